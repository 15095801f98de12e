//! The one error type of Souverain's HTTP fronts and the one place that turns an error into a
//! response body.
//!
//! Every failure answers with OpenAI's error object:
//! `{"error":{"message":..,"type":..,"param":..,"code":..}}`. Client mistakes (4xx) carry
//! `"type":"invalid_request_error"`; server faults (5xx) carry `"server_error"` and a generic
//! message, while the detail goes to the tracing log only.

use axum::Json;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answered to an HTTP client, shaped as OpenAI shapes its errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed or a field is out of range (400).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, for the client.
        message: String,
        /// The offending field (`"temperature"`, `"messages[1].role"`), if one is to blame.
        param: Option<String>,
        /// A stable machine-readable code, if the case has one.
        code: Option<&'static str>,
    },
    /// The request asks for a model this server does not serve (404).
    #[error("The model `{model}` does not exist")]
    ModelNotFound {
        /// The model id the client asked for.
        model: String,
    },
    /// The prompt does not fit in the model's context window (400).
    #[error(
        "This model's maximum context length is {context_length} tokens. However, your \
         prompt resulted in {prompt_tokens} tokens, which leaves no room for the completion. \
         Please reduce the length of the prompt."
    )]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The model's context length in tokens.
        context_length: usize,
    },
    /// The body is larger than the server accepts (413).
    #[error("The request body is larger than the limit of {limit_bytes} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit_bytes: usize,
    },
    /// No route matches the path (404).
    #[error("Unknown request URL: {method} {path}")]
    UnknownUrl {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
    },
    /// The route exists but not for this method (405).
    #[error("Method {method} is not allowed for {path}")]
    MethodNotAllowed {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
    },
    /// The engine cannot take the request now (503).
    #[error("The server is not able to process the request now; retry later")]
    Unavailable {
        /// What the engine said, with its causes; logged, not sent.
        #[source]
        source: BoxError,
    },
    /// Too many requests are waiting already (503 with `Retry-After`).
    #[error("The server is overloaded ({waiting} requests waiting); retry after {retry_after_s} s")]
    Overloaded {
        /// Requests waiting when this one was refused.
        waiting: usize,
        /// Suggested wait, seconds, sent as `Retry-After`.
        retry_after_s: u64,
    },
    /// Refused by the control plane (`--auth`) or its admin API, with the status, type,
    /// code and `Retry-After` it chose: a missing or bad key (401), a model or region not
    /// allowed (403), a spent rate limit or budget (429), its database down (503), an admin
    /// mistake (400, 404, 409).
    #[error("{}", .0.message)]
    Refused(Box<Refusal>),
    /// Something failed inside the server (500).
    #[error("The server had an error while processing the request")]
    Internal {
        /// What failed, with its causes; logged, not sent.
        #[source]
        source: BoxError,
    },
}

/// The most characters of a client's name (a model) echoed in an error message.
pub const ECHOED_NAME_CHARS: usize = 256;

/// Any error, as the cause of a 500 or 503: kept whole (with its own causes) until it is
/// logged.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its causes, `outer: inner: innermost`, for log lines.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}

impl ApiError {
    /// A 404 for a model this server does not serve. The name is echoed in the message cut to
    /// its first [`ECHOED_NAME_CHARS`] characters (`…` marks a cut), so a huge `model` cannot
    /// make a huge answer or log line.
    pub fn model_not_found(model: &str) -> Self {
        let model = match model.char_indices().nth(ECHOED_NAME_CHARS) {
            Some((cut, _)) => format!("{}…", &model[..cut]),
            None => model.to_owned(),
        };
        ApiError::ModelNotFound { model }
    }

    /// A 500 caused by `source` (a typed error, or a message), which is logged, not sent.
    pub fn internal(source: impl Into<BoxError>) -> Self {
        ApiError::Internal {
            source: source.into(),
        }
    }

    /// A 503 caused by `source`, which is logged, not sent.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        ApiError::Unavailable {
            source: source.into(),
        }
    }

    /// A 400 error naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 error not tied to one field.
    pub fn invalid_body(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::ContextLengthExceeded { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::ModelNotFound { .. } | ApiError::UnknownUrl { .. } => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable { .. } | ApiError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Refused(refusal) => refusal.status,
        }
    }

    /// OpenAI's `error.type`: `"invalid_request_error"` for client errors, `"server_error"`
    /// for server faults.
    pub fn error_type(&self) -> &'static str {
        if let ApiError::Refused(refusal) = self {
            return refusal.kind;
        }
        if self.status().is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        }
    }

    /// OpenAI's `error.code`, a stable string for the cases that have one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::InvalidRequest { code, .. } => *code,
            ApiError::ModelNotFound { .. } => Some("model_not_found"),
            ApiError::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            ApiError::PayloadTooLarge { .. } => Some("payload_too_large"),
            ApiError::UnknownUrl { .. } => Some("unknown_url"),
            ApiError::MethodNotAllowed { .. } => Some("method_not_allowed"),
            ApiError::Unavailable { .. } => Some("unavailable"),
            ApiError::Overloaded { .. } => Some("server_overloaded"),
            ApiError::Internal { .. } => None,
            ApiError::Refused(refusal) => refusal.code,
        }
    }

    /// OpenAI's `error.param`: the field at fault, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::ModelNotFound { .. } => Some("model"),
            ApiError::ContextLengthExceeded { .. } => Some("messages"),
            ApiError::Refused(refusal) => refusal.param.as_deref(),
            _ => None,
        }
    }

    /// Seconds the client should wait before retrying (`Retry-After`), when the error says.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            ApiError::Refused(refusal) => refusal.retry_after_s,
            ApiError::Overloaded { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }

    /// The error object as sent to clients, also used for errors inside an SSE stream.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: self.to_string(),
                kind: self.error_type(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// Logs what the client will not see: server faults at ERROR/WARN with their detail,
    /// client errors at DEBUG.
    fn log(&self) {
        match self {
            ApiError::Internal { source } => {
                tracing::error!(detail = %Chain(source.as_ref()), "request failed");
            }
            ApiError::Unavailable { source } => {
                tracing::warn!(detail = %Chain(source.as_ref()), "engine unavailable");
            }
            other => tracing::debug!(error = %other, "request rejected"),
        }
    }
}

/// What [`ApiError::Refused`] answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's `error.type` (`invalid_request_error`, `requests`, `tokens`,
    /// `insufficient_quota`, `server_error`).
    pub kind: &'static str,
    /// OpenAI's `error.code`.
    pub code: Option<&'static str>,
    /// The field at fault, if any.
    pub param: Option<String>,
    /// The message for the client.
    pub message: String,
    /// Seconds to wait before retrying, sent as `Retry-After`.
    pub retry_after_s: Option<u64>,
}

/// `{"error": {...}}` on the wire.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorObject<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

/// What an error response said, kept in the response's extensions so that a front speaking
/// another API (Anthropic's) can answer the same error in that API's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFacts {
    /// The status it is answered with.
    pub status: StatusCode,
    /// The message for the client.
    pub message: String,
}

impl ErrorFacts {
    /// The error in Anthropic's shape.
    pub fn anthropic_body(&self) -> serde_json::Value {
        anthropic_error_body(self.status, &self.message)
    }
}

/// Anthropic's error object, `{"type": "error", "error": {"type", "message"}}`, with the type
/// Anthropic gives the status (400 `invalid_request_error`, 401 `authentication_error`, 403
/// `permission_error`, 404 `not_found_error`, 413 `request_too_large`, 429
/// `rate_limit_error`, 503 and 529 `overloaded_error`, other server faults `api_error`).
pub fn anthropic_error_body(status: StatusCode, message: &str) -> serde_json::Value {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        402 | 403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (self.status(), Json(self.body())).into_response();
        response.extensions_mut().insert(ErrorFacts {
            status: self.status(),
            message: self.to_string(),
        });
        if let Some(seconds) = self.retry_after_s() {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(err: &ApiError) -> serde_json::Value {
        serde_json::to_value(err.body()).unwrap_or_default()
    }

    #[test]
    fn client_errors_have_invalid_request_type_and_param() {
        let err = ApiError::invalid("temperature", "temperature must be between 0 and 2");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let body = json(&err);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["code"], serde_json::Value::Null);
        assert_eq!(
            body["error"]["message"],
            "temperature must be between 0 and 2"
        );
    }

    #[test]
    fn server_errors_hide_detail() {
        let err = ApiError::internal("secret path /var/lib/model");
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = json(&err);
        assert_eq!(body["error"]["type"], "server_error");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.contains("secret"), "{message}");
        assert!(!message.is_empty());
    }

    #[test]
    fn unknown_model_names_are_echoed_bounded() {
        let short = ApiError::model_not_found("gpt-4");
        assert_eq!(short.to_string(), "The model `gpt-4` does not exist");
        let huge = ApiError::model_not_found(&"é".repeat(1_000_000));
        let message = huge.to_string();
        assert!(
            message.chars().count() < ECHOED_NAME_CHARS + 40,
            "{}",
            message.len()
        );
        assert!(message.contains(&format!("{}…`", "é".repeat(ECHOED_NAME_CHARS))));
    }

    #[test]
    fn causes_are_kept_for_the_log() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = ApiError::internal(Outer(std::io::Error::other("inner")));
        let ApiError::Internal { source } = &err else {
            panic!("not internal: {err:?}");
        };
        assert_eq!(Chain(source.as_ref()).to_string(), "outer: inner");
        assert!(
            !json(&err)["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("inner")
        );
    }
}
