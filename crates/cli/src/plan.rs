//! `souverain plan`: sizes a site (GPUs, racks, megawatts) for a demand within its latency
//! promises, from a site file; prints a summary, writes JSON for machines and an HTML report
//! with plots for people. `--validate` prints the leave-one-model-out table against
//! ML.ENERGY's measurements instead.

use std::path::PathBuf;
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
}

/// Runs `souverain plan`.
pub(crate) fn run(args: &PlanArgs) -> Result<()> {
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
        "site {}: {} GPUs in {} racks, {:.2} MW IT, {:.2} MW facility (envelope now {:.1} MW), {:.0} tokens/s, {:.0} tokens/s per MW",
        p.site,
        p.totals.gpus,
        p.totals.racks,
        p.totals.it_mw,
        p.totals.facility_mw,
        p.totals.envelope_mw,
        p.totals.tokens_per_s,
        p.totals.tokens_per_s_per_mw
    );
    for m in &p.models {
        match (&m.replica, &m.infeasible) {
            (Some(c), _) => println!(
                "  {}: {} × {} {} (batch {}, {:.0} tok/s, {:.0} W, {:.3} J/token per replica), {} replicas + {} spare, binding: {:?}",
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
                m.binding.unwrap_or(plan::search::Binding::BatchGrid)
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
