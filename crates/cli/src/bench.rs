//! `souverain bench`: prompt-processing and generation speed, measured as `llama-bench` does.
//!
//! pp: one forward pass over `p` random tokens from an empty KV cache, logits for the last
//! token only. tg: `n` single-token forward passes from an empty cache. Each repetition times
//! both after one untimed warm-up pass of each kind; the report gives the median, the mean, the
//! standard deviation and the range of tokens per second over the repetitions. Weights are
//! paged in (and the warm-up run) before any timing starts.
//!
//! `--profile OUT.json` measures instead what the planner's CPU step model needs
//! (`plan::cpu`): batched forward passes through the engine's paged path
//! (`LlamaModel::forward_batch`, the one the scheduler runs, and the greedy pick of every row
//! of logits it returns) with 1 to 64 sequences decoding one token each at three context
//! lengths, single prompt chunks of 16 to 512 tokens, and steps mixing both, each the median
//! of the repetitions after one untimed run (the steps taken in turn, one of each per
//! repetition, so that drift moves them alike; a one-sequence step, which runs the one-token
//! kernels, timed back to back after 150 ms of itself, as serving at one stream runs it);
//! then it fits the step-time coefficients and writes the profile with `serve`'s scheduler
//! defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use model::{KvPool, LlamaModel, Logits, SeqChunk, ThreadPool, gguf::GgufFile};
use plan::cpu::{CpuMachine, CpuModel, CpuPoint, CpuProfile, PROFILE_FORMAT, ServeDefaults};

/// Flags of `souverain bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// GGUF model file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Prompt tokens processed in one batch (0 skips the pp test).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens generated one at a time (0 skips the tg test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Tokens already in the context before the tg test (untimed; llama-bench's `-d`):
    /// generation speed at that position.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    n_depth: usize,
    /// Threads (default: all cores).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// Timed repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Seed of the random token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Measure the planner's CPU profile (batched decode steps, prompt chunks, mixed steps)
    /// and write it here as JSON, instead of the pp and tg tests.
    #[arg(long)]
    profile: Option<PathBuf>,
}

/// Tokens per second over the repetitions of one test.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stats {
    /// Every repetition, in run order.
    pub(crate) samples: Vec<f64>,
}

impl Stats {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    /// The median (mean of the middle two for an even count); 0 when empty.
    pub(crate) fn median(&self) -> f64 {
        let s = self.sorted();
        match s.len() {
            0 => 0.0,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    /// The arithmetic mean; 0 when empty.
    pub(crate) fn mean(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().sum::<f64>() / self.samples.len() as f64
    }

    /// The sample standard deviation; 0 for fewer than two samples.
    pub(crate) fn std_dev(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        let var = self.samples.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
        var.sqrt()
    }

    /// Smallest and largest sample; (0, 0) when empty.
    pub(crate) fn range(&self) -> (f64, f64) {
        let s = self.sorted();
        match (s.first(), s.last()) {
            (Some(&a), Some(&b)) => (a, b),
            _ => (0.0, 0.0),
        }
    }

    fn json(&self) -> String {
        let (lo, hi) = self.range();
        let samples: Vec<String> = self.samples.iter().map(|v| format!("{v:.3}")).collect();
        format!(
            "{{\"median\":{:.3},\"mean\":{:.3},\"std\":{:.3},\"min\":{lo:.3},\"max\":{hi:.3},\"samples\":[{}]}}",
            self.median(),
            self.mean(),
            self.std_dev(),
            samples.join(",")
        )
    }
}

/// A small deterministic generator for token ids (splitmix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next() % vocab.max(1) as u64) as u32)
            .collect()
    }
}

/// Runs the benchmark and prints the report.
pub(crate) fn run(args: &BenchArgs) -> Result<()> {
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if args.n_prompt == 0 && args.n_gen == 0 && args.profile.is_none() {
        bail!("nothing to measure: both -p and -n are 0");
    }
    let file = Arc::new(
        GgufFile::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?,
    );
    let model = LlamaModel::load(file, &mut |_, _| {})
        .with_context(|| format!("loading {}", args.model.display()))?;
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        args.threads
    };
    let pool = ThreadPool::new(threads);
    if let Some(out) = &args.profile {
        return profile(args, model, pool, out);
    }
    let vocab = model.config().vocab_size;
    let capacity = args.n_prompt.max(args.n_depth + args.n_gen).max(1);
    if capacity > model.config().context_length {
        bail!(
            "{capacity} tokens exceed the model's context length {}",
            model.config().context_length
        );
    }
    let mut rng = SplitMix(args.seed);

    let pp_once = |rng: &mut SplitMix| -> Result<f64> {
        let tokens = rng.tokens(args.n_prompt, vocab);
        let mut kv = model.new_kv_cache(capacity)?;
        let t0 = Instant::now();
        let logits = model.forward(&pool, &tokens, &mut kv, Logits::Last)?;
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(logits);
        Ok(args.n_prompt as f64 / secs)
    };
    // The context the tg test starts from (filled once; each repetition truncates back).
    let mut depth_kv = model.new_kv_cache(capacity)?;
    if args.n_depth > 0 {
        let context = rng.tokens(args.n_depth, vocab);
        model.forward(&pool, &context, &mut depth_kv, Logits::None)?;
    }
    let depth_kv = std::cell::RefCell::new(depth_kv);
    let tg_once = |rng: &mut SplitMix, n: usize| -> Result<f64> {
        let first = rng.tokens(1, vocab);
        let mut kv = depth_kv.borrow_mut();
        kv.truncate(args.n_depth);
        let kv = &mut *kv;
        let mut token = first[0];
        let t0 = Instant::now();
        for _ in 0..n {
            let logits = model.forward(&pool, &[token], kv, Logits::Last)?;
            // Feed back a token derived from the logits so no pass can be skipped.
            token = (logits
                .iter()
                .map(|v| v.to_bits())
                .fold(0u32, u32::wrapping_add)
                % vocab.max(1) as u32)
                .min(vocab.saturating_sub(1) as u32);
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok(n as f64 / secs)
    };

    // Warm-up: a short batch and a few tokens, untimed.
    if args.n_prompt > 0 {
        let tokens = rng.tokens(args.n_prompt.min(32), vocab);
        let mut kv = model.new_kv_cache(capacity)?;
        model.forward(&pool, &tokens, &mut kv, Logits::Last)?;
    }
    if args.n_gen > 0 {
        tg_once(&mut rng, args.n_gen.min(4))?;
    }

    let mut pp = Stats {
        samples: Vec::new(),
    };
    let mut tg = Stats {
        samples: Vec::new(),
    };
    for _ in 0..args.reps {
        if args.n_prompt > 0 {
            pp.samples.push(pp_once(&mut rng)?);
        }
        if args.n_gen > 0 {
            tg.samples.push(tg_once(&mut rng, args.n_gen)?);
        }
    }

    let c = model.config();
    if args.json {
        let mut fields = vec![
            format!("\"threads\":{}", pool.n_threads()),
            format!("\"simd\":\"{}\"", model::kernels_simd_level()),
            format!("\"n_prompt\":{}", args.n_prompt),
            format!("\"n_gen\":{}", args.n_gen),
            format!("\"n_depth\":{}", args.n_depth),
        ];
        if args.n_prompt > 0 {
            fields.push(format!("\"pp\":{}", pp.json()));
        }
        if args.n_gen > 0 {
            fields.push(format!("\"tg\":{}", tg.json()));
        }
        println!("{{{}}}", fields.join(","));
        return Ok(());
    }
    println!(
        "model: {} ({} layers, width {}, vocab {}), simd: {}, threads: {}, reps: {}",
        args.model.display(),
        c.n_layers,
        c.d_model,
        c.vocab_size,
        model::kernels_simd_level(),
        pool.n_threads(),
        args.reps
    );
    println!(
        "{:<8} {:>12} {:>12} {:>10} {:>23}",
        "test", "median t/s", "mean t/s", "std", "range t/s"
    );
    let row = |name: String, s: &Stats| {
        let (lo, hi) = s.range();
        println!(
            "{name:<8} {:>12.2} {:>12.2} {:>10.2} {:>23}",
            s.median(),
            s.mean(),
            s.std_dev(),
            format!("{lo:.2} .. {hi:.2}")
        );
    };
    if args.n_prompt > 0 {
        row(format!("pp{}", args.n_prompt), &pp);
    }
    if args.n_gen > 0 && args.n_depth > 0 {
        row(format!("tg{} @ d{}", args.n_gen, args.n_depth), &tg);
    } else if args.n_gen > 0 {
        row(format!("tg{}", args.n_gen), &tg);
    }
    Ok(())
}

/// Decoding sequences, their context, the prompt tokens and the prompts they are split
/// into (each whole, from position 0) of one measured step.
const PROFILE_STEPS: &[(usize, usize, usize, usize)] = &[
    (1, 128, 0, 0),
    (2, 128, 0, 0),
    (3, 128, 0, 0),
    (4, 128, 0, 0),
    (8, 128, 0, 0),
    (16, 128, 0, 0),
    (32, 128, 0, 0),
    (48, 128, 0, 0),
    (64, 128, 0, 0),
    (64, 32, 0, 0),
    (1, 768, 0, 0),
    (4, 768, 0, 0),
    (16, 768, 0, 0),
    (0, 0, 16, 1),
    (0, 0, 64, 1),
    (0, 0, 128, 1),
    (0, 0, 256, 1),
    (0, 0, 512, 1),
    (16, 128, 128, 1),
    (4, 128, 384, 1),
    // Short prompts arriving together, as a server's clients send them.
    (0, 0, 128, 8),
    (0, 0, 320, 16),
];

/// How long a one-row step runs untimed before it is timed: on a 2-core Xeon VM the step
/// took 6.6-6.8 ms after a different step (8.4 ms after 100 ms idle) and reached its
/// 4.7-5.0 ms over the next 15-20 steps.
const ONE_ROW_WARM: std::time::Duration = std::time::Duration::from_millis(150);

/// One-row steps timed in a row, their mean the sample.
const ONE_ROW_TIMED: usize = 8;

/// Fewest lone requests that time the server's overhead (`--reps` when more).
const MIN_OVERHEAD_REQUESTS: usize = 16;

/// `souverain bench --profile`: measures [`PROFILE_STEPS`] and writes the planner's profile.
/// The model and the pool are given back before the server's engine loads its own.
fn profile(args: &BenchArgs, model: LlamaModel, pool: ThreadPool, out: &Path) -> Result<()> {
    let c = model.config();
    let defaults = engine::EngineConfig::default();
    // As `serve` sizes it: two contexts' worth of cache when several sequences run.
    let kv_cache_tokens = 2 * c.context_length;
    let block_tokens = engine::KV_BLOCK_TOKENS;
    let mut kv = KvPool::new(c, block_tokens, kv_cache_tokens.div_ceil(block_tokens))
        .context("allocating the KV cache")?;
    let mut rng = SplitMix(args.seed);
    // Every step's inputs first: each step gets blocks of its own, as sequences do in the
    // engine (attention reads memory that is not shared, so the cache hierarchy sees what
    // it sees when serving); steps may reuse another step's blocks.
    struct Step {
        decode_tables: Vec<Vec<u32>>,
        prompt_tables: Vec<Vec<u32>>,
        decode_tokens: Vec<u32>,
        prompt_tokens: Vec<u32>,
        /// Tokens in each prompt (the step splits its prompt tokens evenly).
        each: usize,
    }
    let blocks = |positions: usize| positions.div_ceil(block_tokens);
    let mut steps = Vec::with_capacity(PROFILE_STEPS.len());
    for &(decode, context, prompt, prompts) in PROFILE_STEPS {
        let each = prompt.checked_div(prompts).unwrap_or(0);
        let needed = decode * blocks(context + 1) + prompts * blocks(each);
        if needed > kv.n_blocks() || context + 1 > c.context_length {
            bail!(
                "the step ({decode} sequences at {context} positions + {prompt} prompt tokens) \
                 does not fit the model's KV cache of {kv_cache_tokens} tokens"
            );
        }
        let mut next = 0u32;
        let mut table = |n: usize| -> Vec<u32> {
            let t: Vec<u32> = (next..next + n as u32).collect();
            next += n as u32;
            t
        };
        steps.push(Step {
            decode_tables: (0..decode).map(|_| table(blocks(context + 1))).collect(),
            prompt_tables: (0..prompts).map(|_| table(blocks(each))).collect(),
            decode_tokens: rng.tokens(decode, c.vocab_size),
            prompt_tokens: rng.tokens(prompt, c.vocab_size),
            each,
        });
    }
    let mut all: Vec<Vec<SeqChunk<'_>>> = Vec::with_capacity(steps.len());
    for (&(_, context, _, _), s) in PROFILE_STEPS.iter().zip(&steps) {
        let mut chunks: Vec<SeqChunk<'_>> = s
            .decode_tables
            .iter()
            .zip(&s.decode_tokens)
            .map(|(t, tok)| SeqChunk {
                tokens: std::slice::from_ref(tok),
                start_pos: context,
                block_table: t,
                logits: Logits::Last,
                window_table: &[],
            })
            .collect();
        let each = s.each;
        for (k, table) in s.prompt_tables.iter().enumerate() {
            chunks.push(SeqChunk {
                tokens: &s.prompt_tokens[k * each..(k + 1) * each],
                start_pos: 0,
                block_table: table,
                logits: Logits::Last,
                window_table: &[],
            });
        }
        all.push(chunks);
    }
    // Round robin: one untimed pass of every step, then each repetition times every step
    // once, so that a machine whose speed drifts (a shared host, a clock that changes)
    // moves every step's samples alike instead of bending the fit. A one-row step (the
    // one-token kernels) is timed as serving at one stream runs it, back to back: run for
    // `ONE_ROW_WARM` untimed, then the mean of `ONE_ROW_TIMED` in a row (see `plan::cpu`).
    let mut step = |chunks: &[SeqChunk<'_>]| -> Result<()> {
        let logits = model.forward_batch(&pool, &mut kv, chunks)?;
        // What the scheduler does with each row of logits when the request is greedy
        // (serve-load's are): pick the token, then free the row.
        for row in logits {
            std::hint::black_box(engine::greedy_token(&row));
        }
        Ok(())
    };
    let mut samples = vec![Vec::with_capacity(args.reps); all.len()];
    for rep in 0..=args.reps {
        for ((chunks, samples), &(decode, _, prompt, _)) in
            all.iter().zip(&mut samples).zip(PROFILE_STEPS)
        {
            // One row, as `plan::cpu` defines it (one decoding sequence or a one-token prompt).
            let secs = if decode + prompt == 1 {
                let warm = Instant::now();
                while warm.elapsed() < ONE_ROW_WARM {
                    step(chunks)?;
                }
                let t0 = Instant::now();
                for _ in 0..ONE_ROW_TIMED {
                    step(chunks)?;
                }
                t0.elapsed().as_secs_f64() / ONE_ROW_TIMED as f64
            } else {
                let t0 = Instant::now();
                step(chunks)?;
                t0.elapsed().as_secs_f64()
            };
            if rep > 0 {
                samples.push(secs);
            }
        }
    }
    let mut points = Vec::with_capacity(all.len());
    for (&(decode, context, prompt, prompts), samples) in PROFILE_STEPS.iter().zip(samples) {
        let seconds = Stats { samples }.median();
        eprintln!(
            "decode {decode:>2} @ {context:>3} + prompt {prompt:>3} in {prompts:>2}: {:8.2} ms",
            seconds * 1e3
        );
        points.push(CpuPoint {
            decode_seqs: decode,
            prefill_tokens: prompt,
            prompt_chunks: prompts.max(1),
            context,
            seconds,
        });
    }
    let fit = plan::cpu::fit(&points);
    let threads = pool.n_threads();
    let cpu_model = CpuModel {
        file: args
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        layers: c.n_layers,
        width: c.d_model,
        vocab: c.vocab_size,
        context_length: c.context_length,
    };
    drop(all);
    drop((steps, kv, model, pool));
    // The server's time outside the forward passes, through the real HTTP path.
    let requests = args.reps.max(MIN_OVERHEAD_REQUESTS);
    let overheads = crate::overhead::measure(&args.model, threads, requests, &fit)?;
    let overheads = Stats { samples: overheads };
    let median = overheads.median();
    let request_overhead_s = median.clamp(0.0, plan::cpu::MAX_REQUEST_OVERHEAD_S);
    if request_overhead_s != median {
        eprintln!(
            "request overhead: the median, {:.2} ms, is outside 0..={} s; {:.2} ms is kept",
            median * 1e3,
            plan::cpu::MAX_REQUEST_OVERHEAD_S,
            request_overhead_s * 1e3
        );
    }
    let (lo, hi) = overheads.range();
    eprintln!(
        "request overhead (HTTP, template, queue; {} of {requests} lone requests timed): \
         {:.2} ms kept (median {:.2} ms), range {:.2} .. {:.2} ms",
        overheads.samples.len(),
        request_overhead_s * 1e3,
        median * 1e3,
        lo * 1e3,
        hi * 1e3
    );
    let profile = CpuProfile {
        format: PROFILE_FORMAT,
        machine: CpuMachine {
            cpu: cpu_name(),
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            simd: model::kernels_simd_level().to_string(),
        },
        threads,
        model: cpu_model,
        serve_defaults: ServeDefaults {
            max_batch_tokens: defaults.max_batch_tokens,
            max_seqs: defaults.max_seqs,
            kv_cache_tokens,
            kv_block_tokens: block_tokens,
        },
        fit_median_relative_error: fit.median_relative_error(&points),
        request_overhead_s,
        points,
        fit,
    };
    let text = serde_json::to_string_pretty(&profile)?;
    std::fs::write(out, text + "\n").with_context(|| format!("writing {}", out.display()))?;
    println!(
        "profile: {} ({} threads): {} (median error {:.1}%), written to {}",
        profile.model.file,
        profile.threads,
        fit.describe(),
        profile.fit_median_relative_error * 100.0,
        out.display()
    );
    Ok(())
}

/// The processor's name from `/proc/cpuinfo`, or the architecture where there is none.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_known_samples() {
        let s = Stats {
            samples: vec![4.0, 1.0, 3.0, 2.0],
        };
        assert_eq!(s.median(), 2.5);
        assert_eq!(s.mean(), 2.5);
        assert_eq!(s.range(), (1.0, 4.0));
        assert!((s.std_dev() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        let odd = Stats {
            samples: vec![9.0, 1.0, 5.0],
        };
        assert_eq!(odd.median(), 5.0);
        let empty = Stats { samples: vec![] };
        assert_eq!((empty.median(), empty.std_dev()), (0.0, 0.0));
    }

    #[test]
    fn token_ids_stay_in_the_vocabulary() {
        let mut rng = SplitMix(7);
        let t = rng.tokens(1000, 13);
        assert!(t.iter().all(|&x| x < 13));
        assert!(t.iter().any(|&x| x != t[0]));
    }
}
