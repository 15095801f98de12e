//! What every Souverain HTTP front shares: the server (`api`), the router and the endpoint
//! picker (`fleet`).
//!
//! - [`ApiError`]: the one error type of the HTTP fronts, answered as OpenAI's error object,
//!   with `From<ControlError>` mapping every control-plane refusal to its status, type, code
//!   and `Retry-After`.
//! - [`bearer`]: the key in `Authorization: Bearer ...` (or, without that header,
//!   Anthropic's `x-api-key`), or the [`Denial`] saying why there is none.
//! - [`anthropic_error_body`] and [`ErrorFacts`]: an error in Anthropic's shape, for the
//!   fronts that speak its Messages API.
//! - [`gate`]: the control plane's admission flow ([`control::Gate`]) recording refusals with
//!   the statuses [`ApiError`] answers them with.
//! - [`MAX_BODY_BYTES`]: the largest request body any front reads.
//! - [`Json`]: the JSON body extractor whose rejection is an [`ApiError`] naming the field.
//! - [`admin::router`]: the admin API under `/admin/v1` (organisations, projects, keys,
//!   usage, audit), served by `serve --auth` and `route --auth` alike.
//! - [`JsonParseErrors`]: a listener whose connections answer hyper's own parse errors (bad
//!   request line or header, headers too large) with the error object instead of no body.
//!
//! ```
//! use control::{ControlError, Denial};
//! use souverain_edge::ApiError;
//!
//! let err = ApiError::from(ControlError::Denied(Denial::MissingKey));
//! assert_eq!(err.status().as_u16(), 401);
//! ```

pub mod admin;
mod error;
mod json;
mod refusal;
mod wire;

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use control::{ControlPlane, Denial, Gate, Settlement};

pub use crate::error::{
    ApiError, BoxError, Chain, ECHOED_NAME_CHARS, ErrorBody, ErrorFacts, Refusal,
    anthropic_error_body,
};
pub use crate::json::{Json, parse_json, read_json_body};
pub use crate::wire::{JsonParseErrors, MAX_HEADER_BYTES, ParseErrorBodies, header_limit};

/// The largest request body accepted, in bytes (8 MiB): room for long prompts, not for abuse.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The control plane's admission flow, with refusals recorded under the status they are
/// answered with.
pub fn gate(control: Arc<ControlPlane>, settlement: Settlement) -> Gate {
    Gate::new(control, settlement, |err| {
        ApiError::from(err.clone()).status().as_u16()
    })
}

/// The key in `Authorization: Bearer <key>`, or why there is none. Without an
/// `Authorization` header, the key in `x-api-key: <key>` (how Anthropic's SDKs send it).
pub fn bearer(headers: &HeaderMap) -> Result<String, Denial> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return api_key(headers);
    };
    if values.next().is_some() {
        return Err(Denial::MalformedKey {
            reason: "more than one Authorization header".to_owned(),
        });
    }
    let value = value.to_str().map_err(|_| Denial::MalformedKey {
        reason: "the Authorization header is not visible ASCII".to_owned(),
    })?;
    let (scheme, key) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denial::MalformedKey {
            reason: "the Authorization header must use the Bearer scheme \
                     (Authorization: Bearer sk-sov-...)"
                .to_owned(),
        });
    }
    let key = key.trim();
    if key.is_empty() {
        return Err(Denial::MissingKey);
    }
    Ok(key.to_owned())
}

/// The key in `x-api-key`, or why there is none.
fn api_key(headers: &HeaderMap) -> Result<String, Denial> {
    let mut values = headers.get_all("x-api-key").iter();
    let Some(value) = values.next() else {
        return Err(Denial::MissingKey);
    };
    if values.next().is_some() {
        return Err(Denial::MalformedKey {
            reason: "more than one x-api-key header".to_owned(),
        });
    }
    let key = value.to_str().map_err(|_| Denial::MalformedKey {
        reason: "the x-api-key header is not visible ASCII".to_owned(),
    })?;
    match key.trim() {
        "" => Err(Denial::MissingKey),
        key => Ok(key.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_header_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), Err(Denial::MissingKey));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer  sk-sov-x "),
        );
        assert_eq!(bearer(&headers).unwrap(), "sk-sov-x");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer sk-sov-y"),
        );
        assert_eq!(bearer(&headers).unwrap(), "sk-sov-y");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert_eq!(bearer(&headers), Err(Denial::MissingKey));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        assert!(matches!(bearer(&headers), Err(Denial::MalformedKey { .. })));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert!(matches!(bearer(&headers), Err(Denial::MalformedKey { .. })));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert!(matches!(bearer(&headers), Err(Denial::MalformedKey { .. })));
    }

    #[test]
    fn x_api_key_is_the_key_without_authorization() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static(" sk-sov-z "));
        assert_eq!(bearer(&headers).unwrap(), "sk-sov-z");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        assert_eq!(bearer(&headers).unwrap(), "a");
        headers.remove(header::AUTHORIZATION);
        headers.insert("x-api-key", HeaderValue::from_static(""));
        assert_eq!(bearer(&headers), Err(Denial::MissingKey));
    }
}
