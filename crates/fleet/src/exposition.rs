//! The Prometheus text both front ends write: the router's `/metrics` and the endpoint
//! picker's. One writer for the per-upstream series, so both name and label them alike
//! (`upstream`, `region`, `engine`) and one set of recording rules reads either.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::upstream::Upstream;

/// One per-upstream series: its name after the front's prefix, its help, its type, its value.
pub(crate) struct UpstreamSeries {
    pub(crate) suffix: &'static str,
    pub(crate) help: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) value: fn(&Upstream) -> f64,
}

/// Health, requests routed and the scraped load: what both fronts know of every upstream.
pub(crate) const SHARED: [UpstreamSeries; 4] = [
    UpstreamSeries {
        suffix: "healthy",
        help: "1 if the upstream is healthy.",
        kind: "gauge",
        value: |u| f64::from(u8::from(u.is_healthy())),
    },
    UpstreamSeries {
        suffix: "routed_total",
        help: "Requests routed to the upstream.",
        kind: "counter",
        value: |u| u.routed() as f64,
    },
    UpstreamSeries {
        suffix: "waiting",
        help: "Requests waiting at the upstream, as last scraped.",
        kind: "gauge",
        value: |u| u.load().waiting,
    },
    UpstreamSeries {
        suffix: "kv_cache_usage",
        help: "The upstream's KV cache usage, as last scraped.",
        kind: "gauge",
        value: |u| u.load().kv_usage,
    },
];

/// A label value escaped as the text format asks (backslash, quote, newline).
pub(crate) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes `series` for every member, named `{prefix}_{suffix}`.
pub(crate) fn write_upstreams(
    out: &mut String,
    prefix: &str,
    members: &[Arc<Upstream>],
    series: &[UpstreamSeries],
) {
    for s in series {
        let name = format!("{prefix}_{}", s.suffix);
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", s.help, s.kind);
        for u in members {
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{}\",region=\"{}\",engine=\"{}\"}} {}",
                escape(u.name()),
                escape(&u.spec().region),
                u.spec().engine.as_str(),
                (s.value)(u)
            );
        }
    }
}

/// Writes one counter family with one label, `label`, taking each of `values`.
pub(crate) fn write_counter(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

/// The page as Prometheus's text format 0.0.4.
pub(crate) fn response(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
