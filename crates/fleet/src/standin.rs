//! A stand-in engine: an OpenAI-compatible server with no model, that answers with a fixed
//! text and exposes its load under the metric names of the engine it stands in for (vLLM,
//! SGLang, llama.cpp's server, TGI). It is what the router's tests and its overhead benchmark
//! put behind the router where a real vLLM or SGLang cannot run (no GPU here). It is named a
//! stand-in wherever it is used; it never pretends to generate.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::upstream::EngineKind;

/// A stand-in's settings and live state.
#[derive(Debug)]
pub struct Standin {
    /// Its name, written into every answer.
    pub name: String,
    /// Whose metric names it exposes.
    pub flavour: EngineKind,
    /// The model id it answers for.
    pub model: String,
    /// Time per generated token.
    pub token_delay: Duration,
    /// Requests it reports as waiting (tests set it).
    pub waiting: AtomicU64,
    /// KV-cache usage it reports, in millionths (tests set it).
    pub kv_millionths: AtomicU64,
    /// Requests being answered now.
    pub running: AtomicU64,
    /// Requests answered in all.
    pub served: AtomicU64,
    /// When set, health and generation answer 503.
    pub down: AtomicBool,
}

impl Standin {
    /// A stand-in with no delay and no load.
    pub fn new(name: &str, flavour: EngineKind, model: &str) -> Self {
        Standin {
            name: name.to_owned(),
            flavour,
            model: model.to_owned(),
            token_delay: Duration::ZERO,
            waiting: AtomicU64::new(0),
            kv_millionths: AtomicU64::new(0),
            running: AtomicU64::new(0),
            served: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// The Prometheus page, in its flavour's names.
    pub fn metrics_text(&self) -> String {
        let waiting = self.waiting.load(Ordering::Relaxed);
        let running = self.running.load(Ordering::Relaxed);
        let kv = self.kv_millionths.load(Ordering::Relaxed) as f64 / 1e6;
        let model = &self.model;
        match self.flavour {
            EngineKind::Souverain | EngineKind::Vllm => format!(
                "# TYPE vllm:num_requests_waiting gauge\n\
                 vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}\n\
                 # TYPE vllm:num_requests_running gauge\n\
                 vllm:num_requests_running{{model_name=\"{model}\"}} {running}\n\
                 # TYPE vllm:kv_cache_usage_perc gauge\n\
                 vllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {kv}\n"
            ),
            EngineKind::Sglang => format!(
                "sglang:num_queue_reqs{{model_name=\"{model}\",tp_rank=\"0\"}} {waiting}\n\
                 sglang:num_running_reqs{{model_name=\"{model}\",tp_rank=\"0\"}} {running}\n\
                 sglang:token_usage{{model_name=\"{model}\",tp_rank=\"0\"}} {kv}\n"
            ),
            EngineKind::LlamaCpp => format!(
                "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {running}\n\
                 # TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred {waiting}\n\
                 llamacpp:kv_cache_usage_ratio {kv}\n"
            ),
            EngineKind::Tgi => {
                format!("tgi_queue_size {waiting}\ntgi_batch_current_size {running}\n")
            }
            EngineKind::Openai => String::new(),
        }
    }
}

/// The stand-in's application.
pub fn standin_app(standin: Arc<Standin>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(complete))
        .route("/v1/completions", post(complete))
        .with_state(standin)
}

/// Serves a stand-in on `listener` until the task is dropped.
pub async fn serve_standin(
    listener: tokio::net::TcpListener,
    standin: Arc<Standin>,
) -> std::io::Result<()> {
    axum::serve(listener, standin_app(standin)).await
}

async fn health(State(s): State<Arc<Standin>>) -> StatusCode {
    if s.down.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn metrics(State(s): State<Arc<Standin>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics_text(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<Standin>>) -> Response {
    axum::Json(json!({"object": "list", "data": [
        {"id": s.model, "object": "model", "owned_by": "standin"}
    ]}))
    .into_response()
}

struct Running(Arc<Standin>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn complete(State(s): State<Arc<Standin>>, body: Bytes) -> Response {
    if s.down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"message": "bad JSON", "type": "invalid_request_error"}})),
        )
            .into_response();
    };
    s.served.fetch_add(1, Ordering::Relaxed);
    s.running.fetch_add(1, Ordering::Relaxed);
    let running = Running(Arc::clone(&s));
    let tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .min(4096);
    // A prompt "token" is four bytes of the body, roughly what tokenizers make of English.
    let prompt_tokens = (body.len() as u64).div_ceil(4);
    let chat = request.get("messages").is_some();
    let id = format!("standin-{}", s.served.load(Ordering::Relaxed));
    let mut usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                           "total_tokens": prompt_tokens + tokens});
    if s.flavour == EngineKind::Souverain {
        // As a Souverain replica reports its engine's energy: 1 mJ per generated token.
        usage["energy_joules"] = json!(tokens as f64 / 1000.0);
        usage["energy_source"] = json!("modelled");
    }
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream {
        tokio::time::sleep(s.token_delay * u32::try_from(tokens).unwrap_or(u32::MAX)).await;
        drop(running);
        let text = format!("{} ", s.name).repeat(tokens as usize);
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        return axum::Json(
            json!({"id": id, "object": "chat.completion", "model": s.model,
                                  "choices": [choice], "usage": usage}),
        )
        .into_response();
    }
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let _running = running;
        for i in 0..tokens {
            tokio::time::sleep(s.token_delay).await;
            let finish = (i + 1 == tokens).then_some("length");
            let delta = if chat {
                json!({"index": 0, "delta": {"content": format!("{} ", s.name)},
                       "finish_reason": finish})
            } else {
                json!({"index": 0, "text": format!("{} ", s.name), "finish_reason": finish})
            };
            let chunk = json!({"id": id, "object": "chat.completion.chunk", "model": s.model,
                               "choices": [delta]});
            if tx
                .send(Ok(Bytes::from(format!("data: {chunk}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
        if include_usage {
            let chunk = json!({"id": id, "object": "chat.completion.chunk", "model": s.model,
                               "choices": [], "usage": usage});
            let _ = tx.send(Ok(Bytes::from(format!("data: {chunk}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let mut response = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::load_from_metrics;

    #[test]
    fn every_flavour_is_read_back_by_its_adapter() {
        for flavour in [
            EngineKind::Vllm,
            EngineKind::Sglang,
            EngineKind::LlamaCpp,
            EngineKind::Tgi,
        ] {
            let s = Standin::new("x", flavour, "m");
            s.waiting.store(3, Ordering::Relaxed);
            s.running.store(2, Ordering::Relaxed);
            s.kv_millionths.store(250_000, Ordering::Relaxed);
            let load = load_from_metrics(flavour, &s.metrics_text()).unwrap();
            assert_eq!((load.waiting, load.running), (3.0, 2.0), "{flavour:?}");
            let kv = if flavour == EngineKind::Tgi {
                0.0
            } else {
                0.25
            };
            assert_eq!(load.kv_usage, kv, "{flavour:?}");
        }
    }
}
