//! Souverain's HTTP API: OpenAI-compatible endpoints over any [`Backend`].
//!
//! - `GET /health`
//! - `GET /metrics` (Prometheus text: the engine's gauges, counters and latency histograms)
//! - `GET /v1/models`, `GET /v1/models/{id}` (each chat model with its `status`: `loaded`,
//!   `loading`, `unloaded`)
//! - `GET /models`, `POST /models/load`, `POST /models/unload` (llama.cpp's router routes;
//!   under `/admin/v1`, with the admin key, when a control plane is in front)
//! - `POST /v1/chat/completions` (JSON or server-sent events)
//! - `POST /v1/completions` (JSON or server-sent events)
//! - `POST /v1/fim/completions` (Mistral's fill in the middle)
//! - `POST /v1/messages` (Anthropic's Messages API: JSON or its server-sent events),
//!   `POST /v1/messages/count_tokens`; errors there in Anthropic's shape, and `x-api-key`
//!   taken as the key
//! - `POST /v1/responses` (OpenAI's Responses API: JSON or its server-sent events),
//!   `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`; stored responses (`store`,
//!   `previous_response_id`) only under a control plane whose project retention allows it
//! - `POST /v1/embeddings` (when an [`EmbeddingBackend`] is served beside the chat model)
//! - Ollama's API: `POST /api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
//!   `/api/show`, `GET /api/tags`, `/api/ps`, `/api/version` (NDJSON streams, streaming by
//!   default; errors there as `{"error": "..."}`)
//! - `POST /tokenize`, `POST /detokenize` (vLLM's shapes)
//! - with a control plane: keys, limits, budgets, metering and residency on all of the above
//!   (but `/health` and `/metrics`), and the admin API under `/admin/v1`
//! - `GET /console/`: the browser console (`souverain-console`)
//!
//! Requests are parsed once and validated once into a validated request (every bad field
//! named in the error's `param`); every error, unknown routes and wrong methods included, is
//! an OpenAI error object made by [`ApiError`]. The API knows nothing of batching: it encodes
//! the prompt through the [`Backend`], calls [`Backend::generate`] and turns the event stream
//! into JSON or SSE. A client that disconnects drops the event receiver, which cancels the
//! generation.
//!
//! Modules import in one direction, lowest first: `error` and `backend`; `models` (the
//! served models, loaded on demand); `state`; the request shapes
//! (`openai`, `anthropic`, `responses`, `validate`, `tools`, `output`, `logprobs`);
//! `admission` (a request under the control plane) and `ollama` (Ollama's requests
//! translated); `generation` (encode, start, fan-in, one choice read as parsed steps); the
//! responders (`whole`, `stream`, whose `EventSource` every streamed dialect implements) and
//! `embeddings`; the handlers (`handlers`, `messages`, `responding`, `ollama_api`,
//! `tokenize`, `metrics`); the `middleware`; this file, which assembles the [`App`].
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! async fn run(backend: Arc<dyn souverain_api::Backend>) -> std::io::Result<()> {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     let shutdown = async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     };
//!     souverain_api::App::new(backend).serve(listener, shutdown).await
//! }
//! ```

mod admission;
mod anthropic;
mod backend;
mod batches;
mod embeddings;
mod error;
mod generation;
mod handlers;
mod logprobs;
mod messages;
mod metrics;
mod middleware;
mod models;
mod ollama;
mod ollama_api;
mod openai;
mod output;
mod responding;
mod responses;
mod state;
mod stream;
mod tokenize;
mod tools;
mod validate;
mod whole;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use control::{ControlPlane, Settlement};

pub use crate::backend::{Backend, EmbeddingBackend, ModelFacts};
pub use crate::batches::{MAX_BATCH_REQUESTS, MAX_FILE_BYTES, check_batch_file};
pub use crate::embeddings::MAX_EMBEDDING_INPUTS;
pub use crate::error::ApiError;
pub use crate::models::{
    Loader, MAX_MODEL_NAME_CHARS, MAX_MODEL_NAMES, MAX_MODELS, ModelEntry, ModelSet, ModelSetError,
    ModelState, ModelStatus,
};
pub use edge::MAX_BODY_BYTES;

/// The application: chat models (one, or several loaded on demand), optionally an embedding
/// model beside them, optionally the control plane in front. The one way to build the
/// router or to serve it.
#[derive(Clone)]
pub struct App {
    models: Arc<ModelSet>,
    batches: Arc<state::BatchSignals>,
    batch_concurrency: usize,
    embedder: Option<Arc<dyn EmbeddingBackend>>,
    control: Option<Arc<ControlPlane>>,
    energy: Option<Arc<engine::EnergyAccount>>,
}

/// Ollama's routes; their bodies are JSON whatever they are declared as.
fn ollama_routes() -> Router<state::AppState> {
    Router::new()
        .route("/api/chat", post(ollama_api::chat))
        .route("/api/generate", post(ollama_api::generate))
        .route("/api/embed", post(ollama_api::embed_route))
        .route("/api/embeddings", post(ollama_api::embeddings_route))
        .route("/api/show", post(ollama_api::show))
        .route("/api/tags", get(ollama_api::tags))
        .route("/api/ps", get(ollama_api::ps))
        .route("/api/version", get(ollama_api::version))
        .route_layer(axum::middleware::from_fn(middleware::json_bodies))
}

/// Loading and unloading models: open without a control plane (as llama.cpp's router mode),
/// under `/admin/v1` with the admin key under one.
fn model_admin_routes() -> Router<state::AppState> {
    Router::new()
        .route("/models", get(handlers::model_states))
        .route("/models/load", post(handlers::load_model))
        .route("/models/unload", post(handlers::unload_model))
}

impl App {
    /// Serves `backend` on the OpenAI routes, without authentication.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self::with_models(Arc::new(ModelSet::single(backend)))
    }

    /// Serves every model of `models`, each loaded on first use (or by `POST
    /// /models/load`), without authentication.
    pub fn with_models(models: Arc<ModelSet>) -> Self {
        App {
            models,
            batches: Arc::default(),
            batch_concurrency: 8,
            embedder: None,
            control: None,
            energy: None,
        }
    }

    /// The process's energy account (the one its engines meter on): `/metrics` exports its
    /// idle energy from it, loaded models or not. Without it, from a loaded model's snapshot.
    pub fn with_energy_account(self, energy: Option<Arc<engine::EnergyAccount>>) -> Self {
        App { energy, ..self }
    }

    /// Serves `embedder` on `/v1/embeddings` beside the chat model (both listed by
    /// `/v1/models`). Without one, `/v1/embeddings` answers that no embedding model is served.
    pub fn with_embedder(self, embedder: Option<Arc<dyn EmbeddingBackend>>) -> Self {
        App { embedder, ..self }
    }

    /// Puts the control plane in front: keys, limits, budgets, residency and metering on
    /// `/v1/*` (each settlement committed before its answer ends), the admin API under
    /// `/admin/v1`.
    pub fn with_control(self, control: Option<Arc<ControlPlane>>) -> Self {
        App { control, ..self }
    }

    /// How many requests of a batch the Batch API's runner sends at once (default 8; the
    /// engine runs batch work in at most half its slots whatever this is).
    pub fn with_batch_concurrency(self, batch_concurrency: usize) -> Self {
        App {
            batch_concurrency: batch_concurrency.max(1),
            ..self
        }
    }

    /// The whole application, ready to serve or to call with `tower::ServiceExt::oneshot`.
    pub fn router(&self) -> Router {
        let mut state = state::AppState::new(
            Arc::clone(&self.models),
            self.embedder.clone(),
            Arc::clone(&self.batches),
        );
        state.energy = self.energy.clone();
        let model_state = state.clone();
        let app = Router::new()
            .route("/health", get(handlers::health))
            .route("/metrics", get(metrics::metrics))
            .route("/v1/models", get(handlers::list_models))
            .route("/v1/models/{*id}", get(handlers::get_model))
            .route(
                "/v1/chat/completions",
                post(handlers::generate::<openai::ChatCompletionRequest>),
            )
            .route(
                "/v1/completions",
                post(handlers::generate::<openai::CompletionRequest>),
            )
            .route(
                "/v1/fim/completions",
                post(handlers::generate::<handlers::FimRequest>),
            )
            .route("/v1/messages", post(messages::messages))
            .route("/v1/messages/count_tokens", post(messages::count_tokens))
            .route("/v1/responses", post(responding::create))
            .route(
                "/v1/responses/{id}",
                get(responding::retrieve).delete(responding::delete),
            )
            .route("/v1/embeddings", post(embeddings::embeddings))
            .route(
                "/v1/files",
                post(batches::upload)
                    .get(batches::list_files)
                    .layer(DefaultBodyLimit::max(batches::MAX_FILE_BYTES + (1 << 20))),
            )
            .route(
                "/v1/files/{id}",
                get(batches::retrieve_file).delete(batches::delete_file),
            )
            .route("/v1/files/{id}/content", get(batches::file_content))
            .route(
                "/v1/batches",
                post(batches::create_batch).get(batches::list_batches),
            )
            .route("/v1/batches/{id}", get(batches::retrieve_batch))
            .route("/v1/batches/{id}/cancel", post(batches::cancel_batch))
            .route("/tokenize", post(tokenize::tokenize))
            .route("/detokenize", post(tokenize::detokenize))
            .merge(ollama_routes())
            .merge(match &self.control {
                None => model_admin_routes(),
                Some(_) => Router::new(),
            })
            // After the routes: it applies to the routes present when it is called.
            .method_not_allowed_fallback(handlers::method_not_allowed)
            .fallback(handlers::unknown_url)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(state);
        // The browser console: static assets, no credentials needed to load them.
        let app = app.merge(console::router());
        let app = match &self.control {
            None => app,
            Some(control) => app.layer(axum::middleware::from_fn_with_state(
                edge::gate(Arc::clone(control), Settlement::Committed),
                middleware::authenticate,
            )),
        };
        // Outermost, so that the authentication's refusals are re-shaped too.
        let app = app.layer(axum::middleware::from_fn(middleware::dialect_errors));
        match &self.control {
            None => app,
            Some(control) => app.nest(
                "/admin/v1",
                edge::admin::router(
                    Arc::clone(control),
                    model_admin_routes().with_state(model_state),
                ),
            ),
        }
    }

    /// Serves the application on `listener` until `shutdown` completes, then stops taking
    /// connections and waits for the open ones (streams included) to finish. With a control
    /// plane, its maintenance task (retention, queued records) runs every minute meanwhile.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if let Ok(address) = listener.local_addr() {
            tracing::info!(
                %address,
                model = self.models.default_id(),
                models = self.models.ids().count(),
                embedding_model = self.embedder.as_ref().map(|e| e.model_id()),
                auth = self.control.is_some(),
                region = self.control.as_ref().map(|c| c.config().region.clone()),
                store = self.control.as_ref().map(|c| c.store().backend_name()),
                "serving the OpenAI API"
            );
        }
        let maintenance = self
            .control
            .as_ref()
            .map(|c| c.spawn_maintenance(Duration::from_secs(60)));
        // The Batch API's runner sends batch requests through the application itself.
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let runner_id = format!(
            "{}:{}",
            host.trim(),
            listener.local_addr().map_or(0, |a| a.port())
        );
        let runner = self.control.as_ref().map(|c| {
            batches::spawn_runner(
                self.router(),
                Arc::clone(c),
                Arc::clone(&self.batches),
                self.batch_concurrency,
                runner_id,
            )
        });
        // Hyper's own answers to unparsable requests get the error object too, and header
        // sections past edge's limit a JSON 431.
        let app = self
            .router()
            .layer(axum::middleware::from_fn(edge::header_limit));
        let result = axum::serve(edge::JsonParseErrors(listener), app)
            .with_graceful_shutdown(shutdown)
            .await;
        for task in maintenance.into_iter().chain(runner) {
            task.abort();
        }
        result
    }
}
