//! A JSON body extractor whose rejection is an [`ApiError`], so a malformed body gets the
//! same OpenAI-shaped answer as every other error, with the bad field named in `param`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::MAX_BODY_BYTES;
use crate::error::ApiError;

/// A request body parsed as JSON into `T`.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_json_body(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// The body of a request that must be JSON (by its `Content-Type`), read whole.
pub async fn read_json_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    if !has_json_content_type(&req) {
        return Err(ApiError::invalid_body(
            "Expected a request body with `Content-Type: application/json`",
        ));
    }
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit_bytes: MAX_BODY_BYTES,
            }
        } else {
            ApiError::invalid_body(format!(
                "Could not read the request body: {}",
                rejection.body_text()
            ))
        }
    })
}

/// True for `application/json` and `application/<anything>+json`, with any parameters.
fn has_json_content_type(req: &Request) -> bool {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses `bytes` into `T`. Syntax errors and type errors are told apart, and a type error
/// names the path of the field (`messages[0].role`) both in the message and in `param`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            syntax_error(&inner)
        } else if path.is_empty() || path == "." {
            ApiError::invalid_body(format!("Invalid request body: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })?;
    // Anything but whitespace after the value is a syntax error too.
    deserializer.end().map_err(|err| syntax_error(&err))?;
    Ok(value)
}

fn syntax_error(err: &serde_json::Error) -> ApiError {
    ApiError::invalid_body(format!("The request body is not valid JSON: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Probe {
        #[allow(dead_code)]
        name: String,
        #[allow(dead_code)]
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Item {
        #[allow(dead_code)]
        value: f32,
    }

    #[test]
    fn syntax_error_is_named() {
        let err = parse_json::<Probe>(b"{\"name\": ").unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert_eq!(err.param(), None);
    }

    #[test]
    fn trailing_garbage_is_a_syntax_error() {
        let err = parse_json::<Probe>(b"{\"name\":\"a\",\"items\":[]} x").unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn type_error_names_the_field_path() {
        let err = parse_json::<Probe>(br#"{"name":"a","items":[{"value":1},{"value":"x"}]}"#)
            .unwrap_err();
        assert_eq!(err.param(), Some("items[1].value"));
        assert!(err.to_string().contains("items[1].value"), "{err}");
    }

    #[test]
    fn missing_field_is_reported() {
        let err = parse_json::<Probe>(br#"{"items":[]}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `name`"), "{err}");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn valid_body_parses() {
        let probe = parse_json::<Probe>(br#"{"name":"a","items":[{"value":0.5}],"extra":1}"#);
        assert!(probe.is_ok());
    }
}
