//! The API end to end over `tower::ServiceExt::oneshot`, against a fake backend.

use crate::common;

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{
    FakeBackend, MODEL, Mode, RefuseWith, error_object, get, notified_within, post_json, send,
    send_json, send_sse,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};

fn chat_body(extra: &str) -> String {
    let comma = if extra.is_empty() { "" } else { "," };
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello there"}}]{comma}{extra}}}"#
    )
}

fn completion_body(extra: &str) -> String {
    let comma = if extra.is_empty() { "" } else { "," };
    format!(r#"{{"model":"{MODEL}","prompt":"one two three"{comma}{extra}}}"#)
}

#[tokio::test]
async fn health_is_ok() {
    let app = FakeBackend::new(Mode::Echo).app();
    let (status, json) = send_json(app, get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json, json!({"status": "ok"}));
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let app = FakeBackend::new(Mode::Echo).app();
    let (status, json) = send_json(app.clone(), get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["object"], "list");
    let data = json["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], MODEL);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "souverain");
    assert!(data[0]["created"].as_u64().unwrap() > 1_600_000_000);

    // The id holds a slash, as Hugging Face ids do.
    let (status, one) = send_json(app.clone(), get(&format!("/v1/models/{MODEL}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, data[0]);

    let (status, missing) = send_json(app, get("/v1/models/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_object(status, &missing)["code"], "model_not_found");
}

#[tokio::test]
async fn chat_completion_shape() {
    let fake = FakeBackend::new(Mode::Echo);
    let (status, json) = send_json(
        fake.app(),
        post_json("/v1/chat/completions", &chat_body("")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let id = json["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    assert_eq!(json["object"], "chat.completion");
    assert!(json["created"].is_u64());
    assert_eq!(json["model"], MODEL);
    assert_eq!(json["system_fingerprint"], Value::Null);
    assert_eq!(
        json["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": "user: hello there assistant: "},
            "logprobs": null,
            "finish_reason": "stop"
        }])
    );
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
               "completion_tokens_details": {"reasoning_tokens": 0},
               "energy_joules": 0.008, "energy_source": "modelled"})
    );
    let req = fake.last_request();
    assert_eq!(req.max_tokens, None);
    assert!(req.stop_at_eog);
}

#[tokio::test]
async fn chat_passes_sampling_and_stop_through() {
    let fake = FakeBackend::new(Mode::Echo);
    let body = chat_body(
        r#""stop":["END","\n\n"],"temperature":0.25,"top_p":0.5,"top_k":7,"min_p":0.1,
           "seed":42,"repetition_penalty":1.2,"presence_penalty":0.5,"frequency_penalty":-0.5,
           "max_tokens":100,"max_completion_tokens":2,"user":"ignored-extra","n":1"#,
    );
    let (status, json) = send_json(fake.app(), post_json("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert_eq!(json["usage"]["completion_tokens"], 2);
    let req = fake.last_request();
    assert_eq!(req.stop, vec!["END".to_owned(), "\n\n".to_owned()]);
    assert_eq!(req.max_tokens, Some(2));
    assert_eq!(req.sampling.temperature, 0.25);
    assert_eq!(req.sampling.top_p, 0.5);
    assert_eq!(req.sampling.top_k, 7);
    assert_eq!(req.sampling.min_p, 0.1);
    assert_eq!(req.sampling.seed, Some(42));
    assert_eq!(req.sampling.repetition_penalty, 1.2);
    assert_eq!(req.sampling.presence_penalty, 0.5);
    assert_eq!(req.sampling.frequency_penalty, -0.5);
}

#[tokio::test]
async fn text_parts_are_concatenated() {
    let fake = FakeBackend::new(Mode::Echo);
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":[{{"type":"text","text":"al"}},{{"type":"text","text":"pha"}}]}}]}}"#
    );
    let (status, json) = send_json(fake.app(), post_json("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "user: alpha assistant: "
    );
}

fn parse_chunks(data: &[String]) -> Vec<Value> {
    let (done, chunks) = data.split_last().expect("at least [DONE]");
    assert_eq!(done, "[DONE]");
    chunks
        .iter()
        .map(|chunk| serde_json::from_str(chunk).unwrap())
        .collect()
}

#[tokio::test]
async fn chat_stream_shape() {
    let fake = FakeBackend::new(Mode::Echo);
    let (response, data) = send_sse(
        fake.app(),
        post_json("/v1/chat/completions", &chat_body(r#""stream":true"#)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let chunks = parse_chunks(&data);
    // role, 4 words, finish
    assert_eq!(chunks.len(), 6, "{data:?}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], MODEL);
    }
    // Usage not asked for: no usage chunk and no `usage: null`, but the finish chunk carries
    // the request's usage, as Mistral's API and llama.cpp's server end every stream.
    for chunk in &chunks[..5] {
        assert!(
            chunk.get("usage").is_none(),
            "usage before the end: {chunk}"
        );
    }
    assert!(chunks[5]["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(chunks[5]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        chunks[0]["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}])
    );
    let text: String = chunks[1..5]
        .iter()
        .map(|chunk| {
            assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text, "user: hello there assistant: ");
    assert_eq!(
        chunks[5]["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}])
    );
}

#[tokio::test]
async fn chat_stream_include_usage() {
    let fake = FakeBackend::new(Mode::Echo);
    let (_, data) = send_sse(
        fake.app(),
        post_json(
            "/v1/chat/completions",
            &chat_body(r#""stream":true,"stream_options":{"include_usage":true}"#),
        ),
    )
    .await;
    let chunks = parse_chunks(&data);
    assert_eq!(chunks.len(), 7, "{data:?}");
    let (last, earlier) = chunks.split_last().unwrap();
    for chunk in earlier {
        assert!(chunk.as_object().unwrap().contains_key("usage"));
        assert_eq!(chunk["usage"], Value::Null);
    }
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
               "completion_tokens_details": {"reasoning_tokens": 0},
               "energy_joules": 0.008, "energy_source": "modelled"})
    );
    assert_eq!(last["id"], earlier[0]["id"]);
}

#[tokio::test]
async fn completion_shape_and_default_max_tokens() {
    let fake = FakeBackend::new(Mode::Echo);
    let (status, json) = send_json(
        fake.app(),
        post_json("/v1/completions", &completion_body("")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert!(json["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(json["object"], "text_completion");
    assert_eq!(json["model"], MODEL);
    assert_eq!(
        json["choices"],
        json!([{"text": "one two three ", "index": 0, "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
               "completion_tokens_details": {"reasoning_tokens": 0},
               "energy_joules": 0.006, "energy_source": "modelled"})
    );
    assert_eq!(fake.last_request().max_tokens, Some(16));
}

#[tokio::test]
async fn completion_stream_shape_with_usage() {
    let fake = FakeBackend::new(Mode::Echo);
    let (response, data) = send_sse(
        fake.app(),
        post_json(
            "/v1/completions",
            &completion_body(
                r#""stream":true,"max_tokens":2,"stop":"x","stream_options":{"include_usage":true}"#,
            ),
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let chunks = parse_chunks(&data);
    // 2 words, finish, usage
    assert_eq!(chunks.len(), 4, "{data:?}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    assert_eq!(chunks[0]["choices"][0]["text"], "one ");
    assert_eq!(chunks[0]["usage"], Value::Null);
    assert_eq!(chunks[1]["choices"][0]["text"], "two ");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"]["total_tokens"], 5);
    assert_eq!(fake.last_request().stop, vec!["x".to_owned()]);
}

#[tokio::test]
async fn answers_carry_their_energy_in_usage_and_headers() {
    let fake = FakeBackend::new(Mode::Echo);
    // Two choices: the answer's energy is theirs summed (the fake gives 1 mJ per token).
    let response = send(
        fake.app(),
        post_json("/v1/completions", &completion_body(r#""n":2"#)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let header = |name: &str| common::header_of(&response, name);
    assert_eq!(
        header("x-souverain-energy-joules").as_deref(),
        Some("0.012000")
    );
    assert_eq!(
        header("x-souverain-energy-source").as_deref(),
        Some("modelled")
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["usage"]["energy_joules"], 0.012);
    assert_eq!(json["usage"]["energy_source"], "modelled");
    // The stream's usage chunk carries it too.
    let (_, data) = send_sse(
        fake.app(),
        post_json(
            "/v1/chat/completions",
            &chat_body(r#""stream":true,"stream_options":{"include_usage":true}"#),
        ),
    )
    .await;
    let chunks = parse_chunks(&data);
    let usage = &chunks.last().unwrap()["usage"];
    let tokens = usage["total_tokens"].as_f64().unwrap();
    assert_eq!(usage["energy_joules"].as_f64(), Some(tokens / 1000.0));
    assert_eq!(usage["energy_source"], "modelled");
}

#[tokio::test]
async fn every_apis_answers_carry_their_energy() {
    let fake = FakeBackend::new(Mode::Echo);
    let messages = r#"[{"role":"user","content":"hello there"}]"#;
    // Whole answers of each API: the energy in the body (where each API keeps its counts)
    // and in the headers; the fake charges 1 mJ per token, prompt and output.
    let cases = [
        (
            "/v1/messages",
            format!(r#"{{"model":"{MODEL}","max_tokens":5,"messages":{messages}}}"#),
            ["usage", "input_tokens", "output_tokens"],
        ),
        (
            "/v1/responses",
            format!(r#"{{"model":"{MODEL}","input":"hello there"}}"#),
            ["usage", "input_tokens", "output_tokens"],
        ),
        (
            "/api/chat",
            format!(r#"{{"model":"{MODEL}","stream":false,"messages":{messages}}}"#),
            ["", "prompt_eval_count", "eval_count"],
        ),
        (
            "/api/generate",
            format!(r#"{{"model":"{MODEL}","stream":false,"prompt":"hello there"}}"#),
            ["", "prompt_eval_count", "eval_count"],
        ),
    ];
    for (uri, body, [within, input, output]) in cases {
        let response = send(fake.app(), post_json(uri, &body)).await;
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        let header = |name: &str| common::header_of(&response, name);
        let joules = header("x-souverain-energy-joules");
        let source = header("x-souverain-energy-source");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        let counts = if within.is_empty() {
            &json
        } else {
            &json[within]
        };
        let tokens = counts[input].as_f64().unwrap() + counts[output].as_f64().unwrap();
        assert!(tokens > 0.0, "{uri}: {json}");
        assert_eq!(
            counts["energy_joules"].as_f64(),
            Some(tokens / 1000.0),
            "{uri}: {json}"
        );
        assert_eq!(counts["energy_source"], "modelled", "{uri}");
        assert_eq!(joules, Some(format!("{:.6}", tokens / 1000.0)), "{uri}");
        assert_eq!(source.as_deref(), Some("modelled"), "{uri}");
    }
    // Streamed: the closing event or object carries it.
    let (_, data) = send_sse(
        fake.app(),
        post_json(
            "/v1/messages",
            &format!(r#"{{"model":"{MODEL}","max_tokens":5,"stream":true,"messages":{messages}}}"#),
        ),
    )
    .await;
    let delta = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["usage"]["energy_source"], "modelled", "{delta}");
    assert!(delta["usage"]["energy_joules"].as_f64().unwrap() > 0.0);
    let response = send(
        fake.app(),
        post_json(
            "/api/chat",
            &format!(r#"{{"model":"{MODEL}","messages":{messages}}}"#),
        ),
    )
    .await;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let lines: Vec<Value> = std::str::from_utf8(&bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    let tokens = last["prompt_eval_count"].as_f64().unwrap() + last["eval_count"].as_f64().unwrap();
    assert_eq!(
        last["energy_joules"].as_f64(),
        Some(tokens / 1000.0),
        "{last}"
    );
    assert_eq!(last["energy_source"], "modelled");
    // Only the closing object has it.
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l.get("energy_joules").is_none())
    );
}

async fn expect_error(
    fake: &std::sync::Arc<FakeBackend>,
    request: Request<Body>,
    status: StatusCode,
) -> Value {
    let (got, json) = send_json(fake.app(), request).await;
    assert_eq!(got, status, "{json}");
    error_object(got, &json).clone()
}

#[tokio::test]
async fn chat_bad_requests_are_400_naming_the_field() {
    let fake = FakeBackend::new(Mode::Echo);
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("{\"model\": ".to_owned(), None, "not valid JSON"),
        (
            format!(r#"{{"model":"{MODEL}"}}"#),
            Some("messages"),
            "required",
        ),
        (
            format!(r#"{{"model":"{MODEL}","messages":[]}}"#),
            Some("messages"),
            "at least one",
        ),
        (
            format!(r#"{{"model":"{MODEL}","messages":[{{"role":"wizard","content":"x"}}]}}"#),
            Some("messages[0].role"),
            "wizard",
        ),
        (
            chat_body(r#""temperature":3"#),
            Some("temperature"),
            "between 0 and 2",
        ),
        (chat_body(r#""top_p":0"#), Some("top_p"), "greater than 0"),
        (chat_body(r#""n":17"#), Some("n"), "between 1 and 16"),
        (
            chat_body(r#""max_tokens":0"#),
            Some("max_tokens"),
            "at least 1",
        ),
        (
            format!(r#"{{"model":"{MODEL}","messages":"hi"}}"#),
            Some("messages"),
            "invalid type",
        ),
        (
            chat_body(r#""temperature":"warm""#),
            Some("temperature"),
            "invalid type",
        ),
    ];
    for (body, param, needle) in cases {
        let error = expect_error(
            &fake,
            post_json("/v1/chat/completions", &body),
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(error["param"].as_str(), param, "{body}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    assert!(
        fake.last_request.lock().unwrap().is_none(),
        "no bad request may reach the engine"
    );
}

#[tokio::test]
async fn completion_bad_requests_are_400() {
    let fake = FakeBackend::new(Mode::Echo);
    let cases = [
        (
            completion_body(r#""echo":true,"suffix":"b""#),
            "echo",
            "cannot be combined",
        ),
        (
            format!(r#"{{"model":"{MODEL}","prompt":[[1,2,3],[]]}}"#),
            "prompt",
            "token-id lists",
        ),
        (completion_body(r#""n":0"#), "n", "between 1 and 16"),
        (
            completion_body(r#""max_tokens":0"#),
            "max_tokens",
            "at least 1",
        ),
    ];
    for (body, param, needle) in cases {
        let error = expect_error(
            &fake,
            post_json("/v1/completions", &body),
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(error["param"], param, "{body}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
    }
}

#[tokio::test]
async fn wrong_content_type_is_400() {
    let fake = FakeBackend::new(Mode::Echo);
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(chat_body("")))
        .unwrap();
    let error = expect_error(&fake, request, StatusCode::BAD_REQUEST).await;
    assert!(error["message"].as_str().unwrap().contains("Content-Type"));

    let request = Request::post("/v1/chat/completions")
        .body(Body::from(chat_body("")))
        .unwrap();
    expect_error(&fake, request, StatusCode::BAD_REQUEST).await;

    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(chat_body("")))
        .unwrap();
    let (status, _) = send_json(fake.app(), request).await;
    assert_eq!(status, StatusCode::OK, "charset parameter is fine");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let fake = FakeBackend::new(Mode::Echo);
    let big = "a".repeat(souverain_api::MAX_BODY_BYTES + 1);
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{big}"}}]}}"#);
    let error = expect_error(
        &fake,
        post_json("/v1/chat/completions", &body),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert_eq!(error["type"], "invalid_request_error");
}

#[tokio::test]
async fn too_long_prompt_is_400_context() {
    // "user: hello there assistant:" is 4 tokens; a 4-token context leaves no room.
    let fake = FakeBackend::with_context(Mode::Echo, 4);
    let error = expect_error(
        &fake,
        post_json("/v1/chat/completions", &chat_body("")),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(error["code"], "context_length_exceeded");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("context"), "{message}");
    assert!(message.contains("4 tokens"), "{message}");
    assert!(fake.last_request.lock().unwrap().is_none());

    // The engine's own verdict is answered the same way.
    let fake = FakeBackend::new(Mode::Refuse(RefuseWith::ContextLength));
    let error = expect_error(
        &fake,
        post_json("/v1/completions", &completion_body("")),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("context"));
}

#[tokio::test]
async fn unknown_model_is_404() {
    let fake = FakeBackend::new(Mode::Echo);
    let body = r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#;
    let error = expect_error(
        &fake,
        post_json("/v1/chat/completions", body),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");
    assert!(error["message"].as_str().unwrap().contains("gpt-4"));

    let body = r#"{"model":"gpt-4","prompt":"hi"}"#;
    expect_error(
        &fake,
        post_json("/v1/completions", body),
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let fake = FakeBackend::new(Mode::Echo);
    let error = expect_error(&fake, get("/v1/nothing"), StatusCode::NOT_FOUND).await;
    assert_eq!(error["code"], "unknown_url");
    assert!(error["message"].as_str().unwrap().contains("/v1/nothing"));
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let fake = FakeBackend::new(Mode::Echo);
    let response = send(fake.app(), get("/v1/chat/completions")).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()[header::ALLOW], "POST");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    let error = error_object(StatusCode::METHOD_NOT_ALLOWED, &json);
    assert_eq!(error["code"], "method_not_allowed");

    let request = Request::post("/health").body(Body::empty()).unwrap();
    expect_error(&fake, request, StatusCode::METHOD_NOT_ALLOWED).await;
}

#[tokio::test]
async fn template_error_is_400_and_unavailable_is_503() {
    let fake = FakeBackend::new(Mode::Echo);
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"TEMPLATE_ERROR"}}]}}"#
    );
    let error = expect_error(
        &fake,
        post_json("/v1/chat/completions", &body),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(error["param"], "messages");

    let fake = FakeBackend::new(Mode::Refuse(RefuseWith::Unavailable));
    let error = expect_error(
        &fake,
        post_json("/v1/chat/completions", &chat_body("")),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(!error["message"].as_str().unwrap().contains("internal"));
}

#[tokio::test]
async fn failure_is_500_without_detail() {
    let fake = FakeBackend::new(Mode::FailMidway);
    let error = expect_error(
        &fake,
        post_json("/v1/chat/completions", &chat_body("")),
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert!(!error["message"].as_str().unwrap().contains("secret"));
}

#[tokio::test]
async fn failure_mid_stream_sends_an_error_event_and_stops() {
    let fake = FakeBackend::new(Mode::FailMidway);
    let (response, data) = send_sse(
        fake.app(),
        post_json("/v1/chat/completions", &chat_body(r#""stream":true"#)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    // role chunk, "partial ", error; no [DONE]
    assert_eq!(data.len(), 3, "{data:?}");
    let text: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(text["choices"][0]["delta"]["content"], "partial ");
    let error: Value = serde_json::from_str(&data[2]).unwrap();
    let object = error_object(StatusCode::INTERNAL_SERVER_ERROR, &error);
    assert!(!object["message"].as_str().unwrap().contains("secret"));
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_generation() {
    let fake = FakeBackend::new(Mode::Endless);
    let response = send(
        fake.app(),
        post_json("/v1/chat/completions", &chat_body(r#""stream":true"#)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let frame = body.frame().await.expect("a first chunk").unwrap();
    let first = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(first.contains("chat.completion.chunk"), "{first}");
    assert_eq!(fake.cancellations.load(Ordering::SeqCst), 0);

    drop(body);
    assert!(
        notified_within(&fake.cancelled).await,
        "the generation never saw its receiver dropped"
    );
    assert_eq!(fake.cancellations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dropping_a_waiting_request_cancels_the_generation() {
    let fake = FakeBackend::new(Mode::Endless);
    let app = fake.app();
    let request = post_json("/v1/completions", &completion_body(""));
    let client = tokio::spawn(async move { send(app, request).await });
    assert!(
        notified_within(&fake.started).await,
        "the generation never started"
    );
    assert_eq!(fake.cancellations.load(Ordering::SeqCst), 0);

    client.abort();
    assert!(
        notified_within(&fake.cancelled).await,
        "the generation never saw its receiver dropped"
    );
    assert_eq!(fake.cancellations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn serve_answers_over_tcp_and_shuts_down() {
    let fake = FakeBackend::new(Mode::Echo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(souverain_api::App::new(fake).serve(listener, async move {
        let _ = stopped.await;
    }));

    // A plain blocking client, on its own thread, speaking HTTP/1.1 by hand.
    let reply = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    })
    .await
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with(r#"{"status":"ok"}"#), "{reply}");

    stop.send(()).unwrap();
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("server stops after shutdown")
        .unwrap();
    assert!(result.is_ok());
}

#[tokio::test]
async fn malformed_and_oversized_heads_get_the_error_object() {
    let fake = FakeBackend::new(Mode::Echo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(souverain_api::App::new(fake).serve(listener, async move {
        let _ = stopped.await;
    }));
    let send = move |request: Vec<u8>| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // The server may answer and close before it has read all of a huge head.
        let _ = stream.write_all(&request);
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    };
    let big = |n: usize| {
        let mut r = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
        r.extend(std::iter::repeat_n(b'a', n));
        r.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        r
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "malformed_request"),
        (
            b"GET /health HTTP/1.1\r\nBad Header: v\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            b"GET /health HTTP/1.1\r\nX: \x01\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        // Past our limit, within hyper's buffer: the middleware's 431.
        (big(100_000), 431, "request_header_fields_too_large"),
        // Past hyper's buffer: hyper's own 431, rewritten.
        (big(1_000_000), 431, "request_header_fields_too_large"),
    ];
    for (request, status, code) in cases {
        let reply = tokio::task::spawn_blocking(move || send(request))
            .await
            .unwrap();
        assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
        assert!(
            reply
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{reply}"
        );
        let body = reply.split_once("\r\n\r\n").unwrap().1;
        let json: Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], code, "{reply}");
    }
    // A good request on the same server still works.
    let reply = tokio::task::spawn_blocking(move || send(big(10)))
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    stop.send(()).unwrap();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
}

#[tokio::test]
async fn a_full_queue_is_503_with_retry_after() {
    let fake = FakeBackend::new(Mode::Refuse(RefuseWith::Overloaded));
    let response = send(
        fake.app(),
        post_json("/v1/chat/completions", &chat_body("")),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["error"]["code"], "server_overloaded");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("overloaded")
    );
}

#[tokio::test]
async fn metrics_is_prometheus_text() {
    let fake = FakeBackend::new(Mode::Echo);
    let response = send(fake.app(), get("/metrics")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let fake = FakeBackend::new(Mode::Echo);
    let (status, json) = send_json(
        fake.app(),
        post_json("/tokenize", r#"{"prompt": "one two one"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["tokens"], json!([0, 1, 0]));
    assert_eq!(json["count"], 3);
    assert!(json["max_model_len"].as_u64().unwrap() > 0);

    // A chat is rendered with the template first (the fake's template joins role and text).
    let (status, chat) = send_json(
        fake.app(),
        post_json(
            "/tokenize",
            r#"{"messages": [{"role": "user", "content": "one two"}]}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    assert!(chat["count"].as_u64().unwrap() >= 2);

    let (status, text) = send_json(
        fake.app(),
        post_json("/detokenize", r#"{"tokens": [1, 0]}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(text["prompt"], "two one");

    for (uri, body, param) in [
        ("/tokenize", r#"{}"#, None),
        ("/tokenize", r#"{"prompt": "a", "messages": []}"#, None),
        ("/tokenize", r#"{"messages": []}"#, Some("messages")),
        (
            "/tokenize",
            r#"{"prompt": "a", "model": "other"}"#,
            Some("model"),
        ),
        ("/detokenize", r#"{"tokens": [-1]}"#, Some("tokens[0]")),
        ("/detokenize", r#"{"tokens": "x"}"#, None),
    ] {
        let (status, json) = send_json(fake.app(), post_json(uri, body)).await;
        assert!(status.is_client_error(), "{uri} {body}: {status}");
        if let Some(param) = param {
            assert_eq!(json["error"]["param"], param, "{uri} {body}");
        }
    }
    let (status, _) = send_json(fake.app(), post_json("/detokenize", r#"{"tokens": [999]}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn batches_and_files_need_the_control_plane() {
    let app = FakeBackend::new(Mode::Echo).app();
    let (status, json) = send_json(
        app.clone(),
        post_json(
            "/v1/batches",
            r#"{"input_file_id":"file-x","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_object(status, &json)["code"], "batches_unavailable");
    let (status, json) = send_json(app, get("/v1/files")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
}
