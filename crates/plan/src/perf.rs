//! The performance and power model of one replica, and its fit to measurements.
//!
//! One step of continuous batching (one decode token for each running sequence plus prompt
//! chunks) costs, on each of the replica's GPUs:
//!
//! ```text
//! t = c0                                   fixed cost of a step (launches, scheduling)
//!   + c1 · weight bytes read / bandwidth   the dense weights + the experts any token chose
//!   + c2 · KV bytes read / bandwidth       every decoding sequence's cache
//!   + c3 · FLOPs / peak                    2 per active parameter per token + attention
//!   + c4 · sequences                       per-sequence work (sampling, bookkeeping)
//!   + c5 · layers, when split over GPUs    the all-reduces' latency (tensor/expert parallel)
//!   + c6 · GB all-reduced, when split      their volume: 2 per layer of tokens × width
//! ```
//!
//! The bytes and FLOPs come from the model's shape and the device's datasheet; the
//! coefficients `c` (inverse efficiencies, or seconds) are fitted to measurements by
//! non-negative least absolute relative error, per GPU family. A GPU's power is a
//! fraction of its board power, `p0 + p1 · (memory-bound share of the step) + p2 ·
//! (compute-bound share) + p3 · (communication share)`, fitted to the same measurements.

use serde::Serialize;

use crate::device::{Family, GpuSystem, Precision};
use crate::model::ModelShape;

/// Number of step-time terms.
pub const TIME_TERMS: usize = 7;
/// Number of power terms.
pub const POWER_TERMS: usize = 5;

/// A model deployed as one replica.
#[derive(Clone, Copy, Debug)]
pub struct Replica<'a> {
    /// The model.
    pub model: &'a ModelShape,
    /// The GPU system.
    pub system: &'a GpuSystem,
    /// Weight precision.
    pub precision: Precision,
    /// GPUs the replica spans (tensor × expert parallel degree).
    pub gpus: u32,
}

/// What one step computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLoad {
    /// Sequences decoding one token each.
    pub decode_seqs: f64,
    /// Prompt tokens processed in the same step.
    pub prefill_tokens: f64,
    /// Mean positions each decoding sequence attends over.
    pub mean_context: f64,
}

/// Fitted coefficients for one GPU family.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Efficiency {
    /// Step-time coefficients `c0..c5` (see the module documentation).
    pub time: [f64; TIME_TERMS],
    /// Power coefficients `p0..p3`, fractions of board power.
    pub power: [f64; POWER_TERMS],
}

impl Replica<'_> {
    /// Weight bytes held by each GPU.
    pub fn weight_bytes_per_gpu(&self) -> f64 {
        self.model.params_b * 1e9 * self.precision.bytes_per_weight() / f64::from(self.gpus)
    }

    /// The raw step-time terms (seconds, or counts for `c0`, `c4`, `c5`).
    pub fn terms(&self, load: &StepLoad) -> [f64; TIME_TERMS] {
        let n = f64::from(self.gpus);
        let tokens = load.decode_seqs + load.prefill_tokens;
        let bw = self.system.bandwidth();
        let weights = self.model.params_read_b(tokens) * 1e9 * self.precision.bytes_per_weight();
        let kv = load.decode_seqs
            * (self.model.kv_bytes(load.mean_context) + 2.0 * self.model.recurrent_state_bytes);
        let flops = load.decode_seqs * self.model.flops_per_token(load.mean_context)
            + load.prefill_tokens * self.model.flops_per_token(load.mean_context / 2.0);
        let (comm, volume_gb) = if self.gpus > 1 {
            let layers = f64::from(self.model.layers);
            let share = (n - 1.0) / n;
            (
                layers,
                2.0 * layers * tokens * f64::from(self.model.hidden) * 2.0 * share / 1e9,
            )
        } else {
            (0.0, 0.0)
        };
        [
            1.0,
            weights / n / bw,
            kv / n / bw,
            flops / n / self.system.flops(self.precision),
            load.decode_seqs.max(1.0),
            comm,
            volume_gb,
        ]
    }

    /// Seconds one step takes.
    pub fn step_seconds(&self, eff: &Efficiency, load: &StepLoad) -> f64 {
        dot(&eff.time, &self.terms(load)).max(1e-6)
    }

    /// Power terms `[1, memory share, compute share, communication share]` of a step.
    fn power_terms(&self, eff: &Efficiency, load: &StepLoad) -> [f64; POWER_TERMS] {
        let f = self.terms(load);
        let t = dot(&eff.time, &f).max(1e-9);
        [
            1.0,
            (eff.time[1] * f[1] + eff.time[2] * f[2]) / t,
            eff.time[3] * f[3] / t,
            (eff.time[5] * f[5] + eff.time[6] * f[6]) / t,
            load.decode_seqs.max(1.0).ln() / 8.0,
        ]
    }

    /// Watts drawn by each GPU during such steps (at most its board power).
    pub fn gpu_watts(&self, eff: &Efficiency, load: &StepLoad) -> f64 {
        let frac = dot(&eff.power, &self.power_terms(eff, load)).clamp(0.05, 1.0);
        frac * self.system.board_power_w
    }
}

fn dot<const N: usize>(a: &[f64; N], b: &[f64; N]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Fitted efficiencies for every family.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Efficiencies {
    /// Hopper (H100, H200).
    pub hopper: Efficiency,
    /// Blackwell (B200, GB200, GB300).
    pub blackwell: Efficiency,
}

impl Efficiencies {
    /// The coefficients of `family`.
    pub fn of(&self, family: Family) -> &Efficiency {
        match family {
            Family::Hopper => &self.hopper,
            Family::Blackwell => &self.blackwell,
        }
    }
}

/// Least absolute deviations over `x ≥ 0`, by iteratively reweighted least squares: each
/// round weighs a row by the inverse of its last residual, so a few noisy measurements do not
/// pull the fit the way squares let them (the planner is judged on median errors).
pub(crate) fn nnls_robust(rows: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let mut w = vec![1.0; b.len()];
    let mut x = nnls_weighted(rows, b, &w);
    for _ in 0..8 {
        for ((wi, row), &y) in w.iter_mut().zip(rows).zip(b) {
            let p: f64 = row.iter().zip(&x).map(|(a, c)| a * c).sum();
            *wi = 1.0 / (p - y).abs().max(0.01);
        }
        x = nnls_weighted(rows, b, &w);
    }
    x
}

/// Weighted non-negative least squares on a small problem: minimises `Σ w (A x − b)²` over
/// `x ≥ 0` by solving the normal equations on every subset of columns and keeping the best
/// feasible solution (2^k solves of at most k×k; k ≤ 7 here).
fn nnls_weighted(rows: &[Vec<f64>], b: &[f64], weights: &[f64]) -> Vec<f64> {
    let k = rows.first().map_or(0, Vec::len);
    let mut best = (f64::INFINITY, vec![0.0; k]);
    for mask in 1u32..(1 << k) {
        let cols: Vec<usize> = (0..k).filter(|&c| mask & (1 << c) != 0).collect();
        let m = cols.len();
        let mut ata = vec![vec![0.0; m]; m];
        let mut atb = vec![0.0; m];
        for ((row, &y), &w) in rows.iter().zip(b).zip(weights) {
            for (i, &ci) in cols.iter().enumerate() {
                atb[i] += w * row[ci] * y;
                for (j, &cj) in cols.iter().enumerate() {
                    ata[i][j] += w * row[ci] * row[cj];
                }
            }
        }
        let Some(sol) = solve(ata, atb) else {
            continue;
        };
        if sol.iter().any(|&v| v < 0.0 || !v.is_finite()) {
            continue;
        }
        let mut x = vec![0.0; k];
        for (&c, &v) in cols.iter().zip(&sol) {
            x[c] = v;
        }
        let err: f64 = rows
            .iter()
            .zip(b)
            .zip(weights)
            .map(|((row, &y), &w)| {
                let p: f64 = row.iter().zip(&x).map(|(a, c)| a * c).sum();
                w * (p - y) * (p - y)
            })
            .sum();
        if err < best.0 {
            best = (err, x);
        }
    }
    best.1
}

/// Gaussian elimination with partial pivoting; `None` when singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        let scale = a.iter().map(|r| r[col].abs()).fold(0.0, f64::max);
        if a[pivot][col].abs() <= 1e-12 * scale.max(1e-300) {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for r in col + 1..n {
            let f = a[r][col] / a[col][col];
            let (top, bottom) = a.split_at_mut(r);
            for (x, y) in bottom[0][col..].iter_mut().zip(&top[col][col..]) {
                *x -= f * y;
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    Some(x)
}

/// One measurement to fit: a replica under a load, its measured step time and GPU power.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The replica measured.
    pub replica: Replica<'a>,
    /// Its load.
    pub load: StepLoad,
    /// Measured seconds per step.
    pub step_seconds: f64,
    /// Measured watts per GPU.
    pub gpu_watts: f64,
}

/// Fits one family's coefficients to its samples (relative errors, non-negative).
pub fn fit(samples: &[Sample<'_>]) -> Efficiency {
    let rows: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| {
            s.replica
                .terms(&s.load)
                .iter()
                .map(|f| f / s.step_seconds)
                .collect()
        })
        .collect();
    let ones = vec![1.0; rows.len()];
    let t = nnls_robust(&rows, &ones);
    let mut time = [0.0; TIME_TERMS];
    time.copy_from_slice(&t);
    let provisional = Efficiency {
        time,
        power: [0.0; POWER_TERMS],
    };
    let rows: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| {
            let frac = s.gpu_watts / s.replica.system.board_power_w;
            s.replica
                .power_terms(&provisional, &s.load)
                .iter()
                .map(|f| f / frac)
                .collect()
        })
        .collect();
    let p = nnls_robust(&rows, &ones);
    let mut power = [0.0; POWER_TERMS];
    power.copy_from_slice(&p);
    Efficiency { time, power }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnls_recovers_known_non_negative_coefficients() {
        let truth = [2.0, 0.0, 0.5];
        let rows: Vec<Vec<f64>> = (0..20)
            .map(|i| vec![1.0, f64::from(i), f64::from(i * i % 7)])
            .collect();
        let b: Vec<f64> = rows
            .iter()
            .map(|r| r.iter().zip(&truth).map(|(a, c)| a * c).sum())
            .collect();
        let x = nnls_weighted(&rows, &b, &vec![1.0; b.len()]);
        for (got, want) in x.iter().zip(truth) {
            assert!((got - want).abs() < 1e-9, "{x:?}");
        }
    }

    #[test]
    fn nnls_never_returns_a_negative_coefficient() {
        // The unconstrained optimum has a negative second coefficient.
        let rows = vec![vec![1.0, 1.0], vec![1.0, 2.0], vec![1.0, 3.0]];
        let b = vec![3.0, 2.0, 1.0];
        let x = nnls_weighted(&rows, &b, &vec![1.0; b.len()]);
        assert!(x.iter().all(|&v| v >= 0.0), "{x:?}");
        assert!((x[0] - 2.0).abs() < 1e-9 && x[1] == 0.0, "{x:?}");
    }
}
