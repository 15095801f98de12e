//! `serve --auth`: the control plane in front of `/v1/*`, Ollama's `/api/*` (and vLLM's
//! `/tokenize`, `/detokenize`).
//!
//! For each such request the middleware authenticates the key (401) and checks the
//! deployment's region against the key's organisation (403), headers only. A `POST` that may
//! generate then gets an [`Admission`] for its handler, which checks the model and the rate
//! once the body is parsed, reserves once the prompt is counted, and meters the generation
//! (`admission`). A request that ends without a meter (refused, invalid) is recorded as the
//! key's use with no tokens. Listing models and tokenising (Anthropic's `count_tokens`
//! included) and Ollama's `/api/show` are authenticated, not metered.
//!
//! [`dialect_errors`], outermost, answers every error on `/v1/messages*` (this
//! middleware's 401s and 403s included) in Anthropic's shape and on `/api/*` in Ollama's,
//! with the same status.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use control::{Checks, Gate};
use edge::ErrorFacts;
use edge::MAX_BODY_BYTES;

use crate::admission::{Admission, BatchIdentity, Caller};
use crate::error::ApiError;

/// The middleware on `/v1/*`.
pub(crate) async fn authenticate(
    State(gate): State<Gate>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    // Authenticated, never metered: tokenising, and the Files and Batch APIs (the batch's
    // requests are metered one by one when the runner sends them).
    let tokenizer_only = path == "/tokenize"
        || path == "/detokenize"
        || path == "/v1/messages/count_tokens"
        || path == "/api/show"
        || path.starts_with("/v1/files")
        || path.starts_with("/v1/batches");
    let guarded = path.starts_with("/v1/") || path == "/v1" || path.starts_with("/api/");
    if !(guarded || tokenizer_only) {
        return next.run(req).await;
    }
    let started = Instant::now();
    // A batch's request, sent in-process by the runner in its key's name (an extension no
    // client can set); any other request shows its key.
    let internal = req
        .extensions()
        .get::<BatchIdentity>()
        .map(|b| b.ctx.clone());
    let ctx = match internal {
        Some(ctx) => ctx,
        None => match gate.authenticate(edge::bearer(req.headers())).await {
            Ok(ctx) => ctx,
            Err(err) => return ApiError::from(err).into_response(),
        },
    };
    let region = Checks {
        region: true,
        ..Checks::default()
    };
    if let Err(err) = gate.check(&ctx, region) {
        let response = ApiError::from(err).into_response();
        gate.record_refusal(&ctx, "", started, response.status().as_u16())
            .await;
        return response;
    }
    req.extensions_mut().insert(Caller {
        gate: gate.clone(),
        ctx: ctx.clone(),
    });
    if req.method() != Method::POST || tokenizer_only {
        return next.run(req).await;
    }
    let declared_too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len > MAX_BODY_BYTES);
    if declared_too_large {
        return ApiError::PayloadTooLarge {
            limit_bytes: MAX_BODY_BYTES,
        }
        .into_response();
    }
    let admission = Admission::new(gate.clone(), ctx.clone(), started);
    req.extensions_mut().insert(admission.clone());
    let response = next.run(req).await;
    if !admission.is_metered() {
        // Refused or invalid before generation: a usage record with no tokens.
        gate.record_refusal(&ctx, admission.model(), started, response.status().as_u16())
            .await;
    }
    response
}

/// Ollama's routes read every body as JSON whatever its `Content-Type` (its documentation's
/// `curl -d` examples send none of JSON's), so on them the body is declared JSON before the
/// extractor, which requires that, reads it.
pub(crate) async fn json_bodies(mut req: Request, next: Next) -> Response {
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    next.run(req).await
}

/// Errors in the shape of the API a route speaks: on Anthropic's routes (`/v1/messages`,
/// `/v1/messages/count_tokens`) Anthropic's error object, on Ollama's (`/api/*`)
/// `{"error": "..."}`. Every `ApiError` response carries its [`ErrorFacts`], re-rendered here
/// with the same status and headers (`Retry-After`).
pub(crate) async fn dialect_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let anthropic = path.starts_with("/v1/messages");
    let ollama = path.starts_with("/api/");
    let response = next.run(req).await;
    if !(anthropic || ollama) {
        return response;
    }
    let Some(facts) = response.extensions().get::<ErrorFacts>().cloned() else {
        return response;
    };
    let body = if anthropic {
        facts.anthropic_body()
    } else {
        serde_json::json!({ "error": facts.message })
    };
    let (mut parts, _) = response.into_parts();
    let body = axum::Json(body).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    let (body_parts, body) = body.into_parts();
    if let Some(kind) = body_parts.headers.get(header::CONTENT_TYPE) {
        parts.headers.insert(header::CONTENT_TYPE, kind.clone());
    }
    Response::from_parts(parts, body)
}
