//! The HTTP layer's errors: [`edge::ApiError`] (one error type for every front, with
//! `From<ControlError>`), and how an engine error becomes one.

use engine::EngineError;

pub use edge::ApiError;

/// The API error for an engine error: the client's mistakes are 400s naming the field, a
/// full queue is a 503 with `Retry-After`, anything else a 500 whose cause is logged with its
/// whole chain, never sent.
pub(crate) fn engine_error(err: EngineError) -> ApiError {
    match err {
        EngineError::ContextLengthExceeded {
            prompt_tokens,
            context_length,
        } => ApiError::ContextLengthExceeded {
            prompt_tokens,
            context_length,
        },
        EngineError::InvalidRequest(message) => ApiError::invalid_body(message),
        // A template that rejects the conversation (roles out of order, a system message
        // the model does not take) is the client's to fix.
        EngineError::Template(message) => ApiError::InvalidRequest {
            message: format!(
                "The messages could not be rendered with the model's chat template: {message}"
            ),
            param: Some("messages".to_owned()),
            code: None,
        },
        EngineError::Unavailable(detail) => ApiError::unavailable(detail),
        EngineError::Overloaded { waiting } => ApiError::Overloaded {
            waiting,
            retry_after_s: 1,
        },
        other => ApiError::internal(other),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn engine_errors_map_to_statuses() {
        let ctx = engine_error(EngineError::ContextLengthExceeded {
            prompt_tokens: 10,
            context_length: 8,
        });
        assert_eq!(ctx.status(), StatusCode::BAD_REQUEST);
        assert_eq!(ctx.code(), Some("context_length_exceeded"));
        assert!(ctx.to_string().contains("context length is 8"));
        assert!(ctx.to_string().contains("10 tokens"));

        let template = engine_error(EngineError::Template("bad roles".to_owned()));
        assert_eq!(template.status(), StatusCode::BAD_REQUEST);
        assert_eq!(template.param(), Some("messages"));

        let busy = engine_error(EngineError::Unavailable("queue full".to_owned()));
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.error_type(), "server_error");
        assert!(!busy.to_string().contains("queue full"));
    }
}
