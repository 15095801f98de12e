//! A deterministic fake [`Backend`] and request helpers for the API's integration tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use engine::{
    ChatPrompt, ChatRequest, EngineError, Event, Failure, FinishReason, GenerateRequest, Usage,
};
use http_body_util::BodyExt;
use souverain_api::Backend;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tower::ServiceExt;

pub const MODEL: &str = "fake/echo-model";

/// How the fake generates.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Echo the prompt's words back, one `Text` event per word, up to `max_tokens`.
    Echo,
    /// Send one word, then wait until the receiver is dropped and count it.
    Endless,
    /// Send one word, then `Failed`.
    FailMidway,
    /// Refuse in `generate` with this error.
    Refuse(RefuseWith),
}

/// Which error `generate` refuses with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefuseWith {
    Unavailable,
    ContextLength,
    Overloaded,
}

/// A backend whose "tokenizer" gives each distinct whitespace-separated word an id and whose
/// "model" echoes the prompt's words.
pub struct FakeBackend {
    /// Its model id ([`MODEL`] unless made by [`FakeBackend::sized`]).
    pub id: String,
    /// The bytes it says it holds (`facts().file_bytes`).
    pub bytes: u64,
    pub mode: Mode,
    pub context_length: usize,
    vocab: Mutex<Vec<String>>,
    /// The last request given to `generate`.
    pub last_request: Mutex<Option<GenerateRequest>>,
    /// Generations that saw their receiver dropped.
    pub cancellations: Arc<AtomicUsize>,
    /// Notified once per cancellation seen.
    pub cancelled: Arc<Notify>,
    /// Notified when an `Endless` generation has sent its first word.
    pub started: Arc<Notify>,
}

impl FakeBackend {
    pub fn new(mode: Mode) -> Arc<Self> {
        Self::with_context(mode, 64)
    }

    pub fn with_context(mode: Mode, context_length: usize) -> Arc<Self> {
        Arc::new(FakeBackend {
            id: MODEL.to_owned(),
            bytes: 0,
            mode,
            context_length,
            vocab: Mutex::new(Vec::new()),
            last_request: Mutex::new(None),
            cancellations: Arc::new(AtomicUsize::new(0)),
            cancelled: Arc::new(Notify::new()),
            started: Arc::new(Notify::new()),
        })
    }

    /// An echoing model named `id` that says it holds `bytes`.
    pub fn sized(id: &str, bytes: u64) -> Arc<Self> {
        let mut fake = Arc::into_inner(Self::new(Mode::Echo)).expect("fresh");
        fake.id = id.to_owned();
        fake.bytes = bytes;
        Arc::new(fake)
    }

    pub fn app(self: &Arc<Self>) -> Router {
        souverain_api::App::new(Arc::clone(self) as Arc<dyn Backend>).router()
    }

    pub fn last_request(&self) -> GenerateRequest {
        self.last_request
            .lock()
            .unwrap()
            .clone()
            .expect("generate was called")
    }

    fn words(&self, tokens: &[u32]) -> Vec<String> {
        let vocab = self.vocab.lock().unwrap();
        tokens
            .iter()
            .map(|&id| vocab[id as usize].clone())
            .collect()
    }
}

impl Backend for FakeBackend {
    fn model_id(&self) -> &str {
        &self.id
    }

    fn facts(&self) -> souverain_api::ModelFacts {
        souverain_api::ModelFacts {
            file_bytes: self.bytes,
            ..souverain_api::ModelFacts::default()
        }
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    /// `role: content` lines, then `assistant:`, tokenised; a message `TEMPLATE_ERROR` fails.
    fn encode_chat(&self, request: &ChatRequest) -> Result<ChatPrompt, EngineError> {
        let mut text = String::new();
        for message in &request.messages {
            let role = message["role"].as_str().unwrap_or_default();
            let content = message["content"].as_str().unwrap_or_default();
            if content == "TEMPLATE_ERROR" {
                return Err(EngineError::Template("roles must alternate".into()));
            }
            text.push_str(&format!("{role}: {content}\n"));
        }
        text.push_str("assistant:");
        Ok(ChatPrompt {
            tokens: self.tokenize(&text),
            reasoning_open: false,
        })
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        let vocab = self.vocab.lock().unwrap();
        tokens
            .iter()
            .map(|&t| {
                vocab
                    .get(t as usize)
                    .cloned()
                    .ok_or_else(|| EngineError::InvalidRequest(format!("unknown token {t}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|words| words.join(" "))
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut vocab = self.vocab.lock().unwrap();
        text.split_whitespace()
            .map(|word| match vocab.iter().position(|known| known == word) {
                Some(id) => id as u32,
                None => {
                    vocab.push(word.to_owned());
                    (vocab.len() - 1) as u32
                }
            })
            .collect()
    }

    fn generate(&self, mut req: GenerateRequest) -> Result<UnboundedReceiver<Event>, EngineError> {
        // Like the engine, the fake holds the request's energy tap only while it generates
        // (the meter of a request that ends without `Done` waits for it to be let go).
        let tap = req.energy_tap.take();
        *self.last_request.lock().unwrap() = Some(req.clone());
        let prompt_tokens = req.prompt_tokens.len();
        let (tx, rx) = unbounded_channel();
        match &self.mode {
            Mode::Refuse(RefuseWith::Unavailable) => {
                return Err(EngineError::Unavailable("queue full (internal)".into()));
            }
            Mode::Refuse(RefuseWith::Overloaded) => {
                return Err(EngineError::Overloaded { waiting: 7 });
            }
            Mode::Refuse(RefuseWith::ContextLength) => {
                return Err(EngineError::ContextLengthExceeded {
                    prompt_tokens,
                    context_length: self.context_length,
                });
            }
            Mode::Echo => {
                let words = self.words(&req.prompt_tokens);
                let limit = req.max_tokens.unwrap_or(usize::MAX);
                let emitted = words.len().min(limit);
                for word in words.iter().take(emitted) {
                    tx.send(Event::Text(format!("{word} "))).unwrap();
                }
                let finish_reason = if emitted < words.len() {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                tx.send(Event::Done {
                    finish_reason,
                    usage: Usage {
                        prompt_tokens,
                        completion_tokens: emitted,
                        reasoning_tokens: 0,
                        // 1 mJ per token, modelled, as the engine's model would label it.
                        energy: Some(engine::Energy {
                            microjoules: 1000 * (prompt_tokens + emitted) as u64,
                            kind: engine::EnergyKind::Modelled,
                        }),
                    },
                })
                .unwrap();
            }
            Mode::FailMidway => {
                tx.send(Event::Text("partial ".into())).unwrap();
                tx.send(Event::Failed(Failure::other(EngineError::Unavailable(
                    "kv cache exploded at /secret/path".into(),
                ))))
                .unwrap();
            }
            Mode::Endless => {
                let cancellations = Arc::clone(&self.cancellations);
                let cancelled = Arc::clone(&self.cancelled);
                let started = Arc::clone(&self.started);
                tokio::spawn(async move {
                    let _tap = tap;
                    if tx.send(Event::Text("tick ".into())).is_ok() {
                        started.notify_one();
                    }
                    tx.closed().await;
                    cancellations.fetch_add(1, Ordering::SeqCst);
                    cancelled.notify_one();
                });
            }
        }
        Ok(rx)
    }
}

/// Waits at most a few seconds for `notify`; false if it never came.
pub async fn notified_within(notify: &Notify) -> bool {
    tokio::time::timeout(Duration::from_secs(5), notify.notified())
        .await
        .is_ok()
}

pub fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

pub async fn send(app: Router, request: Request<Body>) -> Response<Body> {
    app.oneshot(request).await.unwrap()
}

/// A response header's value, as text.
pub fn header_of(response: &Response<Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A response's whole body.
pub async fn body_bytes(response: Response<Body>) -> Vec<u8> {
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

/// Sends and reads the whole body as JSON.
pub async fn send_json(app: Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = send(app, request).await;
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|err| panic!("body is not JSON ({err}): {bytes:?}"));
    (status, json)
}

/// Sends and splits an SSE body into its `data:` payloads.
pub async fn send_sse(app: Router, request: Request<Body>) -> (Response<()>, Vec<String>) {
    let response = send(app, request).await;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let data = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
        .map(str::to_owned)
        .collect();
    (Response::from_parts(parts, ()), data)
}

/// Asserts the OpenAI error shape and returns the error object.
pub fn error_object(status: StatusCode, json: &serde_json::Value) -> &serde_json::Value {
    let error = &json["error"];
    let object = error
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {json}"));
    assert!(object["message"].is_string(), "{json}");
    assert!(object["type"].is_string(), "{json}");
    assert!(
        object.contains_key("param") && object.contains_key("code"),
        "{json}"
    );
    let expected_type = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    assert_eq!(object["type"], expected_type, "{json}");
    error
}
