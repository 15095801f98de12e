//! Many models in one server: each loaded on first use, the least recently used unloaded
//! under the memory budget, aliases, admin load/unload, failures and waits.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use common::*;
use souverain_api::{App, Backend, Loader, ModelEntry, ModelFacts, ModelSet, ModelSetError};

/// A model of `bytes` whose loader counts its calls, waits `delay`, and fails while `fail`
/// is set.
struct Counted {
    loads: Arc<AtomicUsize>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

fn entry(id: &str, bytes: u64, delay: Duration) -> (ModelEntry, Counted) {
    let loads = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counted = Counted {
        loads: Arc::clone(&loads),
        fail: Arc::clone(&fail),
    };
    let name = id.to_owned();
    let loader: Loader = Arc::new(move || {
        loads.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
        if fail.load(Ordering::SeqCst) {
            return Err("weights unreadable: truncated file".to_owned());
        }
        Ok(FakeBackend::sized(&name, bytes) as Arc<dyn Backend>)
    });
    let entry = ModelEntry {
        id: id.to_owned(),
        aliases: Vec::new(),
        facts: ModelFacts {
            file_bytes: bytes,
            ..ModelFacts::default()
        },
        loader,
    };
    (entry, counted)
}

fn app(models: &Arc<ModelSet>) -> Router {
    App::with_models(Arc::clone(models)).router()
}

fn chat(model: &str) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
    })
    .to_string()
}

async fn states(models: &Arc<ModelSet>) -> Vec<(String, String)> {
    let (status, json) = send_json(app(models), get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["status"]["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(a: &str, b: &str) -> Vec<(String, String)> {
    vec![
        ("small".to_owned(), a.to_owned()),
        ("large".to_owned(), b.to_owned()),
    ]
}

#[tokio::test]
async fn each_model_loads_on_first_use_and_the_least_recently_used_makes_room() {
    let (small, small_loads) = entry("small", 100, Duration::ZERO);
    let (mut large, large_loads) = entry("large", 120, Duration::ZERO);
    large.aliases.push("big".to_owned());
    let models =
        Arc::new(ModelSet::new(vec![small, large], Some(150), Duration::from_secs(5)).unwrap());
    models.load_now("small").unwrap();
    assert_eq!(states(&models).await, pair("loaded", "unloaded"));

    // The alias loads the other model, which needs the first one's room.
    let (status, json) = send_json(
        app(&models),
        post_json("/v1/chat/completions", &chat("big")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["model"], "large");
    assert_eq!(states(&models).await, pair("unloaded", "loaded"));

    let (status, json) = send_json(
        app(&models),
        post_json(
            "/v1/completions",
            &serde_json::json!({
                "model": "small", "prompt": "one two", "max_tokens": 2
            })
            .to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["model"], "small");
    assert_eq!(states(&models).await, pair("loaded", "unloaded"));
    assert_eq!(small_loads.loads.load(Ordering::SeqCst), 2);
    assert_eq!(large_loads.loads.load(Ordering::SeqCst), 1);

    // Unknown names are a 404 and load nothing.
    let (status, json) = send_json(
        app(&models),
        post_json("/v1/chat/completions", &chat("absent")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_object(status, &json)["code"], "model_not_found");
    assert_eq!(states(&models).await, pair("loaded", "unloaded"));
}

#[tokio::test]
async fn without_a_budget_every_model_stays_and_metrics_list_each_once() {
    let (small, _) = entry("small", 100, Duration::ZERO);
    let (large, _) = entry("large", 120, Duration::ZERO);
    let models = Arc::new(ModelSet::new(vec![small, large], None, Duration::from_secs(5)).unwrap());
    models.load_now("small").unwrap();
    let (status, _) = send_json(
        app(&models),
        post_json("/v1/chat/completions", &chat("large")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(states(&models).await, pair("loaded", "loaded"));
    // Ollama's /api/ps lists what is in memory; /api/tags every model.
    let (_, ps) = send_json(app(&models), get("/api/ps")).await;
    assert_eq!(ps["models"].as_array().unwrap().len(), 2);
    assert!(models.unload("large").unwrap());
    let (_, ps) = send_json(app(&models), get("/api/ps")).await;
    assert_eq!(ps["models"][0]["name"], "small:latest");
    assert_eq!(ps["models"].as_array().unwrap().len(), 1);
    let (_, tags) = send_json(app(&models), get("/api/tags")).await;
    assert_eq!(tags["models"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_failed_load_is_a_503_naming_why_and_an_admin_load_tries_again() {
    let (small, _) = entry("small", 100, Duration::ZERO);
    let (large, large_loads) = entry("large", 100, Duration::ZERO);
    large_loads.fail.store(true, Ordering::SeqCst);
    let models = Arc::new(ModelSet::new(vec![small, large], None, Duration::from_secs(5)).unwrap());
    models.load_now("small").unwrap();
    let (status, json) = send_json(
        app(&models),
        post_json("/v1/chat/completions", &chat("large")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let message = error_object(status, &json)["message"].as_str().unwrap();
    assert!(message.contains("truncated file"), "{message}");
    let (_, list) = send_json(app(&models), get("/v1/models")).await;
    assert_eq!(list["data"][1]["status"]["failed"], true);
    // Fixed: requests within the back-off get the failure without another try (a broken
    // file must not unload the others at every request); an admin's load tries at once.
    large_loads.fail.store(false, Ordering::SeqCst);
    let ask = || {
        send_json(
            app(&models),
            post_json("/v1/chat/completions", &chat("large")),
        )
    };
    assert_eq!(ask().await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(large_loads.loads.load(Ordering::SeqCst), 1);
    let (status, _body) = send_json(
        app(&models),
        post_json("/models/load", r#"{"model":"large"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{_body}");
    assert_eq!(ask().await.0, StatusCode::OK);
    assert_eq!(large_loads.loads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn requests_for_a_loading_model_wait_for_one_load_bounded_by_the_wait() {
    let (small, _) = entry("small", 100, Duration::ZERO);
    let (large, large_loads) = entry("large", 100, Duration::from_millis(300));
    let models = Arc::new(ModelSet::new(vec![small, large], None, Duration::from_secs(5)).unwrap());
    models.load_now("small").unwrap();
    let asks = (0..4).map(|_| {
        send_json(
            app(&models),
            post_json("/v1/chat/completions", &chat("large")),
        )
    });
    for (status, json) in futures::future::join_all(asks).await {
        assert_eq!(status, StatusCode::OK, "{json}");
    }
    assert_eq!(large_loads.loads.load(Ordering::SeqCst), 1);

    // A wait shorter than the load: 503 with Retry-After, the load goes on.
    let (small, _) = entry("small", 100, Duration::ZERO);
    let (large, _) = entry("large", 100, Duration::from_millis(400));
    let models =
        Arc::new(ModelSet::new(vec![small, large], None, Duration::from_millis(50)).unwrap());
    models.load_now("small").unwrap();
    let response = send(
        app(&models),
        post_json("/v1/chat/completions", &chat("large")),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(states(&models).await, pair("loaded", "loading"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(states(&models).await, pair("loaded", "loaded"));
}

#[tokio::test]
async fn admin_routes_load_and_unload() {
    let (small, _) = entry("small", 100, Duration::ZERO);
    let (large, large_loads) = entry("large", 100, Duration::ZERO);
    let models = Arc::new(ModelSet::new(vec![small, large], None, Duration::from_secs(5)).unwrap());
    models.load_now("small").unwrap();
    let (status, json) = send_json(
        app(&models),
        post_json("/models/load", r#"{"model":"large"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["status"], "loaded");
    assert_eq!(large_loads.loads.load(Ordering::SeqCst), 1);
    let (_, listed) = send_json(app(&models), get("/models")).await;
    assert_eq!(listed["data"][1]["status"]["value"], "loaded");
    let (status, json) = send_json(
        app(&models),
        post_json("/models/unload", r#"{"model":"small"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["was_loaded"], true);
    assert_eq!(states(&models).await, pair("unloaded", "loaded"));
    let (status, json) = send_json(
        app(&models),
        post_json("/models/unload", r#"{"model":"small"}"#),
    )
    .await;
    assert_eq!(
        (status, &json["was_loaded"]),
        (StatusCode::OK, &serde_json::json!(false))
    );
    let (status, json) = send_json(
        app(&models),
        post_json("/models/load", r#"{"model":"nope"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
    let (status, json) = send_json(
        app(&models),
        post_json("/models/load", r#"{"name":"small"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    // A request without `model` on a route where it is optional goes to the default model,
    // loading it again.
    let (status, json) = send_json(
        app(&models),
        post_json("/tokenize", r#"{"prompt":"a b c"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(states(&models).await, pair("loaded", "loaded"));
}

#[test]
fn sets_that_do_not_add_up_are_refused() {
    let (a, _) = entry("a", 100, Duration::ZERO);
    let (b, _) = entry("a", 100, Duration::ZERO);
    assert_eq!(
        ModelSet::new(vec![a, b], None, Duration::ZERO).err(),
        Some(ModelSetError::BadName("a".into()))
    );
    let (a, _) = entry("a", 100, Duration::ZERO);
    assert!(matches!(
        ModelSet::new(vec![a], Some(99), Duration::ZERO).err(),
        Some(ModelSetError::TooLarge {
            bytes: 100,
            budget: 99,
            ..
        })
    ));
    assert_eq!(
        ModelSet::new(vec![], None, Duration::ZERO).err(),
        Some(ModelSetError::Empty)
    );
    let (mut a, _) = entry("a", 100, Duration::ZERO);
    a.aliases.push("x\ny".into());
    assert!(ModelSet::new(vec![a], None, Duration::ZERO).is_err());
    let (a, fails) = entry("a", 100, Duration::ZERO);
    fails.fail.store(true, Ordering::SeqCst);
    let set = ModelSet::new(vec![a], None, Duration::ZERO).unwrap();
    assert!(matches!(set.load_now("a"), Err(ModelSetError::Load { .. })));
}
