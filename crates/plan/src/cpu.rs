//! Our own CPU engine as a replica the planner can describe: a profile measured on this
//! machine by `souverain bench --profile`, its step-time fit, and the prediction of
//! `scripts/bench/serve-load` (N concurrent streams) through the scheduler simulation.
//!
//! A step of the engine is one batched forward pass. On a CPU its time is, to a good
//! approximation, linear in what the pass computes:
//!
//! ```text
//! t = fixed_s                                   thread wake-ups, norms, per-step work
//!   + per_decode_seq_s · decode sequences       one row of every matrix product + logits
//!   + per_prompt_token_s · prompt tokens        one row of every matrix product
//!   + per_decode_seq_per_1k_context_s
//!       · decode sequences · context / 1000     attention over each sequence's cache
//! ```
//!
//! The coefficients are fitted to the measured steps by non-negative least absolute
//! relative error (the same fitter as the GPU model's), so a few noisy measurements on a
//! shared machine do not pull the fit.
//!
//! ```
//! use souverain_plan::cpu::{CpuPoint, fit};
//! // Steps of 10 ms plus 2 ms per decoding sequence and 1 ms per prompt token.
//! let points: Vec<CpuPoint> = [(1, 0), (8, 0), (32, 0), (0, 64), (0, 256)]
//!     .into_iter()
//!     .map(|(d, p)| CpuPoint {
//!         decode_seqs: d,
//!         prefill_tokens: p,
//!         context: 128,
//!         seconds: 0.010 + 0.002 * d as f64 + 0.001 * p as f64,
//!     })
//!     .collect();
//! let f = fit(&points);
//! assert!((f.per_prompt_token_s - 0.001).abs() < 1e-5);
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::PlanError;
use crate::perf::nnls_robust;
use crate::sim::{self, Limits, Request, SimResult, StepCost};

/// The version of the profile format this crate reads and writes.
pub const PROFILE_FORMAT: u32 = 1;

/// One measured step: what it computed and the median seconds it took.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuPoint {
    /// Sequences decoding one token each.
    pub decode_seqs: usize,
    /// Prompt tokens in the same step (one chunk from position 0).
    pub prefill_tokens: usize,
    /// Positions each decoding sequence had cached before the step.
    pub context: usize,
    /// Median seconds of the step over the repetitions.
    pub seconds: f64,
}

/// The step-time coefficients (see the module documentation), seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuFit {
    /// Fixed cost of a step.
    pub fixed_s: f64,
    /// Per decoding sequence.
    pub per_decode_seq_s: f64,
    /// Per prompt token.
    pub per_prompt_token_s: f64,
    /// Per decoding sequence per 1,000 positions of context.
    pub per_decode_seq_per_1k_context_s: f64,
}

impl CpuFit {
    fn terms(decode_seqs: f64, prefill_tokens: f64, context: f64) -> [f64; 4] {
        [
            1.0,
            decode_seqs,
            prefill_tokens,
            decode_seqs * context / 1000.0,
        ]
    }

    fn coefficients(&self) -> [f64; 4] {
        [
            self.fixed_s,
            self.per_decode_seq_s,
            self.per_prompt_token_s,
            self.per_decode_seq_per_1k_context_s,
        ]
    }

    /// Seconds of a step with `decode_seqs` decoding sequences at `context` positions on
    /// average and `prefill_tokens` prompt tokens.
    pub fn seconds(&self, decode_seqs: f64, prefill_tokens: f64, context: f64) -> f64 {
        Self::terms(decode_seqs, prefill_tokens, context)
            .iter()
            .zip(self.coefficients())
            .map(|(f, c)| f * c)
            .sum()
    }

    /// The median of |predicted − measured| / measured over `points`.
    pub fn median_relative_error(&self, points: &[CpuPoint]) -> f64 {
        let mut e: Vec<f64> = points
            .iter()
            .map(|p| {
                let t = self.seconds(
                    p.decode_seqs as f64,
                    p.prefill_tokens as f64,
                    p.context as f64,
                );
                (t - p.seconds).abs() / p.seconds
            })
            .collect();
        sim::percentile(&mut e, 50.0)
    }
}

impl StepCost for CpuFit {
    fn step_seconds(&self, decode_seqs: usize, prefill_tokens: usize, mean_context: f64) -> f64 {
        self.seconds(decode_seqs as f64, prefill_tokens as f64, mean_context)
            .max(1e-6)
    }
}

/// Fits the coefficients to measured steps (relative errors, non-negative). Points with a
/// non-positive or non-finite time are ignored.
pub fn fit(points: &[CpuPoint]) -> CpuFit {
    let usable: Vec<&CpuPoint> = points
        .iter()
        .filter(|p| p.seconds.is_finite() && p.seconds > 0.0)
        .collect();
    let rows: Vec<Vec<f64>> = usable
        .iter()
        .map(|p| {
            CpuFit::terms(
                p.decode_seqs as f64,
                p.prefill_tokens as f64,
                p.context as f64,
            )
            .iter()
            .map(|f| f / p.seconds)
            .collect()
        })
        .collect();
    let ones = vec![1.0; rows.len()];
    let c = nnls_robust(&rows, &ones);
    let at = |i: usize| c.get(i).copied().unwrap_or(0.0);
    CpuFit {
        fixed_s: at(0),
        per_decode_seq_s: at(1),
        per_prompt_token_s: at(2),
        per_decode_seq_per_1k_context_s: at(3),
    }
}

/// The machine a profile was measured on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuMachine {
    /// The processor's name (`/proc/cpuinfo`'s model name where there is one).
    pub cpu: String,
    /// Logical cores the machine has.
    pub cores: usize,
    /// The SIMD level the kernels chose.
    pub simd: String,
}

/// The model a profile was measured with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuModel {
    /// The model file's name.
    pub file: String,
    /// Layers.
    pub layers: usize,
    /// Hidden width.
    pub width: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Trained context length, tokens.
    pub context_length: usize,
}

/// The scheduler's defaults of `souverain serve` on that machine and model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServeDefaults {
    /// Most tokens per step (`--max-batch-tokens`).
    pub max_batch_tokens: usize,
    /// Most sequences at once (`--max-seqs`).
    pub max_seqs: usize,
    /// KV cache capacity, tokens (`--kv-cache-tokens`' default).
    pub kv_cache_tokens: usize,
    /// Positions per KV block (the prefix cache shares whole blocks).
    pub kv_block_tokens: usize,
}

/// A CPU profile: what `souverain bench --profile` writes and the planner reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuProfile {
    /// [`PROFILE_FORMAT`].
    pub format: u32,
    /// Where it was measured.
    pub machine: CpuMachine,
    /// Threads of the engine's pool.
    pub threads: usize,
    /// The model.
    pub model: CpuModel,
    /// The scheduler's defaults.
    pub serve_defaults: ServeDefaults,
    /// The measured steps.
    pub points: Vec<CpuPoint>,
    /// The step-time fit to `points`.
    pub fit: CpuFit,
    /// The fit's median relative error over `points`.
    pub fit_median_relative_error: f64,
}

impl CpuProfile {
    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a profile; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, PlanError> {
        let p: Self = serde_json::from_str(text).map_err(|e| PlanError::Parse {
            file: file.into(),
            message: e.to_string(),
        })?;
        if p.format != PROFILE_FORMAT {
            return Err(PlanError::field(
                file,
                "format",
                format!(
                    "this planner reads format {PROFILE_FORMAT}, not {}",
                    p.format
                ),
            ));
        }
        let f = p.fit;
        for (name, v) in [
            ("fit.fixed_s", f.fixed_s),
            ("fit.per_decode_seq_s", f.per_decode_seq_s),
            ("fit.per_prompt_token_s", f.per_prompt_token_s),
            (
                "fit.per_decode_seq_per_1k_context_s",
                f.per_decode_seq_per_1k_context_s,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PlanError::field(
                    file,
                    name,
                    format!("must be a finite number ≥ 0, not {v}"),
                ));
            }
        }
        if f.seconds(1.0, 0.0, 0.0) <= 0.0 || f.seconds(0.0, 1.0, 0.0) <= 0.0 {
            return Err(PlanError::field(
                file,
                "fit",
                "a step must take some time: the coefficients are all zero",
            ));
        }
        let d = p.serve_defaults;
        for (name, v) in [
            ("serve_defaults.max_batch_tokens", d.max_batch_tokens),
            ("serve_defaults.max_seqs", d.max_seqs),
            ("serve_defaults.kv_cache_tokens", d.kv_cache_tokens),
            ("serve_defaults.kv_block_tokens", d.kv_block_tokens),
        ] {
            if v == 0 {
                return Err(PlanError::field(file, name, "must be at least 1"));
            }
        }
        for (i, pt) in p.points.iter().enumerate() {
            if !(pt.seconds.is_finite() && pt.seconds > 0.0) {
                return Err(PlanError::field(
                    file,
                    format!("points[{i}].seconds"),
                    format!("must be a finite number > 0, not {}", pt.seconds),
                ));
            }
        }
        Ok(p)
    }
}

/// The request shape of `scripts/bench/serve-load`: every client sends one streaming chat
/// request at the same moment, with its own `--max-seqs` equal to the number of clients.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ServeLoad {
    /// Concurrent clients (and the server's `--max-seqs`).
    pub streams: usize,
    /// Prompt tokens the engine computes per request (after prefix-cache hits).
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    pub max_tokens: usize,
}

/// Predicts one serve-load level from a profile: its requests run through the scheduler
/// simulation with the profile's step times and `serve`'s limits.
pub fn predict_serve_load(profile: &CpuProfile, load: ServeLoad) -> SimResult {
    let requests: Vec<Request> = (0..load.streams.max(1))
        .map(|_| Request {
            arrival_s: 0.0,
            prompt_tokens: load.prompt_tokens.max(1),
            output_tokens: load.max_tokens.max(1),
        })
        .collect();
    let limits = Limits {
        max_seqs: load.streams.max(1),
        max_batch_tokens: profile.serve_defaults.max_batch_tokens,
        kv_tokens: profile.serve_defaults.kv_cache_tokens,
    };
    sim::simulate(&requests, limits, &profile.fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth() -> CpuFit {
        CpuFit {
            fixed_s: 0.012,
            per_decode_seq_s: 0.007,
            per_prompt_token_s: 0.006,
            per_decode_seq_per_1k_context_s: 0.004,
        }
    }

    fn points() -> Vec<CpuPoint> {
        let t = truth();
        let mut v = Vec::new();
        for d in [1, 2, 4, 8, 16, 32, 64] {
            for ctx in [128, 1024] {
                v.push((d, 0, ctx));
            }
        }
        for p in [16, 64, 128, 256, 512] {
            v.push((0, p, 0));
        }
        v.push((16, 128, 128));
        v.into_iter()
            .map(|(d, p, ctx)| CpuPoint {
                decode_seqs: d,
                prefill_tokens: p,
                context: ctx,
                seconds: t.seconds(d as f64, p as f64, ctx as f64),
            })
            .collect()
    }

    fn profile_json(fit: CpuFit) -> String {
        let p = CpuProfile {
            format: PROFILE_FORMAT,
            machine: CpuMachine {
                cpu: "test".into(),
                cores: 2,
                simd: "scalar".into(),
            },
            threads: 2,
            model: CpuModel::default(),
            serve_defaults: ServeDefaults {
                max_batch_tokens: 512,
                max_seqs: 16,
                kv_cache_tokens: 16384,
                kv_block_tokens: 16,
            },
            points: points(),
            fit,
            fit_median_relative_error: 0.0,
        };
        serde_json::to_string(&p).unwrap_or_default()
    }

    #[test]
    fn the_fit_recovers_known_coefficients_despite_an_outlier() {
        let mut pts = points();
        pts[3].seconds *= 3.0; // one step disturbed by another process
        let f = fit(&pts);
        let t = truth();
        for (got, want) in f.coefficients().iter().zip(t.coefficients()) {
            assert!((got - want).abs() < 0.01 * want, "{f:?}");
        }
        assert!(f.median_relative_error(&pts) < 1e-3);
    }

    #[test]
    fn a_profile_round_trips_and_bad_fields_are_named() {
        let text = profile_json(truth());
        let p = CpuProfile::parse(&text, "p.json").expect("valid profile");
        assert_eq!(p.fit, truth());
        let bad = text.replace("\"format\":1", "\"format\":9");
        let e = CpuProfile::parse(&bad, "p.json").expect_err("wrong format");
        assert!(e.to_string().contains("format"), "{e}");
        let negative = profile_json(CpuFit {
            per_prompt_token_s: -1.0,
            ..truth()
        });
        let e = CpuProfile::parse(&negative, "p.json").expect_err("negative coefficient");
        assert!(e.to_string().contains("fit.per_prompt_token_s"), "{e}");
        let e = CpuProfile::parse("{\"format\":1}", "p.json").expect_err("missing fields");
        assert!(e.to_string().starts_with("p.json"), "{e}");
    }

    #[test]
    fn one_stream_is_its_prompt_step_then_one_decode_step_per_token() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let t = truth();
        let one = predict_serve_load(
            &p,
            ServeLoad {
                streams: 1,
                prompt_tokens: 40,
                max_tokens: 10,
            },
        );
        // The prompt's last token costs as a decoding sequence's (it needs logits).
        let prompt_step = t.seconds(1.0, 39.0, 40.0);
        assert!((one.ttft_s[0] - prompt_step).abs() < 1e-12, "{one:?}");
        assert_eq!(one.tokens, 10);
        // Nine decode steps at contexts 41..49 follow.
        let decode: f64 = (41..50).map(|c| t.seconds(1.0, 0.0, f64::from(c))).sum();
        assert!((one.wall_s - prompt_step - decode).abs() < 1e-9, "{one:?}");
    }

    #[test]
    fn more_streams_raise_throughput_and_time_to_first_token() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let at = |streams| {
            predict_serve_load(
                &p,
                ServeLoad {
                    streams,
                    prompt_tokens: 30,
                    max_tokens: 128,
                },
            )
        };
        let (one, many) = (at(1), at(64));
        assert_eq!(many.tokens, 64 * 128);
        assert!(many.tokens_per_s > one.tokens_per_s);
        assert!(many.ttft_s[0] > one.ttft_s[0]);
    }
}
