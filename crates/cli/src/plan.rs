//! `souverain plan`: sizes a site (GPUs, racks, megawatts) for a demand within its latency
//! promises, from a site file; prints a summary, writes JSON for machines and an HTML report
//! with plots for people. `--validate` prints the leave-one-model-out table against
//! ML.ENERGY's measurements instead. `--cpu-profile P.json --predict-serve-load 1,4,16,64`
//! predicts `scripts/bench/serve-load` on our CPU engine from a profile measured by
//! `souverain bench --profile`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use plan::search::Infeasible;

/// Flags of `souverain plan`.
#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    /// The site file (TOML), e.g. deploy/plan/paris.toml.
    site: Option<PathBuf>,
    /// Write the plan as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Print how many configurations were scored and how long the search took.
    #[arg(long)]
    timings: bool,
    /// Print the leave-one-model-out validation against ML.ENERGY's v3 measurements.
    #[arg(long)]
    validate: bool,
    /// A CPU profile of our engine on this machine, from `souverain bench --profile`.
    #[arg(long, requires = "predict_serve_load")]
    cpu_profile: Option<PathBuf>,
    /// Predict `scripts/bench/serve-load` at these concurrencies (streams started together,
    /// `serve --max-seqs` equal to their number) from `--cpu-profile`.
    #[arg(long, value_delimiter = ',', requires = "cpu_profile")]
    predict_serve_load: Vec<usize>,
    /// Prompt tokens the engine computes per request (what the prefix cache does not hold;
    /// serve-load's chat prompts are 43 to 48 tokens with SmolLM2's template).
    #[arg(long, default_value_t = 46)]
    prompt_tokens: usize,
    /// Tokens generated per request (serve-load's --max-tokens).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// The requests as they reached the server, per concurrency: a JSON object from the
    /// number of streams to a list of `{"arrival_s": seconds after the first,
    /// "prompt_tokens": tokens computed, "waits_for": index of an earlier request whose
    /// prompt this one shares (optional)}`, one per stream in arrival order
    /// (`scripts/bench/plan-vs-serve-load` writes it from serve-load's record). Without it
    /// every request arrives at once with `--prompt-tokens`.
    #[arg(long, requires = "predict_serve_load")]
    requests: Option<PathBuf>,
    /// CPU microseconds that other work on the machine spends per generated token during the
    /// load (serve-load's clients and the server's HTTP threads; serve-load records them):
    /// the engine's threads fill the cores, so each step is that much longer per token it
    /// emits. 0 where the engine has the cores to itself.
    #[arg(
        long,
        default_value_t = 0.0,
        allow_negative_numbers = true,
        requires = "predict_serve_load"
    )]
    other_cpu_per_token_us: f64,
    /// CPU microseconds that other work spends taking each request in (serve-load's sending
    /// thread, the server's HTTP, template and tokeniser; serve-load records them): a
    /// request that arrives while a step runs makes that step that much longer. 0 where the
    /// engine has the cores to itself.
    #[arg(
        long,
        default_value_t = 0.0,
        allow_negative_numbers = true,
        requires = "predict_serve_load"
    )]
    other_cpu_per_request_us: f64,
}

/// Largest `--requests` file read.
const MAX_REQUESTS_BYTES: u64 = 4 << 20;

/// Reads `--requests`: streams → the requests as they arrived.
fn read_requests(
    path: &Path,
) -> Result<std::collections::BTreeMap<usize, Vec<plan::cpu::Arrival>>> {
    let text = plan::site::read_bounded(path, MAX_REQUESTS_BYTES)?;
    let raw: std::collections::BTreeMap<String, Vec<plan::cpu::Arrival>> =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected an object from stream counts to lists of \
                 {{\"arrival_s\", \"prompt_tokens\"}}",
                path.display()
            )
        })?;
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in raw {
        match k.parse::<usize>() {
            Ok(n) if n > 0 && n.to_string() == k => {
                out.insert(n, v);
            }
            _ => bail!(
                "{}: key {k:?}: must be a number of streams (at least 1, no leading zeros)",
                path.display()
            ),
        }
    }
    Ok(out)
}

/// `--predict-serve-load`: the simulated scheduler with the profile's step times.
fn predict(args: &PlanArgs, path: &Path) -> Result<()> {
    let profile = plan::cpu::CpuProfile::load(path)?;
    let f = profile.fit;
    let requests = match &args.requests {
        Some(p) => read_requests(p)?,
        None => Default::default(),
    };
    let (other, per_request) = (args.other_cpu_per_token_us, args.other_cpu_per_request_us);
    for (flag, us) in [
        ("--other-cpu-per-token-us", other),
        ("--other-cpu-per-request-us", per_request),
    ] {
        if !plan::cpu::other_cpu_ok(us * 1e-6) {
            let most = plan::cpu::MAX_OTHER_CPU_S * 1e6;
            bail!("{flag}: must be microseconds in 0..={most}, not {us}");
        }
    }
    // Every load checked before any is predicted.
    let mut loads = Vec::new();
    for &streams in &args.predict_serve_load {
        let load = plan::cpu::ServeLoad {
            streams,
            prompt_tokens: args.prompt_tokens,
            max_tokens: args.max_tokens,
            requests: requests.get(&streams).cloned().unwrap_or_default(),
            other_cpu_per_token_s: other * 1e-6,
            other_cpu_per_request_s: per_request * 1e-6,
        };
        let name = match &args.requests {
            Some(file) => {
                let name = file.display().to_string();
                if load.requests.is_empty() {
                    bail!("{name}: no requests for {streams} streams (key \"{streams}\")");
                }
                name
            }
            None => String::new(),
        };
        let kv = profile.serve_defaults.kv_cache_tokens;
        match load.check(&name, &streams.to_string(), kv) {
            Ok(()) => {}
            // What the flags set is named by its flag.
            Err(plan::PlanError::Field { field, message, .. })
                if ["streams", "max_tokens", "prompt_tokens"].contains(&field.as_str()) =>
            {
                let flag = match field.as_str() {
                    "streams" => "--predict-serve-load",
                    "max_tokens" => "--max-tokens",
                    _ => "--prompt-tokens",
                };
                bail!("{flag}: {message}");
            }
            Err(e) => return Err(e.into()),
        }
        loads.push(load);
    }
    println!(
        "CPU profile {} ({}, {} threads, {}): {} (median error {:.1}% over {} steps); \
         request overhead {:.2} ms",
        path.display(),
        profile.model.file,
        profile.threads,
        profile.machine.cpu,
        f.describe(),
        profile.fit_median_relative_error * 100.0,
        profile.points.len(),
        profile.request_overhead_s * 1e3
    );
    let prompts = match &args.requests {
        Some(file) => format!("each request's prompt tokens from {}", file.display()),
        None => format!("{} prompt tokens computed", args.prompt_tokens),
    };
    println!(
        "serve-load: {prompts}, {} generated per request, max batch tokens {}, other CPU \
         {other:.0} µs per token and {per_request:.0} µs per request\n",
        args.max_tokens, profile.serve_defaults.max_batch_tokens
    );
    println!("| streams | tokens/s | TTFT p50 ms | ITL p50 ms | steps | mean decode batch |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for load in loads {
        let streams = load.streams;
        let r = plan::cpu::predict_serve_load(&profile, &load);
        println!(
            "| {streams} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
            r.tokens_per_s,
            r.ttft_s[0] * 1e3,
            r.itl_s[0] * 1e3,
            r.steps,
            r.mean_batch
        );
        rows.push(serde_json::json!({ "load": load, "predicted": r }));
    }
    if let Some(out) = &args.json {
        let text = serde_json::to_string_pretty(&rows)?;
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// Runs `souverain plan`.
pub(crate) fn run(args: &PlanArgs) -> Result<()> {
    if let Some(path) = &args.cpu_profile {
        return predict(args, path);
    }
    if args.validate {
        let data = plan::mlenergy::dataset();
        let v = data.leave_one_model_out();
        println!(
            "ML.ENERGY v3 lm-arena-chat ({} @ {}), leave-one-model-out:\n",
            data.source.repository, data.source.commit
        );
        print!("{}", v.table());
        if args.site.is_none() {
            return Ok(());
        }
    }
    let Some(path) = &args.site else {
        bail!("name a site file (e.g. deploy/plan/paris.toml), or pass --validate");
    };
    let site = plan::site::Site::load(path)?;
    let t0 = Instant::now();
    let p = plan::search::plan(&site);
    let elapsed = t0.elapsed();
    println!(
        "site {}: {} GPUs in {} racks, {:.2} MW IT, {:.2} MW facility (envelope now {:.1} MW{}), {:.0} tokens/s, {:.0} tokens/s per MW",
        p.site,
        p.totals.gpus,
        p.totals.racks,
        p.totals.it_mw,
        p.totals.facility_mw,
        p.totals.envelope_mw,
        match p.growth.first() {
            Some(now) if now.served < 1.0 => format!(
                "; power binds: {:.0}% of the demand can be served",
                100.0 * now.served
            ),
            _ => String::new(),
        },
        p.totals.tokens_per_s,
        p.totals.tokens_per_s_per_mw
    );
    for m in &p.models {
        match (&m.replica, &m.infeasible) {
            (Some(c), _) => println!(
                "  {}: {} × {} {} (batch {}, {:.0} tok/s, {:.0} W, {:.3} J/token per replica), {} replicas + {} spare, binding: {}",
                m.model,
                c.gpus,
                c.system,
                m.precision,
                c.batch,
                c.tokens_per_s,
                c.replica_it_watts,
                c.joules_per_token,
                m.replicas,
                m.replicas_with_headroom - m.replicas,
                m.binding.unwrap_or(plan::search::Binding::BatchGrid).name()
            ),
            (
                None,
                Some(Infeasible::FitsNoGpu {
                    weights_gb,
                    largest_replica_gb,
                }),
            ) => println!(
                "  {}: IMPOSSIBLE: fits no GPU offered ({weights_gb:.0} GB of weights; the largest replica holds {largest_replica_gb:.0} GB)",
                m.model
            ),
            (
                None,
                Some(Infeasible::SloUnmet {
                    best_itl_ms,
                    best_ttft_ms,
                }),
            ) => println!(
                "  {}: IMPOSSIBLE: no batch size meets the SLOs (best ITL {best_itl_ms:.1} ms, best TTFT {best_ttft_ms:.0} ms)",
                m.model
            ),
            (None, None) => {}
        }
    }
    if let Some(last) = p.growth.last() {
        println!(
            "  month {}: demand ×{:.2}, {} GPUs, {:.1} MW needed of {:.1} MW{}",
            last.month,
            last.demand_factor,
            last.gpus_needed,
            last.facility_mw_needed,
            last.envelope_mw,
            if last.served < 1.0 {
                format!(" (power binds: {:.0}% served)", 100.0 * last.served)
            } else {
                String::new()
            }
        );
    }
    if args.timings {
        let eff = &p.efficiencies;
        let t1 = Instant::now();
        let (ok, n) = plan::search::score_all(&site, eff);
        println!(
            "exhaustive search: {n} configurations scored in {:.3} s ({ok} fit and meet their SLOs)",
            t1.elapsed().as_secs_f64()
        );
        println!(
            "plan: fit + {} configurations scored + simulations of the chosen ones in {:.3} s",
            p.configurations,
            elapsed.as_secs_f64()
        );
    }
    if let Some(out) = &args.json {
        let text = serde_json::to_string_pretty(&p)?;
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(out) = &args.html {
        std::fs::write(out, plan::report::html(&p))
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
