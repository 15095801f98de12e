//! Upstream replicas: what the configuration says of each ([`UpstreamSpec`]) and what the
//! router knows of it while it runs ([`Upstream`]: health, load, requests in flight), in a
//! [`Pool`] whose membership discovery replaces as replicas come and go.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde::Deserialize;

use crate::FleetError;

/// The engine behind an upstream, which says where its load is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum EngineKind {
    /// A Souverain replica (`souverain serve`): vLLM's metric names, among its own.
    Souverain,
    /// vLLM: `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`.
    Vllm,
    /// SGLang: `sglang:num_queue_reqs`, `sglang:num_running_reqs`, `sglang:token_usage`.
    Sglang,
    /// llama.cpp's server (`--metrics`): `llamacpp:requests_deferred`,
    /// `llamacpp:requests_processing`, `llamacpp:kv_cache_usage_ratio`.
    LlamaCpp,
    /// Hugging Face TGI: `tgi_queue_size`, `tgi_batch_current_size`.
    Tgi,
    /// Any other OpenAI-compatible endpoint: no metrics, load from the router's own count.
    Openai,
}

impl EngineKind {
    /// The path of its Prometheus metrics, if it has any.
    pub fn metrics_path(self) -> Option<&'static str> {
        match self {
            EngineKind::Openai => None,
            _ => Some("/metrics"),
        }
    }

    /// The path its health is probed on (a 2xx answer means healthy).
    pub fn health_path(self) -> &'static str {
        match self {
            EngineKind::Openai => "/v1/models",
            _ => "/health",
        }
    }

    /// The name used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Souverain => "souverain",
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::LlamaCpp => "llama-cpp",
            EngineKind::Tgi => "tgi",
            EngineKind::Openai => "openai",
        }
    }
}

/// One upstream as configuration or discovery describes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// A name unique in the pool (discovery uses the pod's name).
    pub name: String,
    /// Its base URL, `http://host:port` (the OpenAI API is under `/v1`).
    pub url: String,
    /// The engine it runs.
    pub engine: EngineKind,
    /// Its region label: an organisation's requests go only to replicas in its allowed regions.
    pub region: String,
    /// The models it serves; empty means whatever is asked.
    #[serde(default)]
    pub models: Vec<String>,
}

impl UpstreamSpec {
    /// Checks the name, URL and region; returns the `host:port` the URL names.
    pub fn validate(&self) -> Result<String, FleetError> {
        let bad = |message: String| FleetError::Config {
            message: format!("upstream `{}`: {message}", self.name),
        };
        if self.name.is_empty() || self.name.len() > 253 || self.name.chars().any(char::is_control)
        {
            return Err(bad("the name must be 1 to 253 printable characters".into()));
        }
        if !control::valid_region(&self.region) {
            return Err(bad(format!(
                "`{}` is not a region label (1 to 64 of a-z, 0-9 and -)",
                self.region
            )));
        }
        let uri: hyper::Uri = self
            .url
            .parse()
            .map_err(|e| bad(format!("`{}` is not a URL: {e}", self.url)))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(format!(
                "`{}` must be an http:// URL (TLS is the mesh's or gateway's job)",
                self.url
            )));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad(format!(
                "`{}` must be a base URL without a path",
                self.url
            )));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| bad(format!("`{}` names no host", self.url)))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(format!("{}:{port}", authority.host()))
    }

    /// Whether it serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// Most models remembered per upstream from its metrics.
pub const MAX_SEEN_MODELS: usize = 1024;

/// An upstream's load as its metrics last said.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Requests waiting in its queue.
    pub waiting: f64,
    /// Requests it is running.
    pub running: f64,
    /// Fraction of its KV cache in use, 0 to 1.
    pub kv_usage: f64,
}

/// One upstream while the router runs.
#[derive(Debug)]
pub struct Upstream {
    spec: UpstreamSpec,
    authority: String,
    healthy: AtomicBool,
    load: RwLock<(Load, Option<Instant>)>,
    /// The models its metrics list (`souverain_model_loaded`) and whether each is loaded;
    /// empty until a scrape finds them.
    models: RwLock<Vec<(String, bool)>>,
    in_flight: AtomicU64,
    in_flight_tokens: AtomicU64,
    routed: AtomicU64,
    failures: AtomicU64,
}

impl Upstream {
    /// A new upstream from a validated spec. It starts healthy: the first probe corrects it.
    pub fn new(spec: UpstreamSpec) -> Result<Self, FleetError> {
        let authority = spec.validate()?;
        Ok(Upstream {
            spec,
            authority,
            healthy: AtomicBool::new(true),
            load: RwLock::new((Load::default(), None)),
            models: RwLock::new(Vec::new()),
            in_flight: AtomicU64::new(0),
            in_flight_tokens: AtomicU64::new(0),
            routed: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// What configuration or discovery said of it.
    pub fn spec(&self) -> &UpstreamSpec {
        &self.spec
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// `host:port`, as Envoy's `x-gateway-destination-endpoint` names it.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Whether it answered its last health probe and no connection to it failed since.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Marks it healthy or not; returns whether that changed anything.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            tracing::info!(upstream = self.name(), healthy, "upstream health changed");
        }
        was != healthy
    }

    /// Its load as last scraped (the default before the first scrape).
    pub fn load(&self) -> Load {
        self.load.read().map(|l| l.0).unwrap_or_default()
    }

    /// Whether it serves `model`: as configured, else as its metrics list its models (a
    /// replica serving several), else whatever is asked.
    pub fn serves(&self, model: &str) -> bool {
        if !self.spec.models.is_empty() {
            return self.spec.serves(model);
        }
        match self.models.read() {
            Ok(seen) if !seen.is_empty() => seen.iter().any(|(m, _)| m == model),
            _ => true,
        }
    }

    /// Whether its metrics say `model` is loaded (in memory, no load to wait for).
    pub fn has_loaded(&self, model: &str) -> bool {
        self.models
            .read()
            .is_ok_and(|seen| seen.iter().any(|(m, loaded)| *loaded && m == model))
    }

    /// Records the models its metrics list, at most [`MAX_SEEN_MODELS`].
    pub fn set_models(&self, mut models: Vec<(String, bool)>) {
        models.truncate(MAX_SEEN_MODELS);
        if let Ok(mut seen) = self.models.write() {
            *seen = models;
        }
    }

    /// When its load was last scraped.
    pub fn scraped_at(&self) -> Option<Instant> {
        self.load.read().ok().and_then(|l| l.1)
    }

    /// Records a scrape.
    pub fn set_load(&self, load: Load) {
        if let Ok(mut l) = self.load.write() {
            *l = (load, Some(Instant::now()));
        }
    }

    /// Requests the router has sent it that have not ended.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Tokens (prompt estimate plus completion limit) of those requests.
    pub fn in_flight_tokens(&self) -> u64 {
        self.in_flight_tokens.load(Ordering::Relaxed)
    }

    /// Requests routed to it since it joined.
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Connections to it that failed since it joined.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Counts a failed connection and takes it out of rotation until a probe succeeds.
    pub fn connection_failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.set_healthy(false);
    }

    /// Counts a request placed on it by the endpoint picker, which hands the request to the
    /// gateway and so never sees it end (nothing is counted in flight).
    pub fn placed(&self) {
        self.routed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request of `tokens` as in flight until the guard drops.
    pub fn begin(self: &Arc<Self>, tokens: u64) -> InFlight {
        self.routed.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        InFlight {
            upstream: Arc::clone(self),
            tokens,
        }
    }
}

/// A request in flight to an upstream; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    tokens: u64,
}

impl InFlight {
    /// The upstream.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.upstream
            .in_flight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// The upstreams the router may pick from. Readers take a snapshot (an `Arc` of the list,
/// never a lock held across a request); discovery replaces the membership as a whole.
#[derive(Debug, Default)]
pub struct Pool {
    members: RwLock<Arc<Vec<Arc<Upstream>>>>,
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Pool::default()
    }

    /// A pool of these upstreams (names must be unique).
    pub fn with(specs: Vec<UpstreamSpec>) -> Result<Self, FleetError> {
        let pool = Pool::new();
        pool.replace(specs)?;
        Ok(pool)
    }

    /// The members now.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.members
            .read()
            .map(|m| Arc::clone(&m))
            .unwrap_or_default()
    }

    /// The member named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.snapshot().iter().find(|u| u.name() == name).cloned()
    }

    /// Replaces the membership. A member whose spec did not change keeps its state (health,
    /// load, counts); new ones start fresh; the others leave (requests in flight to them
    /// finish). Fails, changing nothing, on an invalid spec or a repeated name.
    pub fn replace(&self, specs: Vec<UpstreamSpec>) -> Result<(), FleetError> {
        let current = self.snapshot();
        let mut next: Vec<Arc<Upstream>> = Vec::with_capacity(specs.len());
        for spec in specs {
            if next.iter().any(|u| u.name() == spec.name) {
                return Err(FleetError::Config {
                    message: format!("upstream `{}` is named twice", spec.name),
                });
            }
            match current.iter().find(|u| u.spec == spec) {
                Some(kept) => next.push(Arc::clone(kept)),
                None => next.push(Arc::new(Upstream::new(spec)?)),
            }
        }
        let joined: Vec<&str> = next
            .iter()
            .filter(|u| !current.iter().any(|c| Arc::ptr_eq(c, u)))
            .map(|u| u.name())
            .collect();
        let left: Vec<&str> = current
            .iter()
            .filter(|c| !next.iter().any(|u| Arc::ptr_eq(c, u)))
            .map(|u| u.name())
            .collect();
        if !joined.is_empty() || !left.is_empty() {
            tracing::info!(
                ?joined,
                ?left,
                members = next.len(),
                "upstream pool changed"
            );
        }
        if let Ok(mut members) = self.members.write() {
            *members = Arc::new(next);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, url: &str) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            url: url.into(),
            engine: EngineKind::Vllm,
            region: "eu-west".into(),
            models: vec![],
        }
    }

    #[test]
    fn specs_are_checked() {
        assert_eq!(
            spec("a", "http://10.0.0.1:8000").validate().unwrap(),
            "10.0.0.1:8000"
        );
        assert_eq!(spec("a", "http://h/").validate().unwrap(), "h:80");
        for url in ["https://h:1", "h:1", "http://h:1/v1", "http://h:1?x=1", ""] {
            assert!(spec("a", url).validate().is_err(), "{url}");
        }
        let mut bad_region = spec("a", "http://h:1");
        bad_region.region = "EU".into();
        assert!(bad_region.validate().is_err());
        assert!(spec("", "http://h:1").validate().is_err());
    }

    #[test]
    fn replacing_keeps_unchanged_members_state() {
        let pool = Pool::with(vec![spec("a", "http://h:1"), spec("b", "http://h:2")]).unwrap();
        let a = pool.get("a").unwrap();
        a.set_healthy(false);
        let guard = a.begin(10);
        pool.replace(vec![spec("a", "http://h:1"), spec("c", "http://h:3")])
            .unwrap();
        let a2 = pool.get("a").unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        assert!(!a2.is_healthy());
        assert_eq!((a2.in_flight(), a2.in_flight_tokens()), (1, 10));
        drop(guard);
        assert_eq!((a2.in_flight(), a2.in_flight_tokens()), (0, 0));
        assert!(pool.get("b").is_none());
        assert!(pool.get("c").unwrap().is_healthy());
        // A repeated name or a bad spec changes nothing.
        assert!(
            pool.replace(vec![spec("x", "http://h:1"), spec("x", "http://h:2")])
                .is_err()
        );
        assert!(pool.replace(vec![spec("y", "ftp://h")]).is_err());
        assert_eq!(pool.snapshot().len(), 2);
    }
}
