//! Reading each upstream's load from its Prometheus metrics, and its health from its health
//! endpoint, at a bounded interval.
//!
//! The adapters know which series each engine exports ([`EngineKind`]); the text format is
//! Prometheus' exposition format, of which [`parse_metrics`] reads the sample lines.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;

use crate::client::HttpClient;
use crate::config::ScrapeConfig;
use crate::upstream::{EngineKind, Load, Pool, Upstream};

/// The most bytes of a metrics page read.
pub const MAX_METRICS_BYTES: usize = 4 << 20;

/// One sample: metric name, labels as written, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample<'a> {
    /// The metric's name.
    pub name: &'a str,
    /// The text between the braces (empty without labels).
    pub labels: &'a str,
    /// The value.
    pub value: f64,
}

/// The samples of a Prometheus text page; comments and lines that are not samples are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample<'_>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        let mut labels = "";
        if rest.starts_with('{') {
            // Label values may hold `}` inside quotes: find the closing brace outside them.
            let mut in_quotes = false;
            let mut escaped = false;
            let mut close = None;
            for (i, c) in rest.char_indices().skip(1) {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if in_quotes => escaped = true,
                    '"' => in_quotes = !in_quotes,
                    '}' if !in_quotes => {
                        close = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let Some(close) = close else { continue };
            labels = &rest[1..close];
            rest = &rest[close + 1..];
        }
        let Some(value) = rest.split_ascii_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        if name.is_empty() || !value.is_finite() {
            continue;
        }
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Which series an engine's load is read from: waiting, running, KV usage (fraction).
fn series(
    kind: EngineKind,
) -> (
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
) {
    match kind {
        EngineKind::Souverain | EngineKind::Vllm => (
            &["vllm:num_requests_waiting"],
            &["vllm:num_requests_running"],
            &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        ),
        EngineKind::Sglang => (
            &["sglang:num_queue_reqs"],
            &["sglang:num_running_reqs"],
            &["sglang:token_usage"],
        ),
        EngineKind::LlamaCpp => (
            &["llamacpp:requests_deferred"],
            &["llamacpp:requests_processing"],
            &["llamacpp:kv_cache_usage_ratio"],
        ),
        EngineKind::Tgi => (&["tgi_queue_size"], &["tgi_batch_current_size"], &[]),
        EngineKind::Openai => (&[], &[], &[]),
    }
}

/// An engine's load from its metrics page: counts summed over series (several models or
/// data-parallel ranks), KV usage the highest. `None` when the page has none of the
/// engine's series.
pub fn load_from_metrics(kind: EngineKind, text: &str) -> Option<Load> {
    let samples = parse_metrics(text);
    let (waiting, running, kv) = series(kind);
    let mut found = false;
    let mut sum = |names: &[&str]| -> f64 {
        // The first name present wins (a newer engine's name before an older one's).
        for name in names {
            let values: Vec<f64> = samples
                .iter()
                .filter(|s| s.name == *name)
                .map(|s| s.value)
                .collect();
            if !values.is_empty() {
                found = true;
                return values.iter().sum();
            }
        }
        0.0
    };
    let waiting = sum(waiting);
    let running = sum(running);
    let mut kv_usage: f64 = 0.0;
    'names: for name in kv {
        let mut any = false;
        for s in samples.iter().filter(|s| s.name == *name) {
            any = true;
            kv_usage = kv_usage.max(s.value);
        }
        if any {
            found = true;
            break 'names;
        }
    }
    found.then_some(Load {
        waiting: waiting.max(0.0),
        running: running.max(0.0),
        kv_usage: kv_usage.clamp(0.0, 1.0),
    })
}

/// The models a Souverain replica serves and whether each is loaded
/// (`souverain_model_loaded{model_name="..."} 0|1`); `None` when the page has no such series.
pub fn models_from_metrics(text: &str) -> Option<Vec<(String, bool)>> {
    let models: Vec<(String, bool)> = parse_metrics(text)
        .iter()
        .filter(|s| s.name == "souverain_model_loaded")
        .filter_map(|s| Some((label(s.labels, "model_name")?, s.value >= 1.0)))
        .collect();
    (!models.is_empty()).then_some(models)
}

/// The value of label `key` in a sample's label text (`a="x",b="y\"z"`), unescaped; names
/// longer than 256 characters are dropped.
fn label(labels: &str, key: &str) -> Option<String> {
    let mut rest = labels;
    loop {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        if name.trim_start_matches(',').trim() == key {
            return (value.chars().count() <= 256).then_some(value);
        }
        rest = &after[end + 1..];
    }
}

/// GETs `url` and returns the body if the answer is a 2xx within `timeout` and `limit` bytes.
pub(crate) async fn get_text(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
    limit: usize,
) -> Result<String, String> {
    let request = axum::http::Request::get(url)
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Probes one upstream's health and reads its load.
pub async fn scrape_once(client: &HttpClient, upstream: &Upstream, timeout: Duration) {
    let spec = upstream.spec();
    let base = spec.url.trim_end_matches('/');
    let health = get_text(
        client,
        &format!("{base}{}", spec.engine.health_path()),
        timeout,
        64 << 10,
    )
    .await;
    match health {
        Ok(_) => {
            upstream.set_healthy(true);
        }
        Err(error) => {
            if upstream.set_healthy(false) {
                tracing::warn!(upstream = upstream.name(), %error, "health probe failed");
            }
            return;
        }
    }
    let Some(path) = spec.engine.metrics_path() else {
        return;
    };
    match get_text(client, &format!("{base}{path}"), timeout, MAX_METRICS_BYTES).await {
        Ok(text) => {
            if let Some(models) = models_from_metrics(&text) {
                upstream.set_models(models);
            }
            match load_from_metrics(spec.engine, &text) {
                Some(load) => upstream.set_load(load),
                None => tracing::debug!(
                    upstream = upstream.name(),
                    engine = spec.engine.as_str(),
                    "metrics page has none of the engine's load series"
                ),
            }
        }
        Err(error) => tracing::debug!(upstream = upstream.name(), %error, "metrics read failed"),
    }
}

/// Reads every member of the pool every `config.interval` (all members concurrently), for as
/// long as the returned task runs.
pub fn spawn_scraper(
    pool: Arc<Pool>,
    client: HttpClient,
    config: ScrapeConfig,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let members = pool.snapshot();
            let timeout = config
                .timeout()
                .min(config.interval().max(Duration::from_millis(10)));
            futures::future::join_all(members.iter().map(|u| scrape_once(&client, u, timeout)))
                .await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_as_prometheus_writes_them() {
        let text = "# HELP x y\n# TYPE x gauge\nx 1\ny{a=\"b}\",c=\"\\\"\"} 2.5 1700000000\n\
                    z{} NaN\nbad line here\nw +Inf\nv{unclosed=\"1\" 3\nq -4e2\n";
        let samples = parse_metrics(text);
        let got: Vec<(&str, &str, f64)> = samples
            .iter()
            .map(|s| (s.name, s.labels, s.value))
            .collect();
        assert_eq!(
            got,
            vec![
                ("x", "", 1.0),
                ("y", "a=\"b}\",c=\"\\\"\"", 2.5),
                ("q", "", -400.0)
            ]
        );
    }

    #[test]
    fn each_engine_is_read_from_its_own_series() {
        let vllm = "vllm:num_requests_waiting{model_name=\"a\"} 3\n\
                    vllm:num_requests_waiting{model_name=\"b\"} 2\n\
                    vllm:num_requests_running{model_name=\"a\"} 7\n\
                    vllm:kv_cache_usage_perc{model_name=\"a\"} 0.5\n\
                    vllm:kv_cache_usage_perc{model_name=\"b\"} 0.75\n";
        assert_eq!(
            load_from_metrics(EngineKind::Vllm, vllm),
            Some(Load {
                waiting: 5.0,
                running: 7.0,
                kv_usage: 0.75
            })
        );
        let old_vllm = "vllm:gpu_cache_usage_perc 0.25\n";
        assert_eq!(
            load_from_metrics(EngineKind::Vllm, old_vllm)
                .unwrap()
                .kv_usage,
            0.25
        );
        let sglang = "sglang:num_queue_reqs{tp_rank=\"0\"} 4\nsglang:num_running_reqs 2\n\
                      sglang:token_usage 0.3\n";
        assert_eq!(
            load_from_metrics(EngineKind::Sglang, sglang),
            Some(Load {
                waiting: 4.0,
                running: 2.0,
                kv_usage: 0.3
            })
        );
        let llama = "llamacpp:requests_processing 3\nllamacpp:requests_deferred 1\n";
        assert_eq!(
            load_from_metrics(EngineKind::LlamaCpp, llama),
            Some(Load {
                waiting: 1.0,
                running: 3.0,
                kv_usage: 0.0
            })
        );
        let tgi = "tgi_queue_size 6\ntgi_batch_current_size 9\n";
        assert_eq!(
            load_from_metrics(EngineKind::Tgi, tgi),
            Some(Load {
                waiting: 6.0,
                running: 9.0,
                kv_usage: 0.0
            })
        );
        // Another engine's page says nothing of this one's load.
        assert_eq!(load_from_metrics(EngineKind::Sglang, vllm), None);
        assert_eq!(load_from_metrics(EngineKind::Openai, vllm), None);
        // Out-of-range values are clamped.
        assert_eq!(
            load_from_metrics(EngineKind::Vllm, "vllm:kv_cache_usage_perc 7\n")
                .unwrap()
                .kv_usage,
            1.0
        );
    }
}
