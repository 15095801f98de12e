//! Ollama's API end to end over `tower::ServiceExt::oneshot`, against the fake backend: the
//! translation into the one chat path, NDJSON streaming by default, the closing counters, and
//! errors as `{"error": "..."}`.

use crate::common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{FakeBackend, MODEL, Mode, get, send, send_json};
use http_body_util::BodyExt;
use serde_json::{Value, json};

/// A POST without a JSON content type, as `curl -d` sends Ollama's documented examples.
fn post(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri)
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The JSON objects of an NDJSON answer, and its content type.
async fn ndjson(app: axum::Router, request: Request<Body>) -> (String, Vec<Value>) {
    let response = send(app, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let kind = response.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.ends_with('\n'), "{text}");
    let lines = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (kind, lines)
}

fn assert_closing(last: &Value, reason: &str) {
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["done_reason"], reason, "{last}");
    for counter in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[counter].is_u64(), "{counter} in {last}");
    }
    let parts = ["load_duration", "prompt_eval_duration", "eval_duration"]
        .iter()
        .map(|k| last[k].as_u64().unwrap())
        .sum::<u64>();
    assert!(parts <= last["total_duration"].as_u64().unwrap(), "{last}");
}

#[tokio::test]
async fn chat_streams_ndjson_by_default_and_whole_on_request() {
    let fake = FakeBackend::new(Mode::Echo);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
                      "options": {"num_predict": 3}});
    let (kind, lines) = ndjson(fake.app(), post("/api/chat", &body)).await;
    assert_eq!(kind, "application/x-ndjson");
    let (last, parts) = lines.split_last().unwrap();
    assert!(parts.iter().all(|p| p["done"] == false));
    assert_closing(last, "length");
    assert_eq!(last["eval_count"], 3);
    let streamed: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(fake.last_request().max_tokens, Some(3));

    let mut whole_body = body.clone();
    whole_body["stream"] = json!(false);
    let (status, whole) = send_json(fake.app(), post("/api/chat", &whole_body)).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(whole["message"]["role"], "assistant");
    assert_eq!(whole["message"]["content"], streamed.as_str());
    assert_closing(&whole, "length");
    // Ollama's defaults, not ours.
    let sampling = fake.last_request().sampling;
    assert_eq!(
        (sampling.temperature, sampling.top_k, sampling.top_p),
        (0.8, 40, 0.9)
    );
}

#[tokio::test]
async fn empty_prompts_are_load_requests() {
    let fake = FakeBackend::new(Mode::Echo);
    let (_, lines) = ndjson(fake.app(), post("/api/generate", &json!({"model": MODEL}))).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["done_reason"], "load");
    assert_eq!(lines[0]["response"], "");
    let (status, json) = send_json(
        fake.app(),
        post(
            "/api/chat",
            &json!({"model": format!("{MODEL}:latest"), "messages": [], "stream": false}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["done_reason"], "load");
}

#[tokio::test]
async fn num_ctx_limits_the_context() {
    let fake = FakeBackend::with_context(Mode::Echo, 64);
    let body = json!({"model": MODEL, "prompt": "one two three", "raw": true, "stream": false,
                      "options": {"num_ctx": 8}});
    let (status, json) = send_json(fake.app(), post("/api/generate", &body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let prompt = json["prompt_eval_count"].as_u64().unwrap() as usize;
    assert_eq!(fake.last_request().max_tokens, Some(8 - prompt));
    // A prompt that does not fit num_ctx is refused, as one that does not fit the model.
    let body = json!({"model": MODEL, "prompt": "a b c d e f g h i j", "raw": true,
                      "options": {"num_ctx": 4}});
    let (status, json) = send_json(fake.app(), post("/api/generate", &body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
}

#[tokio::test]
async fn errors_are_ollamas() {
    let fake = FakeBackend::new(Mode::Echo);
    let cases = [
        (
            post("/api/chat", &json!({"model": "nope", "messages": []})),
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            post(
                "/api/chat",
                &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                        "options": {"top_k": "many"}}),
            ),
            StatusCode::BAD_REQUEST,
            "options.top_k",
        ),
        (
            post(
                "/api/generate",
                &json!({"model": MODEL, "prompt": "x", "images": ["aGk="]}),
            ),
            StatusCode::BAD_REQUEST,
            "images",
        ),
        (
            post("/api/generate", &json!({"model": MODEL, "prompt": 3})),
            StatusCode::BAD_REQUEST,
            "prompt",
        ),
        (
            post("/api/embed", &json!({"model": MODEL, "input": "x"})),
            StatusCode::BAD_REQUEST,
            "embeddings",
        ),
        (get("/api/nothing"), StatusCode::NOT_FOUND, "/api/nothing"),
        (get("/api/chat"), StatusCode::METHOD_NOT_ALLOWED, "GET"),
    ];
    for (request, status, mentions) in cases {
        let (got, json) = send_json(fake.app(), request).await;
        assert_eq!(got, status, "{json}");
        let error = json["error"].as_str().unwrap_or_else(|| panic!("{json}"));
        assert!(error.contains(mentions), "{error}");
        assert_eq!(json.as_object().unwrap().len(), 1, "{json}");
    }
}

#[tokio::test]
async fn tags_show_version() {
    let fake = FakeBackend::new(Mode::Echo);
    let (status, tags) = send_json(fake.app(), get("/api/tags")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tags["models"][0]["name"], format!("{MODEL}:latest"));
    assert_eq!(tags["models"][0]["digest"].as_str().unwrap().len(), 64);
    let (status, shown) = send_json(
        fake.app(),
        post("/api/show", &json!({"model": format!("{MODEL}:latest")})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["capabilities"], json!(["completion", "tools"]));
    let (status, version) = send_json(fake.app(), get("/api/version")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(version["version"].is_string());
}
