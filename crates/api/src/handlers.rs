//! The OpenAI handlers: thin, because requests arrive validated and responses are built by
//! the responders (`whole`, `stream`) from a started generation.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};

use serde::de::DeserializeOwned;

use crate::admission::{Admission, AdmittedJson, NamesModel};
use crate::backend::Backend;
use crate::error::ApiError;
use crate::generation::{ChunkMeta, Endpoint, start_generation};
use crate::openai::{ChatCompletionRequest, CompletionRequest, ModelList};
use crate::state::{AppState, response_id, unix_now};
use crate::stream::sse_response;
use crate::validate::{self, ValidRequest};
use crate::whole::whole_response;

/// `GET /health`.
pub(crate) async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /v1/models`.
pub(crate) async fn list_models(State(app): State<AppState>) -> Response {
    axum::Json(ModelList {
        object: "list",
        data: app
            .model_cards()
            .into_iter()
            .chain(app.embedder_card())
            .collect(),
    })
    .into_response()
}

/// `GET /v1/models/{id}`; ids may hold slashes (`org/name`).
pub(crate) async fn get_model(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(card) = app.model_cards().into_iter().find(|c| c.id == id) {
        Ok(axum::Json(card).into_response())
    } else if let Some(card) = app.embedder_card().filter(|c| c.id == id) {
        Ok(axum::Json(card).into_response())
    } else {
        Err(ApiError::model_not_found(&id))
    }
}

/// A request body that starts a generation: `/v1/chat/completions`, `/v1/completions` and
/// Mistral's `/v1/fim/completions` differ only in these.
pub(crate) trait GenerationRequest: DeserializeOwned + NamesModel + Send + 'static {
    /// The response id's prefix.
    const ID_PREFIX: &'static str;
    /// The shape of the answer.
    const ENDPOINT: Endpoint;
    /// Validates the request against the served model `model_id`.
    fn validate(&self, model_id: &str) -> Result<ValidRequest, ApiError>;
}

impl GenerationRequest for ChatCompletionRequest {
    const ID_PREFIX: &'static str = "chatcmpl-";
    const ENDPOINT: Endpoint = Endpoint::Chat;
    fn validate(&self, model_id: &str) -> Result<ValidRequest, ApiError> {
        validate::chat(self, model_id)
    }
}

impl GenerationRequest for CompletionRequest {
    const ID_PREFIX: &'static str = "cmpl-";
    const ENDPOINT: Endpoint = Endpoint::Completion;
    fn validate(&self, model_id: &str) -> Result<ValidRequest, ApiError> {
        validate::completion(self, model_id)
    }
}

/// Mistral's fill-in-the-middle (`prompt` before the gap, `suffix` after it): a completion
/// request answered in the chat completion's shape, as Mistral's API does.
#[derive(Debug, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct FimRequest(CompletionRequest);

impl NamesModel for FimRequest {
    fn model_name(&self) -> Option<&str> {
        self.0.model_name()
    }
}

impl GenerationRequest for FimRequest {
    const ID_PREFIX: &'static str = "cmpl-";
    const ENDPOINT: Endpoint = Endpoint::Chat;
    fn validate(&self, model_id: &str) -> Result<ValidRequest, ApiError> {
        validate::fim(&self.0, model_id)
    }
}

/// `POST /v1/chat/completions`, `/v1/completions`, `/v1/fim/completions`: names the request
/// (recorded in the handler's span, so that every log line about it, errors included,
/// carries the id), validates it against the served model and answers.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn generate<R: GenerationRequest>(
    State(app): State<AppState>,
    AdmittedJson { body, admission }: AdmittedJson<R>,
) -> Response {
    let id = response_id(R::ID_PREFIX);
    tracing::Span::current().record("request_id", id.as_str());
    async {
        let served = app.model(body.model_name()).await?;
        let valid = body.validate(&served.name)?;
        respond(&served.backend, id, valid, R::ENDPOINT, admission).await
    }
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

/// Starts the generation and answers with a stream or, once it is done, a whole response.
async fn respond(
    backend: &Arc<dyn Backend>,
    id: String,
    valid: ValidRequest,
    endpoint: Endpoint,
    admission: Option<Admission>,
) -> Result<Response, ApiError> {
    let meta = ChunkMeta {
        endpoint,
        id,
        created: unix_now(),
        model: backend.model_id().to_owned(),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
        token_names: crate::logprobs::TokenNames {
            ids: valid.token_ids,
        },
    };
    let stream = valid.stream;
    let admission = admission.map(|admission| (admission, meta.id.clone()));
    let generation = start_generation(backend, valid, admission).await?;
    if stream {
        Ok(sse_response(meta, generation))
    } else {
        whole_response(meta, generation).await
    }
}

/// Any path no route matches.
pub(crate) async fn unknown_url(method: Method, uri: Uri) -> ApiError {
    ApiError::UnknownUrl {
        method,
        path: uri.path().to_owned(),
    }
}

/// A known path asked with the wrong method.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method,
        path: uri.path().to_owned(),
    }
}

/// The body of `POST /models/load` and `/models/unload` (llama.cpp's router shape).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelAction {
    model: String,
}

/// `GET /models` (`/admin/v1/models` under `--auth`): every chat model and where it is.
pub(crate) async fn model_states(State(app): State<AppState>) -> Response {
    axum::Json(serde_json::json!({
        "object": "list",
        "data": app.model_cards(),
    }))
    .into_response()
}

/// `POST /models/load`: loads a model (unloading the least recently used others if the
/// memory budget needs it) and answers once it is loaded.
pub(crate) async fn load_model(
    State(app): State<AppState>,
    edge::Json(body): edge::Json<ModelAction>,
) -> Result<Response, ApiError> {
    let id = app.models.load(&body.model).await?;
    Ok(axum::Json(serde_json::json!({
        "success": true,
        "model": id,
        "status": "loaded",
    }))
    .into_response())
}

/// `POST /models/unload`: unloads a model; its running requests finish first.
pub(crate) async fn unload_model(
    State(app): State<AppState>,
    edge::Json(body): edge::Json<ModelAction>,
) -> Result<Response, ApiError> {
    let was_loaded = app.models.unload(&body.model)?;
    Ok(axum::Json(serde_json::json!({
        "success": true,
        "model": body.model,
        "status": "unloaded",
        "was_loaded": was_loaded,
    }))
    .into_response())
}
