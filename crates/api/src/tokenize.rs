//! vLLM's `POST /tokenize` and `POST /detokenize`.
//!
//! `/tokenize` takes `{"prompt": "..."}` (tokenised as a completion prompt is) or
//! `{"messages": [...]}` (rendered with the model's chat format, generation prompt included,
//! as a chat completion is) and answers `{"tokens": [...], "count": N, "max_model_len": N}`.
//! `/detokenize` takes `{"tokens": [...]}` and answers `{"prompt": "..."}`.

use std::sync::Arc;

use axum::Json as ResponseJson;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use engine::ChatRequest;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::Caller;
use crate::backend::Backend;
use crate::error::{ApiError, engine_error};
use crate::openai::RawMessage;
use crate::state::AppState;
use crate::validate;
use edge::{Json, parse_json};

/// The body of `POST /tokenize`.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    tools: Option<Value>,
}

/// The body of `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub(crate) struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<i64>,
}

/// `POST /tokenize`.
pub(crate) async fn tokenize(
    State(app): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Response {
    tokenize_inner(app, caller.map(|axum::Extension(c)| c), body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn tokenize_inner(
    app: AppState,
    caller: Option<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: TokenizeRequest = parse_json(&body)?;
    // `model` is optional here, as in vLLM (the default model); when given it must be served.
    let served = app
        .optional_model(
            req.model.as_deref(),
            caller.as_ref().map(|c| c.ctx.as_ref()),
        )
        .await?;
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
    let backend = Arc::clone(&served.backend);
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => tokio::task::spawn_blocking(move || backend.tokenize(&prompt))
            .await
            .map_err(|e| ApiError::internal(format!("tokenisation task failed: {e}")))?,
        (None, Some(raw)) => {
            if raw.is_empty() {
                return Err(ApiError::invalid(
                    "messages",
                    "`messages` must not be empty",
                ));
            }
            // Each message is checked as a chat completion's is, then handed on as sent
            // (key order, content parts, tool calls): the model's template, or Mistral's
            // encoding token for token as mistral-common's, sees the request itself.
            for (i, message) in raw.iter().enumerate() {
                let typed = RawMessage::deserialize(message).map_err(|e| {
                    ApiError::invalid(format!("messages[{i}]"), format!("`messages[{i}]`: {e}"))
                })?;
                validate::chat_message(i, &typed)?;
            }
            let tools = match req.tools {
                None | Some(Value::Null) => None,
                Some(Value::Array(tools)) => Some(tools),
                Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array")),
            };
            let mut template_kwargs = serde_json::Map::new();
            if let Some(continued) = req.continue_final_message {
                template_kwargs.insert("continue_final_message".into(), Value::Bool(continued));
            }
            let request = ChatRequest {
                messages: raw,
                tools,
                template_kwargs,
            };
            tokio::task::spawn_blocking(move || backend.encode_chat(&request))
                .await
                .map_err(|e| ApiError::internal(format!("tokenisation task failed: {e}")))?
                .map_err(engine_error)?
                .tokens
        }
        _ => {
            return Err(ApiError::invalid_body(
                "give exactly one of `prompt` (a string) and `messages` (a chat)",
            ));
        }
    };
    Ok(tokens_response(served.backend.as_ref(), tokens))
}

fn tokens_response(backend: &dyn Backend, tokens: Vec<u32>) -> Response {
    ResponseJson(json!({
        "count": tokens.len(),
        "max_model_len": backend.context_length(),
        "tokens": tokens,
    }))
    .into_response()
}

/// `POST /detokenize`.
pub(crate) async fn detokenize(
    State(app): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Json(req): Json<DetokenizeRequest>,
) -> Response {
    detokenize_inner(app, caller.map(|axum::Extension(c)| c), req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn detokenize_inner(
    app: AppState,
    caller: Option<Caller>,
    req: DetokenizeRequest,
) -> Result<Response, ApiError> {
    let served = app
        .optional_model(
            req.model.as_deref(),
            caller.as_ref().map(|c| c.ctx.as_ref()),
        )
        .await?;
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
    let prompt = served.backend.detokenize(&tokens).map_err(engine_error)?;
    Ok(ResponseJson(json!({ "prompt": prompt })).into_response())
}
