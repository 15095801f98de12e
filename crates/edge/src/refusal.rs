//! Control-plane refusals as HTTP answers: the status, OpenAI's `type` and `code`, the field
//! at fault and `Retry-After`, decided here for every front.

use axum::http::StatusCode;
use control::{ControlError, Denial, StoreError};

use crate::error::{ApiError, Refusal};

impl From<ControlError> for ApiError {
    fn from(err: ControlError) -> Self {
        let refused = |status, kind, code, param: Option<&str>, message: String, retry| {
            ApiError::Refused(Box::new(Refusal {
                status,
                kind,
                code,
                param: param.map(str::to_owned),
                message,
                retry_after_s: retry,
            }))
        };
        match err {
            ControlError::Denied(denial) => {
                let (status, kind, param) = match &denial {
                    d if d.is_authentication() => {
                        (StatusCode::UNAUTHORIZED, "invalid_request_error", None)
                    }
                    Denial::ModelNotAllowed { .. } => (
                        StatusCode::FORBIDDEN,
                        "invalid_request_error",
                        Some("model"),
                    ),
                    Denial::RateLimited { kind, .. } => {
                        (StatusCode::TOO_MANY_REQUESTS, kind.as_str(), None)
                    }
                    Denial::QuotaExceeded { .. } => {
                        (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", None)
                    }
                    _ => (StatusCode::FORBIDDEN, "invalid_request_error", None),
                };
                refused(
                    status,
                    kind,
                    Some(denial.code()),
                    param,
                    denial.to_string(),
                    denial.retry_after_secs(),
                )
            }
            err if err.is_unavailable() => {
                tracing::warn!(error = %err, "control plane store unavailable");
                refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("unavailable"),
                    None,
                    "The server cannot check credentials now; retry later".to_owned(),
                    Some(1),
                )
            }
            ControlError::Invalid { field, message } => refused(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                Some(field),
                format!("Invalid `{field}`: {message}"),
                None,
            ),
            ControlError::Store(StoreError::NotFound { kind, id }) => refused(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                None,
                format!("No {kind} with id `{id}`"),
                None,
            ),
            ControlError::Store(StoreError::Conflict { .. }) => refused(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("conflict"),
                None,
                "The request conflicts with the current state; retry".to_owned(),
                None,
            ),
            other => ApiError::internal(other),
        }
    }
}

impl From<Denial> for ApiError {
    fn from(denial: Denial) -> Self {
        ControlError::Denied(denial).into()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::header;
    use axum::response::IntoResponse;

    use super::*;

    #[test]
    fn refusals_have_openai_shapes() {
        let quota = ApiError::from(ControlError::Denied(Denial::QuotaExceeded {
            requested: 5,
            remaining: 1,
            retry_after_secs: Some(30),
        }));
        assert_eq!(quota.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(quota.code(), Some("insufficient_quota"));
        assert_eq!(quota.error_type(), "insufficient_quota");
        let response = quota.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "30");
        let down = ApiError::from(ControlError::Timeout { timeout_ms: 5 });
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.error_type(), "server_error");
        let model = ApiError::from(ControlError::Denied(Denial::ModelNotAllowed {
            model: "m".into(),
        }));
        assert_eq!(model.status(), StatusCode::FORBIDDEN);
        assert_eq!(model.param(), Some("model"));
    }
}
