//! What `--auth` adds to each request: the same chat completion through the router with and
//! without the control plane, over a backend that answers at once, so the difference is the
//! key check, the limits, the budget reservation and the metering (usage record and audit
//! entry committed before the response ends).
//!
//! ```text
//! cargo run --release -p souverain-api --example auth_overhead [requests]
//! SOUVERAIN_TEST_DATABASE_URL=postgres://... cargo run ... # adds a PostgreSQL run
//! ```
//!
//! Prints p50 and p99 in microseconds for each configuration. A measurement, not a test: it
//! asserts nothing about speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use control::{
    Budget, BudgetPeriod, ControlConfig, ControlPlane, KeyPolicy, PostgresStore, SqliteStore, Store,
};
use engine::{ChatPrompt, ChatRequest, EngineError, Event, FinishReason, GenerateRequest, Usage};
use http_body_util::BodyExt;
use souverain_api::Backend;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tower::ServiceExt;

/// Answers every prompt with one word, at once.
struct Instant1;

impl Backend for Instant1 {
    fn model_id(&self) -> &str {
        "bench"
    }
    fn context_length(&self) -> usize {
        4096
    }
    fn encode_chat(&self, request: &ChatRequest) -> Result<ChatPrompt, EngineError> {
        let text: String = request
            .messages
            .iter()
            .map(|m| m["content"].as_str().unwrap_or_default())
            .collect();
        Ok(ChatPrompt {
            tokens: self.tokenize(&text),
            reasoning_open: false,
        })
    }
    fn tokenize(&self, text: &str) -> Vec<u32> {
        (0..text.split_whitespace().count() as u32).collect()
    }
    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        Ok(tokens.iter().map(|t| format!("w{t} ")).collect())
    }
    fn generate(&self, req: GenerateRequest) -> Result<UnboundedReceiver<Event>, EngineError> {
        let (tx, rx) = unbounded_channel();
        let _ = tx.send(Event::Text("ok".into()));
        let _ = tx.send(Event::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: req.prompt_tokens.len(),
                completion_tokens: 1,
                reasoning_tokens: 0,
                energy: None,
            },
        });
        Ok(rx)
    }
}

fn request(key: Option<&str>) -> Request<Body> {
    let mut builder =
        Request::post("/v1/chat/completions").header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    builder
        .body(Body::from(
            r#"{"model":"bench","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}"#,
        ))
        .unwrap_or_default()
}

/// Latencies of `n` sequential requests, after a warm-up.
async fn measure(app: &Router, key: Option<&str>, n: usize) -> Vec<Duration> {
    for _ in 0..50 {
        let _ = app.clone().oneshot(request(key)).await;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let response = app.clone().oneshot(request(key)).await.ok();
        let ok = match response {
            Some(r) if r.status().is_success() => r.into_body().collect().await.is_ok(),
            _ => false,
        };
        times.push(started.elapsed());
        assert!(ok, "a benchmark request failed");
    }
    times.sort();
    times
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(index)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

fn report(name: &str, times: &[Duration], baseline: Option<&[Duration]>) {
    let (p50, p99) = (percentile(times, 0.50), percentile(times, 0.99));
    match baseline {
        None => println!("{name:<34} p50 {p50:>8.1} µs   p99 {p99:>8.1} µs"),
        Some(base) => println!(
            "{name:<34} p50 {p50:>8.1} µs   p99 {p99:>8.1} µs   added: p50 {:>7.1} µs, p99 {:>7.1} µs",
            p50 - percentile(base, 0.50),
            p99 - percentile(base, 0.99)
        ),
    }
}

/// A control plane over `store` and a key with every check switched on.
fn plane_with_key(store: Arc<dyn Store>) -> (Arc<ControlPlane>, String) {
    let plane = ControlPlane::new(store, ControlConfig::new("bench-region", b"bench".to_vec()));
    let org = plane
        .create_org("bench", "Bench", None)
        .unwrap_or_else(|e| panic!("{e}"));
    let project = plane
        .create_project("bench", &org.id, "p", None)
        .unwrap_or_else(|e| panic!("{e}"));
    let policy = KeyPolicy {
        allowed_models: vec!["bench".into()],
        requests_per_minute: Some(100_000_000),
        tokens_per_minute: Some(100_000_000_000),
        budget: Some(Budget {
            tokens: 1 << 50,
            period: BudgetPeriod::Month,
        }),
        expires_at_ms: None,
    };
    let key = plane
        .create_key("bench", &project.id, "k", policy)
        .unwrap_or_else(|e| panic!("{e}"));
    (Arc::new(plane), key.plaintext)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000);
    let backend: Arc<dyn Backend> = Arc::new(Instant1);
    println!("{n} sequential chat completions per configuration");

    let plain = souverain_api::App::new(Arc::clone(&backend)).router();
    let base = measure(&plain, None, n).await;
    report("no --auth", &base, None);

    let dir = std::env::temp_dir().join(format!("souverain_auth_bench_{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let sqlite: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.join("bench.sqlite3")).unwrap_or_else(|e| panic!("{e}")));
    let (plane, key) = plane_with_key(sqlite);
    let app = souverain_api::App::new(Arc::clone(&backend))
        .with_control(Some(plane))
        .router();
    let times = measure(&app, Some(&key), n).await;
    report("--auth, SQLite (WAL, file)", &times, Some(&base));

    if let Ok(url) = std::env::var("SOUVERAIN_TEST_DATABASE_URL") {
        let schema = format!("bench_{}", std::process::id());
        let pg = tokio::task::spawn_blocking(move || {
            PostgresStore::connect_in_schema(&url, Some(&schema))
        })
        .await
        .ok()
        .and_then(Result::ok);
        match pg {
            Some(pg) => {
                let (plane, key) =
                    tokio::task::spawn_blocking(move || plane_with_key(Arc::new(pg)))
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                let app = souverain_api::App::new(Arc::clone(&backend))
                    .with_control(Some(plane))
                    .router();
                let times = measure(&app, Some(&key), n).await;
                report("--auth, PostgreSQL (local TCP)", &times, Some(&base));
            }
            None => println!("PostgreSQL: could not connect"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
