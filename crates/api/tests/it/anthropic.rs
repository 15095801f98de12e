//! Anthropic's Messages API end to end over `tower::ServiceExt::oneshot`, against the fake
//! backend: the translation into the one chat path, the answer and event shapes, and errors
//! in Anthropic's shape.

use crate::common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{FakeBackend, MODEL, Mode, RefuseWith, get, post_json, send, send_json};
use http_body_util::BodyExt;
use serde_json::{Value, json};

fn message_body(extra: Value) -> String {
    let mut body = json!({
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    body.to_string()
}

/// Asserts Anthropic's error shape with this status and type.
fn assert_anthropic_error(status: StatusCode, json: &Value, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{json}");
    assert_eq!(json["type"], "error", "{json}");
    assert_eq!(json["error"]["type"], kind, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{json}"
    );
}

/// The `(event, data)` pairs of an SSE body.
async fn events(app: axum::Router, request: Request<Body>) -> Vec<(String, Value)> {
    let response = send(app, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    text.split("\n\n")
        .filter(|frame| !frame.trim().is_empty() && !frame.starts_with(':'))
        .map(|frame| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn a_message_has_anthropics_shape() {
    let fake = FakeBackend::new(Mode::Echo);
    let (status, json) = send_json(
        fake.app(),
        post_json(
            "/v1/messages",
            &message_body(json!({"metadata": {"user_id": "u"}})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert!(json["id"].as_str().unwrap().starts_with("msg_"), "{json}");
    assert_eq!(json["type"], "message");
    assert_eq!(json["role"], "assistant");
    assert_eq!(json["model"], MODEL);
    assert_eq!(json["content"][0]["type"], "text");
    assert_eq!(json["content"][0]["text"], "user: hello there assistant: ");
    assert_eq!(json["stop_reason"], "end_turn");
    assert_eq!(json["stop_sequence"], Value::Null);
    assert_eq!(
        json["usage"],
        // The fake backend reports 1 mJ per token (prompt and output), modelled: our extension.
        json!({"input_tokens": 4, "output_tokens": 4,
               "energy_joules": 0.008, "energy_source": "modelled"})
    );
}

#[tokio::test]
async fn the_request_is_translated_into_the_chat_path() {
    let fake = FakeBackend::new(Mode::Echo);
    let body = message_body(json!({
        "max_tokens": 2,
        "system": [{"type": "text", "text": "Be brief."}],
        "temperature": 0.25, "top_p": 0.5, "top_k": 7,
        "stop_sequences": ["END", "\n\n"],
    }));
    let (status, json) = send_json(fake.app(), post_json("/v1/messages", &body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["stop_reason"], "max_tokens");
    assert_eq!(json["usage"]["output_tokens"], 2);
    let req = fake.last_request();
    assert_eq!(req.stop, ["END".to_owned(), "\n\n".to_owned()]);
    assert_eq!(req.max_tokens, Some(2));
    assert_eq!(req.sampling.temperature, 0.25);
    assert_eq!(req.sampling.top_p, 0.5);
    assert_eq!(req.sampling.top_k, 7);
    // The system text is the first message of the prompt.
    assert_eq!(json["content"][0]["text"], "system: Be ");
}

#[tokio::test]
async fn a_stream_is_anthropics_event_sequence() {
    let fake = FakeBackend::new(Mode::Echo);
    let whole = send_json(
        fake.app(),
        post_json("/v1/messages", &message_body(json!({}))),
    )
    .await;
    let streamed = events(
        fake.app(),
        post_json("/v1/messages", &message_body(json!({"stream": true}))),
    )
    .await;
    let names: Vec<&str> = streamed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    for (name, data) in &streamed {
        assert_eq!(data["type"], name.as_str(), "{data}");
    }
    let start = &streamed[0].1["message"];
    assert_eq!(start["usage"]["input_tokens"], 4);
    assert_eq!(start["content"], json!([]));
    let text: String = streamed
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, whole.1["content"][0]["text"].as_str().unwrap());
    let delta = &streamed[streamed.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 4);
}

#[tokio::test]
async fn count_tokens_counts_the_prompt() {
    let fake = FakeBackend::new(Mode::Echo);
    let body = json!({"model": MODEL, "system": "Be brief.",
        "messages": [{"role": "user", "content": "hello there"}]});
    let (status, json) = send_json(
        fake.app(),
        post_json("/v1/messages/count_tokens", &body.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    // `system: Be brief.` `user: hello there` `assistant:`
    assert_eq!(json, json!({"input_tokens": 7}));
}

#[tokio::test]
async fn bad_requests_are_anthropic_errors() {
    let fake = FakeBackend::new(Mode::Echo);
    let cases = [
        (json!({"max_tokens": null}), "max_tokens"),
        (json!({"max_tokens": "many"}), "max_tokens"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}),
            "image",
        ),
        (
            json!({"messages": [{"role": "system", "content": "x"}]}),
            "role",
        ),
        (json!({"temperature": 9}), "temperature"),
        (
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "server tool",
        ),
        (json!({"tool_choice": {"type": "tool"}}), "tool_choice.name"),
    ];
    for (extra, needle) in cases {
        let (status, json) =
            send_json(fake.app(), post_json("/v1/messages", &message_body(extra))).await;
        assert_anthropic_error(
            status,
            &json,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        );
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    let (status, json) = send_json(
        fake.app(),
        post_json("/v1/messages", &message_body(json!({"model": "other"}))),
    )
    .await;
    assert_anthropic_error(status, &json, StatusCode::NOT_FOUND, "not_found_error");
    let (status, json) = send_json(fake.app(), post_json("/v1/messages", "{not json")).await;
    assert_anthropic_error(
        status,
        &json,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
    );
    let (status, json) = send_json(fake.app(), get("/v1/messages")).await;
    assert_anthropic_error(
        status,
        &json,
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
    );
    // Other routes keep OpenAI's shape.
    let (_, json) = send_json(fake.app(), get("/v1/nothing")).await;
    assert!(json["error"]["message"].is_string(), "{json}");
    assert!(json.get("type").is_none(), "{json}");
}

#[tokio::test]
async fn engine_refusals_and_failures_are_anthropic_errors() {
    let busy = FakeBackend::new(Mode::Refuse(RefuseWith::Overloaded));
    let response = send(
        busy.app(),
        post_json("/v1/messages", &message_body(json!({}))),
    )
    .await;
    assert!(response.headers().contains_key(header::RETRY_AFTER));
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_anthropic_error(
        status,
        &json,
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded_error",
    );

    let failing = FakeBackend::new(Mode::FailMidway);
    let streamed = events(
        failing.app(),
        post_json("/v1/messages", &message_body(json!({"stream": true}))),
    )
    .await;
    let (name, data) = streamed.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error"]["type"], "api_error", "{data}");
}
