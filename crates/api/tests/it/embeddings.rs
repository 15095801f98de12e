//! `POST /v1/embeddings` over a fake embedding model: shapes, base64, errors, the model list
//! with a chat model beside it, and metering under `--auth`.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{FakeBackend, MODEL, Mode, error_object, get, post_json, send, send_json};
use control::{ControlConfig, ControlPlane, SqliteStore, Store, UsageFilter};
use engine::EngineError;
use serde_json::{Value, json};
use souverain_api::{Backend, EmbeddingBackend};

const EMBED_MODEL: &str = "fake/embedder";
const DIMS: usize = 4;
const MAX_TOKENS: usize = 8;

/// Tokens: `[CLS]` (101), one id per byte of the text, `[SEP]` (102). The vector of a
/// sequence is a fixed function of its ids, with fractional values so that float and base64
/// answers can be compared bit for bit.
struct FakeEmbedder {
    calls: AtomicUsize,
    charged_uj: AtomicU64,
}

impl EmbeddingBackend for FakeEmbedder {
    fn model_id(&self) -> &str {
        EMBED_MODEL
    }

    fn dimensions(&self) -> usize {
        DIMS
    }

    fn max_tokens(&self) -> usize {
        MAX_TOKENS
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![101];
        ids.extend(text.bytes().map(u32::from));
        ids.push(102);
        ids
    }

    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Token 998 ("slow"): an embedding that takes a while (a client may leave meanwhile).
        if inputs.iter().any(|ids| ids.contains(&998)) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        inputs
            .iter()
            .map(|ids| {
                if ids.contains(&999) {
                    return Err(EngineError::InvalidRequest(
                        "token id 999 is unknown".into(),
                    ));
                }
                let sum: u32 = ids.iter().sum();
                Ok((0..DIMS)
                    .map(|k| (sum as f32 * (k as f32 + 1.0)) / 7.0 - 0.1)
                    .collect())
            })
            .collect()
    }

    /// 1 mJ per token, modelled, as the engine's model would label it.
    fn embed_metered(
        &self,
        inputs: &[Vec<u32>],
    ) -> Result<(Vec<Vec<f32>>, Option<engine::Energy>), EngineError> {
        let vectors = self.embed(inputs)?;
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        self.charged_uj
            .fetch_add(1000 * tokens as u64, Ordering::SeqCst);
        let energy = engine::Energy {
            microjoules: 1000 * tokens as u64,
            kind: engine::EnergyKind::Modelled,
        };
        Ok((vectors, Some(energy)))
    }

    fn energy(&self) -> Option<engine::EnergySnapshot> {
        Some(engine::EnergySnapshot {
            meter: "model",
            kind: engine::EnergyKind::Modelled,
            requests_uj: self.charged_uj.load(Ordering::SeqCst),
            idle_uj: 0,
        })
    }
}

fn expected(ids: &[u32]) -> Vec<f32> {
    FakeEmbedder {
        calls: AtomicUsize::new(0),
        charged_uj: AtomicU64::new(0),
    }
    .embed(&[ids.to_vec()])
    .unwrap()
    .remove(0)
}

fn fake() -> (Arc<FakeBackend>, Arc<FakeEmbedder>) {
    (
        FakeBackend::new(Mode::Echo),
        Arc::new(FakeEmbedder {
            calls: AtomicUsize::new(0),
            charged_uj: AtomicU64::new(0),
        }),
    )
}

fn app(backend: &Arc<FakeBackend>, embedder: &Arc<FakeEmbedder>) -> Router {
    souverain_api::App::new(Arc::clone(backend) as Arc<dyn Backend>)
        .with_embedder(Some(Arc::clone(embedder) as Arc<dyn EmbeddingBackend>))
        .router()
}

async fn embed(app: Router, body: Value) -> (StatusCode, Value) {
    send_json(app, post_json("/v1/embeddings", &body.to_string())).await
}

/// Standard base64 with padding, decoded (a test-side reference, independent of the server's
/// encoder).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            other => panic!("not base64: {other}"),
        }
    };
    let bytes = text.as_bytes();
    assert_eq!(bytes.len() % 4, 0, "unpadded base64 {text}");
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in chunk {
            n = (n << 6) | if c == b'=' { 0 } else { value(c) };
        }
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    out
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn several_inputs_give_one_vector_each_in_order() {
    let (backend, embedder) = fake();
    let (status, json) = embed(
        app(&backend, &embedder),
        json!({"model": EMBED_MODEL, "input": ["ab", "c", "hello"], "user": "someone"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["object"], "list");
    assert_eq!(json["model"], EMBED_MODEL);
    let data = json["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, (item, text)) in data.iter().zip(["ab", "c", "hello"]).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let want = expected(&embedder.tokenize(text));
        assert_eq!(floats(&item["embedding"]), want, "input {i}");
    }
    // 4 + 3 + 7 tokens, [CLS] and [SEP] included.
    assert_eq!(json["usage"]["prompt_tokens"], 14);
    assert_eq!(json["usage"]["total_tokens"], 14);
    assert_eq!(embedder.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn base64_is_the_little_endian_floats() {
    let (backend, embedder) = fake();
    let body = |format: &str| json!({"model": EMBED_MODEL, "input": ["ab", "xyz"], "encoding_format": format});
    let (status, float) = embed(app(&backend, &embedder), body("float")).await;
    assert_eq!(status, StatusCode::OK, "{float}");
    let (status, b64) = embed(app(&backend, &embedder), body("base64")).await;
    assert_eq!(status, StatusCode::OK, "{b64}");
    for i in 0..2 {
        let text = b64["data"][i]["embedding"].as_str().unwrap();
        let bytes = base64_decode(text);
        assert_eq!(bytes.len(), DIMS * 4);
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded, floats(&float["data"][i]["embedding"]));
    }
    assert_eq!(b64["usage"], float["usage"]);
}

#[tokio::test]
async fn token_inputs_are_used_as_given() {
    let (backend, embedder) = fake();
    let (status, one) = embed(
        app(&backend, &embedder),
        json!({"model": EMBED_MODEL, "input": [5, 6, 7]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    assert_eq!(floats(&one["data"][0]["embedding"]), expected(&[5, 6, 7]));
    assert_eq!(one["usage"]["prompt_tokens"], 3);

    let (status, many) = embed(
        app(&backend, &embedder),
        json!({"model": EMBED_MODEL, "input": [[1], [2, 3]], "dimensions": DIMS}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{many}");
    assert_eq!(floats(&many["data"][1]["embedding"]), expected(&[2, 3]));
    assert_eq!(many["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn bad_requests_get_400_naming_the_field() {
    let (backend, embedder) = fake();
    let cases = [
        (json!({"input": "a"}), "model"),
        (json!({"model": EMBED_MODEL}), "input"),
        (json!({"model": EMBED_MODEL, "input": ""}), "input"),
        (json!({"model": EMBED_MODEL, "input": []}), "input"),
        (
            json!({"model": EMBED_MODEL, "input": ["a", ""]}),
            "input[1]",
        ),
        (
            json!({"model": EMBED_MODEL, "input": [[1], []]}),
            "input[1]",
        ),
        (json!({"model": EMBED_MODEL, "input": [1, -2]}), "input[1]"),
        (
            json!({"model": EMBED_MODEL, "input": {"text": "a"}}),
            "input",
        ),
        (
            json!({"model": EMBED_MODEL, "input": "a", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (
            json!({"model": EMBED_MODEL, "input": "a", "dimensions": 2}),
            "dimensions",
        ),
        // "abcdefg" is 9 tokens with [CLS] and [SEP]: one over the limit, refused, not cut.
        (
            json!({"model": EMBED_MODEL, "input": ["ok", "abcdefg"]}),
            "input[1]",
        ),
        (
            json!({"model": EMBED_MODEL, "input": [[1, 2, 3, 4, 5, 6, 7, 8, 9]]}),
            "input[0]",
        ),
    ];
    for (body, param) in cases {
        let (status, json) = embed(app(&backend, &embedder), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {json}");
        let error = error_object(status, &json);
        assert_eq!(error["param"], param, "{body} -> {json}");
    }
    let (status, json) = embed(
        app(&backend, &embedder),
        json!({"model": EMBED_MODEL, "input": "abcdefg"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = error_object(status, &json);
    assert_eq!(error["code"], "context_length_exceeded");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Input 0 has 9 tokens"),
        "{json}"
    );
    // The model refusing an id is the client's fault too.
    let (status, json) = embed(
        app(&backend, &embedder),
        json!({"model": EMBED_MODEL, "input": [999]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    // Too many inputs.
    let many: Vec<&str> = vec!["a"; souverain_api::MAX_EMBEDDING_INPUTS + 1];
    let (status, json) = embed(
        app(&backend, &embedder),
        json!({"model": EMBED_MODEL, "input": many}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    // No invalid request reached the model.
    assert_eq!(embedder.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unknown_models_get_404_and_a_server_without_embedder_says_so() {
    let (backend, embedder) = fake();
    let (status, json) = embed(
        app(&backend, &embedder),
        json!({"model": "other", "input": "a"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
    assert_eq!(error_object(status, &json)["code"], "model_not_found");
    // The chat model is not an embedding model.
    let (status, json) = embed(
        app(&backend, &embedder),
        json!({"model": MODEL, "input": "a"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");

    let (status, json) = embed(backend.app(), json!({"model": MODEL, "input": "a"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    let error = error_object(status, &json);
    assert_eq!(error["param"], "model");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("--embedding-model")
    );
}

#[tokio::test]
async fn models_lists_the_chat_and_the_embedding_model() {
    let (backend, embedder) = fake();
    let (status, json) = send_json(app(&backend, &embedder), get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, EMBED_MODEL]);
    let (status, card) = send_json(
        app(&backend, &embedder),
        get(&format!("/v1/models/{EMBED_MODEL}")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{card}");
    assert_eq!(card["id"], EMBED_MODEL);
    // Without an embedder only the chat model is listed, as before.
    let (_, json) = send_json(backend.app(), get("/v1/models")).await;
    assert_eq!(json["data"].as_array().unwrap().len(), 1);
    // Chat still works beside the embedder.
    let (status, chat) = send_json(
        app(&backend, &embedder),
        post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
}

const ADMIN_KEY: &str = "admin-key-for-embedding-tests";

#[tokio::test]
async fn embeddings_are_authenticated_and_metered_with_their_prompt_tokens() {
    let dir = std::env::temp_dir().join(format!("souverain_api_embeddings_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("control.db");
    let _ = std::fs::remove_file(&db);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    let mut config = ControlConfig::new("eu-west-paris", b"hash secret".to_vec());
    config.admin_key = Some(ADMIN_KEY.to_owned());
    let control = Arc::new(ControlPlane::new(store, config));
    let (backend, embedder) = fake();
    let app = || {
        souverain_api::App::new(Arc::clone(&backend) as Arc<dyn Backend>)
            .with_embedder(Some(Arc::clone(&embedder) as Arc<dyn EmbeddingBackend>))
            .with_control(Some(Arc::clone(&control)))
            .router()
    };
    let admin = |uri: String, body: Value| {
        Request::post(uri)
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (status, org) = send_json(
        app(),
        admin(
            "/admin/v1/organizations".into(),
            json!({"name": "Acme", "allowed_regions": ["eu-west-paris"]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{org}");
    let (status, project) = send_json(
        app(),
        admin(
            format!(
                "/admin/v1/organizations/{}/projects",
                org["id"].as_str().unwrap()
            ),
            json!({"name": "search"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{project}");
    let (status, key) = send_json(
        app(),
        admin(
            format!(
                "/admin/v1/projects/{}/keys",
                project["id"].as_str().unwrap()
            ),
            json!({"name": "k"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key = key["key"].as_str().unwrap().to_owned();

    let request = |key: Option<&str>, body: Value| {
        let mut b =
            Request::post("/v1/embeddings").header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        b.body(Body::from(body.to_string())).unwrap()
    };
    let body = json!({"model": EMBED_MODEL, "input": ["ab", "c"]});
    let response = send(app(), request(None, body.clone())).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (status, json) = send_json(app(), request(Some(&key), body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["usage"]["prompt_tokens"], 7);
    let (status, _) = send_json(
        app(),
        request(
            Some(&key),
            json!({"model": EMBED_MODEL, "input": "abcdefghij"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A client that goes away while its inputs are embedded: the request is still recorded
    // whole, with its tokens and energy.
    let left = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        send(
            app(),
            request(
                Some(&key),
                json!({"model": EMBED_MODEL, "input": [[101, 998, 102]]}),
            ),
        ),
    )
    .await;
    assert!(left.is_err(), "the slow embedding answered within 50 ms");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let usage = loop {
        let usage = control
            .run(|c| c.usage(&UsageFilter::default()))
            .await
            .unwrap();
        if usage.iter().filter(|u| u.status == "ok").count() == 2
            || std::time::Instant::now() > deadline
        {
            break usage;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let ok: Vec<_> = usage.iter().filter(|u| u.status == "ok").collect();
    assert_eq!(ok.len(), 2, "{usage:#?}");
    let gone = ok.iter().find(|u| u.prompt_tokens == 3).unwrap();
    assert_eq!(gone.energy_uj, Some(3_000), "{usage:#?}");
    let ok: Vec<_> = ok.into_iter().filter(|u| u.prompt_tokens != 3).collect();
    assert_eq!((ok[0].prompt_tokens, ok[0].completion_tokens), (7, 0));
    // The record carries the energy the embedding took.
    assert_eq!(ok[0].energy_uj, Some(7_000));
    assert_eq!(
        ok[0].energy_source.map(|s| s.as_str()),
        Some("modelled"),
        "{usage:#?}"
    );
    assert_eq!(ok[0].model, EMBED_MODEL);
    assert!(ok[0].id.starts_with("embd-"), "{}", ok[0].id);
    assert!(
        usage
            .iter()
            .any(|u| u.status == "rejected" && u.http_status == 400),
        "{usage:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn body_json(response: axum::http::Response<Body>) -> Value {
    serde_json::from_slice(&common::body_bytes(response).await).unwrap()
}

#[tokio::test]
async fn embeddings_carry_their_energy_in_usage_headers_and_metrics() {
    let (backend, embedder) = fake();
    let response = send(
        app(&backend, &embedder),
        post_json(
            "/v1/embeddings",
            &json!({"model": EMBED_MODEL, "input": ["ab", "c"]}).to_string(),
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let header = |name: &str| common::header_of(&response, name);
    // 7 tokens ([CLS] a b [SEP], [CLS] c [SEP]) at 1 mJ each.
    assert_eq!(
        header("x-souverain-energy-joules").as_deref(),
        Some("0.007000")
    );
    assert_eq!(
        header("x-souverain-energy-source").as_deref(),
        Some("modelled")
    );
    let json = body_json(response).await;
    assert_eq!(json["usage"]["energy_joules"], 0.007);
    assert_eq!(json["usage"]["energy_source"], "modelled");
    // Ollama's /api/embed: beside its counters, and in the headers.
    let response = send(
        app(&backend, &embedder),
        post_json(
            "/api/embed",
            &json!({"model": EMBED_MODEL, "input": "ab"}).to_string(),
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-souverain-energy-joules"));
    let json = body_json(response).await;
    assert_eq!(json["prompt_eval_count"], 4);
    assert_eq!(json["energy_joules"], 0.004);
    assert_eq!(json["energy_source"], "modelled");
    // `/metrics`: the embedding model's requests under its name, idle once for the process.
    let response = send(app(&backend, &embedder), get("/metrics")).await;
    let text = String::from_utf8(common::body_bytes(response).await).unwrap();
    let line = format!(
        "souverain_energy_joules_total{{model_name=\"{EMBED_MODEL}\",source=\"modelled\",meter=\"model\",kind=\"requests\"}} 0.011"
    );
    assert!(text.lines().any(|l| l == line), "{text}");
    let idle = text
        .lines()
        .filter(|l| l.starts_with("souverain_energy_joules_total") && l.contains("kind=\"idle\""))
        .collect::<Vec<_>>();
    assert_eq!(idle.len(), 1, "{text}");
    assert!(!idle[0].contains("model_name"), "{text}");
}
