//! vLLM's `POST /tokenize` and `POST /detokenize`.
//!
//! `/tokenize` takes `{"prompt": "..."}` (tokenised as a completion prompt is) or
//! `{"messages": [...]}` (rendered with the model's chat format, generation prompt included,
//! as a chat completion is) and answers `{"tokens": [...], "count": N, "max_model_len": N}`.
//! `/detokenize` takes `{"tokens": [...]}` and answers `{"prompt": "..."}`.

use axum::Json as ResponseJson;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::extract::{Json, parse_json};
use crate::openai::RawMessage;
use crate::routes::AppState;
use crate::validate;

/// The body of `POST /tokenize`.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<RawMessage>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    tools: Option<serde_json::Value>,
}

/// The body of `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub(crate) struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<i64>,
}

/// `POST /tokenize`.
pub(crate) async fn tokenize(State(app): State<AppState>, body: Bytes) -> Response {
    tokenize_inner(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn tokenize_inner(app: AppState, body: Bytes) -> Result<Response, ApiError> {
    let req: TokenizeRequest = parse_json(&body)?;
    // `model` is optional here, as in vLLM; when given it must be the served one.
    if req.model.is_some() {
        validate::check_model(req.model.as_deref(), app.backend.model_id())?;
    }
    if req.add_special_tokens == Some(false) {
        return Err(ApiError::invalid(
            "add_special_tokens",
            "`add_special_tokens: false` is not supported; special tokens are added as the model asks",
        ));
    }
    if req.add_generation_prompt == Some(false) {
        return Err(ApiError::invalid(
            "add_generation_prompt",
            "`add_generation_prompt: false` is not supported; chats are encoded as for a completion",
        ));
    }
    let backend = app.backend.clone();
    // A model with Mistral's chat format encodes the request as mistral-common does, tools
    // and tool calls included, straight from the JSON (key order matters in tool schemas).
    if req.messages.is_some() && req.prompt.is_none() {
        let json = String::from_utf8_lossy(&body).into_owned();
        let worker = backend.clone();
        let encoded = tokio::task::spawn_blocking(move || worker.tokenize_chat_json(&json))
            .await
            .map_err(|e| ApiError::Internal {
                detail: e.to_string(),
            })?;
        if let Some(tokens) = encoded {
            return Ok(tokens_response(&app, tokens?));
        }
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid(
            "tools",
            "`tools` are not supported by this model's chat template yet",
        ));
    }
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            tokio::task::spawn_blocking(move || Ok::<_, ApiError>(backend.tokenize(&prompt)))
                .await
                .map_err(|e| ApiError::Internal {
                    detail: e.to_string(),
                })??
        }
        (None, Some(raw)) => {
            if raw.is_empty() {
                return Err(ApiError::invalid(
                    "messages",
                    "`messages` must not be empty",
                ));
            }
            let messages = raw
                .iter()
                .enumerate()
                .map(|(i, m)| validate::chat_message(i, m))
                .collect::<Result<Vec<_>, _>>()?;
            tokio::task::spawn_blocking(move || {
                Ok::<_, ApiError>(backend.tokenize_chat(&messages)?)
            })
            .await
            .map_err(|e| ApiError::Internal {
                detail: e.to_string(),
            })??
        }
        _ => {
            return Err(ApiError::invalid_body(
                "give exactly one of `prompt` (a string) and `messages` (a chat)",
            ));
        }
    };
    Ok(tokens_response(&app, tokens))
}

fn tokens_response(app: &AppState, tokens: Vec<u32>) -> Response {
    ResponseJson(json!({
        "count": tokens.len(),
        "max_model_len": app.backend.context_length(),
        "tokens": tokens,
    }))
    .into_response()
}

/// `POST /detokenize`.
pub(crate) async fn detokenize(
    State(app): State<AppState>,
    Json(req): Json<DetokenizeRequest>,
) -> Response {
    detokenize_inner(app, req).unwrap_or_else(IntoResponse::into_response)
}

fn detokenize_inner(app: AppState, req: DetokenizeRequest) -> Result<Response, ApiError> {
    if req.model.is_some() {
        validate::check_model(req.model.as_deref(), app.backend.model_id())?;
    }
    let tokens = req
        .tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            u32::try_from(t).map_err(|_| {
                ApiError::invalid(
                    format!("tokens[{i}]"),
                    format!("`tokens[{i}]` = {t} is not a token id"),
                )
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let prompt = app.backend.detokenize(&tokens)?;
    Ok(ResponseJson(json!({ "prompt": prompt })).into_response())
}
