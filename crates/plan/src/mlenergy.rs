//! ML.ENERGY's v3 chat measurements (`data/mlenergy-v3-lm-arena-chat.json`, extracted by
//! `scripts/plan/extract-mlenergy` from `ml-energy/leaderboard`, commit named in the file):
//! the efficiencies are fitted to them, and leave-one-model-out validation checks that the
//! model predicts a model it has not seen.
//!
//! Each row is vLLM serving one model on H100 or B200 at one `max_num_seqs`, with the
//! measured average batch, output length, GPU power, output tokens/s and J/token. A step's
//! time is the average batch over the output tokens/s (every step gives each running
//! sequence one token; prompt work is spread over the same steps).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::device::{Family, GpuSystem, Precision, catalogue};
use crate::model::{ModelShape, preset};
use crate::perf::{Efficiencies, Efficiency, Replica, Sample, StepLoad, fit};

/// Prompt tokens per LM Arena request. ML.ENERGY publishes output lengths but not input
/// lengths; LM Arena conversations are mostly short single turns, and this is an assumed
/// mean (the fitted coefficients absorb a misestimate of it as a scale on the prompt's work).
pub const LM_ARENA_PROMPT_TOKENS: f64 = 200.0;

/// One measured configuration.
#[derive(Clone, Debug, Deserialize)]
#[allow(missing_docs)]
pub struct Row {
    pub model_id: String,
    pub gpu: String,
    pub num_gpus: u32,
    pub tensor_parallel: u32,
    pub expert_parallel: u32,
    pub data_parallel: u32,
    pub precision: String,
    pub max_num_seqs: u32,
    pub avg_batch_size: f64,
    pub avg_output_len: f64,
    pub avg_power_watts: f64,
    pub output_tokens_per_s: f64,
    pub energy_per_token_j: f64,
    pub median_itl_ms: f64,
}

/// Where the data came from.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct Source {
    pub repository: String,
    pub commit: String,
    pub file: String,
}

#[derive(Deserialize)]
struct DataFile {
    source: Source,
    rows: Vec<Row>,
}

/// The committed measurements with the models' shapes and the GPUs' specifications.
pub struct Dataset {
    /// Where they came from.
    pub source: Source,
    /// Rows whose model and GPU are known: (row, shape, system).
    pub rows: Vec<(Row, ModelShape, GpuSystem)>,
}

impl Row {
    /// The model, with the `-FP8` suffix of a quantised checkpoint removed (both are the
    /// same model for leave-one-model-out).
    pub fn base_model(&self) -> &str {
        self.model_id.strip_suffix("-FP8").unwrap_or(&self.model_id)
    }

    fn precision(&self) -> Precision {
        match self.precision.as_str() {
            "fp8" => Precision::Fp8,
            "mxfp4" | "nvfp4" => Precision::Fp4,
            _ => Precision::Bf16,
        }
    }

    /// The step load the row ran at.
    pub fn load(&self) -> StepLoad {
        StepLoad {
            decode_seqs: self.avg_batch_size,
            prefill_tokens: self.avg_batch_size * LM_ARENA_PROMPT_TOKENS
                / self.avg_output_len.max(1.0),
            mean_context: LM_ARENA_PROMPT_TOKENS + self.avg_output_len / 2.0,
        }
    }
}

/// Loads the committed data file.
pub fn dataset() -> Dataset {
    // The file is part of the crate and checked by the tests; an error is a build defect.
    let file: DataFile = serde_json::from_str(include_str!(
        "../data/mlenergy-v3-lm-arena-chat.json"
    ))
    .unwrap_or(DataFile {
        source: Source {
            repository: String::new(),
            commit: String::new(),
            file: String::new(),
        },
        rows: Vec::new(),
    });
    let systems = catalogue();
    let rows = file
        .rows
        .into_iter()
        .filter_map(|r| {
            let shape = preset(&r.model_id)?;
            let system = systems.iter().find(|s| s.name == r.gpu)?.clone();
            Some((r, shape, system))
        })
        .collect();
    Dataset {
        source: file.source,
        rows,
    }
}

/// A prediction for one row.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// Output tokens/s of the replica.
    pub tokens_per_s: f64,
    /// Joules per output token (all the replica's GPUs).
    pub joules_per_token: f64,
}

impl Dataset {
    fn samples<'a>(&'a self, keep: impl Fn(&Row) -> bool) -> Vec<(Family, Sample<'a>)> {
        self.rows
            .iter()
            .filter(|(r, _, _)| keep(r))
            .map(|(r, shape, system)| {
                (
                    system.family,
                    Sample {
                        replica: self.replica(r, shape, system),
                        load: r.load(),
                        step_seconds: r.avg_batch_size / r.output_tokens_per_s,
                        gpu_watts: r.avg_power_watts / f64::from(r.num_gpus),
                    },
                )
            })
            .collect()
    }

    fn replica<'a>(&self, r: &Row, shape: &'a ModelShape, system: &'a GpuSystem) -> Replica<'a> {
        Replica {
            model: shape,
            system,
            precision: r.precision(),
            gpus: r.num_gpus,
        }
    }

    /// Fits both families on the rows `keep` accepts.
    pub fn fit(&self, keep: impl Fn(&Row) -> bool) -> Efficiencies {
        let samples = self.samples(keep);
        let of = |f: Family| {
            let s: Vec<Sample<'_>> = samples
                .iter()
                .filter(|(fam, _)| *fam == f)
                .map(|(_, s)| *s)
                .collect();
            fit(&s)
        };
        Efficiencies {
            hopper: of(Family::Hopper),
            blackwell: of(Family::Blackwell),
        }
    }

    /// The prediction for row `i` under `eff`.
    pub fn predict(&self, i: usize, eff: &Efficiency) -> Option<Prediction> {
        let (r, shape, system) = self.rows.get(i)?;
        let replica = self.replica(r, shape, system);
        let load = r.load();
        let t = replica.step_seconds(eff, &load);
        let tokens_per_s = r.avg_batch_size / t;
        let watts = replica.gpu_watts(eff, &load) * f64::from(r.num_gpus);
        Some(Prediction {
            tokens_per_s,
            joules_per_token: watts / tokens_per_s,
        })
    }

    /// Leave-one-model-out: for each model, fit without its rows and predict them.
    pub fn leave_one_model_out(&self) -> Validation {
        let models: Vec<String> = {
            let mut m: Vec<String> = self
                .rows
                .iter()
                .map(|(r, _, _)| r.base_model().to_owned())
                .collect();
            m.sort();
            m.dedup();
            m
        };
        let mut per_model = BTreeMap::new();
        let mut all_tps = Vec::new();
        let mut all_j = Vec::new();
        for model in &models {
            let eff = self.fit(|r| r.base_model() != model);
            let mut tps = Vec::new();
            let mut j = Vec::new();
            let mut bias = Vec::new();
            for (i, (r, _, system)) in self.rows.iter().enumerate() {
                if r.base_model() != model {
                    continue;
                }
                let Some(p) = self.predict(i, eff.of(system.family)) else {
                    continue;
                };
                tps.push(rel_err(p.tokens_per_s, r.output_tokens_per_s));
                bias.push(p.tokens_per_s / r.output_tokens_per_s - 1.0);
                j.push(rel_err(p.joules_per_token, r.energy_per_token_j));
            }
            all_tps.extend(&tps);
            all_j.extend(&j);
            per_model.insert(
                model.clone(),
                ModelError {
                    rows: tps.len(),
                    tokens_per_s_median_err: median(&tps),
                    tokens_per_s_median_bias: median(&bias),
                    joules_per_token_median_err: median(&j),
                },
            );
        }
        Validation {
            rows: all_tps.len(),
            tokens_per_s_median_err: median(&all_tps),
            joules_per_token_median_err: median(&all_j),
            per_model,
        }
    }
}

/// |predicted − measured| / measured.
fn rel_err(predicted: f64, measured: f64) -> f64 {
    ((predicted - measured) / measured).abs()
}

/// The median (0 for none).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Errors of one held-out model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelError {
    /// Its rows.
    pub rows: usize,
    /// Median relative error of output tokens/s.
    pub tokens_per_s_median_err: f64,
    /// Median signed relative error of output tokens/s (positive: predicted too fast).
    pub tokens_per_s_median_bias: f64,
    /// Median relative error of J/token.
    pub joules_per_token_median_err: f64,
}

/// The result of leave-one-model-out validation.
#[derive(Clone, Debug, Serialize)]
pub struct Validation {
    /// Rows predicted.
    pub rows: usize,
    /// Median relative error of output tokens/s over all rows.
    pub tokens_per_s_median_err: f64,
    /// Median relative error of J/token over all rows.
    pub joules_per_token_median_err: f64,
    /// Per held-out model.
    pub per_model: BTreeMap<String, ModelError>,
}

impl Validation {
    /// The table as Markdown.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| held-out model | rows | tokens/s median abs err | tokens/s median bias | J/token median abs err |\n|---|---|---|---|---|\n",
        );
        for (m, e) in &self.per_model {
            out += &format!(
                "| {m} | {} | {:.1}% | {:+.1}% | {:.1}% |\n",
                e.rows,
                100.0 * e.tokens_per_s_median_err,
                100.0 * e.tokens_per_s_median_bias,
                100.0 * e.joules_per_token_median_err
            );
        }
        out += &format!(
            "| **all** | {} | **{:.1}%** | | **{:.1}%** |\n",
            self.rows,
            100.0 * self.tokens_per_s_median_err,
            100.0 * self.joules_per_token_median_err
        );
        out
    }
}
