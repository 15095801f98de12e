//! `GET /metrics`: the engine's measurements in Prometheus' text format.
//!
//! Souverain's own names (`souverain_*`) come with the names vLLM exports (`vllm:*`) for the
//! same quantities, so that routers and endpoint pickers written for vLLM can read a
//! Souverain replica unchanged.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use engine::{HistogramSnapshot, MetricsSnapshot};

use crate::state::AppState;

/// The handler.
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let snapshots: Vec<(String, MetricsSnapshot)> = state
        .models
        .loaded()
        .iter()
        .filter_map(|b| b.metrics().map(|m| (b.model_id().to_owned(), m)))
        .collect();
    let mut rendered: Vec<String> = snapshots.iter().map(|(id, m)| render(id, m)).collect();
    let embedding = state
        .embedder
        .as_ref()
        .and_then(|e| e.energy().map(|s| (e.model_id().to_owned(), s)));
    if let Some((id, e)) = &embedding {
        rendered.push(energy_requests(&model_label(id), e));
    }
    // Idle energy is the process's (its engines share one meter): once, without a model.
    let idle = match &state.energy {
        Some(account) => Some(account.snapshot(0)),
        None => snapshots
            .first()
            .map(|(_, m)| m.energy)
            .or(embedding.map(|(_, e)| e)),
    };
    if let Some(e) = idle {
        rendered.push(energy_idle(&e));
    }
    let mut body = merge(&rendered);
    models_loaded(&mut body, &state);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// `model_name="..."`, escaped as the exposition format wants.
fn model_label(model: &str) -> String {
    let model = model.replace('\\', "\\\\").replace('"', "\\\"");
    format!("model_name=\"{model}\"")
}

/// Prometheus exposition text for one model's snapshot.
pub(crate) fn render(model: &str, m: &MetricsSnapshot) -> String {
    let label = model_label(model);
    let mut out = String::new();
    let kv_usage = if m.kv_blocks_total == 0 {
        0.0
    } else {
        m.kv_blocks_used as f64 / m.kv_blocks_total as f64
    };
    let hit_rate = if m.prefix_query_tokens == 0 {
        0.0
    } else {
        m.prefix_hit_tokens as f64 / m.prefix_query_tokens as f64
    };
    let gauges: [(&str, &str, f64); 10] = [
        (
            "souverain_requests_running",
            "Sequences being generated.",
            m.running as f64,
        ),
        (
            "souverain_requests_waiting",
            "Requests waiting to start.",
            m.waiting as f64,
        ),
        (
            "souverain_kv_cache_blocks_used",
            "KV cache blocks held by sequences.",
            m.kv_blocks_used as f64,
        ),
        (
            "souverain_kv_cache_blocks_total",
            "KV cache blocks in the pool.",
            m.kv_blocks_total as f64,
        ),
        (
            "souverain_kv_cache_window_blocks_used",
            "Sliding-window layers' KV blocks held by sequences (0 when they share the blocks).",
            m.kv_window_blocks_used as f64,
        ),
        (
            "souverain_kv_cache_window_blocks_total",
            "Sliding-window layers' KV blocks in the pool (0 when they share the blocks).",
            m.kv_window_blocks_total as f64,
        ),
        (
            "souverain_kv_cache_usage_ratio",
            "Fraction of KV cache blocks in use.",
            kv_usage,
        ),
        (
            "souverain_prefix_cache_hit_ratio",
            "Prompt tokens found in the prefix cache, as a fraction of those looked up.",
            hit_rate,
        ),
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches (vLLM name).",
            m.running as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed (vLLM name).",
            m.waiting as f64,
        ),
    ];
    for (name, help, value) in gauges {
        metric(&mut out, name, help, "gauge", &label, value);
    }
    metric(
        &mut out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage; 1 means 100 percent (vLLM name).",
        "gauge",
        &label,
        kv_usage,
    );
    let counters: [(&str, &str, u64); 11] = [
        (
            "souverain_prompt_tokens_total",
            "Prompt tokens processed.",
            m.prompt_tokens,
        ),
        (
            "souverain_generation_tokens_total",
            "Tokens generated.",
            m.generation_tokens,
        ),
        (
            "souverain_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            m.prefix_query_tokens,
        ),
        (
            "souverain_prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache.",
            m.prefix_hit_tokens,
        ),
        (
            "souverain_requests_finished_total",
            "Requests that ended.",
            m.requests_finished,
        ),
        (
            "souverain_requests_rejected_total",
            "Requests refused because the queue was full.",
            m.requests_rejected,
        ),
        (
            "souverain_preemptions_total",
            "Sequences preempted for lack of KV cache.",
            m.preemptions,
        ),
        (
            "vllm:spec_decode_num_draft_tokens_total",
            "Draft tokens proposed by speculative decoding (vLLM name).",
            m.spec_draft_tokens,
        ),
        (
            "vllm:spec_decode_num_accepted_tokens_total",
            "Draft tokens accepted by speculative decoding (vLLM name).",
            m.spec_accepted_tokens,
        ),
        (
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed (vLLM name).",
            m.prompt_tokens,
        ),
        (
            "vllm:generation_tokens_total",
            "Number of generation tokens processed (vLLM name).",
            m.generation_tokens,
        ),
    ];
    for (name, help, value) in counters {
        metric(&mut out, name, help, "counter", &label, value as f64);
    }
    let histograms = [
        (
            "souverain_time_to_first_token_seconds",
            "Seconds from arrival to the first token.",
            &m.time_to_first_token,
        ),
        (
            "souverain_inter_token_latency_seconds",
            "Seconds between tokens of one sequence.",
            &m.inter_token_latency,
        ),
        (
            "souverain_request_latency_seconds",
            "Seconds from arrival to the end of a request.",
            &m.request_latency,
        ),
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds (vLLM name).",
            &m.time_to_first_token,
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds (vLLM name).",
            &m.inter_token_latency,
        ),
    ];
    for (name, help, h) in histograms {
        histogram(&mut out, name, help, &label, h);
    }
    out.push_str(&energy_requests(&label, &m.energy));
    out
}

/// The energy counters' family.
const ENERGY: &str = "souverain_energy_joules_total";

/// Energy counters, labelled by source (`measured` or `modelled`), meter (`rapl`, `nvml`,
/// `model`) and where the joules went: `requests` per model (its steps, split across their
/// sequences; the embedding model's forward passes), and `idle` once for the process (while
/// no model computed: its models share one meter). Their sum is the meter's total since
/// start (a model's counter restarts from 0 when it is loaded again, as counters do).
fn energy_header() -> String {
    format!(
        "# HELP {ENERGY} Energy since start by source and by where it went (a model's requests, or idle).\n# TYPE {ENERGY} counter\n"
    )
}

/// A model's `kind="requests"` sample, under the family's header.
fn energy_requests(label: &str, e: &engine::EnergySnapshot) -> String {
    let (source, meter) = (e.kind.as_str(), e.meter);
    format!(
        "{}{ENERGY}{{{label},source=\"{source}\",meter=\"{meter}\",kind=\"requests\"}} {}\n",
        energy_header(),
        e.requests_uj as f64 / 1e6
    )
}

/// The process's `kind="idle"` sample, under the family's header.
fn energy_idle(e: &engine::EnergySnapshot) -> String {
    let (source, meter) = (e.kind.as_str(), e.meter);
    format!(
        "{}{ENERGY}{{source=\"{source}\",meter=\"{meter}\",kind=\"idle\"}} {}\n",
        energy_header(),
        e.idle_uj as f64 / 1e6
    )
}

/// `souverain_model_loaded`: 1 for each model in memory, 0 for the others, under every name
/// it answers to (a router sends a model's requests where it is served and loaded).
fn models_loaded(out: &mut String, state: &AppState) {
    let name = "souverain_model_loaded";
    let _ = writeln!(
        out,
        "# HELP {name} Whether the model is loaded (1) or not (0).\n# TYPE {name} gauge"
    );
    // Every name a request may use: each chat model's id and aliases, and the embedding
    // model (always loaded), so that a router sends each where it is served.
    let mut names: Vec<(String, bool)> = Vec::new();
    for status in state.models.statuses() {
        let loaded = status.state == crate::models::ModelState::Loaded;
        names.push((status.id, loaded));
        names.extend(status.aliases.into_iter().map(|a| (a, loaded)));
    }
    if let Some(embedder) = &state.embedder {
        names.push((embedder.model_id().to_owned(), true));
    }
    for (model, loaded) in names {
        let model = model.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(out, "{name}{{model_name=\"{model}\"}} {}", u8::from(loaded));
    }
}

/// Several models' exposition texts as one: each metric family's `# HELP` and `# TYPE` once,
/// then every model's samples of it (the format allows a family only once).
fn merge(texts: &[String]) -> String {
    if let [one] = texts {
        return one.clone();
    }
    // (family name, its header lines, its samples), in first-seen order.
    let mut families: Vec<(String, String, String)> = Vec::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                let found = families.iter().position(|f| f.0 == name);
                current = Some(found.unwrap_or_else(|| {
                    families.push((name.to_owned(), format!("{line}\n"), String::new()));
                    families.len() - 1
                }));
            } else if let Some(i) = current {
                let family = &mut families[i];
                if line.starts_with("# TYPE ") {
                    if !family.1.contains("# TYPE ") {
                        family.1.push_str(line);
                        family.1.push('\n');
                    }
                } else {
                    family.2.push_str(line);
                    family.2.push('\n');
                }
            }
        }
    }
    families
        .into_iter()
        .map(|(_, header, samples)| header + &samples)
        .collect()
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, label: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{label}}} {value}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, label: &str, h: &HistogramSnapshot) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (le, count) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{label}}} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{{{label}}} {}", h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> MetricsSnapshot {
        let hist = HistogramSnapshot {
            buckets: vec![(0.01, 1), (0.1, 3)],
            count: 4,
            sum_seconds: 1.5,
        };
        MetricsSnapshot {
            running: 2,
            waiting: 1,
            kv_blocks_used: 25,
            kv_blocks_total: 100,
            kv_window_blocks_used: 3,
            kv_window_blocks_total: 40,
            kv_block_tokens: 16,
            prefix_query_tokens: 200,
            prefix_hit_tokens: 50,
            prompt_tokens: 200,
            generation_tokens: 30,
            requests_finished: 3,
            requests_rejected: 0,
            preemptions: 0,
            spec_draft_tokens: 12,
            spec_accepted_tokens: 9,
            time_to_first_token: hist.clone(),
            inter_token_latency: hist.clone(),
            request_latency: hist,
            energy: engine::EnergySnapshot {
                meter: "model",
                kind: engine::EnergyKind::Modelled,
                requests_uj: 2_500_000,
                idle_uj: 500,
            },
        }
    }

    #[test]
    fn text_format_has_our_and_vllm_names() {
        let text = render("m\"x", &snapshot());
        for line in [
            "souverain_requests_running{model_name=\"m\\\"x\"} 2",
            "vllm:num_requests_waiting{model_name=\"m\\\"x\"} 1",
            "vllm:kv_cache_usage_perc{model_name=\"m\\\"x\"} 0.25",
            "souverain_prefix_cache_hit_ratio{model_name=\"m\\\"x\"} 0.25",
            "souverain_time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"0.1\"} 3",
            "souverain_time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"+Inf\"} 4",
            "vllm:inter_token_latency_seconds_count{model_name=\"m\\\"x\"} 4",
            "# TYPE souverain_generation_tokens_total counter",
            "souverain_energy_joules_total{model_name=\"m\\\"x\",source=\"modelled\",meter=\"model\",kind=\"requests\"} 2.5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn idle_energy_is_the_processs_once_beside_each_models_requests() {
        let mut b = snapshot();
        b.energy.requests_uj = 1_000_000;
        let text = merge(&[
            render("a", &snapshot()),
            render("b", &b),
            energy_idle(&snapshot().energy),
        ]);
        let energy: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("souverain_energy_joules_total"))
            .collect();
        assert_eq!(
            energy,
            [
                "souverain_energy_joules_total{model_name=\"a\",source=\"modelled\",meter=\"model\",kind=\"requests\"} 2.5",
                "souverain_energy_joules_total{model_name=\"b\",source=\"modelled\",meter=\"model\",kind=\"requests\"} 1",
                "souverain_energy_joules_total{source=\"modelled\",meter=\"model\",kind=\"idle\"} 0.0005",
            ],
            "{text}"
        );
        let headers = text
            .lines()
            .filter(|l| l.starts_with("# TYPE souverain_energy_joules_total"))
            .count();
        assert_eq!(headers, 1, "{text}");
    }

    #[test]
    fn several_models_share_each_family_header() {
        let text = merge(&[render("a", &snapshot()), render("b", &snapshot())]);
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(types.len(), unique.len(), "{text}");
        let at = |line: &str| text.lines().position(|l| l == line).unwrap();
        let header = at("# TYPE souverain_requests_running gauge");
        let a = at("souverain_requests_running{model_name=\"a\"} 2");
        let b = at("souverain_requests_running{model_name=\"b\"} 2");
        assert!(header < a && a + 1 == b, "{text}");
        assert_eq!(merge(&[render("a", &snapshot())]), render("a", &snapshot()));
    }
}
