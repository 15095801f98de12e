//! The handlers: thin, because requests arrive validated and responses are built by the
//! shapes in `openai` and `stream`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use engine::{Event, GenerateRequest};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::Backend;
use crate::auth::Admission;
use crate::error::ApiError;
use crate::extract::Json;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, CompletionRequest, Header,
    ModelCard, ModelList, TextChoice, TextCompletion, UsageBody,
};
use crate::stream::{ChunkMeta, Endpoint, sse_response};
use crate::validate::{self, Prompt, ValidRequest};

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) backend: Arc<dyn Backend>,
    /// The embedding model served beside the chat model, if any (`/v1/embeddings`).
    pub(crate) embedder: Option<Arc<dyn crate::EmbeddingBackend>>,
    /// Unix seconds when the router was built: the model's `created`.
    pub(crate) started_at: u64,
}

impl AppState {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Self {
        AppState {
            backend,
            embedder: None,
            started_at: unix_now(),
        }
    }

    /// The same state serving `embedder` on `/v1/embeddings` too.
    pub(crate) fn with_embedder(self, embedder: Option<Arc<dyn crate::EmbeddingBackend>>) -> Self {
        AppState { embedder, ..self }
    }

    /// The card of the embedding model, if one is served.
    fn embedder_card(&self) -> Option<ModelCard<'_>> {
        self.embedder.as_ref().map(|e| ModelCard {
            id: e.model_id(),
            object: "model",
            created: self.started_at,
            owned_by: "souverain",
        })
    }

    fn model_card(&self) -> ModelCard<'_> {
        ModelCard {
            id: self.backend.model_id(),
            object: "model",
            created: self.started_at,
            owned_by: "souverain",
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// A fresh response id: the prefix and 24 random alphanumerics, as OpenAI's look.
fn response_id(prefix: &str) -> String {
    use rand::Rng;
    use rand::distributions::Alphanumeric;
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{suffix}")
}

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
    admission: Option<Extension<Admission>>,
    Json(req): Json<ChatCompletionRequest>,
) -> Response {
    let id = response_id("chatcmpl-");
    tracing::Span::current().record("request_id", id.as_str());
    // Errors become responses inside the span, so their log lines carry the request id.
    match validate::chat(&req, app.backend.model_id()) {
        Ok(valid) => respond(&app, id, valid, Endpoint::Chat, admission).await,
        Err(err) => Err(err),
    }
    .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/completions`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn completions(
    State(app): State<AppState>,
    admission: Option<Extension<Admission>>,
    Json(req): Json<CompletionRequest>,
) -> Response {
    let id = response_id("cmpl-");
    tracing::Span::current().record("request_id", id.as_str());
    match validate::completion(&req, app.backend.model_id()) {
        Ok(valid) => respond(&app, id, valid, Endpoint::Completion, admission).await,
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
    admission: Option<Extension<Admission>>,
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
    let admission = admission.map(|Extension(admission)| (admission, meta.id.clone()));
    let receiver = start_generation(&app.backend, valid, admission).await?;
    if stream {
        Ok(sse_response(meta, receiver))
    } else {
        whole_response(meta, receiver).await
    }
}

/// Renders and tokenises the prompt (off the executor: both are CPU work that grows with
/// the prompt), checks that it fits the context, and hands the request to the engine.
/// With `--auth`, the admission reserves the request's tokens once the prompt is counted,
/// and meters the generation (`auth::Meter`).
async fn start_generation(
    backend: &Arc<dyn Backend>,
    valid: ValidRequest,
    admission: Option<(Admission, String)>,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let worker = Arc::clone(backend);
    let prompt = valid.prompt;
    let prompt_tokens = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ApiError> {
        match prompt {
            Prompt::Chat(messages) => Ok(worker.tokenize_chat(&messages)?),
            Prompt::Text(text) => Ok(worker.tokenize(&text)),
        }
    })
    .await
    .map_err(|err| ApiError::Internal {
        detail: format!("tokenisation task failed: {err}"),
    })??;

    let context_length = backend.context_length();
    if prompt_tokens.len() >= context_length {
        return Err(ApiError::ContextLengthExceeded {
            prompt_tokens: prompt_tokens.len(),
            context_length,
        });
    }
    tracing::debug!(
        prompt_tokens = prompt_tokens.len(),
        max_tokens = valid.max_tokens,
        "generation admitted"
    );
    let meter = match admission {
        Some((admission, request_id)) => {
            let room = context_length - prompt_tokens.len();
            let limit = valid.max_tokens.map_or(room, |max| max.min(room));
            Some(
                admission
                    .reserve(&request_id, prompt_tokens.len(), limit)
                    .await?,
            )
        }
        None => None,
    };
    let generated = backend.generate(GenerateRequest {
        prompt_tokens,
        sampling: valid.sampling,
        max_tokens: valid.max_tokens,
        stop: valid.stop,
        stop_at_eog: true,
        logprobs: valid.logprobs,
        constraint: valid.constraint,
    });
    match meter {
        Some(meter) => meter.track(generated),
        None => Ok(generated?),
    }
}

/// Waits for the whole generation. If the client goes away meanwhile, axum drops this
/// future and with it the receiver, which cancels the generation.
async fn whole_response(
    meta: ChunkMeta,
    mut receiver: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut token_logprobs = Vec::new();
    let (finish_reason, usage) = loop {
        match receiver.recv().await {
            Some(Event::Text(piece)) => text.push_str(&piece),
            Some(Event::Logprobs(lp)) => token_logprobs.push(lp),
            Some(Event::Done {
                finish_reason,
                usage,
            }) => break (finish_reason, usage),
            Some(Event::Failed(detail)) => return Err(ApiError::Internal { detail }),
            None => {
                return Err(ApiError::Internal {
                    detail: "the engine closed the stream without finishing it".to_owned(),
                });
            }
        }
    };
    drop(receiver);
    tracing::info!(
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        finish_reason = finish_reason.as_str(),
        "completion finished"
    );
    let usage = UsageBody::from(usage);
    let finish_reason = finish_reason.as_str();
    let response = match meta.endpoint {
        Endpoint::Chat => axum::Json(ChatCompletion {
            header: Header {
                id: &meta.id,
                object: "chat.completion",
                created: meta.created,
                model: &meta.model,
            },
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &text,
                },
                logprobs: meta
                    .logprobs
                    .then(|| crate::logprobs::chat(&token_logprobs)),
                finish_reason,
            }],
            usage,
            system_fingerprint: None,
        })
        .into_response(),
        Endpoint::Completion => axum::Json(TextCompletion {
            header: Header {
                id: &meta.id,
                object: "text_completion",
                created: meta.created,
                model: &meta.model,
            },
            choices: vec![TextChoice {
                text: &text,
                index: 0,
                logprobs: meta
                    .logprobs
                    .then(|| crate::logprobs::completion(&token_logprobs, 0)),
                finish_reason: Some(finish_reason),
            }],
            usage: Some(Some(usage)),
            system_fingerprint: None,
        })
        .into_response(),
    };
    Ok(response)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_are_prefixed_and_distinct() {
        let a = response_id("chatcmpl-");
        let b = response_id("chatcmpl-");
        assert!(a.starts_with("chatcmpl-"));
        assert_eq!(a.len(), "chatcmpl-".len() + 24);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_ne!(a, b);
    }
}
