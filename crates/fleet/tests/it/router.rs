//! The router on loopback in front of stand-in engines (no model: `fleet::standin` serves
//! vLLM-, SGLang- and llama.cpp-shaped metrics and OpenAI answers), with and without the
//! control plane. Real Souverain replicas behind the router are tested in
//! `crates/cli/tests/it/route.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use control::{
    Budget, BudgetPeriod, ControlConfig, ControlPlane, KeyPolicy, SqliteStore, Store, UsageFilter,
};
use serde_json::{Value, json};
use souverain_fleet::standin::{Standin, serve_standin};
use souverain_fleet::{EngineKind, Fleet, FleetRouter, RouterConfig};

struct StandinHandle {
    standin: Arc<Standin>,
    port: u16,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start_standin(name: &str, flavour: EngineKind, port: u16) -> StandinHandle {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let standin = Arc::new(Standin::new(name, flavour, "m"));
    let task = tokio::spawn(serve_standin(listener, Arc::clone(&standin)));
    StandinHandle {
        standin,
        port,
        task,
    }
}

struct Routed {
    base: String,
    fleet: Fleet,
    _task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start_router(config: &str, control: Option<Arc<ControlPlane>>) -> Routed {
    let config = RouterConfig::parse(config).unwrap();
    let fleet = Fleet::start(&config, None).unwrap();
    let router = Arc::new(FleetRouter::new(
        Arc::clone(&fleet.picker),
        fleet.client.clone(),
        control,
        config.proxy.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(souverain_fleet::proxy::serve(
        listener,
        router,
        std::future::pending(),
    ));
    Routed {
        base,
        fleet,
        _task: task,
    }
}

fn upstream_toml(name: &str, port: u16, engine: &str, region: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{port}\"\n\
         engine = \"{engine}\"\nregion = \"{region}\"\n"
    )
}

/// Three stand-ins shaped as vLLM, SGLang and llama.cpp, each given as (stand-in name, upstream
/// name, region), started in that order, and the router configuration that lists them
/// (scraped every 50 ms).
async fn three_engines(replicas: [(&str, &str, &str); 3]) -> ([StandinHandle; 3], String) {
    let kinds = [
        (EngineKind::Vllm, "vllm"),
        (EngineKind::Sglang, "sglang"),
        (EngineKind::LlamaCpp, "llama-cpp"),
    ];
    let mut config = "[scrape]\ninterval_ms = 50\n".to_owned();
    let mut handles = Vec::new();
    for ((standin, upstream, region), (kind, engine)) in replicas.into_iter().zip(kinds) {
        let handle = start_standin(standin, kind, 0).await;
        config += &upstream_toml(upstream, handle.port, engine, region);
        handles.push(handle);
    }
    let Ok(handles) = <[StandinHandle; 3]>::try_from(handles) else {
        unreachable!("three replicas in, three handles out")
    };
    (handles, config)
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Answer {
    status: u16,
    upstream: Option<String>,
    body: String,
}

async fn post(
    client: &reqwest_lite::Client,
    base: &str,
    key: Option<&str>,
    body: &Value,
) -> Answer {
    client.post(base, "/v1/chat/completions", key, body).await
}

/// A tiny HTTP client over hyper for the tests (the router's own client type).
mod reqwest_lite {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use serde_json::Value;

    pub(crate) struct Client(pub souverain_fleet::HttpClient);

    impl Client {
        pub(crate) fn new() -> Self {
            Client(souverain_fleet::http_client(
                std::time::Duration::from_secs(5),
            ))
        }

        pub(crate) async fn post(
            &self,
            base: &str,
            path: &str,
            key: Option<&str>,
            body: &Value,
        ) -> super::Answer {
            let mut request = axum::http::Request::post(format!("{base}{path}"))
                .header("content-type", "application/json");
            if let Some(key) = key {
                request = request.header("authorization", format!("Bearer {key}"));
            }
            let request = request.body(Body::from(body.to_string())).unwrap();
            let response = self.0.request(request).await.unwrap();
            let status = response.status().as_u16();
            let upstream = response
                .headers()
                .get(souverain_fleet::proxy::UPSTREAM_HEADER)
                .map(|v| v.to_str().unwrap().to_owned());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            super::Answer {
                status,
                upstream,
                body: String::from_utf8(body.to_vec()).unwrap(),
            }
        }

        pub(crate) async fn get(&self, url: &str) -> (u16, String) {
            let request = axum::http::Request::get(url).body(Body::empty()).unwrap();
            let response = self.0.request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    }
}

fn chat(system: &str, user: &str, stream: bool) -> Value {
    json!({
        "model": "m",
        "max_tokens": 4,
        "stream": stream,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stand_in_engines_are_read_by_their_own_metrics_and_served_through_the_router() {
    let ([a, b, c], config) = three_engines([
        ("vllm-standin", "a", "eu-west"),
        ("sglang-standin", "b", "eu-west"),
        ("llamacpp-standin", "c", "eu-west"),
    ])
    .await;
    let routed = start_router(&config, None).await;
    let pool = Arc::clone(routed.fleet.picker.pool());
    b.standin.waiting.store(7, Ordering::Relaxed);
    b.standin.kv_millionths.store(500_000, Ordering::Relaxed);
    c.standin.waiting.store(2, Ordering::Relaxed);
    wait_for("the scrapes", || {
        pool.get("b").unwrap().load().waiting == 7.0 && pool.get("c").unwrap().load().waiting == 2.0
    })
    .await;
    assert_eq!(pool.get("b").unwrap().load().kv_usage, 0.5);
    // The least loaded upstream takes fresh requests (no prefix yet, no session).
    let client = reqwest_lite::Client::new();
    let answer = post(&client, &routed.base, None, &chat("s", "hello", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.upstream.as_deref(), Some("a"));
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("vllm-standin")
    );
    // Streams pass through event by event, ending with [DONE].
    let answer = post(&client, &routed.base, None, &chat("s", "hello", true)).await;
    assert_eq!(answer.status, 200);
    let events: Vec<&str> = answer
        .body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(events.len(), 5, "{}", answer.body);
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    // The router's metrics name every upstream.
    let (status, metrics) = client.get(&format!("{}/metrics", routed.base)).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("souverain_router_upstream_waiting{upstream=\"b\",region=\"eu-west\",engine=\"sglang\"} 7"), "{metrics}");
    let (status, models) = client.get(&format!("{}/v1/models", routed.base)).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"],
        "m"
    );
    // Bad JSON never reaches an upstream.
    let served: u64 = [&a, &b, &c]
        .iter()
        .map(|h| h.standin.served.load(Ordering::Relaxed))
        .sum();
    let request = axum::http::Request::post(format!("{}/v1/chat/completions", routed.base))
        .body(axum::body::Body::from("{not json"))
        .unwrap();
    let response = client.0.request(request).await.unwrap();
    assert_eq!(response.status(), 400);
    let after: u64 = [&a, &b, &c]
        .iter()
        .map(|h| h.standin.served.load(Ordering::Relaxed))
        .sum();
    assert_eq!(served, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_prompt_or_a_session_land_together() {
    let handles = [
        start_standin("r0", EngineKind::Vllm, 0).await,
        start_standin("r1", EngineKind::Vllm, 0).await,
        start_standin("r2", EngineKind::Vllm, 0).await,
        start_standin("r3", EngineKind::Vllm, 0).await,
    ];
    let mut config = "[scrape]\ninterval_ms = 50\n".to_owned();
    for (i, h) in handles.iter().enumerate() {
        config += &upstream_toml(&format!("r{i}"), h.port, "vllm", "eu-west");
    }
    let routed = start_router(&config, None).await;
    let client = reqwest_lite::Client::new();
    let mut homes = std::collections::HashMap::new();
    for round in 0..3 {
        for p in 0..8 {
            let system = format!("System prompt number {p}. ").repeat(60);
            let answer = post(
                &client,
                &routed.base,
                None,
                &chat(&system, &format!("q{round}"), false),
            )
            .await;
            assert_eq!(answer.status, 200);
            let home = homes
                .entry(p)
                .or_insert_with(|| answer.upstream.clone().unwrap());
            assert_eq!(
                answer.upstream.as_ref(),
                Some(&*home),
                "prompt {p} round {round}"
            );
        }
    }
    // The 8 prompts spread over the replicas rather than piling on one.
    let distinct: std::collections::HashSet<_> = homes.values().collect();
    assert!(distinct.len() >= 3, "{homes:?}");
    // A session sticks without a shared prompt.
    let mut session_home = None;
    for i in 0..6 {
        let request = axum::http::Request::post(format!("{}/v1/chat/completions", routed.base))
            .header("x-session-id", "conversation-42")
            .body(axum::body::Body::from(
                chat("short", &format!("turn {i}"), false).to_string(),
            ))
            .unwrap();
        let response = client.0.request(request).await.unwrap();
        let upstream = response.headers()[souverain_fleet::proxy::UPSTREAM_HEADER]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(*session_home.get_or_insert(upstream.clone()), upstream);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_costs_no_request_and_rejoins_when_back() {
    let live = start_standin("live", EngineKind::Vllm, 0).await;
    let dying = start_standin("dying", EngineKind::Vllm, 0).await;
    let dead_port = dying.port;
    let config = format!(
        "[scrape]\ninterval_ms = 100\n[routing]\nstrategy = \"round-robin\"\n{}{}",
        upstream_toml("live", live.port, "vllm", "eu-west"),
        upstream_toml("dying", dead_port, "vllm", "eu-west"),
    );
    let routed = start_router(&config, None).await;
    let pool = Arc::clone(routed.fleet.picker.pool());
    let client = reqwest_lite::Client::new();
    for i in 0..4 {
        let a = post(
            &client,
            &routed.base,
            None,
            &chat("s", &format!("{i}"), false),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    assert!(dying.standin.served.load(Ordering::Relaxed) >= 1);
    // Killed: connections are refused from now on.
    dying.task.abort();
    let _ = dying.task.await;
    let mut failed = 0;
    for i in 0..40 {
        let a = post(
            &client,
            &routed.base,
            None,
            &chat("s", &format!("after {i}"), i % 2 == 0),
        )
        .await;
        if a.status != 200 {
            failed += 1;
        }
        assert_eq!(a.upstream.as_deref(), Some("live"));
    }
    assert_eq!(failed, 0);
    assert!(!pool.get("dying").unwrap().is_healthy());
    // Back on the same port: the health probe lets it rejoin.
    let back = start_standin("dying", EngineKind::Vllm, dead_port).await;
    wait_for("the replica to rejoin", || {
        pool.get("dying").unwrap().is_healthy()
    })
    .await;
    for i in 0..6 {
        let a = post(
            &client,
            &routed.base,
            None,
            &chat("s", &format!("back {i}"), false),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    assert!(back.standin.served.load(Ordering::Relaxed) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_replicas_shed_with_429_and_none_healthy_is_503() {
    let a = start_standin("a", EngineKind::Vllm, 0).await;
    let b = start_standin("b", EngineKind::Tgi, 0).await;
    let config = format!(
        "[scrape]\ninterval_ms = 50\n[routing]\nqueue_saturation = 5\n{}{}",
        upstream_toml("a", a.port, "vllm", "eu-west"),
        upstream_toml("b", b.port, "tgi", "eu-west"),
    );
    let routed = start_router(&config, None).await;
    let pool = Arc::clone(routed.fleet.picker.pool());
    a.standin.waiting.store(5, Ordering::Relaxed);
    b.standin.waiting.store(9, Ordering::Relaxed);
    wait_for("the scrapes", || {
        pool.get("a").unwrap().load().waiting == 5.0 && pool.get("b").unwrap().load().waiting == 9.0
    })
    .await;
    let client = reqwest_lite::Client::new();
    let answer = post(&client, &routed.base, None, &chat("s", "x", false)).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    let error: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(error["error"]["code"], "replicas_saturated");
    b.standin.waiting.store(0, Ordering::Relaxed);
    wait_for("b to drain", || {
        pool.get("b").unwrap().load().waiting == 0.0
    })
    .await;
    assert_eq!(
        post(&client, &routed.base, None, &chat("s", "x", false))
            .await
            .upstream
            .as_deref(),
        Some("b")
    );
    a.standin.down.store(true, Ordering::Relaxed);
    b.standin.down.store(true, Ordering::Relaxed);
    wait_for("both down", || {
        pool.snapshot().iter().all(|u| !u.is_healthy())
    })
    .await;
    let answer = post(&client, &routed.base, None, &chat("s", "x", false)).await;
    assert_eq!(answer.status, 503);
    let (status, _) = client.get(&format!("{}/health", routed.base)).await;
    assert_eq!(status, 503);
}

fn temp_db(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("souverain_fleet_{tag}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.db");
    let _ = std::fs::remove_file(&path);
    path
}

fn control_plane(tag: &str) -> Arc<ControlPlane> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&temp_db(tag)).unwrap());
    // As `souverain route` sets it up: keys cached, budgets leased, settlements queued.
    let mut config = ControlConfig::new("router", b"hash secret".to_vec());
    config.key_cache_ttl = Duration::from_secs(1);
    config.budget_lease_tokens = 4096;
    Arc::new(ControlPlane::new(store, config))
}

fn key_for(control: &ControlPlane, regions: &[&str], policy: KeyPolicy) -> String {
    let org = control
        .create_org(
            "test",
            "org",
            Some(regions.iter().map(|r| (*r).to_owned()).collect()),
        )
        .unwrap();
    let project = control
        .create_project("test", &org.id, "project", None)
        .unwrap();
    control
        .create_key("test", &project.id, "key", policy)
        .unwrap()
        .plaintext
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organisations_are_served_only_in_their_regions() {
    let ([paris, _stockholm, virginia], config) = three_engines([
        ("paris", "paris", "eu-west-paris"),
        ("stockholm", "stockholm", "eu-north-stockholm"),
        ("virginia", "virginia", "us-east-virginia"),
    ])
    .await;
    let control = control_plane("regions");
    let eu = key_for(
        &control,
        &["eu-west-paris", "eu-north-stockholm"],
        KeyPolicy::default(),
    );
    let paris_only = key_for(&control, &["eu-west-paris"], KeyPolicy::default());
    let routed = start_router(&config, Some(Arc::clone(&control))).await;
    let client = reqwest_lite::Client::new();
    // No key, a wrong key: 401 before any upstream.
    assert_eq!(
        post(&client, &routed.base, None, &chat("s", "x", false))
            .await
            .status,
        401
    );
    assert_eq!(
        post(
            &client,
            &routed.base,
            Some("sk-sov-nope"),
            &chat("s", "x", false)
        )
        .await
        .status,
        401
    );
    for i in 0..60 {
        let body = chat(&format!("prompt {}", i % 7), &format!("{i}"), i % 3 == 0);
        let a = post(&client, &routed.base, Some(&eu), &body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_ne!(a.upstream.as_deref(), Some("virginia"));
        let a = post(&client, &routed.base, Some(&paris_only), &body).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.upstream.as_deref(), Some("paris"));
    }
    assert_eq!(virginia.standin.served.load(Ordering::Relaxed), 0);
    // Paris down: its organisation gets 503, never another region.
    paris.standin.down.store(true, Ordering::Relaxed);
    let pool = Arc::clone(routed.fleet.picker.pool());
    wait_for("paris down", || !pool.get("paris").unwrap().is_healthy()).await;
    let a = post(
        &client,
        &routed.base,
        Some(&paris_only),
        &chat("s", "x", false),
    )
    .await;
    assert_eq!(a.status, 503, "{}", a.body);
    let a = post(&client, &routed.base, Some(&eu), &chat("s", "x", false)).await;
    assert_eq!(a.upstream.as_deref(), Some("stockholm"));
    // Every request was metered at the router, refusals included.
    assert!(control.flush_writes(Duration::from_secs(10)));
    let usage = control.usage(&UsageFilter::default()).unwrap();
    assert_eq!(usage.iter().filter(|u| u.status == "ok").count(), 121);
    assert!(
        usage
            .iter()
            .filter(|u| u.status == "ok")
            .all(|u| u.completion_tokens == 4)
    );
    assert!(usage.iter().any(|u| u.http_status == 503));
    assert!(control.verify_audit().unwrap().is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_records_the_energy_a_souverain_replica_reports() {
    // A stand-in shaped as a Souverain replica reports 1 mJ per generated token in its usage
    // (as `serve` reports its engine's joules); one shaped as vLLM reports none.
    let ours = start_standin("ours", EngineKind::Souverain, 0).await;
    let theirs = start_standin("theirs", EngineKind::Vllm, 0).await;
    let config = format!(
        "[scrape]\ninterval_ms = 50\n{}{}",
        upstream_toml("ours", ours.port, "souverain", "eu-west-paris"),
        upstream_toml("theirs", theirs.port, "vllm", "eu-north-stockholm"),
    );
    let control = control_plane("energy");
    let paris = key_for(&control, &["eu-west-paris"], KeyPolicy::default());
    let stockholm = key_for(&control, &["eu-north-stockholm"], KeyPolicy::default());
    let routed = start_router(&config, Some(Arc::clone(&control))).await;
    let client = reqwest_lite::Client::new();
    for stream in [false, true] {
        for key in [&paris, &stockholm] {
            let a = post(&client, &routed.base, Some(key), &chat("s", "x", stream)).await;
            assert_eq!(a.status, 200, "{}", a.body);
        }
    }
    assert!(control.flush_writes(Duration::from_secs(10)));
    let usage = control.usage(&UsageFilter::default()).unwrap();
    assert_eq!(usage.len(), 4, "{usage:?}");
    for u in &usage {
        assert_eq!(u.status, "ok");
        assert_eq!(u.completion_tokens, 4);
    }
    let metered: Vec<_> = usage.iter().filter(|u| u.energy_uj.is_some()).collect();
    assert_eq!(
        metered.len(),
        2,
        "the Souverain replica's two answers: {usage:?}"
    );
    for u in metered {
        assert_eq!(u.energy_uj, Some(4_000), "4 tokens at 1 mJ");
        assert_eq!(u.energy_source, Some(control::EnergySource::Modelled));
    }
    assert!(
        usage
            .iter()
            .filter(|u| u.energy_uj.is_none())
            .all(|u| u.energy_source.is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_is_exact_across_replicas() {
    let handles = [
        start_standin("b0", EngineKind::Vllm, 0).await,
        start_standin("b1", EngineKind::Vllm, 0).await,
        start_standin("b2", EngineKind::Sglang, 0).await,
        start_standin("b3", EngineKind::LlamaCpp, 0).await,
    ];
    let mut config =
        "[scrape]\ninterval_ms = 50\n[routing]\nstrategy = \"round-robin\"\n".to_owned();
    let engines = ["vllm", "vllm", "sglang", "llama-cpp"];
    for (i, h) in handles.iter().enumerate() {
        config += &upstream_toml(&format!("b{i}"), h.port, engines[i], "eu-west");
    }
    let control = control_plane("budget");
    let budget = 3_000;
    let key = key_for(
        &control,
        &["eu-west"],
        KeyPolicy {
            budget: Some(Budget {
                tokens: budget,
                period: BudgetPeriod::Total,
            }),
            ..KeyPolicy::default()
        },
    );
    let routed = start_router(&config, Some(Arc::clone(&control))).await;
    let client = Arc::new(reqwest_lite::Client::new());
    let max_tokens = 64;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let client = Arc::clone(&client);
        let base = routed.base.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "m", "max_tokens": max_tokens, "stream": i % 2 == 0,
                              "messages": [{"role": "user", "content": format!("request {i}")}]});
            client
                .post(&base, "/v1/chat/completions", Some(&key), &body)
                .await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    let mut upstreams = std::collections::HashSet::new();
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            200 => {
                ok += 1;
                upstreams.insert(a.upstream.unwrap());
            }
            429 => {
                refused += 1;
                assert!(a.body.contains("insufficient_quota"), "{}", a.body);
            }
            other => panic!("status {other}: {}", a.body),
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    assert!(upstreams.len() >= 3, "{upstreams:?}");
    assert!(control.close(Duration::from_secs(10)));
    let used: i64 = control
        .usage(&UsageFilter::default())
        .unwrap()
        .iter()
        .map(|u| u.prompt_tokens + u.completion_tokens)
        .sum();
    let served: u64 = handles
        .iter()
        .map(|h| h.standin.served.load(Ordering::Relaxed))
        .sum();
    assert_eq!(served, ok);
    assert!(
        used as u64 <= budget + max_tokens,
        "used {used} of {budget}"
    );
    println!(
        "budget {budget}: {ok} served over {} replicas, {refused} refused, {used} tokens used",
        upstreams.len()
    );
}
