//! The router's configuration file (TOML), read and checked once at start-up.
//!
//! ```toml
//! listen = "0.0.0.0:8080"
//! [routing]
//! strategy = "scored"            # or "round-robin"
//! [routing.weights]
//! prefix = 3.0
//! queue = 1.0
//! kv_cache = 1.0
//! in_flight = 1.0
//! session = 2.0
//! [scrape]
//! interval_ms = 500
//! [[upstream]]
//! name = "paris-1"
//! url = "http://10.0.0.1:8000"
//! engine = "vllm"
//! region = "eu-west-paris"
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::FleetError;
use crate::upstream::{EngineKind, UpstreamSpec};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Where the router's HTTP API listens.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// How upstreams are picked.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// How upstreams' load and health are read.
    #[serde(default)]
    pub scrape: ScrapeConfig,
    /// How requests are forwarded.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// A static list of upstreams.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamSpec>,
    /// Upstreams found by a watch on Kubernetes.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

/// How a request's upstream is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Weighted scores: load, prefix-cache affinity, session affinity.
    #[default]
    Scored,
    /// Each eligible upstream in turn (for comparison).
    RoundRobin,
}

/// The weights of the scorers; a weight of 0 turns a scorer off.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// Share of the prompt's leading blocks last routed to the upstream.
    pub prefix: f64,
    /// Shortness of its waiting queue, relative to the others'.
    pub queue: f64,
    /// Free fraction of its KV cache.
    pub kv_cache: f64,
    /// Fewness of the router's own requests in flight to it, relative to the others'.
    pub in_flight: f64,
    /// 1 for the upstream the request's session went to last.
    pub session: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            prefix: 3.0,
            queue: 1.0,
            kv_cache: 1.0,
            in_flight: 1.0,
            session: 2.0,
        }
    }
}

/// Routing settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Scored or round-robin.
    pub strategy: Strategy,
    /// The scorers' weights.
    pub weights: Weights,
    /// Bytes of prompt per prefix block (about a quarter as many tokens).
    pub block_bytes: usize,
    /// Prefix blocks remembered per upstream (least recently routed forgotten first).
    pub prefix_blocks_per_upstream: usize,
    /// Sessions remembered (least recently seen forgotten first).
    pub max_sessions: usize,
    /// The header naming a request's session.
    pub session_header: String,
    /// An upstream with this many requests waiting is saturated.
    pub queue_saturation: f64,
    /// An upstream whose KV cache is this full is saturated.
    pub kv_saturation: f64,
    /// The most requests the router keeps in flight to one upstream (0: no limit).
    pub max_in_flight: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            strategy: Strategy::Scored,
            weights: Weights::default(),
            block_bytes: 256,
            prefix_blocks_per_upstream: 65_536,
            max_sessions: 100_000,
            session_header: "x-session-id".to_owned(),
            queue_saturation: 64.0,
            kv_saturation: 0.98,
            max_in_flight: 0,
        }
    }
}

/// Load and health reading.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    /// How often each upstream's metrics and health are read.
    pub interval_ms: u64,
    /// How long one read may take.
    pub timeout_ms: u64,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            interval_ms: 500,
            timeout_ms: 1_000,
        }
    }
}

impl ScrapeConfig {
    /// The interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Forwarding settings.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Other upstreams tried when a connection fails before the first byte.
    pub retries: usize,
    /// How long to wait for an upstream's response headers.
    pub connect_timeout_ms: u64,
    /// The completion limit reserved for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            retries: 2,
            connect_timeout_ms: 30_000,
            default_max_tokens: 4_096,
        }
    }
}

/// Where upstreams come from besides the static list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A Kubernetes watch.
    pub kubernetes: Option<KubernetesDiscovery>,
}

/// The pods of an InferencePool, or the endpoints of a Service, followed with a watch.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// The namespace watched.
    pub namespace: String,
    /// An InferencePool (`inference.networking.k8s.io/v1`): its selector and target port.
    #[serde(default)]
    pub inference_pool: Option<String>,
    /// A Service: its EndpointSlices.
    #[serde(default)]
    pub service: Option<String>,
    /// The port to use (default: the pool's first target port, or the slice's first port).
    #[serde(default)]
    pub port: Option<u16>,
    /// The engine the pods run.
    #[serde(default = "default_engine")]
    pub engine: EngineKind,
    /// The pod label holding the region.
    #[serde(default = "default_region_label")]
    pub region_label: String,
    /// The region of pods without that label (none: such pods are left out).
    #[serde(default)]
    pub default_region: Option<String>,
    /// The models the pods serve (empty: whatever is asked).
    #[serde(default)]
    pub models: Vec<String>,
}

fn default_engine() -> EngineKind {
    EngineKind::Souverain
}

fn default_region_label() -> String {
    "topology.kubernetes.io/region".to_owned()
}

impl RouterConfig {
    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> Result<Self, FleetError> {
        let config: RouterConfig = toml::from_str(text).map_err(|e| FleetError::Config {
            message: e.to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|e| FleetError::Config {
            message: format!("reading {}: {e}", path.display()),
        })?;
        RouterConfig::parse(&text).map_err(|e| FleetError::Config {
            message: format!("{}: {e}", path.display()),
        })
    }

    fn check(&self) -> Result<(), FleetError> {
        let bad = |message: &str| {
            Err(FleetError::Config {
                message: message.to_owned(),
            })
        };
        let r = &self.routing;
        let w = r.weights;
        for (name, v) in [
            ("prefix", w.prefix),
            ("queue", w.queue),
            ("kv_cache", w.kv_cache),
            ("in_flight", w.in_flight),
            ("session", w.session),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(&format!(
                    "routing.weights.{name} must be a finite number >= 0"
                ));
            }
        }
        if !(64..=1 << 20).contains(&r.block_bytes) {
            return bad("routing.block_bytes must be between 64 and 1048576");
        }
        if r.prefix_blocks_per_upstream == 0 || r.max_sessions == 0 {
            return bad("routing.prefix_blocks_per_upstream and max_sessions must be > 0");
        }
        if r.session_header.is_empty()
            || axum::http::HeaderName::from_bytes(r.session_header.as_bytes()).is_err()
        {
            return bad("routing.session_header must be a header name");
        }
        let queue_ok = r.queue_saturation.is_finite() && r.queue_saturation > 0.0;
        let kv_ok = r.kv_saturation > 0.0 && r.kv_saturation <= 1.0;
        if !(queue_ok && kv_ok) {
            return bad("routing.queue_saturation must be > 0 and kv_saturation in (0, 1]");
        }
        if self.scrape.interval_ms < 10 || self.scrape.timeout_ms == 0 {
            return bad("scrape.interval_ms must be >= 10 and timeout_ms > 0");
        }
        if self.proxy.default_max_tokens == 0 {
            return bad("proxy.default_max_tokens must be > 0");
        }
        for u in &self.upstreams {
            u.validate()?;
        }
        if let Some(k) = &self.discovery.kubernetes {
            if !self.upstreams.is_empty() {
                return bad("list [[upstream]]s or configure discovery.kubernetes, not both");
            }
            if k.inference_pool.is_some() == k.service.is_some() {
                return bad("discovery.kubernetes names exactly one of inference_pool and service");
            }
            if let Some(region) = &k.default_region
                && !control::valid_region(region)
            {
                return bad("discovery.kubernetes.default_region is not a region label");
            }
        } else if self.upstreams.is_empty() {
            return bad("no upstreams: list [[upstream]]s or configure discovery.kubernetes");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let config = RouterConfig::parse(
            r#"
listen = "0.0.0.0:9000"
[routing]
strategy = "round-robin"
block_bytes = 128
[routing.weights]
prefix = 0.0
[scrape]
interval_ms = 250
[[upstream]]
name = "a"
url = "http://127.0.0.1:8001"
engine = "sglang"
region = "eu-west"
models = ["m"]
[[upstream]]
name = "b"
url = "http://127.0.0.1:8002"
engine = "llama-cpp"
region = "eu-north"
"#,
        )
        .unwrap();
        assert_eq!(config.routing.strategy, Strategy::RoundRobin);
        assert_eq!(config.routing.weights.prefix, 0.0);
        assert_eq!(config.routing.weights.queue, 1.0);
        assert_eq!(config.upstreams[1].engine, EngineKind::LlamaCpp);
        assert_eq!(config.scrape.interval_ms, 250);
    }

    #[test]
    fn bad_files_say_why() {
        for (text, needle) in [
            ("", "no upstreams"),
            ("bogus = 1", "unknown field"),
            (
                "[routing.weights]\nprefix = -1\n[[upstream]]\nname='a'\nurl='http://h:1'\nengine='vllm'\nregion='r'",
                "weights.prefix",
            ),
            (
                "[[upstream]]\nname='a'\nurl='http://h:1'\nengine='nope'\nregion='r'",
                "unknown variant",
            ),
            (
                "[[upstream]]\nname='a'\nurl='https://h:1'\nengine='vllm'\nregion='r'",
                "http://",
            ),
            ("[discovery.kubernetes]\nnamespace='n'", "exactly one"),
        ] {
            let err = RouterConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
