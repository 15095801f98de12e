//! The search: for each model, every GPU system, parallel degree and batch size is scored
//! by the fitted step model (memory fit, latency against the SLOs, tokens/s, watts); the
//! cheapest shape in watts per unit of demand is then checked by simulating our scheduler
//! at the load it would carry, and the site is sized month by month against its envelope.

use serde::Serialize;

use crate::device::GpuSystem;
use crate::mlenergy;
use crate::perf::{Efficiencies, Replica, StepLoad};
use crate::sim::{self, Limits, Request, Rng, SimResult, StepCost};
use crate::site::{Demand, Site};

/// Tokens per step on a GPU replica (vLLM's chunked-prefill budget is of this order).
pub const GPU_MAX_BATCH_TOKENS: usize = 8192;
/// Share of HBM the weights and KV may take (the rest: activations, CUDA graphs, fragments).
pub const MEMORY_USABLE: f64 = 0.9;
/// Requests simulated per check...
const SIM_REQUESTS: usize = 400;
/// ...fewer where their outputs would be longer than this in all, that is where the mean
/// output is longer than 10,000 tokens (a simulation steps through every token: such
/// demands are simulated with fewer requests, down to `MIN_SIM_REQUESTS`, so that one
/// simulation takes at most seconds whatever the site file says).
const SIM_OUTPUT_TOKENS: f64 = 4e6;
/// Fewest requests simulated per check.
const MIN_SIM_REQUESTS: usize = 32;
/// Longest output one simulated request draws from its length distribution (the tail is
/// cut there: each token is a step). Prompts are not cut: they are simulated a step's
/// budget at a time.
const MAX_SAMPLED_OUTPUT: f64 = (1 << 20) as f64;

/// Requests to simulate for a demand.
fn sim_requests(d: &Demand) -> usize {
    ((SIM_OUTPUT_TOKENS / d.output_tokens.mean) as usize).clamp(MIN_SIM_REQUESTS, SIM_REQUESTS)
}

/// Batch sizes tried: every 8 up to 1,024 (and 1, 2, 4).
fn batch_grid() -> Vec<u32> {
    let mut v = vec![1, 2, 4];
    v.extend((1..=128).map(|i| i * 8));
    v
}

/// Parallel degrees tried on a system: powers of two within a node, and for rack-scale
/// NVLink systems (72 GPUs in one domain) 16, 36 and 72.
fn degrees(system: &GpuSystem) -> Vec<u32> {
    let mut v: Vec<u32> = [1, 2, 4, 8]
        .into_iter()
        .filter(|&d| d <= system.gpus_per_node.max(8))
        .collect();
    if system.gpus_per_rack() >= 72 {
        v.extend([16, 36, 72]);
    }
    v
}

/// One scored configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// GPU system.
    pub system: String,
    /// GPUs per replica (tensor × expert parallel degree).
    pub gpus: u32,
    /// Concurrent sequences.
    pub batch: u32,
    /// Weights per GPU, GB.
    pub weights_gb_per_gpu: f64,
    /// KV cache per GPU at this batch with full-length sequences, GB.
    pub kv_gb_per_gpu: f64,
    /// Whether weights + KV fit.
    pub fits: bool,
    /// Steady-state step, ms.
    pub step_ms: f64,
    /// Estimated inter-token latency at the SLO's percentile, ms.
    pub itl_ms: f64,
    /// Estimated time to first token at the SLO's percentile (no queueing), ms.
    pub ttft_ms: f64,
    /// Whether both estimates meet the SLOs.
    pub meets_slo: bool,
    /// Output tokens/s of the replica.
    pub tokens_per_s: f64,
    /// Watts per GPU.
    pub gpu_watts: f64,
    /// IT watts of the replica (GPUs + its share of the nodes' other parts).
    pub replica_it_watts: f64,
    /// GPU joules per output token.
    pub joules_per_token: f64,
}

/// Why a model has no plan.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Infeasible {
    /// Its weights fit no GPU system offered at any parallel degree.
    FitsNoGpu {
        /// The model's weights, GB.
        weights_gb: f64,
        /// The largest memory of any offered replica shape, GB.
        largest_replica_gb: f64,
    },
    /// It fits, but no batch size meets the SLOs.
    SloUnmet {
        /// The best inter-token latency any fitting shape reaches, ms.
        best_itl_ms: f64,
        /// The best time to first token any fitting shape reaches, ms.
        best_ttft_ms: f64,
    },
}

/// What limits a model's chosen shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// A larger batch would not fit in memory.
    Memory,
    /// A larger batch would break a latency promise.
    Slo,
    /// The largest batch tried.
    BatchGrid,
    /// The site's power envelope (in the growth plan).
    Power,
}

impl Binding {
    /// The constraint as people read it (the summary and the HTML report).
    pub fn name(self) -> &'static str {
        match self {
            Binding::Memory => "memory",
            Binding::Slo => "SLO",
            Binding::BatchGrid => "largest batch tried",
            Binding::Power => "power",
        }
    }
}

/// The plan for one model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelPlan {
    /// The model.
    pub model: String,
    /// Precision.
    pub precision: &'static str,
    /// Demand now, requests/s.
    pub requests_per_s: f64,
    /// Demand now, output tokens/s.
    pub demand_tokens_per_s: f64,
    /// Why there is no plan, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub infeasible: Option<Infeasible>,
    /// The chosen replica shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<Candidate>,
    /// What limits it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<Binding>,
    /// The simulation at the planned load per replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimResult>,
    /// Replicas that carry the demand.
    pub replicas: u64,
    /// With the N+k spares.
    pub replicas_with_headroom: u64,
    /// GPUs in all.
    pub gpus: u64,
    /// IT kW of the replicas with headroom, all running.
    pub it_kw: f64,
    /// The chosen shape's batch sweep (power and J/token against batch size).
    pub batch_curve: Vec<Candidate>,
    /// Simulated latency against load (share of one replica's capacity).
    pub load_curve: Vec<LoadPoint>,
}

/// Latency at one load.
#[derive(Clone, Debug, Serialize)]
pub struct LoadPoint {
    /// Arrival rate per replica, requests/s.
    pub requests_per_s: f64,
    /// Time to first token at the SLO's percentile, ms.
    pub ttft_ms: f64,
    /// Inter-token latency at the SLO's percentile, ms.
    pub itl_ms: f64,
}

/// Site totals.
#[derive(Clone, Debug, Serialize)]
pub struct Totals {
    /// GPUs per system.
    pub gpus_by_system: Vec<(String, u64)>,
    /// GPUs in all.
    pub gpus: u64,
    /// Racks in all.
    pub racks: u64,
    /// IT power, MW.
    pub it_mw: f64,
    /// Facility power (IT × PUE), MW.
    pub facility_mw: f64,
    /// Output tokens/s the planned replicas serve (without spares).
    pub tokens_per_s: f64,
    /// Tokens/s per facility MW.
    pub tokens_per_s_per_mw: f64,
    /// Facility MW available now.
    pub envelope_mw: f64,
    /// Capital cost of the GPUs, when every system has a price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_cost: Option<f64>,
}

/// One month of the growth plan.
#[derive(Clone, Debug, Serialize)]
pub struct Month {
    /// Months from now.
    pub month: u32,
    /// Demand relative to now.
    pub demand_factor: f64,
    /// GPUs the demand needs.
    pub gpus_needed: u64,
    /// Facility MW the demand needs.
    pub facility_mw_needed: f64,
    /// Facility MW available.
    pub envelope_mw: f64,
    /// GPUs to install (the needed ones, or what the envelope allows).
    pub gpus_installed: u64,
    /// Share of the demand served.
    pub served: f64,
    /// The binding constraint, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<Binding>,
}

/// The whole plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Site name.
    pub site: String,
    /// Per model.
    pub models: Vec<ModelPlan>,
    /// Site totals now.
    pub totals: Totals,
    /// Month by month up to the envelope's last point.
    pub growth: Vec<Month>,
    /// Configurations scored.
    pub configurations: usize,
    /// Where the fitted efficiencies come from.
    pub fitted_on: String,
    /// The fitted coefficients.
    pub efficiencies: Efficiencies,
}

/// A GPU replica as a simulation step cost.
struct GpuCost<'a> {
    replica: Replica<'a>,
    eff: &'a crate::perf::Efficiency,
}

impl StepCost for GpuCost<'_> {
    // The GPU model prices a prompt's attention within its per-token prefill term.
    fn step_seconds(&self, decode: usize, prefill: usize, ctx: f64, _: f64) -> f64 {
        self.replica.step_seconds(
            self.eff,
            &StepLoad {
                decode_seqs: decode as f64,
                prefill_tokens: prefill as f64,
                mean_context: ctx,
            },
        )
    }
}

/// A length at percentile `p` of a lognormal of mean `mean` and variation `cv`.
fn length_at(mean: f64, cv: f64, p: f64) -> f64 {
    if cv <= 0.0 {
        return mean;
    }
    let z = match p as u32 {
        50 => 0.0,
        90 => 1.2816,
        _ => 2.3263,
    };
    let s2 = (1.0 + cv * cv).ln();
    (mean.ln() - s2 / 2.0 + s2.sqrt() * z).exp()
}

/// Scores one configuration.
fn score(d: &Demand, system: &GpuSystem, gpus: u32, batch: u32, eff: &Efficiencies) -> Candidate {
    let replica = Replica {
        model: &d.model,
        system,
        precision: d.precision,
        gpus,
    };
    let e = eff.of(system.family);
    let (inp, out) = (d.input_tokens.mean, d.output_tokens.mean);
    let b = f64::from(batch);
    let weights = replica.weight_bytes_per_gpu();
    let kv = b * d.model.kv_bytes(inp + out) / f64::from(gpus);
    let fits = weights + kv <= MEMORY_USABLE * system.memory_gb * 1e9;
    let chunk = (GPU_MAX_BATCH_TOKENS as f64 - b).max(1.0);
    let prefill = (b * inp / out).min(chunk);
    let load = StepLoad {
        decode_seqs: b,
        prefill_tokens: prefill,
        mean_context: inp + out / 2.0,
    };
    let step = replica.step_seconds(e, &load);
    let with_chunk = replica.step_seconds(
        e,
        &StepLoad {
            prefill_tokens: chunk,
            ..load
        },
    );
    let plain = replica.step_seconds(
        e,
        &StepLoad {
            prefill_tokens: 0.0,
            ..load
        },
    );
    // Steps that carry a full chunk are the slow ones: the percentile is theirs when more
    // than its tail of steps carry one.
    let chunked_share = prefill / chunk;
    let itl = if chunked_share > 1.0 - d.slo.itl_percentile / 100.0 {
        with_chunk
    } else {
        plain
    };
    let prompt = length_at(inp, d.input_tokens.cv, d.slo.ttft_percentile);
    let ttft = (prompt / chunk).ceil() * with_chunk;
    let gpu_watts = replica.gpu_watts(e, &load);
    let tokens_per_s = b / step;
    let it = f64::from(gpus) * gpu_watts
        + system.node_overhead_w() * f64::from(gpus) / f64::from(system.gpus_per_node);
    Candidate {
        system: system.name.clone(),
        gpus,
        batch,
        weights_gb_per_gpu: weights / 1e9,
        kv_gb_per_gpu: kv / 1e9,
        fits,
        step_ms: step * 1e3,
        itl_ms: itl * 1e3,
        ttft_ms: ttft * 1e3,
        meets_slo: itl * 1e3 <= d.slo.itl_ms && ttft * 1e3 <= d.slo.ttft_ms,
        tokens_per_s,
        gpu_watts,
        replica_it_watts: it,
        joules_per_token: f64::from(gpus) * gpu_watts / tokens_per_s,
    }
}

/// Poisson arrivals at `rate` with the demand's lengths (fixed seed).
fn requests(d: &Demand, rate: f64, n: usize, seed: u64) -> Vec<Request> {
    let mut rng = Rng::new(seed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += rng.exponential(1.0 / rate);
            Request {
                arrival_s: t,
                prompt_tokens: rng
                    .lognormal(d.input_tokens.mean, d.input_tokens.cv)
                    .round()
                    .max(1.0) as usize,
                output_tokens: rng
                    .lognormal(d.output_tokens.mean, d.output_tokens.cv)
                    .round()
                    .clamp(1.0, MAX_SAMPLED_OUTPUT) as usize,
            }
        })
        .collect()
}

fn pct_index(p: f64) -> usize {
    match p as u32 {
        50 => 0,
        90 => 1,
        _ => 2,
    }
}

/// Simulates a replica of `c` at `rate` requests/s.
fn simulate(
    d: &Demand,
    c: &Candidate,
    system: &GpuSystem,
    rate: f64,
    eff: &Efficiencies,
) -> SimResult {
    let replica = Replica {
        model: &d.model,
        system,
        precision: d.precision,
        gpus: c.gpus,
    };
    let free = (MEMORY_USABLE * system.memory_gb * 1e9 - replica.weight_bytes_per_gpu())
        * f64::from(c.gpus);
    let per_token = d.model.kv_bytes(1.0).max(1.0);
    let limits = Limits {
        max_seqs: c.batch as usize,
        max_batch_tokens: GPU_MAX_BATCH_TOKENS,
        kv_tokens: (free / per_token).max(1.0) as usize,
    };
    let cost = GpuCost {
        replica,
        eff: eff.of(system.family),
    };
    sim::simulate(&requests(d, rate, sim_requests(d), 7), limits, &cost)
}

fn meets(d: &Demand, s: &SimResult) -> bool {
    s.ttft_s[pct_index(d.slo.ttft_percentile)] * 1e3 <= d.slo.ttft_ms
        && s.itl_s[pct_index(d.slo.itl_percentile)] * 1e3 <= d.slo.itl_ms
}

/// Plans one model.
fn plan_model(site: &Site, d: &Demand, eff: &Efficiencies, count: &mut usize) -> ModelPlan {
    let demand_tps = d.requests_per_s * d.output_tokens.mean;
    let mut plan = ModelPlan {
        model: d.model.name.clone(),
        precision: d.precision.name(),
        requests_per_s: d.requests_per_s,
        demand_tokens_per_s: demand_tps,
        infeasible: None,
        replica: None,
        binding: None,
        simulated: None,
        replicas: 0,
        replicas_with_headroom: 0,
        gpus: 0,
        it_kw: 0.0,
        batch_curve: Vec::new(),
        load_curve: Vec::new(),
    };
    let grid = batch_grid();
    // Per (system, degree): the largest batch meeting the SLOs, and why not larger.
    let mut best: Vec<(Candidate, Binding, usize)> = Vec::new();
    let mut any_fit = false;
    let (mut best_itl, mut best_ttft) = (f64::INFINITY, f64::INFINITY);
    let mut largest = 0.0f64;
    for (si, system) in site.systems.iter().enumerate() {
        for gpus in degrees(system) {
            largest = largest.max(system.memory_gb * f64::from(gpus));
            let mut chosen: Option<(Candidate, Binding)> = None;
            for &b in &grid {
                *count += 1;
                let c = score(d, system, gpus, b, eff);
                if !c.fits {
                    if let Some((_, why)) = &mut chosen {
                        *why = Binding::Memory;
                    }
                    break;
                }
                any_fit = true;
                best_itl = best_itl.min(c.itl_ms);
                best_ttft = best_ttft.min(c.ttft_ms);
                if c.meets_slo {
                    chosen = Some((c, Binding::BatchGrid));
                } else if let Some((_, why)) = &mut chosen {
                    *why = Binding::Slo;
                    break;
                }
            }
            if let Some((c, why)) = chosen {
                best.push((c, why, si));
            }
        }
    }
    if !any_fit {
        plan.infeasible = Some(Infeasible::FitsNoGpu {
            weights_gb: d.model.params_b * d.precision.bytes_per_weight(),
            largest_replica_gb: largest * MEMORY_USABLE,
        });
        return plan;
    }
    // Watts per unit of demand, then fewer GPUs.
    best.sort_by(|a, b| {
        let wa = a.0.replica_it_watts / a.0.tokens_per_s;
        let wb = b.0.replica_it_watts / b.0.tokens_per_s;
        wa.total_cmp(&wb).then(a.0.gpus.cmp(&b.0.gpus))
    });
    // The first whose simulation meets the SLOs at its planned load (adding replicas, that
    // is lowering the load on each, up to twice the estimate).
    for (c, why, si) in best.iter().take(4) {
        let system = &site.systems[*si];
        let capacity_rps = c.tokens_per_s / d.output_tokens.mean;
        // Counts saturate (`as` from a float, and the sums): the site file bounds the demand
        // far below where they would.
        let mut replicas = (d.requests_per_s / capacity_rps).ceil().max(1.0) as u64;
        let limit = replicas.saturating_mul(2);
        while replicas <= limit {
            let rate = d.requests_per_s / replicas as f64;
            let s = simulate(d, c, system, rate, eff);
            if meets(d, &s) {
                let total = replicas.saturating_add(u64::from(site.headroom_replicas));
                plan.replicas = replicas;
                plan.replicas_with_headroom = total;
                plan.gpus = total.saturating_mul(u64::from(c.gpus));
                plan.it_kw = total as f64 * c.replica_it_watts / 1e3;
                plan.binding = Some(*why);
                plan.simulated = Some(s);
                plan.batch_curve = grid
                    .iter()
                    .map(|&b| score(d, system, c.gpus, b, eff))
                    .take_while(|x| x.fits)
                    .collect();
                plan.load_curve = (1..=10)
                    .map(|i| {
                        let r = capacity_rps * f64::from(i) / 10.0;
                        let s = simulate(d, c, system, r, eff);
                        LoadPoint {
                            requests_per_s: r,
                            ttft_ms: s.ttft_s[pct_index(d.slo.ttft_percentile)] * 1e3,
                            itl_ms: s.itl_s[pct_index(d.slo.itl_percentile)] * 1e3,
                        }
                    })
                    .collect();
                plan.replica = Some(c.clone());
                return plan;
            }
            match replicas.checked_add((replicas / 10).max(1)) {
                Some(more) => replicas = more,
                None => break,
            }
        }
    }
    plan.infeasible = Some(Infeasible::SloUnmet {
        best_itl_ms: best_itl,
        best_ttft_ms: best_ttft,
    });
    plan
}

/// Scores every configuration of the site (each model × system × parallel degree × batch
/// size, with no early stop) and returns how many met both memory and SLOs, and how many
/// were scored: the exhaustive form of the search, for measuring its speed.
pub fn score_all(site: &Site, eff: &Efficiencies) -> (usize, usize) {
    let grid = batch_grid();
    let (mut ok, mut n) = (0, 0);
    for d in &site.demand {
        for system in &site.systems {
            for gpus in degrees(system) {
                for &b in &grid {
                    let c = score(d, system, gpus, b, eff);
                    n += 1;
                    ok += usize::from(c.fits && c.meets_slo);
                }
            }
        }
    }
    (ok, n)
}

/// Plans a site with efficiencies fitted to every committed measurement.
pub fn plan(site: &Site) -> Plan {
    let data = mlenergy::dataset();
    let eff = data.fit(|_| true);
    plan_with(
        site,
        &eff,
        &format!(
            "{} @ {} ({})",
            data.source.repository, data.source.commit, data.source.file
        ),
    )
}

/// Plans a site with given efficiencies.
pub fn plan_with(site: &Site, eff: &Efficiencies, fitted_on: &str) -> Plan {
    let mut configurations = 0;
    let models: Vec<ModelPlan> = site
        .demand
        .iter()
        .map(|d| plan_model(site, d, eff, &mut configurations))
        .collect();
    let mut by_system: Vec<(String, u64)> = Vec::new();
    for m in &models {
        if let Some(c) = &m.replica {
            match by_system.iter_mut().find(|(s, _)| *s == c.system) {
                Some((_, n)) => *n = n.saturating_add(m.gpus),
                None => by_system.push((c.system.clone(), m.gpus)),
            }
        }
    }
    let racks_for = |by: &[(String, u64)]| -> u64 {
        by.iter()
            .map(|(name, n)| {
                let per = site
                    .systems
                    .iter()
                    .find(|s| &s.name == name)
                    .map_or(1, GpuSystem::gpus_per_rack);
                n.div_ceil(u64::from(per.max(1)))
            })
            .fold(0, u64::saturating_add)
    };
    let gpus = by_system
        .iter()
        .map(|(_, n)| *n)
        .fold(0, u64::saturating_add);
    let it_mw: f64 = models.iter().map(|m| m.it_kw).sum::<f64>() / 1e3;
    let facility_mw = it_mw * site.pue;
    let tokens: f64 = models
        .iter()
        .filter_map(|m| {
            m.replica
                .as_ref()
                .map(|c| c.tokens_per_s * m.replicas as f64)
        })
        .sum();
    let gpu_cost = by_system
        .iter()
        .map(|(name, n)| {
            site.systems
                .iter()
                .find(|s| &s.name == name)
                .and_then(|s| s.price_per_gpu)
                .map(|p| p * *n as f64)
        })
        .sum::<Option<f64>>()
        .filter(|_| !by_system.is_empty());
    let totals = Totals {
        racks: racks_for(&by_system),
        gpus_by_system: by_system,
        gpus,
        it_mw,
        facility_mw,
        tokens_per_s: tokens,
        tokens_per_s_per_mw: if facility_mw > 0.0 {
            tokens / facility_mw
        } else {
            0.0
        },
        envelope_mw: site.envelope_mw(0),
        gpu_cost,
    };
    let last = site.envelope.last().map_or(0, |p| p.month);
    let growth = (0..=last)
        .map(|month| {
            let factor = (1.0 + site.demand_growth_per_month).powi(month as i32);
            let mut gpus_needed: u64 = 0;
            let mut it_w = 0.0;
            for m in &models {
                if let Some(c) = &m.replica {
                    let n = ((m.replicas as f64 * factor).ceil() as u64)
                        .saturating_add(u64::from(site.headroom_replicas));
                    gpus_needed = gpus_needed.saturating_add(n.saturating_mul(u64::from(c.gpus)));
                    it_w += n as f64 * c.replica_it_watts;
                }
            }
            let needed_mw = it_w / 1e6 * site.pue;
            let envelope_mw = site.envelope_mw(month);
            let served = if needed_mw > envelope_mw {
                envelope_mw / needed_mw
            } else {
                1.0
            };
            Month {
                month,
                demand_factor: factor,
                gpus_needed,
                facility_mw_needed: needed_mw,
                envelope_mw,
                gpus_installed: (gpus_needed as f64 * served).floor() as u64,
                served,
                binding: (served < 1.0).then_some(Binding::Power),
            }
        })
        .collect();
    Plan {
        site: site.name.clone(),
        models,
        totals,
        growth,
        configurations,
        fitted_on: fitted_on.to_owned(),
        efficiencies: *eff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(extra: &str) -> Site {
        let text = format!(
            r#"
[site]
name = "t"
pue = 1.2
envelope = [{{ month = 0, facility_mw = 40 }}, {{ month = 6, facility_mw = 100 }}]
demand_growth_per_month = 0.2
[[system]]
name = "H100"
[[system]]
name = "B200"
{extra}
"#
        );
        Site::parse(&text, "t.toml", None).unwrap()
    }

    const SMALL: &str = r#"
[[demand]]
model = "ministral-3-14b"
requests_per_s = 20
input_tokens = { mean = 1000, cv = 1 }
output_tokens = { mean = 300, cv = 1 }
slo = { ttft_ms = 3000, itl_ms = 60 }
"#;

    #[test]
    fn the_longest_lengths_allowed_simulate_a_bounded_number_of_tokens() {
        let d = &site(
            &SMALL
                .replace("{ mean = 1000, cv = 1 }", "{ mean = 1000000, cv = 10 }")
                .replace("{ mean = 300, cv = 1 }", "{ mean = 131072, cv = 10 }"),
        )
        .demand[0];
        let n = sim_requests(d);
        assert_eq!(n, MIN_SIM_REQUESTS);
        let r = requests(d, 1.0, n, 7);
        let longest = r.iter().map(|r| r.output_tokens).max();
        assert_eq!(
            longest,
            Some(1 << 20),
            "a drawn output past 2^20 is cut there"
        );
        // Prompts are not cut.
        assert!(r.iter().any(|r| r.prompt_tokens > 1 << 20));
        // Mean outputs up to 10,000 tokens simulate all the requests.
        let usual = |mean: u32| {
            site(&SMALL.replace("{ mean = 300, cv = 1 }", &format!("{{ mean = {mean} }}"))).demand
                [0]
            .clone()
        };
        assert_eq!(sim_requests(&usual(10_000)), SIM_REQUESTS);
        assert_eq!(sim_requests(&usual(20_000)), SIM_REQUESTS / 2);
    }

    #[test]
    fn the_largest_demands_allowed_plan_with_counts_that_add_up() {
        // Ten million requests a second of the largest model, a thousand spares, demand
        // doubling monthly for ten years: counts far past u32 (they wrapped when they were),
        // every one adding up, and power binding from the start.
        let text = r#"
[site]
name = "t"
pue = 1.2
headroom_replicas = 1000
demand_growth_per_month = 1.0
envelope = [{ month = 0, facility_mw = 40 }, { month = 120, facility_mw = 100 }]
[[system]]
name = "H200"
[[demand]]
model = "mistral-large-3"
requests_per_s = 1e7
input_tokens = { mean = 3000 }
output_tokens = { mean = 600 }
slo = { ttft_ms = 60000, itl_ms = 1000 }
[[demand]]
model = "ministral-3-14b"
requests_per_s = 1e7
input_tokens = { mean = 1000 }
output_tokens = { mean = 300 }
slo = { ttft_ms = 60000, itl_ms = 1000 }
"#;
        let site = Site::parse(text, "t.toml", None).expect("valid");
        let p = plan(&site);
        let mut sum = 0u64;
        for m in &p.models {
            assert!(m.infeasible.is_none(), "{:?}", m.infeasible);
            let c = m.replica.as_ref().expect("a shape");
            assert_eq!(m.replicas_with_headroom, m.replicas + 1000);
            assert_eq!(m.gpus, m.replicas_with_headroom * u64::from(c.gpus));
            sum += m.gpus;
        }
        assert!(sum > 10_000_000, "{sum}");
        assert_eq!(p.totals.gpus, sum);
        let now = &p.growth[0];
        assert_eq!(now.gpus_needed, sum);
        assert_eq!(now.binding, Some(Binding::Power));
        assert!(now.gpus_installed < now.gpus_needed);
        // Needs grow with demand, saturating rather than wrapping.
        for w in p.growth.windows(2) {
            assert!(w[1].gpus_needed >= w[0].gpus_needed, "{:?}", (&w[0], &w[1]));
        }
        assert!(p.growth[10].gpus_needed > u64::from(u32::MAX));
        assert_eq!(p.growth[120].gpus_needed, u64::MAX);
    }

    #[test]
    fn a_small_model_gets_a_shape_that_meets_its_slos_in_simulation() {
        let p = plan(&site(SMALL));
        let m = &p.models[0];
        assert!(m.infeasible.is_none(), "{:?}", m.infeasible);
        let c = m.replica.as_ref().unwrap();
        assert!(c.fits && c.meets_slo);
        let s = m.simulated.as_ref().unwrap();
        assert!(s.itl_s[2] * 1e3 <= 60.0 && s.ttft_s[2] * 1e3 <= 3000.0);
        assert_eq!(m.replicas_with_headroom, m.replicas + 1);
        // The replicas carry the demand.
        assert!(c.tokens_per_s * m.replicas as f64 >= m.demand_tokens_per_s * 0.99);
        assert!(p.totals.facility_mw > p.totals.it_mw);
        assert_eq!(p.growth.len(), 7);
    }

    #[test]
    fn a_model_too_large_for_any_gpu_is_reported_as_such() {
        let mut s = site(SMALL);
        s.demand[0].model.params_b = 1e5;
        s.demand[0].model.active_params_b = 1e5;
        let p = plan(&s);
        assert!(matches!(
            p.models[0].infeasible,
            Some(Infeasible::FitsNoGpu { .. })
        ));
        assert!(p.models[0].replica.is_none());
    }

    #[test]
    fn an_impossible_latency_is_reported_not_planned() {
        let p = plan(&site(&SMALL.replace("itl_ms = 60", "itl_ms = 0.01")));
        assert!(matches!(
            p.models[0].infeasible,
            Some(Infeasible::SloUnmet { .. })
        ));
        assert_eq!(p.totals.gpus, 0);
    }

    #[test]
    fn growth_beyond_the_envelope_is_bound_by_power() {
        let big = SMALL.replace("requests_per_s = 20", "requests_per_s = 600000");
        let p = plan(&site(&big));
        let last = p.growth.last().unwrap();
        assert!(
            last.facility_mw_needed > last.envelope_mw,
            "{last:?} {:?}",
            p.models[0].replica
        );
        assert_eq!(last.binding, Some(Binding::Power));
        assert!(last.served < 1.0);
    }
}
