//! The OpenAI handlers: thin, because requests arrive validated and responses are built by
//! the responders (`whole`, `stream`) from a started generation.

use axum::extract::{Path, State};
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};

use crate::admission::{Admission, AdmittedJson};
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
        data: std::iter::once(app.model_card())
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
    if id == app.backend.model_id() {
        Ok(axum::Json(app.model_card()).into_response())
    } else if let Some(card) = app.embedder_card().filter(|c| c.id == id) {
        Ok(axum::Json(card).into_response())
    } else {
        Err(ApiError::ModelNotFound { model: id })
    }
}

/// `POST /v1/chat/completions`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn chat_completions(
    State(app): State<AppState>,
    AdmittedJson {
        body: req,
        admission,
    }: AdmittedJson<ChatCompletionRequest>,
) -> Response {
    answer(&app, admission, "chatcmpl-", Endpoint::Chat, |model| {
        validate::chat(&req, model)
    })
    .await
}

/// `POST /v1/completions`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn completions(
    State(app): State<AppState>,
    AdmittedJson {
        body: req,
        admission,
    }: AdmittedJson<CompletionRequest>,
) -> Response {
    answer(&app, admission, "cmpl-", Endpoint::Completion, |model| {
        validate::completion(&req, model)
    })
    .await
}

/// `POST /v1/fim/completions`: Mistral's fill-in-the-middle (`prompt` before the gap,
/// `suffix` after it), answered in the chat completion's shape as Mistral's API does.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn fim_completions(
    State(app): State<AppState>,
    AdmittedJson {
        body: req,
        admission,
    }: AdmittedJson<CompletionRequest>,
) -> Response {
    answer(&app, admission, "cmpl-", Endpoint::Chat, |model| {
        validate::fim(&req, model)
    })
    .await
}

/// Names the request (recorded in the handler's span, so that every log line about it,
/// errors included, carries the id), validates it against the served model and answers.
async fn answer(
    app: &AppState,
    admission: Option<Admission>,
    id_prefix: &str,
    endpoint: Endpoint,
    validate: impl FnOnce(&str) -> Result<ValidRequest, ApiError>,
) -> Response {
    let id = response_id(id_prefix);
    tracing::Span::current().record("request_id", id.as_str());
    match validate(app.backend.model_id()) {
        Ok(valid) => respond(app, id, valid, endpoint, admission).await,
        Err(err) => Err(err),
    }
    .unwrap_or_else(IntoResponse::into_response)
}

/// Starts the generation and answers with a stream or, once it is done, a whole response.
async fn respond(
    app: &AppState,
    id: String,
    valid: ValidRequest,
    endpoint: Endpoint,
    admission: Option<Admission>,
) -> Result<Response, ApiError> {
    let meta = ChunkMeta {
        endpoint,
        id,
        created: unix_now(),
        model: app.backend.model_id().to_owned(),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
    };
    let stream = valid.stream;
    let admission = admission.map(|admission| (admission, meta.id.clone()));
    let generation = start_generation(&app.backend, valid, admission).await?;
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
