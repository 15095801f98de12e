//! Souverain's HTTP API: OpenAI-compatible endpoints over any [`Backend`].
//!
//! - `GET /health`
//! - `GET /metrics` (Prometheus text: the engine's gauges, counters and latency histograms)
//! - `GET /v1/models`, `GET /v1/models/{id}`
//! - `POST /v1/chat/completions` (JSON or server-sent events)
//! - `POST /v1/completions` (JSON or server-sent events)
//! - `POST /v1/embeddings` (when an [`EmbeddingBackend`] is served beside the chat model:
//!   [`router_with`])
//! - `POST /tokenize`, `POST /detokenize` (vLLM's shapes)
//!
//! Requests are validated once into a validated request (every bad field named in the error's
//! `param`); every error, unknown routes and wrong methods included, is an OpenAI error object
//! made by [`ApiError`]. The API knows nothing of batching: it renders and tokenises the
//! prompt through the [`Backend`], calls [`Backend::generate`] and turns the event stream into
//! JSON or SSE. A client that disconnects drops the event receiver, which cancels the
//! generation.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! async fn run(backend: Arc<dyn souverain_api::Backend>) -> std::io::Result<()> {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     let shutdown = async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     };
//!     souverain_api::serve(listener, backend, shutdown).await
//! }
//! ```

mod admin;
mod auth;
mod backend;
mod embeddings;
mod engine_backend;
mod error;
mod extract;
mod logprobs;
mod metrics;
mod openai;
mod output;
mod routes;
mod stream;
mod tokenize;
mod tools;
mod validate;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use crate::auth::{bearer, refusal, rejected_outcome, router_with_control, serve_with_control};
pub use crate::backend::Backend;
pub use crate::embeddings::{
    EmbeddingBackend, MAX_EMBEDDING_INPUTS, router_with_control_and_embedder, serve_with_embedder,
};
pub use crate::error::{ApiError, Refusal};
pub use crate::extract::MAX_BODY_BYTES;

/// The whole application, ready to serve or to call with `tower::ServiceExt::oneshot`.
pub fn router(backend: Arc<dyn Backend>) -> Router {
    router_with(backend, None)
}

/// [`router`] serving an embedding model on `/v1/embeddings` beside the chat model (both
/// listed by `/v1/models`). Without one, `/v1/embeddings` answers that no embedding model is
/// served.
pub fn router_with(
    backend: Arc<dyn Backend>,
    embedder: Option<Arc<dyn EmbeddingBackend>>,
) -> Router {
    Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{*id}", get(routes::get_model))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/fim/completions", post(routes::fim_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        // After the routes: it applies to the routes present when it is called.
        .method_not_allowed_fallback(routes::method_not_allowed)
        .fallback(routes::unknown_url)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(routes::AppState::new(backend).with_embedder(embedder))
}

/// Serves [`router`] on `listener` until `shutdown` completes, then stops taking connections
/// and waits for the open ones (streams included) to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, model = backend.model_id(), "serving the OpenAI API");
    }
    axum::serve(listener, router(backend))
        .with_graceful_shutdown(shutdown)
        .await
}
