//! Kubernetes discovery against a FAKE API server (`fake_api_server` in every test name).
//!
//! No Kubernetes runs here (no container engine, no API server package), so an axum server on
//! loopback answers the exact HTTP requests kube's watcher makes: a list
//! (`GET <collection>?labelSelector=..&limit=500` or `?fieldSelector=..`) answered from the
//! fixtures under `tests/fixtures/kube/` (PodList, InferencePoolList and EndpointSliceList JSON
//! in the shape a real API server returns them), then a watch (`..&watch=true&
//! resourceVersion=..&allowWatchBookmarks=true`) that streams newline-delimited WatchEvent
//! JSON pushed by the test. Like a real API server, the fake filters lists and watch events
//! by the request's label and field selectors, and keeps its lists up to date with the
//! events pushed, so a re-list after a selector change sees the current objects.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use souverain_fleet::config::KubernetesDiscovery;
use souverain_fleet::{EngineKind, Pool, spawn_kubernetes_discovery};
use tokio::sync::mpsc;

const NS: &str = "llm";
const PODS: &str = "/api/v1/namespaces/llm/pods";
const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices";

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// One open watch: what it selects, and where its events go.
struct Watch {
    labels: Vec<(String, String)>,
    fields: Vec<(String, String)>,
    events: mpsc::UnboundedSender<String>,
}

/// One collection the fake serves: its list (kind, apiVersion, items) and its open watches.
struct Collection {
    list: Value,
    watches: Vec<Watch>,
}

#[derive(Default)]
struct FakeState {
    /// Every request, as `GET path?query`, in order.
    requests: Vec<String>,
    /// How many of the next requests fail with a 500.
    fail_next: usize,
    collections: HashMap<String, Collection>,
}

#[derive(Clone)]
struct FakeApiServer {
    state: Arc<Mutex<FakeState>>,
    addr: SocketAddr,
}

/// `key=value` terms of a selector (what kube sends: equality terms joined by commas).
fn terms(selector: Option<&String>) -> Vec<(String, String)> {
    selector
        .map(|s| {
            s.split(',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    let (k, v) = t.split_once('=').expect("only equality terms are sent");
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(labels: &[(String, String)], fields: &[(String, String)], object: &Value) -> bool {
    let meta = &object["metadata"];
    labels
        .iter()
        .all(|(k, v)| meta["labels"][k].as_str() == Some(v))
        && fields.iter().all(|(k, v)| match k.as_str() {
            "metadata.name" => meta["name"].as_str() == Some(v),
            other => panic!("the fake does not know field selector `{other}`"),
        })
}

impl FakeApiServer {
    async fn start(collections: &[(&str, &str)]) -> Self {
        let mut state = FakeState::default();
        for (path, file) in collections {
            state.collections.insert(
                (*path).to_owned(),
                Collection {
                    list: fixture(file),
                    watches: Vec::new(),
                },
            );
        }
        let state = Arc::new(Mutex::new(state));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeApiServer { state, addr }
    }

    fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().unwrap();
        let mut config = kube::Config::new(url);
        config.default_namespace = NS.to_owned();
        kube::Client::try_from(config).unwrap()
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Ends the open watches of `path`, as an API server does every few minutes.
    fn close_watches(&self, path: &str) {
        let mut state = self.state.lock().unwrap();
        state.collections.get_mut(path).unwrap().watches.clear();
    }

    /// Changes a collection's list without a watch event (an event the watch missed).
    fn edit_list(&self, path: &str, edit: impl FnOnce(&mut Vec<Value>)) {
        let mut state = self.state.lock().unwrap();
        let list = &mut state.collections.get_mut(path).unwrap().list;
        edit(list["items"].as_array_mut().unwrap());
    }

    /// Waits until `n` requests came in (a watch opens a moment after its list is applied).
    async fn requests_at_least(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            assert!(Instant::now() < deadline, "{requests:#?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a watch event to the open watches of `path` that select the object, once at
    /// least one does (the watch opens just after the list: this waits for it), and applies
    /// it to the collection's list.
    async fn push(&self, path: &str, kind: &str, object: Value) {
        let line = json!({"type": kind, "object": object}).to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            {
                let mut state = self.state.lock().unwrap();
                let collection = state.collections.get_mut(path).unwrap();
                collection.watches.retain(|w| !w.events.is_closed());
                let targets: Vec<&Watch> = collection
                    .watches
                    .iter()
                    .filter(|w| {
                        matches!(kind, "BOOKMARK" | "ERROR")
                            || selects(&w.labels, &w.fields, &object)
                    })
                    .collect();
                if !targets.is_empty() {
                    for w in targets {
                        let _ = w.events.send(line.clone());
                    }
                    let items = collection.list["items"].as_array_mut().unwrap();
                    let name = &object["metadata"]["name"];
                    match kind {
                        "ADDED" | "MODIFIED" => {
                            items.retain(|i| &i["metadata"]["name"] != name);
                            items.push(object.clone());
                        }
                        "DELETED" => items.retain(|i| &i["metadata"]["name"] != name),
                        _ => {}
                    }
                    if let Some(rv) = object["metadata"]["resourceVersion"].as_str() {
                        collection.list["metadata"]["resourceVersion"] = rv.into();
                    }
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no open watch on {path} selects {object}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn handle(
    State(state): State<Arc<Mutex<FakeState>>>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let path = request.uri().path().to_owned();
    let logged = format!(
        "{} {}",
        request.method(),
        request
            .uri()
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str())
    );
    eprintln!("fake_api_server: {logged}");
    let mut state = state.lock().unwrap();
    state.requests.push(logged);
    if state.fail_next > 0 {
        state.fail_next -= 1;
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "etcdserver: request timed out",
            "reason": "InternalError", "details": {}, "code": 500});
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(status)).into_response();
    }
    let Some(collection) = state.collections.get_mut(&path) else {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "the server could not find the requested resource",
            "reason": "NotFound", "details": {}, "code": 404});
        return (StatusCode::NOT_FOUND, axum::Json(status)).into_response();
    };
    let labels = terms(query.get("labelSelector"));
    let fields = terms(query.get("fieldSelector"));
    if query.get("watch").map(String::as_str) == Some("true") {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        collection.watches.push(Watch {
            labels,
            fields,
            events: tx,
        });
        let lines = futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|line| line.map(|l| Ok::<_, Infallible>(format!("{l}\n"))))
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(lines))
            .unwrap();
    }
    let mut list = collection.list.clone();
    let items: Vec<Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| selects(&labels, &fields, i))
        .cloned()
        .collect();
    list["items"] = Value::Array(items);
    axum::Json(list).into_response()
}

fn discovery(inference_pool: Option<&str>, service: Option<&str>) -> KubernetesDiscovery {
    KubernetesDiscovery {
        namespace: NS.to_owned(),
        inference_pool: inference_pool.map(str::to_owned),
        service: service.map(str::to_owned),
        port: None,
        engine: EngineKind::Vllm,
        region_label: "topology.kubernetes.io/region".to_owned(),
        default_region: None,
        models: vec!["llama-3.1-8b".to_owned()],
    }
}

/// The pool as `(name, url, region)`, in name order.
fn members(pool: &Pool) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = pool
        .snapshot()
        .iter()
        .map(|u| {
            let s = u.spec();
            (s.name.clone(), s.url.clone(), s.region.clone())
        })
        .collect();
    out.sort();
    out
}

fn names(pool: &Pool) -> Vec<String> {
    members(pool).into_iter().map(|m| m.0).collect()
}

/// Polls the pool until `check` holds (5 s at most).
async fn until(pool: &Pool, what: &str, check: impl Fn(&Pool) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check(pool) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; pool: {:?}",
            members(pool)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn m(name: &str, url: &str, region: &str) -> (String, String, String) {
    (name.to_owned(), url.to_owned(), region.to_owned())
}

/// A pod of the fixture (by name), for watch events.
fn fixture_pod(name: &str) -> Value {
    fixture("pods.json")["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["name"] == name)
        .unwrap()
        .clone()
}

fn set_ready(pod: &mut Value, ready: bool) {
    for c in pod["status"]["conditions"].as_array_mut().unwrap() {
        if c["type"] == "Ready" || c["type"] == "ContainersReady" {
            c["status"] = if ready { "True" } else { "False" }.into();
        }
    }
}

fn query_of<'a>(request: &'a str, path: &str) -> Option<&'a str> {
    request
        .strip_prefix("GET ")?
        .strip_prefix(path)?
        .strip_prefix('?')
}

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[tokio::test]
async fn fake_api_server_inference_pool_pods_follow_watch_events() {
    let fake = FakeApiServer::start(&[(POOLS, "inferencepools.json"), (PODS, "pods.json")]).await;
    let pool = Arc::new(Pool::new());
    let task = spawn_kubernetes_discovery(
        fake.client(),
        discovery(Some("llama-pool"), None),
        Arc::clone(&pool),
    );

    // The list has 3 eligible pods; vllm-llama-3 has no region label (and no default region
    // is set), vllm-llama-4 is Pending, other-0 is not selected.
    until(&pool, "the 3 listed pods", |p| p.snapshot().len() == 3).await;
    assert_eq!(
        members(&pool),
        [
            m("vllm-llama-0", "http://10.42.0.10:8000", "eu-west-paris"),
            m("vllm-llama-1", "http://10.42.0.11:8000", "eu-west-paris"),
            m(
                "vllm-llama-2",
                "http://10.42.1.12:8000",
                "eu-north-stockholm"
            ),
        ]
    );
    let first = pool.get("vllm-llama-0").unwrap();
    assert_eq!(first.spec().engine, EngineKind::Vllm);
    assert_eq!(first.spec().models, ["llama-3.1-8b"]);

    // ADDED: a 4th ready pod.
    let mut added = fixture_pod("vllm-llama-1");
    added["metadata"]["name"] = "vllm-llama-5".into();
    added["metadata"]["resourceVersion"] = "10420".into();
    added["status"]["podIP"] = "10.42.1.15".into();
    added["metadata"]["labels"]["topology.kubernetes.io/region"] = "eu-north-stockholm".into();
    fake.push(PODS, "ADDED", added.clone()).await;
    until(&pool, "the added pod", |p| p.snapshot().len() == 4).await;
    assert_eq!(
        members(&pool)[3],
        m(
            "vllm-llama-5",
            "http://10.42.1.15:8000",
            "eu-north-stockholm"
        )
    );

    // A bookmark changes nothing; the pending pod turning Running without a region label
    // stays out, then getting one brings it in.
    let bookmark = json!({"kind": "Pod", "apiVersion": "v1",
        "metadata": {"resourceVersion": "10421"}});
    fake.push(PODS, "BOOKMARK", bookmark).await;
    let mut started = fixture_pod("vllm-llama-1");
    started["metadata"]["name"] = "vllm-llama-4".into();
    started["metadata"]["resourceVersion"] = "10422".into();
    started["status"]["podIP"] = "10.42.0.14".into();
    let labels = started["metadata"]["labels"].as_object_mut().unwrap();
    labels.remove("topology.kubernetes.io/region");
    fake.push(PODS, "MODIFIED", started.clone()).await;
    started["metadata"]["resourceVersion"] = "10423".into();
    started["metadata"]["labels"]["topology.kubernetes.io/region"] = "eu-west-paris".into();
    fake.push(PODS, "MODIFIED", started).await;
    until(&pool, "the started pod", |p| {
        p.get("vllm-llama-4").is_some()
    })
    .await;
    assert_eq!(pool.snapshot().len(), 5);
    assert!(pool.get("vllm-llama-3").is_none(), "no region: left out");

    // MODIFIED: a pod no longer Ready leaves; its old member object is not kept.
    let mut unready = fixture_pod("vllm-llama-1");
    unready["metadata"]["resourceVersion"] = "10430".into();
    set_ready(&mut unready, false);
    fake.push(PODS, "MODIFIED", unready).await;
    until(&pool, "the unready pod to leave", |p| {
        p.get("vllm-llama-1").is_none()
    })
    .await;
    assert_eq!(
        names(&pool),
        [
            "vllm-llama-0",
            "vllm-llama-2",
            "vllm-llama-4",
            "vllm-llama-5"
        ]
    );

    // A pod being deleted leaves at once, before its DELETED event.
    let mut terminating = fixture_pod("vllm-llama-2");
    terminating["metadata"]["resourceVersion"] = "10431".into();
    terminating["metadata"]["deletionTimestamp"] = "2025-06-02T10:00:00Z".into();
    terminating["metadata"]["deletionGracePeriodSeconds"] = 30.into();
    fake.push(PODS, "MODIFIED", terminating.clone()).await;
    until(&pool, "the terminating pod to leave", |p| {
        p.get("vllm-llama-2").is_none()
    })
    .await;

    // DELETED.
    added["metadata"]["resourceVersion"] = "10440".into();
    fake.push(PODS, "DELETED", added).await;
    until(&pool, "the deleted pod to leave", |p| {
        p.get("vllm-llama-5").is_none()
    })
    .await;
    assert_eq!(names(&pool), ["vllm-llama-0", "vllm-llama-4"]);
    // A member that did not change kept its state object across all of this.
    assert!(Arc::ptr_eq(&first, &pool.get("vllm-llama-0").unwrap()));

    // Only the two watches talked to the API server: one list and one watch each.
    let requests = fake.requests();
    assert_eq!(requests.len(), 4, "{requests:#?}");
    task.abort();
}

#[tokio::test]
async fn fake_api_server_inference_pool_selector_and_port_are_honoured() {
    let fake = FakeApiServer::start(&[(POOLS, "inferencepools.json"), (PODS, "pods.json")]).await;
    let pool = Arc::new(Pool::new());
    let task = spawn_kubernetes_discovery(
        fake.client(),
        discovery(Some("llama-pool"), None),
        Arc::clone(&pool),
    );
    until(&pool, "the 3 listed pods", |p| p.snapshot().len() == 3).await;

    // The InferencePool is watched by name, and the pods by exactly its matchLabels.
    let requests = fake.requests_at_least(4).await;
    let pool_queries: Vec<&str> = requests.iter().filter_map(|r| query_of(r, POOLS)).collect();
    assert_eq!(pool_queries.len(), 2, "{requests:#?}");
    for q in &pool_queries {
        assert_eq!(
            param(q, "fieldSelector"),
            Some("metadata.name%3Dllama-pool")
        );
    }
    let pod_queries: Vec<&str> = requests.iter().filter_map(|r| query_of(r, PODS)).collect();
    assert_eq!(pod_queries.len(), 2, "{requests:#?}");
    for q in &pod_queries {
        assert_eq!(
            param(q, "labelSelector"),
            Some("app%3Dvllm-llama%2Csouverain.eu%2Fpool%3Dllama"),
            "{q}"
        );
    }
    assert!(param(pod_queries[0], "watch").is_none());
    assert_eq!(param(pod_queries[1], "watch"), Some("true"));
    assert_eq!(param(pod_queries[1], "resourceVersion"), Some("10410"));
    assert!(pool.get("other-0").is_none());

    // The pool's target port changes: same pods, new URLs, no new pod watch.
    let mut changed = fixture("inferencepools.json")["items"][0].clone();
    changed["metadata"]["resourceVersion"] = "10500".into();
    changed["spec"]["targetPorts"][0]["number"] = 8080.into();
    fake.push(POOLS, "MODIFIED", changed.clone()).await;
    until(&pool, "the new port", |p| {
        p.snapshot().iter().all(|u| u.spec().url.ends_with(":8080"))
    })
    .await;
    assert_eq!(pool.snapshot().len(), 3);
    assert_eq!(fake.requests().len(), 4);

    // The selector changes: the pod watch starts over with the new one.
    changed["metadata"]["resourceVersion"] = "10501".into();
    changed["spec"]["selector"]["matchLabels"] = json!({"app": "other"});
    fake.push(POOLS, "MODIFIED", changed.clone()).await;
    until(&pool, "the other selector's pods", |p| {
        names(p) == ["other-0"]
    })
    .await;
    assert_eq!(
        members(&pool),
        [m("other-0", "http://10.42.2.20:8080", "eu-west-paris")]
    );
    let requests = fake.requests();
    let relist = requests
        .iter()
        .filter_map(|r| query_of(r, PODS))
        .nth(2)
        .expect("a new pod list");
    assert_eq!(param(relist, "labelSelector"), Some("app%3Dother"));

    // An invalid edit (an empty selector would select every pod) changes nothing.
    changed["metadata"]["resourceVersion"] = "10502".into();
    changed["spec"]["selector"]["matchLabels"] = json!({});
    fake.push(POOLS, "MODIFIED", changed.clone()).await;
    // Then a valid one, to know the invalid one was read first.
    changed["metadata"]["resourceVersion"] = "10503".into();
    changed["spec"]["selector"]["matchLabels"] = json!({"app": "other"});
    changed["spec"]["targetPorts"][0]["number"] = 8081.into();
    fake.push(POOLS, "MODIFIED", changed.clone()).await;
    until(&pool, "the port after the invalid edit", |p| {
        p.snapshot().iter().all(|u| u.spec().url.ends_with(":8081"))
    })
    .await;
    assert_eq!(names(&pool), ["other-0"]);
    // ... and the invalid edit did not restart the pod watch.
    let pod_requests = fake
        .requests()
        .iter()
        .filter(|r| query_of(r, PODS).is_some())
        .count();
    assert_eq!(pod_requests, 4);

    // The InferencePool is deleted: no upstreams.
    changed["metadata"]["resourceVersion"] = "10504".into();
    fake.push(POOLS, "DELETED", changed).await;
    until(&pool, "an empty pool", |p| p.snapshot().is_empty()).await;
    task.abort();
}

#[tokio::test]
async fn fake_api_server_configured_port_overrides_and_default_region_applies() {
    let fake = FakeApiServer::start(&[(POOLS, "inferencepools.json"), (PODS, "pods.json")]).await;
    let pool = Arc::new(Pool::new());
    let mut config = discovery(Some("llama-pool"), None);
    config.port = Some(7000);
    config.default_region = Some("eu-central".to_owned());
    let task = spawn_kubernetes_discovery(fake.client(), config, Arc::clone(&pool));
    until(&pool, "4 pods", |p| p.snapshot().len() == 4).await;
    assert_eq!(
        members(&pool),
        [
            m("vllm-llama-0", "http://10.42.0.10:7000", "eu-west-paris"),
            m("vllm-llama-1", "http://10.42.0.11:7000", "eu-west-paris"),
            m(
                "vllm-llama-2",
                "http://10.42.1.12:7000",
                "eu-north-stockholm"
            ),
            m("vllm-llama-3", "http://10.42.1.13:7000", "eu-central"),
        ]
    );
    task.abort();
}

#[tokio::test]
async fn fake_api_server_service_endpoint_slices() {
    let fake = FakeApiServer::start(&[(SLICES, "endpointslices.json")]).await;
    let pool = Arc::new(Pool::new());
    let mut config = discovery(None, Some("llama-svc"));
    config.default_region = Some("eu-west-paris".to_owned());
    let task = spawn_kubernetes_discovery(fake.client(), config, Arc::clone(&pool));

    // Ready and unset-ready endpoints are in; the unready one and other-svc's are not.
    until(&pool, "the ready endpoints", |p| p.snapshot().len() == 3).await;
    assert_eq!(
        members(&pool),
        [
            m("10.42.3.30", "http://10.42.3.30:8001", "eu-west-paris"),
            m("vllm-llama-0", "http://10.42.0.10:8000", "eu-west-paris"),
            m("vllm-llama-2", "http://10.42.1.12:8000", "eu-west-paris"),
        ]
    );
    let requests = fake.requests_at_least(2).await;
    let queries: Vec<&str> = requests
        .iter()
        .filter_map(|r| query_of(r, SLICES))
        .collect();
    assert_eq!(queries.len(), 2, "{requests:#?}");
    for q in &queries {
        assert_eq!(
            param(q, "labelSelector"),
            Some("kubernetes.io%2Fservice-name%3Dllama-svc")
        );
    }

    // The unready endpoint turns ready, and the first turns unready.
    let mut slice = fixture("endpointslices.json")["items"][0].clone();
    slice["metadata"]["resourceVersion"] = "10600".into();
    slice["endpoints"][1]["conditions"]["ready"] = true.into();
    slice["endpoints"][0]["conditions"]["ready"] = false.into();
    fake.push(SLICES, "MODIFIED", slice).await;
    until(&pool, "the readiness change", |p| {
        p.get("vllm-llama-1").is_some() && p.get("vllm-llama-0").is_none()
    })
    .await;
    assert_eq!(
        members(&pool)[1],
        m("vllm-llama-1", "http://10.42.0.11:8000", "eu-west-paris")
    );

    // A slice is deleted.
    let mut gone = fixture("endpointslices.json")["items"][1].clone();
    gone["metadata"]["resourceVersion"] = "10601".into();
    fake.push(SLICES, "DELETED", gone).await;
    until(&pool, "the deleted slice's endpoint to leave", |p| {
        p.get("10.42.3.30").is_none()
    })
    .await;
    assert_eq!(names(&pool), ["vllm-llama-1", "vllm-llama-2"]);
    task.abort();
}

#[tokio::test]
async fn fake_api_server_service_without_a_region_gives_no_upstreams() {
    let fake = FakeApiServer::start(&[(SLICES, "endpointslices.json")]).await;
    let pool = Arc::new(Pool::new());
    let task = spawn_kubernetes_discovery(
        fake.client(),
        discovery(None, Some("llama-svc")),
        Arc::clone(&pool),
    );
    // The watcher opens its watch only when polled again after handing over the listed
    // objects, so once the watch request is in, the list has been applied: the pool stays
    // empty (EndpointSlices carry no region, and none is configured).
    fake.requests_at_least(2).await;
    assert!(pool.snapshot().is_empty(), "{:?}", members(&pool));
    task.abort();
}

#[tokio::test]
async fn fake_api_server_is_contacted_only_by_the_watches() {
    let fake = FakeApiServer::start(&[(SLICES, "endpointslices.json")]).await;
    let pool = Arc::new(Pool::new());
    let mut config = discovery(None, Some("llama-svc"));
    config.default_region = Some("eu-west-paris".to_owned());
    let task = spawn_kubernetes_discovery(fake.client(), config, Arc::clone(&pool));
    until(&pool, "the ready endpoints", |p| p.snapshot().len() == 3).await;
    let before = fake.requests_at_least(2).await;
    assert_eq!(before.len(), 2, "one list, one watch: {before:#?}");
    assert!(query_of(&before[0], SLICES).is_some_and(|q| param(q, "watch").is_none()));
    assert!(query_of(&before[1], SLICES).is_some_and(|q| param(q, "watch") == Some("true")));

    // Reading the pool, as every routed request does, never reaches the API server.
    for n in [1usize, 10, 1_000, 10_000] {
        for _ in 0..n {
            assert_eq!(pool.snapshot().len(), 3);
        }
        tokio::task::yield_now().await;
        assert_eq!(fake.requests(), before, "after {n} snapshots");
    }
    // Nor does time passing: a watch, not a poll (a short window, to catch a poll loop).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.requests(), before);
    task.abort();
}

#[tokio::test]
async fn fake_api_server_errors_back_off_and_the_watch_goes_on() {
    let fake = FakeApiServer::start(&[(POOLS, "inferencepools.json"), (PODS, "pods.json")]).await;
    // The first request (the InferencePool list) fails: kube backs off and lists again.
    fake.state.lock().unwrap().fail_next = 1;
    let pool = Arc::new(Pool::new());
    let task = spawn_kubernetes_discovery(
        fake.client(),
        discovery(Some("llama-pool"), None),
        Arc::clone(&pool),
    );
    until(&pool, "the 3 listed pods", |p| p.snapshot().len() == 3).await;
    let requests = fake.requests_at_least(5).await;
    assert_eq!(requests.len(), 5, "{requests:#?}");
    assert_eq!(
        requests
            .iter()
            .filter(|r| query_of(r, POOLS).is_some_and(|q| param(q, "watch").is_none()))
            .count(),
        2,
        "{requests:#?}"
    );

    // The pod watch ends: kube watches again from the last resourceVersion, without a list.
    fake.close_watches(PODS);
    let mut added = fixture_pod("vllm-llama-1");
    added["metadata"]["name"] = "vllm-llama-5".into();
    added["metadata"]["resourceVersion"] = "10450".into();
    added["status"]["podIP"] = "10.42.1.15".into();
    fake.push(PODS, "ADDED", added).await;
    until(&pool, "the added pod", |p| p.snapshot().len() == 4).await;
    let requests = fake.requests();
    assert_eq!(requests.len(), 6, "{requests:#?}");
    let rewatch = query_of(&requests[5], PODS).unwrap();
    assert_eq!(param(rewatch, "watch"), Some("true"));
    assert_eq!(param(rewatch, "resourceVersion"), Some("10410"));

    // 410 Gone: the watcher lists again (after a backoff) and the list replaces the set as a
    // whole: a deletion the watch missed is noticed; the pool is never emptied meanwhile.
    fake.edit_list(PODS, |items| {
        items.retain(|p| p["metadata"]["name"] != "vllm-llama-0");
    });
    let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version: 10450 (10600)",
        "reason": "Expired", "code": 410});
    fake.push(PODS, "ERROR", gone).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.get("vllm-llama-0").is_some() {
        assert!(!pool.snapshot().is_empty());
        assert!(Instant::now() < deadline, "{:?}", fake.requests());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        names(&pool),
        ["vllm-llama-1", "vllm-llama-2", "vllm-llama-5"]
    );
    let relist = fake.requests()[6].clone();
    assert!(
        query_of(&relist, PODS).is_some_and(|q| param(q, "watch").is_none()),
        "{relist}"
    );
    task.abort();
}
