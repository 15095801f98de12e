//! Upstreams found by watching the Kubernetes API: the pods an InferencePool
//! (`inference.networking.k8s.io/v1`) selects, or the endpoints of a Service's EndpointSlices.
//!
//! Each watched resource costs one list and then one long-lived watch (kube's
//! [`watcher`](kube::runtime::watcher::watcher), which re-lists only when the API server says
//! the watch fell too far behind). The objects seen are kept in memory and, after each change,
//! the [`Pool`]'s membership is replaced as a whole. Nothing here runs per request: the router
//! only ever reads [`Pool::snapshot`].
//!
//! - InferencePool mode: the pool object gives the pod label selector
//!   (`spec.selector.matchLabels`) and the port (`spec.targetPorts[0].number`, unless the
//!   configuration names one). A pod is an upstream while it is `Running`, has a pod IP, has
//!   its `Ready` condition `True` and is not being deleted. When the selector changes, the pod
//!   watch starts over with the new one.
//! - Service mode: the EndpointSlices labelled `kubernetes.io/service-name=<service>`; every
//!   address of an endpoint whose `ready` condition is not `false`.
//!
//! An upstream's region is the pod's region label (InferencePool mode only: EndpointSlices
//! carry no pod labels) or else the configured default region; a pod with neither, or with a
//! label that is not a region, is left out with a warning, never routed to a guessed region.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::FleetError;
use crate::config::KubernetesDiscovery;
use crate::upstream::{Pool, UpstreamSpec};

/// The label Kubernetes puts on a Service's EndpointSlices, naming the Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The API group of the InferencePool resource.
pub const INFERENCE_POOL_GROUP: &str = "inference.networking.k8s.io";

/// Starts following the InferencePool or Service that `config` names, replacing `pool`'s
/// membership after every change. The task runs until aborted; watch errors are logged and
/// retried with kube's default backoff. A configuration naming neither or both (which
/// [`RouterConfig::parse`](crate::RouterConfig::parse) refuses), or an object name that is
/// not a Kubernetes name, is logged as an error and the task ends at once.
pub fn spawn_kubernetes_discovery(
    client: Client,
    config: KubernetesDiscovery,
    pool: Arc<Pool>,
) -> JoinHandle<()> {
    let span = tracing::info_span!("kubernetes_discovery", namespace = %config.namespace);
    tokio::spawn(
        async move {
            if !valid_object_name(&config.namespace) {
                tracing::error!("`{}` is not a namespace name", config.namespace);
                return;
            }
            match (config.inference_pool.clone(), config.service.clone()) {
                (Some(name), None) if valid_object_name(&name) => {
                    follow_inference_pool(client, config, name, pool).await;
                }
                (None, Some(name)) if valid_object_name(&name) => {
                    follow_service(client, config, name, pool).await;
                }
                (Some(name), None) | (None, Some(name)) => {
                    tracing::error!("`{name}` is not a Kubernetes object name");
                }
                _ => tracing::error!(
                    "discovery.kubernetes must name exactly one of inference_pool and service"
                ),
            }
        }
        .instrument(span),
    )
}

/// The InferencePool resource (`inference.networking.k8s.io/v1`, plural `inferencepools`),
/// read as a [`DynamicObject`].
pub fn inference_pool_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(INFERENCE_POOL_GROUP, "v1", "InferencePool");
    ApiResource::from_gvk_with_plural(&gvk, "inferencepools")
}

/// What an InferencePool says of its members: which pods, and on which port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolTarget {
    /// `spec.selector.matchLabels`: a pod is a member when it carries all of them.
    pub match_labels: BTreeMap<String, String>,
    /// The port requests go to.
    pub port: u16,
}

impl PoolTarget {
    /// The label selector for the pod watch: `key=value` pairs joined by commas, in key order.
    pub fn label_selector(&self) -> String {
        self.match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Reads an InferencePool's selector and port; `port` (the configuration's) overrides the
/// pool's `targetPorts`. An empty selector is refused: it would select every pod in the
/// namespace.
pub fn pool_target(pool: &DynamicObject, port: Option<u16>) -> Result<PoolTarget, FleetError> {
    let name = pool.metadata.name.as_deref().unwrap_or("?");
    let bad = |message: String| FleetError::Config {
        message: format!("InferencePool `{name}`: {message}"),
    };
    let spec = pool
        .data
        .get("spec")
        .ok_or_else(|| bad("it has no spec".into()))?;
    let labels = spec
        .get("selector")
        .and_then(|s| s.get("matchLabels"))
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("spec.selector.matchLabels is missing".into()))?;
    let mut match_labels = BTreeMap::new();
    for (key, value) in labels {
        let value = value
            .as_str()
            .ok_or_else(|| bad(format!("label `{key}` has a value that is not a string")))?;
        if !valid_label_key(key) || !valid_label_value(value) {
            return Err(bad(format!("`{key}={value}` is not a label")));
        }
        match_labels.insert(key.clone(), value.to_owned());
    }
    if match_labels.is_empty() {
        return Err(bad(
            "spec.selector.matchLabels is empty (it would select every pod)".into(),
        ));
    }
    let port = match port {
        Some(port) => port,
        None => spec
            .get("targetPorts")
            .and_then(|p| p.get(0))
            .and_then(|p| p.get("number"))
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
            .ok_or_else(|| bad("spec.targetPorts[0].number is not a port (1 to 65535)".into()))?,
    };
    Ok(PoolTarget { match_labels, port })
}

/// Why a pod or endpoint is not an upstream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SkipReason {
    /// Its deletion has begun.
    #[error("it is being deleted")]
    Deleting,
    /// Its phase is not `Running`.
    #[error("its phase is `{0}`, not Running")]
    NotRunning(String),
    /// It has no IP address yet.
    #[error("it has no IP address")]
    NoAddress,
    /// Its readiness is not (or no longer) true.
    #[error("it is not ready")]
    NotReady,
    /// It has no region label, and no default region is configured.
    #[error("it has no `{label}` label and discovery.kubernetes.default_region is not set")]
    NoRegion {
        /// The label looked for.
        label: String,
    },
    /// Its region label is not a region (1 to 64 of a-z, 0-9 and -).
    #[error("its region `{0}` is not a region label")]
    BadRegion(String),
    /// Neither the configuration nor the EndpointSlice gives a port.
    #[error("no port: neither discovery.kubernetes.port nor the slice's ports give one")]
    NoPort,
    /// The spec it would make is invalid.
    #[error("{0}")]
    Invalid(String),
}

impl SkipReason {
    /// Whether this is a normal stage of a pod's life (starting, unready, ending) rather than
    /// a mistake someone should fix.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SkipReason::Deleting
                | SkipReason::NotRunning(_)
                | SkipReason::NoAddress
                | SkipReason::NotReady
        )
    }
}

/// A pod or endpoint left out of the pool, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` left out: {reason}")]
pub struct Skipped {
    /// The pod's name (or the endpoint's address, or the slice's name).
    pub name: String,
    /// Why.
    pub reason: SkipReason,
}

/// The upstream a pod of an InferencePool makes, if it is eligible: `Running`, with a pod
/// IP, `Ready=True`, not being deleted, and with a region.
pub fn pod_spec(
    pod: &Pod,
    port: u16,
    config: &KubernetesDiscovery,
) -> Result<UpstreamSpec, Skipped> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let skip = |reason| Skipped {
        name: name.clone(),
        reason,
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(skip(SkipReason::Deleting));
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    if phase != "Running" {
        return Err(skip(SkipReason::NotRunning(phase.to_owned())));
    }
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| skip(SkipReason::NoAddress))?;
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Err(skip(SkipReason::NotReady));
    }
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(&config.region_label));
    let region = region(label.map(String::as_str), config).map_err(skip)?;
    upstream(name.clone(), ip, port, region, config).map_err(skip)
}

/// The upstreams an EndpointSlice of a Service makes: every address of each endpoint whose
/// `ready` condition is not `false`, on the configured port or else the slice's first one,
/// named after the endpoint's pod (or its address when it names no pod), in the configured
/// default region. The endpoints left out come back as errors.
pub fn endpoint_slice_specs(
    slice: &EndpointSlice,
    config: &KubernetesDiscovery,
) -> Vec<Result<UpstreamSpec, Skipped>> {
    let slice_name = slice.metadata.name.clone().unwrap_or_default();
    let port = config.port.or_else(|| {
        slice
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
    });
    let Some(port) = port else {
        return vec![Err(Skipped {
            name: slice_name,
            reason: SkipReason::NoPort,
        })];
    };
    let mut out = Vec::new();
    for endpoint in &slice.endpoints {
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        for address in &endpoint.addresses {
            let name = match &pod {
                Some(pod) if endpoint.addresses.len() == 1 => pod.clone(),
                Some(pod) => format!("{pod}@{address}"),
                None => address.clone(),
            };
            let skip = |reason| Skipped {
                name: name.clone(),
                reason,
            };
            if !ready {
                out.push(Err(skip(SkipReason::NotReady)));
                continue;
            }
            let spec = region(None, config)
                .and_then(|region| upstream(name.clone(), address, port, region, config))
                .map_err(skip);
            out.push(spec);
        }
    }
    out
}

/// The region of a pod whose region label is `label`.
fn region(label: Option<&str>, config: &KubernetesDiscovery) -> Result<String, SkipReason> {
    match label.or(config.default_region.as_deref()) {
        Some(region) if control::valid_region(region) => Ok(region.to_owned()),
        Some(region) => Err(SkipReason::BadRegion(region.to_owned())),
        None => Err(SkipReason::NoRegion {
            label: config.region_label.clone(),
        }),
    }
}

fn upstream(
    name: String,
    host: &str,
    port: u16,
    region: String,
    config: &KubernetesDiscovery,
) -> Result<UpstreamSpec, SkipReason> {
    // An IPv6 address goes in brackets in a URL.
    let url = if host.contains(':') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    };
    let spec = UpstreamSpec {
        name,
        url,
        engine: config.engine,
        region,
        models: config.models.clone(),
    };
    spec.validate()
        .map_err(|e| SkipReason::Invalid(e.to_string()))?;
    Ok(spec)
}

/// A namespace or object name: 1 to 253 of a-z, 0-9, `-` and `.` (what goes in a field or
/// label selector, so nothing that could add a term to it).
fn valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

fn valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The objects a watcher has reported, by name (one namespace is watched). During a
/// (re-)list the new set is gathered aside and takes over at `InitDone`, so a re-list never
/// empties the pool for a moment.
#[derive(Debug)]
struct Objects<K> {
    current: BTreeMap<String, K>,
    listing: Option<BTreeMap<String, K>>,
}

impl<K> Default for Objects<K> {
    fn default() -> Self {
        Objects {
            current: BTreeMap::new(),
            listing: None,
        }
    }
}

impl<K: Resource> Objects<K> {
    /// Applies a watcher event; returns whether the current set may have changed.
    fn apply(&mut self, event: Event<K>) -> bool {
        let key = |o: &K| o.meta().name.clone().unwrap_or_default();
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                let listing = self.listing.get_or_insert_with(BTreeMap::new);
                listing.insert(key(&o), o);
                false
            }
            Event::InitDone => {
                if let Some(listed) = self.listing.take() {
                    self.current = listed;
                }
                true
            }
            Event::Apply(o) => {
                self.current.insert(key(&o), o);
                true
            }
            Event::Delete(o) => self.current.remove(&key(&o)).is_some(),
        }
    }
}

/// Replaces the pool's membership when the discovered set changes, and logs what is left
/// out once per distinct reason.
#[derive(Debug)]
struct Publisher {
    pool: Arc<Pool>,
    published: Option<Vec<UpstreamSpec>>,
    skipped: BTreeSet<String>,
}

impl Publisher {
    fn new(pool: Arc<Pool>) -> Self {
        Publisher {
            pool,
            published: None,
            skipped: BTreeSet::new(),
        }
    }

    fn publish(&mut self, found: impl IntoIterator<Item = Result<UpstreamSpec, Skipped>>) {
        let mut specs = Vec::new();
        let mut skipped = BTreeSet::new();
        for result in found {
            match result {
                Ok(spec) => specs.push(spec),
                Err(s) => {
                    let message = s.to_string();
                    if !self.skipped.contains(&message) {
                        if s.reason.is_transient() {
                            tracing::debug!("{message}");
                        } else {
                            tracing::warn!("{message}");
                        }
                    }
                    skipped.insert(message);
                }
            }
        }
        self.skipped = skipped;
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let before = specs.len();
        specs.dedup_by(|later, first| later.name == first.name);
        if specs.len() != before {
            tracing::warn!("discovered upstreams with the same name: only the first is kept");
        }
        if self.published.as_ref() == Some(&specs) {
            return;
        }
        let members_before = self.pool.snapshot().len();
        match self.pool.replace(specs.clone()) {
            Ok(()) => {
                if members_before != specs.len() {
                    tracing::info!(
                        members = specs.len(),
                        before = members_before,
                        "kubernetes discovery: pool size changed"
                    );
                }
                self.published = Some(specs);
            }
            Err(e) => tracing::warn!("kubernetes discovery: pool not updated: {e}"),
        }
    }
}

type WatchStream<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

fn watch<K>(api: Api<K>, config: watcher::Config) -> WatchStream<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Clone + Default + Eq + std::hash::Hash,
{
    watcher::watcher(api, config).default_backoff().boxed()
}

/// The next item of a stream that may not exist yet (`None`: wait forever).
async fn next_of<S: Stream + Unpin>(stream: &mut Option<S>) -> Option<S::Item> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn follow_inference_pool(
    client: Client,
    config: KubernetesDiscovery,
    name: String,
    pool: Arc<Pool>,
) {
    let pools: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &config.namespace,
        &inference_pool_resource(),
    );
    let pods: Api<Pod> = Api::namespaced(client, &config.namespace);
    let mut pool_events = watcher::watch_object(pools, &name)
        .default_backoff()
        .boxed();
    let mut pod_events: Option<WatchStream<Pod>> = None;
    let mut target: Option<PoolTarget> = None;
    let mut objects: Objects<Pod> = Objects::default();
    let mut publisher = Publisher::new(pool);
    let specs = |objects: &Objects<Pod>, port: u16| -> Vec<Result<UpstreamSpec, Skipped>> {
        objects
            .current
            .values()
            .map(|p| pod_spec(p, port, &config))
            .collect()
    };
    loop {
        tokio::select! {
            next = pool_events.next() => match next {
                None => {
                    tracing::error!(inference_pool = %name, "the InferencePool watch ended");
                    return;
                }
                Some(Err(e)) => {
                    tracing::warn!(inference_pool = %name, "watching the InferencePool: {e}");
                }
                Some(Ok(None)) => {
                    if target.take().is_some() || publisher.published.is_none() {
                        tracing::warn!(
                            inference_pool = %name,
                            "the InferencePool does not exist: no upstreams"
                        );
                    }
                    pod_events = None;
                    objects = Objects::default();
                    publisher.publish(Vec::new());
                }
                Some(Ok(Some(object))) => match pool_target(&object, config.port) {
                    Err(e) => tracing::warn!("{e}; keeping the upstreams as they are"),
                    Ok(next) if target.as_ref() == Some(&next) => {}
                    Ok(next) => {
                        let selector = next.label_selector();
                        tracing::info!(
                            inference_pool = %name,
                            %selector,
                            port = next.port,
                            "following the InferencePool's pods"
                        );
                        let same_pods =
                            target.as_ref().is_some_and(|t| t.match_labels == next.match_labels);
                        if same_pods {
                            publisher.publish(specs(&objects, next.port));
                        } else {
                            // The old members stay until the new selector's list is in.
                            objects = Objects::default();
                            let wc = watcher::Config::default().labels(&selector);
                            pod_events = Some(watch(pods.clone(), wc));
                        }
                        target = Some(next);
                    }
                },
            },
            event = next_of(&mut pod_events) => match event {
                None => {
                    tracing::error!(inference_pool = %name, "the pod watch ended");
                    pod_events = None;
                    target = None;
                }
                Some(Err(e)) => tracing::warn!(inference_pool = %name, "watching pods: {e}"),
                Some(Ok(event)) => {
                    if objects.apply(event)
                        && let Some(t) = &target
                    {
                        publisher.publish(specs(&objects, t.port));
                    }
                }
            },
        }
    }
}

async fn follow_service(
    client: Client,
    config: KubernetesDiscovery,
    service: String,
    pool: Arc<Pool>,
) {
    let slices: Api<EndpointSlice> = Api::namespaced(client, &config.namespace);
    let selector = format!("{SERVICE_NAME_LABEL}={service}");
    tracing::info!(%service, "following the Service's EndpointSlices");
    let mut events = watch(slices, watcher::Config::default().labels(&selector));
    let mut objects: Objects<EndpointSlice> = Objects::default();
    let mut publisher = Publisher::new(pool);
    while let Some(event) = events.next().await {
        match event {
            Err(e) => tracing::warn!(%service, "watching EndpointSlices: {e}"),
            Ok(event) => {
                if objects.apply(event) {
                    publisher.publish(
                        objects
                            .current
                            .values()
                            .flat_map(|s| endpoint_slice_specs(s, &config)),
                    );
                }
            }
        }
    }
    tracing::error!(%service, "the EndpointSlice watch ended");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::EngineKind;

    fn config(default_region: Option<&str>) -> KubernetesDiscovery {
        KubernetesDiscovery {
            namespace: "llm".into(),
            inference_pool: Some("pool".into()),
            service: None,
            port: None,
            engine: EngineKind::Vllm,
            region_label: "topology.kubernetes.io/region".into(),
            default_region: default_region.map(str::to_owned),
            models: vec!["m".into()],
        }
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn ready_pod(name: &str, ip: &str, region: Option<&str>) -> serde_json::Value {
        let mut labels = serde_json::json!({"app": "x"});
        if let Some(r) = region {
            labels["topology.kubernetes.io/region"] = r.into();
        }
        serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        })
    }

    #[test]
    fn eligible_pods_become_upstreams() {
        let spec = pod_spec(
            &pod(ready_pod("a", "10.0.0.1", Some("eu-west"))),
            8000,
            &config(None),
        )
        .unwrap();
        assert_eq!(spec.name, "a");
        assert_eq!(spec.url, "http://10.0.0.1:8000");
        assert_eq!(spec.region, "eu-west");
        assert_eq!(spec.engine, EngineKind::Vllm);
        assert_eq!(spec.models, vec!["m".to_owned()]);
        let v6 = pod_spec(
            &pod(ready_pod("b", "fd00::1", Some("eu-west"))),
            80,
            &config(None),
        )
        .unwrap();
        assert_eq!(v6.url, "http://[fd00::1]:80");
    }

    #[test]
    fn ineligible_pods_say_why() {
        let c = config(None);
        let reason = |v: serde_json::Value| pod_spec(&pod(v), 8000, &c).unwrap_err().reason;

        let mut v = ready_pod("a", "10.0.0.1", Some("eu-west"));
        v["status"]["phase"] = "Pending".into();
        assert_eq!(reason(v), SkipReason::NotRunning("Pending".into()));

        let mut v = ready_pod("a", "10.0.0.1", Some("eu-west"));
        v["status"]["conditions"][0]["status"] = "False".into();
        assert_eq!(reason(v), SkipReason::NotReady);

        let mut v = ready_pod("a", "10.0.0.1", Some("eu-west"));
        v["status"]["conditions"] = serde_json::json!([]);
        assert_eq!(reason(v), SkipReason::NotReady);

        let mut v = ready_pod("a", "", Some("eu-west"));
        assert_eq!(reason(v.clone()), SkipReason::NoAddress);
        v["status"]
            .as_object_mut()
            .unwrap()
            .remove("podIP")
            .unwrap();
        assert_eq!(reason(v), SkipReason::NoAddress);

        let mut v = ready_pod("a", "10.0.0.1", Some("eu-west"));
        v["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z".into();
        assert_eq!(reason(v), SkipReason::Deleting);

        assert!(matches!(
            reason(ready_pod("a", "10.0.0.1", None)),
            SkipReason::NoRegion { .. }
        ));
        assert_eq!(
            reason(ready_pod("a", "10.0.0.1", Some("EU_West"))),
            SkipReason::BadRegion("EU_West".into())
        );
        assert!(!SkipReason::BadRegion(String::new()).is_transient());
        assert!(SkipReason::NotReady.is_transient());
    }

    #[test]
    fn regions_fall_back_to_the_default_only_without_a_label() {
        let c = config(Some("eu-north"));
        let spec = pod_spec(&pod(ready_pod("a", "10.0.0.1", None)), 1, &c).unwrap();
        assert_eq!(spec.region, "eu-north");
        let spec = pod_spec(&pod(ready_pod("a", "10.0.0.1", Some("eu-west"))), 1, &c).unwrap();
        assert_eq!(spec.region, "eu-west");
        // A label that is not a region is a mistake, not "no label".
        let err = pod_spec(&pod(ready_pod("a", "10.0.0.1", Some("Paris!"))), 1, &c).unwrap_err();
        assert_eq!(err.reason, SkipReason::BadRegion("Paris!".into()));
    }

    fn inference_pool(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "p", "namespace": "llm"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn pool_targets_are_read_and_checked() {
        let p = inference_pool(serde_json::json!({
            "selector": {"matchLabels": {"tier": "llm", "app": "vllm"}},
            "targetPorts": [{"number": 8000}]
        }));
        let t = pool_target(&p, None).unwrap();
        assert_eq!(t.port, 8000);
        assert_eq!(t.label_selector(), "app=vllm,tier=llm");
        assert_eq!(pool_target(&p, Some(9000)).unwrap().port, 9000);

        for spec in [
            serde_json::json!({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}),
            serde_json::json!({"targetPorts": [{"number": 1}]}),
            serde_json::json!({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": []}),
            serde_json::json!({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 70000}]}),
            serde_json::json!({"selector": {"matchLabels": {"a": "b,c=d"}}, "targetPorts": [{"number": 1}]}),
            serde_json::json!({"selector": {"matchLabels": {"a": 1}}, "targetPorts": [{"number": 1}]}),
        ] {
            assert!(
                pool_target(&inference_pool(spec.clone()), None).is_err(),
                "{spec}"
            );
        }
        let r = inference_pool_resource();
        assert_eq!(
            (r.api_version.as_str(), r.kind.as_str(), r.plural.as_str()),
            (
                "inference.networking.k8s.io/v1",
                "InferencePool",
                "inferencepools"
            )
        );
    }

    #[test]
    fn endpoint_slices_give_ready_addresses() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "svc-abc"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "pod-a"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "pod-b"}},
                {"addresses": ["10.0.0.3"]}
            ],
            "ports": [{"name": "http", "port": 8001, "protocol": "TCP"}]
        }))
        .unwrap();
        let c = config(Some("eu-west"));
        let out = endpoint_slice_specs(&slice, &c);
        let ok: Vec<(String, String)> = out
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|s| (s.name.clone(), s.url.clone()))
            .collect();
        assert_eq!(
            ok,
            [
                ("pod-a".to_owned(), "http://10.0.0.1:8001".to_owned()),
                ("10.0.0.3".to_owned(), "http://10.0.0.3:8001".to_owned())
            ]
        );
        assert_eq!(out[1].as_ref().unwrap_err().reason, SkipReason::NotReady);

        let mut c = config(Some("eu-west"));
        c.port = Some(7000);
        assert!(
            endpoint_slice_specs(&slice, &c)[0]
                .as_ref()
                .unwrap()
                .url
                .ends_with(":7000")
        );

        let none = endpoint_slice_specs(&slice, &config(None));
        assert!(matches!(
            none[0].as_ref().unwrap_err().reason,
            SkipReason::NoRegion { .. }
        ));

        let mut portless = slice.clone();
        portless.ports = None;
        let out = endpoint_slice_specs(&portless, &config(Some("eu-west")));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ref().unwrap_err().reason, SkipReason::NoPort);
    }

    #[test]
    fn relists_replace_the_set_at_init_done() {
        let p = |name: &str| pod(ready_pod(name, "10.0.0.1", Some("eu-west")));
        let mut objects: Objects<Pod> = Objects::default();
        assert!(!objects.apply(Event::Init));
        assert!(!objects.apply(Event::InitApply(p("a"))));
        assert!(objects.current.is_empty());
        assert!(objects.apply(Event::InitDone));
        assert_eq!(objects.current.len(), 1);
        assert!(objects.apply(Event::Apply(p("b"))));
        // A re-list that no longer has `a` drops it only once the list is complete.
        assert!(!objects.apply(Event::Init));
        assert!(!objects.apply(Event::InitApply(p("b"))));
        assert_eq!(objects.current.len(), 2);
        assert!(objects.apply(Event::InitDone));
        assert_eq!(objects.current.keys().collect::<Vec<_>>(), ["b"]);
        assert!(objects.apply(Event::Delete(p("b"))));
        assert!(!objects.apply(Event::Delete(p("b"))));
    }

    #[test]
    fn object_names_cannot_extend_a_selector() {
        assert!(valid_object_name("llama-pool.v1"));
        for bad in ["", "a,b", "a=b", "A", "a b"] {
            assert!(!valid_object_name(bad), "{bad}");
        }
    }
}
