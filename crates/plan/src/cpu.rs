//! Our own CPU engine as a replica the planner can describe: a profile measured on this
//! machine by `souverain bench --profile`, its step-time fit, and the prediction of
//! `scripts/bench/serve-load` (N concurrent streams) through the scheduler simulation.
//!
//! A step of the engine is one batched forward pass. On a CPU its time is, to a good
//! approximation, a roofline: the matrix products stream every weight once per step however
//! few rows they have (a floor), and past a few rows they are bound by arithmetic, which
//! grows with the rows; attention grows with the positions each row reads:
//!
//! ```text
//! t = fixed_s                                   thread wake-ups, norms, per-step work
//!   + max(weights_floor_s,                      streaming the weights once
//!         per_decode_seq_s · decode sequences   one row of every matrix product + logits
//!       + per_decode_seq_beyond_32_s
//!           · max(0, decode sequences − 32)     a second slope for large batches
//!       + per_prompt_token_s · prompt tokens)   one row of every matrix product
//!   + per_decode_seq_per_1k_context_s
//!       · decode sequences · context / 1000     attention over each sequence's cache
//!   + per_prompt_token_per_1k_context_s
//!       · Σ positions prompt tokens attend / 1000   attention within and before the chunk
//! ```
//!
//! except a step of one row (one sequence decoding, a one-token prompt, or a prompt's last
//! token alone, and nothing else): the engine computes it with its one-token kernels, a path
//! of its own, and the profile measures it apart, as serving at one stream runs it (again
//! and again, step after step), and fits these two terms to it by least squares:
//!
//! ```text
//! t = one_row_s + one_row_per_1k_context_s · context / 1000
//! ```
//!
//! (On some machines the one-row step's time depends on what ran just before it: on a
//! 2-core Xeon VM it took 6.6-6.8 ms right after a 512-token prompt or a 64-sequence step and
//! 8.4 ms after 100 ms idle, and fell to 4.7-5.0 ms over the next 15-20 one-row steps, while
//! a step of four rows did not move. A one-row step timed after other steps, as the others are, under-predicted
//! one stream's tokens/s by 35%.)
//!
//! "Decode sequences" are the rows that need logits: the decoding sequences and, in a step
//! where a prompt ends, that prompt's last token (the simulation and the fit count it the
//! same way); "prompt tokens" are the other prompt rows. The profile measures single
//! prompts of 16 to 512 tokens and steps of many short prompts together, as a server's
//! clients send them.
//!
//! The prediction of a serve-load run takes a decode step (no prompt tokens) as the fit's
//! time scaled by the measured decode steps' residual at that batch size and context
//! ([`CpuProfile::decode_residual`]): the profile measures the batch sizes serving decodes
//! at, and the fit, a line through all of them, misses some by a few percent.
//!
//! A request also spends time in the server outside the forward passes (HTTP, the chat
//! template, tokenising, the engine's queue); the profile carries it as one delay,
//! `request_overhead_s`, measured through the real server, and a predicted request reaches
//! the engine that long after it was sent.
//!
//! (Measured here, a decoding sequence costs more in a batch of 64 than in one of 16: the
//! activations of a large batch outgrow the caches. The second slope, 0 where it does not,
//! keeps the fit of small batches from setting the cost of large ones.)
//!
//! The coefficients are fitted to the measured steps by non-negative least absolute
//! relative error (the same fitter as the GPU model's), so a few noisy measurements on a
//! shared machine do not pull the fit; the floor by a search over its value, each point
//! taken as bound by the floor or by arithmetic as the fit so far says.
//!
//! ```
//! use souverain_plan::cpu::{CpuPoint, fit};
//! // Steps of 2 ms, a 6 ms floor, 1 ms per decoding sequence and per prompt token.
//! let points: Vec<CpuPoint> = [(1, 0), (2, 0), (8, 0), (32, 0), (0, 64), (0, 256), (16, 16)]
//!     .into_iter()
//!     .map(|(d, p)| CpuPoint {
//!         decode_seqs: d,
//!         prefill_tokens: p,
//!         prompt_chunks: 1,
//!         context: 0,
//!         seconds: 0.002 + f64::max(0.006, 0.001 * (d + p) as f64),
//!     })
//!     .collect();
//! let f = fit(&points);
//! assert!((f.per_prompt_token_s - 0.001).abs() < 1e-5, "{f:?}");
//! assert!((f.weights_floor_s - 0.006).abs() < 2e-4, "{f:?}");
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::PlanError;
use crate::perf::nnls_robust;
use crate::sim::{self, Limits, Request, SimResult, StepCost};

/// The version of the profile format this crate reads and writes (4: a prompt's last token
/// is costed as a logits row, as the simulation costs it, and points may hold several
/// prompts; 5: the one-row step has terms of its own, measured back to back).
pub const PROFILE_FORMAT: u32 = 5;

/// One measured step: what it computed and the median seconds it took.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuPoint {
    /// Sequences decoding one token each.
    pub decode_seqs: usize,
    /// Prompt tokens in the same step, split evenly among `prompt_chunks` prompts.
    pub prefill_tokens: usize,
    /// Prompts in the step, each a whole prompt from position 0 whose last token needs
    /// logits (a step of a server whose clients send short prompts together holds many).
    #[serde(default = "one")]
    pub prompt_chunks: usize,
    /// Positions each decoding sequence had cached before the step.
    pub context: usize,
    /// Median seconds of the step over the repetitions.
    pub seconds: f64,
}

fn one() -> usize {
    1
}

/// The step-time coefficients (see the module documentation), seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuFit {
    /// Fixed cost of a step.
    pub fixed_s: f64,
    /// The matrix products' floor: every weight streamed once.
    pub weights_floor_s: f64,
    /// Per decoding sequence.
    pub per_decode_seq_s: f64,
    /// Per decoding sequence beyond [`BATCH_KNEE`], on top of `per_decode_seq_s`.
    pub per_decode_seq_beyond_32_s: f64,
    /// Per prompt token.
    pub per_prompt_token_s: f64,
    /// Per decoding sequence per 1,000 positions of context.
    pub per_decode_seq_per_1k_context_s: f64,
    /// Per 1,000 positions attended by prompt tokens.
    pub per_prompt_token_per_1k_context_s: f64,
    /// A step of one row at no context (the one-token kernels); 0 when the profile has no
    /// one-row steps, and then such a step takes the terms above.
    pub one_row_s: f64,
    /// The one-row step's growth per 1,000 positions of context.
    pub one_row_per_1k_context_s: f64,
}

/// Decoding sequences past which the second slope applies.
pub const BATCH_KNEE: f64 = 32.0;

/// What a step computes, as the fit's terms see it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuStep {
    /// Sequences decoding one token (rows that need logits).
    pub decode_seqs: f64,
    /// Prompt tokens (rows without logits).
    pub prefill_tokens: f64,
    /// Mean positions cached per decoding sequence.
    pub context: f64,
    /// Positions the prompt tokens attend, summed, in thousands.
    pub prompt_attention_k: f64,
}

impl CpuStep {
    fn of(p: &CpuPoint) -> Self {
        Self::with_prompts(
            p.decode_seqs as f64,
            p.context as f64,
            p.prefill_tokens as f64,
            p.prompt_chunks as f64,
        )
    }

    /// `decode_seqs` sequences decoding at `context` positions and `prefill_tokens` prompt
    /// tokens in `prompts` whole prompts of equal length from position 0, costed as the
    /// simulation costs them: each prompt's last token is a logits row at the prompt's
    /// length (the output head, a draw), its other tokens prompt rows attending the prompt's
    /// earlier tokens.
    fn with_prompts(decode_seqs: f64, context: f64, prefill_tokens: f64, prompts: f64) -> Self {
        let prompts = if prefill_tokens > 0.0 {
            prompts.clamp(1.0, prefill_tokens)
        } else {
            0.0
        };
        let each = if prompts > 0.0 {
            prefill_tokens / prompts
        } else {
            0.0
        };
        let rows = decode_seqs + prompts;
        Self {
            decode_seqs: rows,
            prefill_tokens: prefill_tokens - prompts,
            context: if rows > 0.0 {
                (decode_seqs * context + prompts * each) / rows
            } else {
                0.0
            },
            prompt_attention_k: prompts * sim::prompt_attention_k(0.0, (each - 1.0).max(0.0)),
        }
    }

    /// Whether the step is one row and nothing else (the engine's one-token path).
    fn is_one_row(&self) -> bool {
        self.decode_seqs == 1.0 && self.prefill_tokens == 0.0 && self.prompt_attention_k == 0.0
    }

    /// Decoding sequences past [`BATCH_KNEE`].
    fn beyond_knee(&self) -> f64 {
        (self.decode_seqs - BATCH_KNEE).max(0.0)
    }

    /// The arithmetic-bound terms (fixed, decode, prompt, decode attention, prompt attention,
    /// decode beyond the knee) or, when bound by the floor, those without the rows'
    /// arithmetic.
    fn terms(&self, floor_bound: bool) -> [f64; 6] {
        let rows = if floor_bound { 0.0 } else { 1.0 };
        [
            1.0,
            rows * self.decode_seqs,
            rows * self.prefill_tokens,
            self.decode_seqs * self.context / 1000.0,
            self.prompt_attention_k,
            rows * self.beyond_knee(),
        ]
    }
}

impl CpuFit {
    fn from_linear(c: &[f64], weights_floor_s: f64) -> Self {
        let at = |i: usize| c.get(i).copied().unwrap_or(0.0);
        Self {
            fixed_s: at(0),
            weights_floor_s,
            per_decode_seq_s: at(1),
            per_prompt_token_s: at(2),
            per_decode_seq_per_1k_context_s: at(3),
            per_prompt_token_per_1k_context_s: at(4),
            per_decode_seq_beyond_32_s: at(5),
            one_row_s: 0.0,
            one_row_per_1k_context_s: 0.0,
        }
    }

    /// The matrix products' arithmetic for `step`, seconds.
    fn rows_s(&self, step: &CpuStep) -> f64 {
        self.per_decode_seq_s * step.decode_seqs
            + self.per_decode_seq_beyond_32_s * step.beyond_knee()
            + self.per_prompt_token_s * step.prefill_tokens
    }

    /// Seconds of a step.
    pub fn step(&self, step: &CpuStep) -> f64 {
        if self.one_row_s > 0.0 && step.is_one_row() {
            return self.one_row_s + self.one_row_per_1k_context_s * step.context / 1000.0;
        }
        self.fixed_s
            + self.weights_floor_s.max(self.rows_s(step))
            + self.per_decode_seq_per_1k_context_s * step.decode_seqs * step.context / 1000.0
            + self.per_prompt_token_per_1k_context_s * step.prompt_attention_k
    }

    /// Seconds of a step with `decode_seqs` decoding sequences at `context` positions on
    /// average and `prefill_tokens` prompt tokens in one whole prompt from position 0 (its
    /// last token a logits row, as the simulation costs it).
    pub fn seconds(&self, decode_seqs: f64, prefill_tokens: f64, context: f64) -> f64 {
        self.step(&CpuStep::with_prompts(
            decode_seqs,
            context,
            prefill_tokens,
            1.0,
        ))
    }

    /// The median of |predicted − measured| / measured over `points`.
    pub fn median_relative_error(&self, points: &[CpuPoint]) -> f64 {
        let mut e: Vec<f64> = points
            .iter()
            .map(|p| (self.step(&CpuStep::of(p)) - p.seconds).abs() / p.seconds)
            .collect();
        sim::percentile(&mut e, 50.0)
    }

    /// One line for people: the coefficients in milliseconds.
    pub fn describe(&self) -> String {
        let one_row = if self.one_row_s > 0.0 {
            format!(
                "; one row: {:.3} ms + {:.4} ms/1k context",
                self.one_row_s * 1e3,
                self.one_row_per_1k_context_s * 1e3
            )
        } else {
            String::new()
        };
        format!(
            "step = {:.3} ms + max({:.3} ms, {:.3} ms/decode seq (+{:.3} ms/decode seq beyond {BATCH_KNEE}) + \
             {:.3} ms/prompt token) + {:.4} ms/decode seq/1k context + {:.4} ms/1k prompt \
             positions attended{one_row}",
            self.fixed_s * 1e3,
            self.weights_floor_s * 1e3,
            self.per_decode_seq_s * 1e3,
            self.per_decode_seq_beyond_32_s * 1e3,
            self.per_prompt_token_s * 1e3,
            self.per_decode_seq_per_1k_context_s * 1e3,
            self.per_prompt_token_per_1k_context_s * 1e3
        )
    }
}

impl StepCost for CpuFit {
    fn step_seconds(
        &self,
        decode_seqs: usize,
        prefill_tokens: usize,
        mean_context: f64,
        prompt_attention_k: f64,
    ) -> f64 {
        self.step(&CpuStep {
            decode_seqs: decode_seqs as f64,
            prefill_tokens: prefill_tokens as f64,
            context: mean_context,
            prompt_attention_k,
        })
        .max(1e-6)
    }
}

/// Values of the floor the fit tries, as fractions of the shortest step.
const FLOOR_GRID: usize = 64;

/// Fits the coefficients to measured steps (relative errors, non-negative). Points with a
/// non-positive or non-finite time are ignored.
///
/// For each floor on a grid up to the shortest step, the linear coefficients are fitted with
/// every point taken as bound by arithmetic, then again with the points whose arithmetic the
/// fit puts under the floor taken as bound by it, until no point changes side; the floor
/// whose fit has the least mean relative error wins (a floor of 0 is the plain linear fit),
/// refined on a finer grid around it.
///
/// The one-row steps are fitted apart (see the module documentation): a line through their
/// times against context (least squares, not falling with context), or, where they are all
/// at one context, the other steps' attention slope through their mean.
pub fn fit(points: &[CpuPoint]) -> CpuFit {
    let (one_row, usable): (Vec<&CpuPoint>, Vec<&CpuPoint>) = points
        .iter()
        .filter(|p| p.seconds.is_finite() && p.seconds > 0.0)
        .partition(|p| CpuStep::of(p).is_one_row());
    let mut f = fit_rows(&usable);
    (f.one_row_s, f.one_row_per_1k_context_s) =
        fit_one_row(&one_row, f.per_decode_seq_per_1k_context_s);
    f
}

/// The one-row terms (seconds at no context, per 1,000 positions) through `points`, each a
/// one-row step; `slope` when their contexts are all the same; (0, 0) when there are none.
fn fit_one_row(points: &[&CpuPoint], slope: f64) -> (f64, f64) {
    if points.is_empty() {
        return (0.0, 0.0);
    }
    let n = points.len() as f64;
    let x: Vec<f64> = points.iter().map(|p| p.context as f64 / 1000.0).collect();
    let y: Vec<f64> = points.iter().map(|p| p.seconds).collect();
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let var: f64 = x.iter().map(|x| (x - mx).powi(2)).sum();
    let slope = if var > 0.0 {
        let cov: f64 = x.iter().zip(&y).map(|(x, y)| (x - mx) * (y - my)).sum();
        (cov / var).max(0.0)
    } else {
        slope
    };
    let at_zero = my - slope * mx;
    if at_zero > 0.0 {
        (at_zero, slope)
    } else {
        (my, 0.0)
    }
}

/// The linear terms and the floor, fitted to `usable` (steps of several rows).
fn fit_rows(usable: &[&CpuPoint]) -> CpuFit {
    let Some(shortest) = usable.iter().map(|p| p.seconds).min_by(f64::total_cmp) else {
        return CpuFit::default();
    };
    let steps: Vec<CpuStep> = usable.iter().map(|p| CpuStep::of(p)).collect();
    // The fit for one floor, and its mean relative error.
    let fit_with = |floor: f64| -> (f64, CpuFit) {
        let mut bound = vec![false; usable.len()];
        let mut f = CpuFit::default();
        for _ in 0..8 {
            // Relative errors: each row and target divided by its measured time.
            let scaled: Vec<Vec<f64>> = steps
                .iter()
                .zip(&bound)
                .zip(usable)
                .map(|((s, &b), p)| s.terms(b).iter().map(|v| v / p.seconds).collect())
                .collect();
            let ratios: Vec<f64> = usable
                .iter()
                .zip(&bound)
                .map(|(p, &b)| {
                    if b {
                        (p.seconds - floor) / p.seconds
                    } else {
                        1.0
                    }
                })
                .collect();
            f = CpuFit::from_linear(&nnls_robust(&scaled, &ratios), floor);
            let next: Vec<bool> = steps.iter().map(|s| f.rows_s(s) < floor).collect();
            if next == bound {
                break;
            }
            bound = next;
        }
        let err = usable
            .iter()
            .zip(&steps)
            .map(|(p, s)| (f.step(s) - p.seconds).abs() / p.seconds)
            .sum::<f64>()
            / usable.len() as f64;
        (err, f)
    };
    // A coarse grid of floors up to the shortest step, then a finer one around the best.
    let step = shortest / FLOOR_GRID as f64;
    let coarse = (0..FLOOR_GRID).map(|g| step * g as f64);
    let Some(mut best) = coarse.map(fit_with).min_by(|a, b| a.0.total_cmp(&b.0)) else {
        return CpuFit::default();
    };
    let centre = best.1.weights_floor_s;
    for g in 1..16 {
        let floor = centre - step + 2.0 * step * f64::from(g) / 16.0;
        if floor >= 0.0 {
            let cand = fit_with(floor);
            if cand.0 < best.0 {
                best = cand;
            }
        }
    }
    best.1
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
    /// Seconds a request spends in the server outside the forward passes (HTTP, the chat
    /// template, tokenising, the engine's queue, the first chunk's way back): measured
    /// through the real HTTP path, each lone streaming request's time to its first token
    /// less the step its prompt takes by [`CpuProfile::fit`]; the median, kept within
    /// `0..=`[`MAX_REQUEST_OVERHEAD_S`] (a fit that overestimates small prompt steps can
    /// make it negative).
    pub request_overhead_s: f64,
}

/// Largest profile file read.
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;
/// Most measured steps a profile may hold (`souverain bench --profile` writes a few dozen).
pub const MAX_PROFILE_POINTS: usize = 4096;

/// Most seconds a profile's request overhead may be.
pub const MAX_REQUEST_OVERHEAD_S: f64 = 10.0;

impl CpuProfile {
    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = crate::site::read_bounded(path, MAX_PROFILE_BYTES)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a profile; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, PlanError> {
        let parse_error = |e: serde_json::Error| PlanError::Parse {
            file: file.into(),
            message: e.to_string(),
        };
        // The format first: an older profile lacks fields this one needs, and should be told
        // so rather than which field is missing.
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let Format { format } = serde_json::from_str(text).map_err(parse_error)?;
        if format != PROFILE_FORMAT {
            return Err(PlanError::field(
                file,
                "format",
                format!(
                    "this planner reads format {PROFILE_FORMAT}, not {format} (measure the \
                     profile again with this version's `souverain bench --profile`)"
                ),
            ));
        }
        let p: Self = serde_json::from_str(text).map_err(parse_error)?;
        let f = p.fit;
        for (name, v) in [
            ("fit.fixed_s", f.fixed_s),
            ("fit.weights_floor_s", f.weights_floor_s),
            ("fit.per_decode_seq_s", f.per_decode_seq_s),
            (
                "fit.per_decode_seq_beyond_32_s",
                f.per_decode_seq_beyond_32_s,
            ),
            ("fit.per_prompt_token_s", f.per_prompt_token_s),
            (
                "fit.per_decode_seq_per_1k_context_s",
                f.per_decode_seq_per_1k_context_s,
            ),
            (
                "fit.per_prompt_token_per_1k_context_s",
                f.per_prompt_token_per_1k_context_s,
            ),
            ("fit.one_row_s", f.one_row_s),
            ("fit.one_row_per_1k_context_s", f.one_row_per_1k_context_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PlanError::field(
                    file,
                    name,
                    format!("must be a finite number ≥ 0, not {v}"),
                ));
            }
        }
        if f.one_row_s == 0.0 && f.one_row_per_1k_context_s != 0.0 {
            return Err(PlanError::field(
                file,
                "fit.one_row_per_1k_context_s",
                "without `one_row_s` the one-row step takes the other terms: must be 0",
            ));
        }
        let o = p.request_overhead_s;
        if !(o.is_finite() && (0.0..=MAX_REQUEST_OVERHEAD_S).contains(&o)) {
            return Err(PlanError::field(
                file,
                "request_overhead_s",
                format!("must be seconds in 0..={MAX_REQUEST_OVERHEAD_S}, not {o}"),
            ));
        }
        if f.seconds(1.0, 0.0, 0.0) <= 0.0 || f.seconds(0.0, 2.0, 0.0) <= 0.0 {
            return Err(PlanError::field(
                file,
                "fit",
                "a step must take some time: the coefficients of one row or of a two-token \
                 prompt are all zero",
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
        if p.points.len() > MAX_PROFILE_POINTS {
            return Err(PlanError::field(
                file,
                "points",
                format!("at most {MAX_PROFILE_POINTS} steps, not {}", p.points.len()),
            ));
        }
        for (i, pt) in p.points.iter().enumerate() {
            if pt.prefill_tokens > 0 && !(1..=pt.prefill_tokens).contains(&pt.prompt_chunks) {
                return Err(PlanError::field(
                    file,
                    format!("points[{i}].prompt_chunks"),
                    format!(
                        "must be 1 to the point's {} prompt tokens, not {}",
                        pt.prefill_tokens, pt.prompt_chunks
                    ),
                ));
            }
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
/// request at (nearly) the same moment, with `serve --max-seqs` equal to the number of
/// clients. Check one with [`ServeLoad::check`] before predicting it: an unchecked load
/// may ask for more than memory holds or a simulation of unbounded length.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeLoad {
    /// Concurrent clients (and the server's `--max-seqs`).
    pub streams: usize,
    /// Prompt tokens the engine computes per request (after prefix-cache hits), where
    /// `requests` does not say.
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    pub max_tokens: usize,
    /// Each request as it reached the server: one per stream, or none for all at once with
    /// `prompt_tokens` each. Clients started together still arrive one after another (a
    /// load generator sends them in turn), a step that starts before the last has arrived
    /// runs without it, and prompts differ in what the prefix cache spares them.
    #[serde(default)]
    pub requests: Vec<Arrival>,
    /// CPU seconds that other work on the machine spends per generated token while the load
    /// runs (a load generator's clients reading their streams, the server's HTTP threads
    /// writing them), 0 where none shares the engine's cores. The engine's threads fill the
    /// cores, so that work delays the step it lands in by its CPU time (a preempted thread
    /// holds up the others at the next join): each step costs that much more per token it
    /// emits.
    #[serde(default)]
    pub other_cpu_per_token_s: f64,
    /// CPU seconds that other work spends taking each request in (a load generator sending
    /// it, the server's HTTP, chat template and tokeniser), 0 where none shares the engine's
    /// cores. Clients that send together put all of it on the steps their burst overlaps:
    /// each request makes the step it arrives during that much longer.
    #[serde(default)]
    pub other_cpu_per_request_s: f64,
}

/// One request of a [`ServeLoad`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arrival {
    /// Seconds after the first request.
    pub arrival_s: f64,
    /// Prompt tokens the engine computes for it.
    pub prompt_tokens: usize,
    /// The earlier request (its index in the list) whose prompt computes this one's next
    /// uncached KV block, if any: the engine admits this one only once that block is cached
    /// (it then shares it, which `prompt_tokens` already leaves out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waits_for: Option<usize>,
}

/// Most concurrent streams a load may have (serve-load starts a client thread for each).
pub const MAX_STREAMS: usize = 65_536;

/// Most tokens a load may have in all, prompts and outputs (streams × tokens per request):
/// what the simulation steps through (a token or a step's budget at a time), a few seconds
/// of it at most.
pub const MAX_LOAD_TOKENS: usize = 1 << 22;

/// Most seconds an arrival may be after the first.
pub const MAX_ARRIVAL_S: f64 = 3600.0;

/// Most CPU seconds of other work per generated token or per request
/// ([`ServeLoad::other_cpu_per_token_s`], [`ServeLoad::other_cpu_per_request_s`]).
pub const MAX_OTHER_CPU_S: f64 = 1.0;

/// Whether `s` is a valid figure of other work's CPU: finite seconds in
/// `0..=MAX_OTHER_CPU_S`.
pub fn other_cpu_ok(s: f64) -> bool {
    s.is_finite() && (0.0..=MAX_OTHER_CPU_S).contains(&s)
}

impl ServeLoad {
    /// Checks the load: 1 to [`MAX_STREAMS`] streams generating 1 or more tokens each, at
    /// most [`MAX_LOAD_TOKENS`] prompt and generated tokens in all; every request's prompt and output within
    /// `kv_cache_tokens` (the engine refuses a prompt larger than its KV cache, and a
    /// sequence cannot outgrow it); the requests one per stream (or none), each arriving at
    /// finite seconds in `0..=MAX_ARRIVAL_S`. `field` names the requests in errors.
    pub fn check(&self, file: &str, field: &str, kv_cache_tokens: usize) -> Result<(), PlanError> {
        if !(1..=MAX_STREAMS).contains(&self.streams) {
            return Err(PlanError::field(
                file,
                "streams",
                format!("must be 1 to {MAX_STREAMS}, not {}", self.streams),
            ));
        }
        // Outputs first: a generation that alone overflows the KV cache or the bound is
        // `max_tokens`' fault whatever the prompts.
        if self.max_tokens == 0
            || self.max_tokens >= kv_cache_tokens
            || self.max_tokens.saturating_mul(self.streams) > MAX_LOAD_TOKENS
        {
            return Err(PlanError::field(
                file,
                "max_tokens",
                format!(
                    "must be at least 1, less than the KV cache's {kv_cache_tokens} tokens \
                     (a prompt needs one), and at most {MAX_LOAD_TOKENS} tokens in all over \
                     the {} streams, not {}",
                    self.streams, self.max_tokens
                ),
            ));
        }
        let fits = |prompt: usize| {
            prompt >= 1 && prompt.saturating_add(self.max_tokens) <= kv_cache_tokens
        };
        let too_long = |prompt: usize| {
            format!(
                "must be at least 1, and with the {} tokens generated fit the KV cache's \
                 {kv_cache_tokens} tokens, not {prompt}",
                self.max_tokens
            )
        };
        if self.requests.is_empty() {
            if !fits(self.prompt_tokens) {
                return Err(PlanError::field(
                    file,
                    "prompt_tokens",
                    too_long(self.prompt_tokens),
                ));
            }
            // The prompts are simulated too, a step's budget of them at a time: the bound
            // is on both, and the larger of the two is named.
            let each = self.prompt_tokens.saturating_add(self.max_tokens);
            let all = each.saturating_mul(self.streams);
            if all > MAX_LOAD_TOKENS {
                let (name, v) = if self.prompt_tokens > self.max_tokens {
                    ("prompt_tokens", self.prompt_tokens)
                } else {
                    ("max_tokens", self.max_tokens)
                };
                return Err(PlanError::field(
                    file,
                    name,
                    format!(
                        "{} streams × ({} prompt + {} generated tokens) = {all} tokens: at \
                         most {MAX_LOAD_TOKENS} in all (not {v})",
                        self.streams, self.prompt_tokens, self.max_tokens
                    ),
                ));
            }
        }
        for (name, v) in [
            ("other_cpu_per_token_s", self.other_cpu_per_token_s),
            ("other_cpu_per_request_s", self.other_cpu_per_request_s),
        ] {
            if !other_cpu_ok(v) {
                return Err(PlanError::field(
                    file,
                    name,
                    format!("must be seconds in 0..={MAX_OTHER_CPU_S}, not {v}"),
                ));
            }
        }
        if !self.requests.is_empty() && self.requests.len() != self.streams {
            return Err(PlanError::field(
                file,
                field,
                format!(
                    "{} requests for {} streams: give one per stream",
                    self.requests.len(),
                    self.streams
                ),
            ));
        }
        for (i, r) in self.requests.iter().enumerate() {
            if !(r.arrival_s.is_finite() && (0.0..=MAX_ARRIVAL_S).contains(&r.arrival_s)) {
                return Err(PlanError::field(
                    file,
                    format!("{field}[{i}].arrival_s"),
                    format!(
                        "must be seconds in 0..={MAX_ARRIVAL_S}, not {}",
                        r.arrival_s
                    ),
                ));
            }
            if let Some(j) = r.waits_for
                && !(j < i && self.requests[j].arrival_s <= r.arrival_s)
            {
                return Err(PlanError::field(
                    file,
                    format!("{field}[{i}].waits_for"),
                    format!(
                        "must be the index of an earlier request that arrived no later, not {j}"
                    ),
                ));
            }
            if !fits(r.prompt_tokens) {
                return Err(PlanError::field(
                    file,
                    format!("{field}[{i}].prompt_tokens"),
                    too_long(r.prompt_tokens),
                ));
            }
        }
        let all = self
            .requests
            .iter()
            .map(|r| r.prompt_tokens.saturating_add(self.max_tokens))
            .fold(0, usize::saturating_add);
        if all > MAX_LOAD_TOKENS {
            return Err(PlanError::field(
                file,
                field,
                format!(
                    "{all} tokens in all (prompts and {} generated each): at most \
                     {MAX_LOAD_TOKENS}",
                    self.max_tokens
                ),
            ));
        }
        Ok(())
    }
}

impl CpuProfile {
    /// How far the measured decode steps are from the fit (measured / fitted) for
    /// `decode_seqs` sequences at `context`: interpolated linearly between the measured
    /// contexts of a batch size (the nearest one's beyond them), then between the measured
    /// batch sizes either side (the nearest one's beyond them); 1 where the profile measured
    /// no decode step. A step's time is not linear in its rows (the kernels take tokens in
    /// groups; a batch of four cost 2-8% more than the fit through all batch sizes said on a
    /// 2-core Xeon), and serving decodes at the batch sizes the profile measures. Points at
    /// the same batch size and context count as their mean; a point more than twice or less
    /// than half its fitted time (a fit that is not the points', as in an edited file) is
    /// not used.
    pub fn decode_residual(&self, decode_seqs: usize, context: f64) -> f64 {
        self.decode_residuals().at(decode_seqs, context)
    }

    /// The table [`CpuProfile::decode_residual`] reads, built once for many steps.
    fn decode_residuals(&self) -> DecodeResiduals {
        // (context, sum of measured / fitted, points) of one batch size.
        type Sums = Vec<(f64, f64, f64)>;
        let mut by_rows: Vec<(usize, Sums)> = Vec::new();
        for p in &self.points {
            if p.prefill_tokens != 0 || p.decode_seqs == 0 {
                continue;
            }
            let fitted = self.fit.step(&CpuStep::of(p));
            let ratio = p.seconds / fitted;
            if !(fitted > 0.0 && ratio.is_finite() && (0.5..=2.0).contains(&ratio)) {
                continue;
            }
            let context = p.context as f64;
            let row = match by_rows.iter_mut().find(|(r, _)| *r == p.decode_seqs) {
                Some((_, v)) => v,
                None => {
                    by_rows.push((p.decode_seqs, Vec::new()));
                    let last = by_rows.len() - 1;
                    &mut by_rows[last].1
                }
            };
            match row.iter_mut().find(|(c, _, _)| *c == context) {
                Some((_, sum, n)) => {
                    *sum += ratio;
                    *n += 1.0;
                }
                None => row.push((context, ratio, 1.0)),
            }
        }
        by_rows.sort_by_key(|(r, _)| *r);
        let by_rows: Vec<(usize, Vec<(f64, f64)>)> = by_rows
            .into_iter()
            .map(|(r, mut v)| {
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                (r, v.into_iter().map(|(c, sum, n)| (c, sum / n)).collect())
            })
            .collect();
        DecodeResiduals { by_rows }
    }
}

/// Measured / fitted decode steps: per measured batch size (ascending), (context, ratio)
/// pairs (ascending, one per context).
struct DecodeResiduals {
    by_rows: Vec<(usize, Vec<(f64, f64)>)>,
}

impl DecodeResiduals {
    /// The residual at `decode_seqs` sequences and `context` ([`CpuProfile::decode_residual`]).
    /// Called for every simulated decode step: only the batch sizes either side of
    /// `decode_seqs` (or the nearest one beyond them) are read, and nothing is allocated.
    fn at(&self, decode_seqs: usize, context: f64) -> f64 {
        let above = self.by_rows.partition_point(|(r, _)| *r < decode_seqs);
        let around = &self.by_rows[above.saturating_sub(1)..(above + 1).min(self.by_rows.len())];
        let mut rows = [(0.0, 0.0); 2];
        for (row, (r, v)) in rows.iter_mut().zip(around) {
            *row = (*r as f64, interpolate(v, context));
        }
        interpolate(&rows[..around.len()], decode_seqs as f64)
    }
}

/// `points` (ascending x, each (x, y)) interpolated linearly at `x`, the nearest end's `y`
/// beyond them; 1 when there are none.
fn interpolate(points: &[(f64, f64)], x: f64) -> f64 {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return 1.0;
    };
    if x <= first.0 {
        return first.1;
    }
    if x >= last.0 {
        return last.1;
    }
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x <= x1 {
            return if x1 > x0 {
                y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            } else {
                y1
            };
        }
    }
    last.1
}

/// A profile's step times as serving runs them: a decode step (no prompt tokens) is the
/// fit's corrected by the measured decode steps' residual ([`CpuProfile::decode_residual`]),
/// and with other work on the same cores each step is longer by that work's CPU time per
/// token it emits ([`ServeLoad::other_cpu_per_token_s`]).
struct Contended<'a> {
    fit: &'a CpuFit,
    residuals: DecodeResiduals,
    per_token_s: f64,
}

impl StepCost for Contended<'_> {
    fn step_seconds(
        &self,
        logit_rows: usize,
        prefill_tokens: usize,
        mean_context: f64,
        prompt_attention_k: f64,
    ) -> f64 {
        let fitted =
            self.fit
                .step_seconds(logit_rows, prefill_tokens, mean_context, prompt_attention_k);
        let residual = if prefill_tokens == 0 && prompt_attention_k == 0.0 {
            self.residuals.at(logit_rows, mean_context)
        } else {
            1.0
        };
        fitted * residual + logit_rows as f64 * self.per_token_s
    }
}

/// Predicts one serve-load level from a profile: its requests run through the scheduler
/// simulation with the profile's step times and `serve`'s limits. Each reaches the engine
/// the profile's request overhead after it was sent (the server's work outside the forward
/// passes, taken as one delay), so its time to first token and the run's wall time, both
/// counted from the sending, include it.
pub fn predict_serve_load(profile: &CpuProfile, load: &ServeLoad) -> SimResult {
    let overhead = profile.request_overhead_s.max(0.0);
    let given: Vec<(Request, Option<usize>)> = (0..load.streams.max(1))
        .map(|i| {
            let r = load.requests.get(i);
            let request = Request {
                arrival_s: r.map_or(0.0, |r| r.arrival_s.max(0.0)),
                prompt_tokens: r.map_or(load.prompt_tokens, |r| r.prompt_tokens).max(1),
                output_tokens: load.max_tokens.max(1),
            };
            (request, r.and_then(|r| r.waits_for))
        })
        .collect();
    // In arrival order (stable: ties keep the list's order), with each wait re-pointed at
    // where its request went.
    let mut order: Vec<usize> = (0..given.len()).collect();
    order.sort_by(|&a, &b| given[a].0.arrival_s.total_cmp(&given[b].0.arrival_s));
    let mut at = vec![0; given.len()];
    for (k, &i) in order.iter().enumerate() {
        at[i] = k;
    }
    let requests: Vec<Request> = order.iter().map(|&i| given[i].0).collect();
    let waits_for: Vec<Option<usize>> = order
        .iter()
        .map(|&i| given[i].1.and_then(|j| at.get(j).copied()))
        .collect();
    let limits = Limits {
        max_seqs: load.streams.max(1),
        max_batch_tokens: profile.serve_defaults.max_batch_tokens,
        kv_tokens: profile.serve_defaults.kv_cache_tokens,
    };
    // A figure out of range (which `ServeLoad::check` refuses) counts as none.
    let valid = |s: f64| if other_cpu_ok(s) { s } else { 0.0 };
    let cost = Contended {
        fit: &profile.fit,
        residuals: profile.decode_residuals(),
        per_token_s: valid(load.other_cpu_per_token_s),
    };
    let per_request = valid(load.other_cpu_per_request_s);
    let mut r = sim::simulate_arrivals_costed(&requests, &waits_for, limits, &cost, per_request);
    for t in &mut r.ttft_s {
        *t += overhead;
    }
    r.wall_s += overhead;
    r.tokens_per_s = r.tokens as f64 / r.wall_s;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth() -> CpuFit {
        CpuFit {
            fixed_s: 0.012,
            weights_floor_s: 0.02,
            per_decode_seq_s: 0.007,
            per_decode_seq_beyond_32_s: 0.001,
            per_prompt_token_s: 0.006,
            per_decode_seq_per_1k_context_s: 0.004,
            per_prompt_token_per_1k_context_s: 0.003,
            one_row_s: 0.025,
            one_row_per_1k_context_s: 0.005,
        }
    }

    fn coefficients(f: &CpuFit) -> [f64; 9] {
        [
            f.fixed_s,
            f.weights_floor_s,
            f.per_decode_seq_s,
            f.per_decode_seq_beyond_32_s,
            f.per_prompt_token_s,
            f.per_decode_seq_per_1k_context_s,
            f.per_prompt_token_per_1k_context_s,
            f.one_row_s,
            f.one_row_per_1k_context_s,
        ]
    }

    fn points() -> Vec<CpuPoint> {
        let t = truth();
        let mut v = Vec::new();
        for d in [1, 2, 4, 8, 16, 32, 48, 64] {
            for ctx in [128, 1024] {
                v.push((d, 0, ctx, 0));
            }
        }
        for p in [16, 64, 128, 256, 512] {
            v.push((0, p, 0, 1));
        }
        v.push((16, 128, 128, 1));
        v.push((4, 384, 128, 1));
        // Many short prompts in one step, as a server's clients send them.
        v.push((0, 256, 0, 16));
        v.push((0, 128, 0, 8));
        v.into_iter()
            .map(|(d, p, ctx, chunks)| {
                let point = CpuPoint {
                    decode_seqs: d,
                    prefill_tokens: p,
                    prompt_chunks: chunks,
                    context: ctx,
                    seconds: 0.0,
                };
                CpuPoint {
                    seconds: t.step(&CpuStep::of(&point)),
                    ..point
                }
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
            request_overhead_s: 0.004,
        };
        serde_json::to_string(&p).unwrap_or_default()
    }

    #[test]
    fn the_fit_recovers_known_coefficients_despite_an_outlier() {
        let mut pts = points();
        pts[3].seconds *= 3.0; // one step disturbed by another process
        let f = fit(&pts);
        let t = truth();
        for (got, want) in coefficients(&f).iter().zip(coefficients(&t)) {
            assert!((got - want).abs() < 0.02 * want, "{f:?}");
        }
        assert!(f.median_relative_error(&pts) < 1e-3);
    }

    #[test]
    fn small_steps_cost_the_floor_and_large_ones_their_rows() {
        let t = truth();
        // One row (a decoding sequence or a one-token prompt): the one-token path's terms.
        assert!((t.seconds(1.0, 0.0, 0.0) - 0.025).abs() < 1e-12);
        assert!((t.seconds(1.0, 0.0, 400.0) - 0.027).abs() < 1e-12);
        // (A one-token prompt's row is at the prompt's length, one position.)
        assert_eq!(t.seconds(0.0, 1.0, 0.0), t.seconds(1.0, 0.0, 1.0));
        // Two rows: below the floor, the linear terms' fixed cost and the floor.
        assert!((t.seconds(2.0, 0.0, 0.0) - 0.032).abs() < 1e-12);
        // Sixty-four: the rows' arithmetic, with the second slope past 32.
        assert!((t.seconds(64.0, 0.0, 0.0) - (0.012 + 64.0 * 0.007 + 32.0 * 0.001)).abs() < 1e-12);
        // A prompt's attention grows with the square of its length (its last token is a
        // logits row at the prompt's length).
        let attention = |n: f64| {
            t.seconds(0.0, n, 0.0) - 0.012 - 0.007 - (n - 1.0) * 0.006 - 0.004 * n / 1000.0
        };
        assert!((attention(512.0) / attention(256.0) - 511.0 / 255.0 * 2.0).abs() < 1e-9);
        // Sixteen prompts of 16 tokens: sixteen logits rows, 240 prompt rows, and each
        // prompt's attention within itself only.
        let many = CpuStep::of(&CpuPoint {
            decode_seqs: 0,
            prefill_tokens: 256,
            prompt_chunks: 16,
            context: 0,
            seconds: 1.0,
        });
        assert_eq!(
            (many.decode_seqs, many.prefill_tokens, many.context),
            (16.0, 240.0, 16.0)
        );
        assert!((many.prompt_attention_k - 16.0 * 15.0 * 16.0 / 2000.0).abs() < 1e-12);
    }

    #[test]
    fn one_row_steps_are_fitted_apart_or_take_the_linear_terms() {
        let t = truth();
        let pts = points();
        // Without one-row points the fit leaves the one-row terms at 0, and a one-row step
        // costs what the linear terms say.
        let several: Vec<CpuPoint> = pts
            .iter()
            .filter(|p| !CpuStep::of(p).is_one_row())
            .copied()
            .collect();
        assert!(several.len() < pts.len());
        let f = fit(&several);
        assert_eq!((f.one_row_s, f.one_row_per_1k_context_s), (0.0, 0.0));
        let linear = CpuFit {
            one_row_s: 0.0,
            ..t
        };
        let want = linear.seconds(1.0, 0.0, 128.0);
        assert!(
            (f.seconds(1.0, 0.0, 128.0) - want).abs() < 0.02 * want,
            "{f:?}"
        );
        // One-row points at one context: the attention slope of the other steps through
        // their mean.
        let mut one = several.clone();
        one.push(CpuPoint {
            decode_seqs: 1,
            prefill_tokens: 0,
            prompt_chunks: 1,
            context: 500,
            seconds: 0.03,
        });
        let f = fit(&one);
        let slope = f.per_decode_seq_per_1k_context_s;
        assert!(
            (slope - t.per_decode_seq_per_1k_context_s).abs() < 1e-4,
            "{f:?}"
        );
        assert!((f.one_row_s - (0.03 - 0.5 * slope)).abs() < 1e-12, "{f:?}");
        assert!((f.seconds(1.0, 0.0, 500.0) - 0.03).abs() < 1e-12);
        // Times falling with context: no slope, their mean.
        one.push(CpuPoint {
            context: 1500,
            seconds: 0.02,
            ..one[one.len() - 1]
        });
        let f = fit(&one);
        assert_eq!((f.one_row_s, f.one_row_per_1k_context_s), (0.025, 0.0));
        // A negative one-row term, and a slope without the one-row term (it would be
        // ignored), are refused by name.
        for (one_row_s, one_row_per_1k_context_s) in [(0.025, -0.001), (0.0, 0.005)] {
            let bad = profile_json(CpuFit {
                one_row_s,
                one_row_per_1k_context_s,
                ..t
            });
            let e = CpuProfile::parse(&bad, "p.json").expect_err("bad one-row terms");
            assert!(
                e.to_string().contains("fit.one_row_per_1k_context_s"),
                "{e}"
            );
        }
        let none = profile_json(CpuFit {
            one_row_s: 0.0,
            one_row_per_1k_context_s: 0.0,
            ..t
        });
        assert!(CpuProfile::parse(&none, "p.json").is_ok());
    }

    #[test]
    fn decode_steps_carry_the_measured_residual_between_measured_batch_sizes() {
        let mut p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        // Points made from the fit: no residual anywhere.
        assert!((p.decode_residual(4, 300.0) - 1.0).abs() < 1e-12);
        // The measured 4-sequence steps 10% above the fit at 128 positions and 20% at 1024,
        // the 8-sequence ones on it.
        for pt in &mut p.points {
            if pt.decode_seqs == 4 && pt.prefill_tokens == 0 {
                pt.seconds *= if pt.context == 128 { 1.1 } else { 1.2 };
            }
        }
        let r = |d, c| p.decode_residual(d, c);
        assert!((r(4, 128.0) - 1.1).abs() < 1e-12);
        assert!((r(4, 1024.0) - 1.2).abs() < 1e-12);
        // Between contexts, linear; beyond them, the nearest.
        assert!((r(4, 576.0) - 1.15).abs() < 1e-12);
        assert!((r(4, 16.0) - 1.1).abs() < 1e-12);
        assert!((r(4, 4000.0) - 1.2).abs() < 1e-12);
        // Between batch sizes, linear (6 is halfway from 4 to 8); beyond them, the nearest.
        assert!((r(6, 128.0) - 1.05).abs() < 1e-12);
        assert!((r(128, 128.0) - 1.0).abs() < 1e-12);
        // Serving four streams: every decode step 10% longer at 128 positions, so fewer
        // tokens a second than the fit alone says.
        let load = ServeLoad {
            streams: 4,
            prompt_tokens: 100,
            max_tokens: 40,
            requests: Vec::new(),
            other_cpu_per_token_s: 0.0,
            other_cpu_per_request_s: 0.0,
        };
        let plain = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let (fit, measured) = (
            predict_serve_load(&plain, &load),
            predict_serve_load(&p, &load),
        );
        let ratio = (measured.wall_s - measured.ttft_s[0]) / (fit.wall_s - fit.ttft_s[0]);
        assert!(
            (1.10..1.15).contains(&ratio),
            "{ratio}: {fit:?} {measured:?}"
        );
        // Two points at the same batch size and context count as their mean; a point more
        // than twice its fitted time (a fit that is not the points') is not used.
        let at_128 = |p: &CpuProfile| {
            p.points
                .iter()
                .find(|pt| pt.decode_seqs == 4 && pt.context == 128 && pt.prefill_tokens == 0)
                .copied()
                .expect("the 4-sequence point")
        };
        let twin = CpuPoint {
            seconds: at_128(&p).seconds / 1.1 * 1.3,
            ..at_128(&p)
        };
        p.points.push(twin);
        assert!((p.decode_residual(4, 128.0) - 1.2).abs() < 1e-12);
        let wild = CpuPoint {
            seconds: at_128(&p).seconds * 3.0,
            ..at_128(&p)
        };
        p.points.push(wild);
        assert!((p.decode_residual(4, 128.0) - 1.2).abs() < 1e-12);
        // A profile without decode steps: no residual.
        p.points.retain(|pt| pt.prefill_tokens > 0);
        assert_eq!(p.decode_residual(4, 128.0), 1.0);
    }

    #[test]
    fn without_a_floor_the_fit_is_linear() {
        let linear = CpuFit {
            weights_floor_s: 0.0,
            ..truth()
        };
        let pts: Vec<CpuPoint> = points()
            .into_iter()
            .map(|p| CpuPoint {
                seconds: linear.seconds(
                    p.decode_seqs as f64,
                    p.prefill_tokens as f64,
                    p.context as f64,
                ),
                ..p
            })
            .collect();
        let f = fit(&pts);
        assert!(f.weights_floor_s <= 0.002, "{f:?}");
        assert!(f.median_relative_error(&pts) < 1e-3, "{f:?}");
    }

    #[test]
    fn a_profile_round_trips_and_bad_fields_are_named() {
        let text = profile_json(truth());
        let p = CpuProfile::parse(&text, "p.json").expect("valid profile");
        assert_eq!(p.fit, truth());
        // A format-1 profile (its fit had four coefficients) is told to measure again.
        let old = r#"{"format":1,"fit":{"fixed_s":0.01,"per_decode_seq_s":0.001,
            "per_prompt_token_s":0.001,"per_decode_seq_per_1k_context_s":0.001}}"#;
        let e = CpuProfile::parse(old, "p.json").expect_err("an older format");
        assert!(e.to_string().contains("format"), "{e}");
        assert!(e.to_string().contains("bench --profile"), "{e}");
        let negative = profile_json(CpuFit {
            per_prompt_token_s: -1.0,
            ..truth()
        });
        let e = CpuProfile::parse(&negative, "p.json").expect_err("negative coefficient");
        assert!(e.to_string().contains("fit.per_prompt_token_s"), "{e}");
        // A format-2 profile has no request overhead: measured again, not read as zero.
        let e = CpuProfile::parse("{\"format\":2}", "p.json").expect_err("format 2");
        assert!(e.to_string().contains("bench --profile"), "{e}");
        for bad in ["-0.001", "11.0"] {
            let text = profile_json(truth()).replace(
                "\"request_overhead_s\":0.004",
                &format!("\"request_overhead_s\":{bad}"),
            );
            let e = CpuProfile::parse(&text, "p.json").expect_err("bad overhead");
            assert!(e.to_string().contains("request_overhead_s"), "{bad}: {e}");
        }
        // A format-3 profile costed a prompt's last token as a prompt row: measured again.
        let e = CpuProfile::parse("{\"format\":3}", "p.json").expect_err("format 3");
        assert!(e.to_string().contains("bench --profile"), "{e}");
        // A format-4 profile timed its one-row steps among the others: measured again.
        let e = CpuProfile::parse("{\"format\":4}", "p.json").expect_err("format 4");
        assert!(e.to_string().contains("bench --profile"), "{e}");
        let e = CpuProfile::parse("{\"format\":5}", "p.json").expect_err("missing fields");
        assert!(e.to_string().contains("missing field"), "{e}");
        // A point's prompts are 1 to its prompt tokens.
        let text = profile_json(truth()).replacen("\"prompt_chunks\":1", "\"prompt_chunks\":0", 1);
        let e = CpuProfile::parse(&text, "p.json").expect_err("no prompts");
        assert!(e.to_string().contains("prompt_chunks"), "{e}");
        let e = CpuProfile::parse("[]", "p.json").expect_err("not an object");
        assert!(e.to_string().starts_with("p.json"), "{e}");
    }

    #[test]
    fn one_stream_is_its_prompt_step_then_one_decode_step_per_token() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let t = truth();
        let one = predict_serve_load(
            &p,
            &ServeLoad {
                streams: 1,
                prompt_tokens: 40,
                max_tokens: 10,
                requests: Vec::new(),
                other_cpu_per_token_s: 0.0,
                other_cpu_per_request_s: 0.0,
            },
        );
        // The prompt's last token costs as a decoding sequence's (it needs logits).
        let prompt_step = t.step(&CpuStep {
            decode_seqs: 1.0,
            prefill_tokens: 39.0,
            context: 40.0,
            prompt_attention_k: 39.0 * 40.0 / 2000.0,
        });
        // The request reaches the engine the server's overhead after it was sent.
        let o = p.request_overhead_s;
        assert!(o > 0.0);
        assert!((one.ttft_s[0] - (o + prompt_step)).abs() < 1e-12, "{one:?}");
        assert_eq!(one.tokens, 10);
        // Nine decode steps at contexts 41..49 follow.
        let decode: f64 = (41..50).map(|c| t.seconds(1.0, 0.0, f64::from(c))).sum();
        assert!(
            (one.wall_s - o - prompt_step - decode).abs() < 1e-9,
            "{one:?}"
        );
        assert!(
            (one.tokens_per_s - 10.0 / one.wall_s).abs() < 1e-9,
            "{one:?}"
        );
    }

    #[test]
    fn other_work_on_the_cores_lengthens_each_step_by_its_cpu_per_token_emitted() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let load = |streams, other_cpu_per_token_s| ServeLoad {
            streams,
            prompt_tokens: 40,
            max_tokens: 10,
            requests: Vec::new(),
            other_cpu_per_token_s,
            other_cpu_per_request_s: 0.0,
        };
        let c = 0.0004;
        for streams in [1, 4] {
            let alone = predict_serve_load(&p, &load(streams, 0.0));
            let shared = predict_serve_load(&p, &load(streams, c));
            // Every step emits one token per stream (the prompts' step their first): ten
            // steps, each `streams` × c longer.
            assert_eq!((alone.steps, shared.steps), (10, 10), "{shared:?}");
            let more = streams as f64 * c;
            assert!((shared.ttft_s[0] - alone.ttft_s[0] - more).abs() < 1e-12);
            assert!(
                (shared.wall_s - alone.wall_s - 10.0 * more).abs() < 1e-9,
                "{alone:?} {shared:?}"
            );
        }
        // Out of range, it is an error naming the field.
        for bad in [-1e-6, f64::NAN, f64::INFINITY, 2.0] {
            let e = load(1, bad).check("a.json", "1", 16384).expect_err("bad");
            assert!(
                e.to_string().contains("other_cpu_per_token_s"),
                "{bad}: {e}"
            );
        }
        assert!(load(1, c).check("a.json", "1", 16384).is_ok());
    }

    #[test]
    fn requests_taken_in_while_a_step_runs_lengthen_it_by_their_cpu() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        // Four clients: the first alone at 0, three more 1 ms apart from 1 ms.
        let requests: Vec<Arrival> = [0.0, 0.001, 0.002, 0.003]
            .into_iter()
            .map(|arrival_s| Arrival {
                arrival_s,
                prompt_tokens: 20,
                waits_for: None,
            })
            .collect();
        let load = |other_cpu_per_request_s| ServeLoad {
            streams: 4,
            prompt_tokens: 20,
            max_tokens: 4,
            requests: requests.clone(),
            other_cpu_per_token_s: 0.0,
            other_cpu_per_request_s,
        };
        let alone = predict_serve_load(&p, &load(0.0));
        let c = 0.002;
        let shared = predict_serve_load(&p, &load(c));
        // The first step (the first prompt, tens of ms by `truth`) runs while the other
        // three arrive: it is 3 c longer, and so is everything after it; nothing else is.
        let t = truth();
        let first = t.step(&CpuStep {
            decode_seqs: 1.0,
            prefill_tokens: 19.0,
            context: 20.0,
            prompt_attention_k: 19.0 * 20.0 / 2000.0,
        });
        assert!(first > 0.003, "{first}");
        assert_eq!(alone.steps, shared.steps, "{alone:?} {shared:?}");
        assert!(
            (shared.wall_s - alone.wall_s - 3.0 * c).abs() < 1e-9,
            "{alone:?} {shared:?}"
        );
        // The other three are computed together in the next step: every first token is
        // 3 c later.
        for (a, b) in alone.ttft_s.iter().zip(&shared.ttft_s) {
            assert!((b - a - 3.0 * c).abs() < 1e-9, "{alone:?} {shared:?}");
        }
        // Out of range, it is an error naming the field.
        for bad in [-1e-6, f64::NAN, f64::INFINITY, 2.0] {
            let e = load(bad).check("a.json", "4", 16384).expect_err("bad");
            assert!(
                e.to_string().contains("other_cpu_per_request_s"),
                "{bad}: {e}"
            );
        }
        assert!(load(c).check("a.json", "4", 16384).is_ok());
    }

    #[test]
    fn more_streams_raise_throughput_and_time_to_first_token() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let at = |streams| {
            predict_serve_load(
                &p,
                &ServeLoad {
                    streams,
                    prompt_tokens: 30,
                    max_tokens: 128,
                    requests: Vec::new(),
                    other_cpu_per_token_s: 0.0,
                    other_cpu_per_request_s: 0.0,
                },
            )
        };
        let (one, many) = (at(1), at(64));
        assert_eq!(many.tokens, 64 * 128);
        assert!(many.tokens_per_s > one.tokens_per_s);
        assert!(many.ttft_s[0] > one.ttft_s[0]);
    }

    #[test]
    fn a_late_request_waits_for_the_step_it_missed() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let t = truth();
        let load = |arrivals: Vec<f64>| ServeLoad {
            streams: 2,
            prompt_tokens: 20,
            max_tokens: 4,
            requests: arrivals
                .into_iter()
                .map(|arrival_s| Arrival {
                    arrival_s,
                    prompt_tokens: 20,
                    waits_for: None,
                })
                .collect(),
            other_cpu_per_token_s: 0.0,
            other_cpu_per_request_s: 0.0,
        };
        let together = predict_serve_load(&p, &load(Vec::new()));
        // The second request arrives just after the first's prompt step began: its prompt
        // runs in the next step, beside the first's decoding.
        let late = predict_serve_load(&p, &load(vec![0.0, 1e-6]));
        let first_step = t.step(&CpuStep {
            decode_seqs: 1.0,
            prefill_tokens: 19.0,
            context: 20.0,
            prompt_attention_k: 19.0 * 20.0 / 2000.0,
        });
        assert!((together.ttft_s[2] - together.ttft_s[0]).abs() < 1e-12);
        assert!(late.ttft_s[2] > first_step, "{late:?}");
        assert!(late.wall_s > together.wall_s);
        // Bad requests are named.
        let e = load(vec![0.0])
            .check("a.json", "2", 16384)
            .expect_err("too few");
        assert!(e.to_string().contains("one per stream"), "{e}");
        let e = load(vec![0.0, f64::NAN])
            .check("a.json", "2", 16384)
            .expect_err("NaN");
        assert!(e.to_string().contains("2[1].arrival_s"), "{e}");
        let mut empty = load(vec![0.0, 0.0]);
        empty.requests[0].prompt_tokens = 0;
        let e = empty.check("a.json", "2", 16384).expect_err("no prompt");
        assert!(e.to_string().contains("2[0].prompt_tokens"), "{e}");
        assert!(load(vec![0.5, 0.0]).check("a.json", "2", 16384).is_ok());
        // Each request's own prompt length counts, not `prompt_tokens`.
        let mut mixed = load(Vec::new());
        mixed.requests = [4, 4]
            .into_iter()
            .map(|prompt_tokens| Arrival {
                arrival_s: 0.0,
                prompt_tokens,
                waits_for: None,
            })
            .collect();
        let r = predict_serve_load(&p, &mixed);
        assert!(r.ttft_s[0] < together.ttft_s[0], "{r:?}");
    }

    #[test]
    fn a_request_sharing_a_prompt_being_computed_starts_after_it() {
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        // Listed out of arrival order: request 0 arrives last; request 2 arrives with
        // request 1 and may wait for its prompt, whose blocks it shares.
        let load = |waits_for: Option<usize>| ServeLoad {
            streams: 3,
            prompt_tokens: 20,
            max_tokens: 4,
            requests: vec![
                Arrival {
                    arrival_s: 2e-6,
                    prompt_tokens: 20,
                    waits_for: None,
                },
                Arrival {
                    arrival_s: 0.0,
                    prompt_tokens: 20,
                    waits_for: None,
                },
                Arrival {
                    arrival_s: 0.0,
                    prompt_tokens: 4,
                    waits_for,
                },
            ],
            other_cpu_per_token_s: 0.0,
            other_cpu_per_request_s: 0.0,
        };
        let free = predict_serve_load(&p, &load(None));
        let waits = predict_serve_load(&p, &load(Some(1)));
        assert!(load(Some(1)).check("a.json", "3", 16384).is_ok());
        // Without the wait requests 1 and 2 share the first step, and the median first token
        // comes at its end; with it request 1 runs alone, and request 2's first token comes
        // with request 0's, a step later.
        let t = truth();
        let first = t.step(&CpuStep {
            decode_seqs: 2.0,
            prefill_tokens: 22.0,
            context: 12.0,
            prompt_attention_k: (19.0 * 20.0 + 3.0 * 4.0) / 2000.0,
        });
        let overhead = p.request_overhead_s;
        assert!((free.ttft_s[0] - overhead - first).abs() < 1e-9, "{free:?}");
        assert!(
            waits.ttft_s[0] > free.ttft_s[0] + t.fixed_s,
            "{free:?} {waits:?}"
        );
        // A wait for a later request, or for itself, is an error naming the field.
        let e = load(Some(0))
            .check("a.json", "3", 16384)
            .expect_err("later");
        assert!(e.to_string().contains("3[2].waits_for"), "{e}");
        let e = load(Some(2))
            .check("a.json", "3", 16384)
            .expect_err("itself");
        assert!(e.to_string().contains("3[2].waits_for"), "{e}");
    }

    #[test]
    fn loads_beyond_memory_or_the_kv_cache_are_refused_before_simulating() {
        let load = |streams, prompt_tokens, max_tokens| ServeLoad {
            streams,
            prompt_tokens,
            max_tokens,
            requests: Vec::new(),
            other_cpu_per_token_s: 0.0,
            other_cpu_per_request_s: 0.0,
        };
        let named = |l: ServeLoad, field: &str| {
            let e = l.check("a.json", "l", 16384).expect_err(field).to_string();
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        };
        // A billion streams would allocate 40 GB before the first step; 0 simulates nothing.
        named(load(1_000_000_000, 46, 128), "streams");
        named(load(0, 46, 128), "streams");
        named(load(MAX_STREAMS + 1, 46, 1), "streams");
        // A billion tokens each would be a billion simulated steps.
        named(load(4, 46, 1_000_000_000), "max_tokens");
        named(load(4, 46, 0), "max_tokens");
        named(
            load(MAX_STREAMS, 46, MAX_LOAD_TOKENS / MAX_STREAMS + 1),
            "max_tokens",
        );
        // A generation the KV cache cannot hold beside a prompt is `max_tokens`' fault.
        named(load(1, 46, 16384), "max_tokens");
        // A sequence the KV cache cannot hold.
        named(load(4, 16384, 1), "prompt_tokens");
        named(load(4, 0, 1), "prompt_tokens");
        let mut long = load(2, 46, 16384 - 100);
        long.requests = vec![
            Arrival {
                arrival_s: 0.0,
                prompt_tokens: 100,
                waits_for: None,
            };
            2
        ];
        assert!(long.check("a.json", "l", 16384).is_ok());
        long.requests[1].prompt_tokens = 101;
        named(long, "l[1].prompt_tokens");
        // Prompts count toward the bound (a profile's KV cache may be vast, its step budget
        // one token).
        named(load(MAX_STREAMS, 300, 1), "prompt_tokens");
        assert!(
            load(MAX_STREAMS, 300, 1)
                .check("a.json", "l", 1 << 30)
                .is_err()
        );
        let mut many = load(2, 46, 1);
        many.requests = vec![
            Arrival {
                arrival_s: 0.0,
                prompt_tokens: MAX_LOAD_TOKENS / 2,
                waits_for: None,
            };
            2
        ];
        let e = many
            .check("a.json", "l", 1 << 30)
            .expect_err("too many")
            .to_string();
        assert!(e.contains("field `l`"), "{e}");
        // The largest loads allowed pass.
        for ok in [
            load(MAX_STREAMS, 46, MAX_LOAD_TOKENS / MAX_STREAMS - 46),
            load(1, 16383, 1),
        ] {
            assert!(ok.check("a.json", "l", 16384).is_ok(), "{ok:?}");
        }
        let p = CpuProfile::parse(&profile_json(truth()), "p.json").expect("valid profile");
        let r = predict_serve_load(&p, &load(1, 16383, 1));
        assert_eq!((r.finished, r.tokens), (1, 1), "{r:?}");
        // The JSON form reads back (what the fuzz target feeds).
        let text = serde_json::to_string(&load(4, 46, 128)).expect("JSON");
        let back: ServeLoad = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, load(4, 46, 128));
    }
}
