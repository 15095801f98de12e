//! `serve --auth`: the control plane in front of `/v1/*`.
//!
//! [`router_with_control`] layers [`authenticate`] on the whole OpenAI surface (`/health` and
//! `/metrics` stay open) and mounts the admin API under `/admin/v1`. For each `/v1` request
//! the middleware reads the bearer key and has the control plane authenticate it (401), checks
//! the deployment's region against the key's organisation and the body's `model` against the
//! key's list (403), and takes one request from the key's per-minute bucket (429). It then
//! hands the handler an [`Admission`]: once the prompt is tokenised the handler calls
//! [`Admission::reserve`], which reserves prompt plus completion limit from the token bucket
//! and the budget (429 `insufficient_quota`), and [`Meter::track`] wraps the engine's event
//! channel so that the request is settled to its real token counts when it ends, however it
//! ends (done, failed, client gone). The settlement commits before the last event reaches the
//! client, so a response received is a response metered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use control::{ControlError, ControlPlane, Denial, KeyContext, Outcome, Reservation};
use engine::{EngineError, Event};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::error::{ApiError, Refusal};
use crate::routes::Tagged;
use crate::{Backend, MAX_BODY_BYTES};

/// [`crate::router`] with the control plane enforcing keys, limits, budgets and residency on
/// `/v1/*`, metering every request, and serving the admin API under `/admin/v1`.
pub fn router_with_control(backend: Arc<dyn Backend>, control: Arc<ControlPlane>) -> Router {
    crate::router(backend)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&control),
            authenticate,
        ))
        .nest("/admin/v1", crate::admin::router(control))
}

/// Serves [`router_with_control`] on `listener` until `shutdown` completes, with the
/// control plane's maintenance task (retention, queued records) running every minute.
pub async fn serve_with_control(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    control: Arc<ControlPlane>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(
            %address,
            model = backend.model_id(),
            region = %control.config().region,
            store = control.store().backend_name(),
            "serving the OpenAI API with authentication"
        );
    }
    let maintenance = control.spawn_maintenance(std::time::Duration::from_secs(60));
    let result = axum::serve(listener, router_with_control(backend, control))
        .with_graceful_shutdown(shutdown)
        .await;
    maintenance.abort();
    result
}

/// The API error for a control-plane failure.
pub fn refusal(err: ControlError) -> ApiError {
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
        ControlError::Store(control::StoreError::NotFound { kind, id }) => refused(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("not_found"),
            None,
            format!("No {kind} with id `{id}`"),
            None,
        ),
        ControlError::Store(control::StoreError::Conflict { .. }) => refused(
            StatusCode::CONFLICT,
            "invalid_request_error",
            Some("conflict"),
            None,
            "The request conflicts with the current state; retry".to_owned(),
            None,
        ),
        other => ApiError::Internal {
            detail: other.to_string(),
        },
    }
}

/// The key in `Authorization: Bearer <key>`, or why there is none.
pub fn bearer(headers: &HeaderMap) -> Result<String, Denial> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Denial::MissingKey);
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

/// A random id for requests refused before they got a response id.
fn rejected_request_id() -> String {
    format!("req-{}", control::keys::random_base62(24))
}

/// The `model` field of a JSON body, if it is one and has one. The handler validates the
/// body fully; this only decides whether the key may ask.
fn peek_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        model: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Peek>(body).ok()?.model? {
        serde_json::Value::String(model) => Some(model),
        _ => None,
    }
}

/// The middleware on `/v1/*`.
pub(crate) async fn authenticate(
    State(control): State<Arc<ControlPlane>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let tokenizer_only = path == "/tokenize" || path == "/detokenize";
    if !(path.starts_with("/v1/") || path == "/v1" || tokenizer_only) {
        return next.run(req).await;
    }
    let started = Instant::now();
    let presented = match bearer(req.headers()) {
        Ok(key) => key,
        Err(denial) => {
            // Audited; the answer is the same whether or not the audit write succeeds.
            let audited = denial.clone();
            let _ = control
                .run(move |c| Err::<(), _>(c.refuse_authentication(audited)))
                .await;
            return refusal(ControlError::Denied(denial)).into_response();
        }
    };
    let ctx = match control.run(move |c| c.authenticate(&presented)).await {
        Ok(ctx) => Arc::new(ctx),
        Err(err) => return refusal(err).into_response(),
    };
    if let Err(denial) = control.check_region(&ctx) {
        return reject(&control, &ctx, "", started, denial.into()).await;
    }
    if req.method() != Method::POST || tokenizer_only {
        // Listing models and tokenising run no generation: authenticated, not metered.
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let declared_too_large = parts
        .headers
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
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => {
            return ApiError::invalid_body(format!(
                "Could not read the request body (the limit is {MAX_BODY_BYTES} bytes): {err}"
            ))
            .into_response();
        }
    };
    let model = peek_model(&bytes).unwrap_or_default();
    if !model.is_empty()
        && let Err(denial) = control.check_model(&ctx, &model)
    {
        return reject(&control, &ctx, &model, started, denial.into()).await;
    }
    if let Err(denial) = control.check_request_rate(&ctx) {
        return reject(&control, &ctx, &model, started, denial.into()).await;
    }
    let prompt = ctx
        .project
        .retention_secs
        .is_some()
        .then(|| String::from_utf8_lossy(&bytes).into_owned());
    let admission = Admission(Arc::new(AdmissionInner {
        control: Arc::clone(&control),
        ctx: Arc::clone(&ctx),
        model: model.clone(),
        prompt,
        started,
        metered: AtomicBool::new(false),
    }));
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(admission.clone());
    let response = next.run(req).await;
    if !admission.0.metered.load(Ordering::SeqCst) {
        // Refused or invalid before generation: a usage record with no tokens.
        record(
            &control,
            &ctx,
            None,
            rejected_outcome(&model, started, response.status()),
        )
        .await;
    }
    response
}

/// The usage record of a request refused before it generated anything.
pub fn rejected_outcome(model: &str, started: Instant, status: StatusCode) -> Outcome {
    Outcome {
        request_id: rejected_request_id(),
        model: model.to_owned(),
        prompt_tokens: 0,
        completion_tokens: 0,
        reasoning_tokens: 0,
        ttft_us: None,
        duration_us: micros(started),
        status: "rejected".to_owned(),
        http_status: status.as_u16(),
        content: None,
    }
}

/// Answers a refusal after recording it as the key's use.
async fn reject(
    control: &Arc<ControlPlane>,
    ctx: &Arc<KeyContext>,
    model: &str,
    started: Instant,
    err: ControlError,
) -> Response {
    let response = refusal(err).into_response();
    record(
        control,
        ctx,
        None,
        rejected_outcome(model, started, response.status()),
    )
    .await;
    response
}

/// Settles a request; a store that is down keeps the record queued (the control plane retries
/// it), which is logged, not answered.
async fn record(
    control: &Arc<ControlPlane>,
    ctx: &Arc<KeyContext>,
    reservation: Option<Reservation>,
    outcome: Outcome,
) {
    let ctx = Arc::clone(ctx);
    if let Err(err) = control
        .run(move |c| c.settle(&ctx, reservation.as_ref(), outcome))
        .await
    {
        tracing::warn!(error = %err, "usage not recorded yet");
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A request let through by [`authenticate`], waiting for its prompt to be tokenised.
#[derive(Clone)]
pub(crate) struct Admission(Arc<AdmissionInner>);

struct AdmissionInner {
    control: Arc<ControlPlane>,
    ctx: Arc<KeyContext>,
    model: String,
    /// The request body, kept only when the project retains content.
    prompt: Option<String>,
    started: Instant,
    /// Set once a [`Meter`] is responsible for recording the request.
    metered: AtomicBool,
}

impl Admission {
    /// Reserves `prompt_tokens + completion_limit` tokens for the request.
    pub(crate) async fn reserve(
        &self,
        request_id: &str,
        prompt_tokens: usize,
        completion_limit: usize,
    ) -> Result<Meter, ApiError> {
        let inner = &self.0;
        let ctx = Arc::clone(&inner.ctx);
        let (prompt, limit) = (prompt_tokens as u64, completion_limit as u64);
        let reservation = inner
            .control
            .run(move |c| c.reserve(&ctx, prompt, limit))
            .await
            .map_err(refusal)?;
        inner.metered.store(true, Ordering::SeqCst);
        Ok(Meter {
            admission: self.clone(),
            request_id: request_id.to_owned(),
            reservation,
            prompt_tokens: prompt,
        })
    }
}

/// Records one request's use when it ends.
pub(crate) struct Meter {
    admission: Admission,
    request_id: String,
    reservation: Reservation,
    prompt_tokens: u64,
}

/// How a generation ended, as the meter saw it.
enum Ending {
    /// Every choice finished: the last `Done` (sent once the use is recorded) and the
    /// request's totals.
    Done(Tagged, engine::Usage),
    Failed(Tagged),
    Vanished,
    Cancelled,
}

impl Meter {
    /// Takes what starting the generation answered: an error is recorded and returned; a
    /// channel of `n` choices' events is wrapped in one that records the request when every
    /// choice has ended.
    pub(crate) fn track(
        self,
        generated: Result<UnboundedReceiver<Tagged>, EngineError>,
        n: usize,
    ) -> Result<UnboundedReceiver<Tagged>, ApiError> {
        let engine_rx = match generated {
            Ok(rx) => rx,
            Err(err) => {
                let err = ApiError::from(err);
                let status = err.status();
                tokio::spawn(async move {
                    self.settle(0, 0, 0, None, "failed", status, None).await;
                });
                return Err(err);
            }
        };
        let (tx, rx) = unbounded_channel();
        tokio::spawn(self.forward(engine_rx, tx, n.max(1)));
        Ok(rx)
    }

    async fn forward(
        self,
        mut engine_rx: UnboundedReceiver<Tagged>,
        tx: tokio::sync::mpsc::UnboundedSender<Tagged>,
        n: usize,
    ) {
        let started = self.admission.0.started;
        let mut ttft_us = None;
        let mut pieces: u64 = 0;
        let mut output = self.admission.0.prompt.as_ref().map(|_| String::new());
        let mut total = engine::Usage::default();
        let mut done = 0;
        let ending = loop {
            tokio::select! {
                event = engine_rx.recv() => match event {
                    Some((index, Event::Text(text))) => {
                        ttft_us.get_or_insert_with(|| micros(started));
                        pieces += 1;
                        if let Some(output) = &mut output {
                            output.push_str(&text);
                        }
                        if tx.send((index, Event::Text(text))).is_err() {
                            break Ending::Cancelled;
                        }
                    }
                    Some(lp @ (_, Event::Logprobs(_) | Event::PromptLogprobs(_))) => {
                        if tx.send(lp).is_err() {
                            break Ending::Cancelled;
                        }
                    }
                    Some((index, Event::Done { finish_reason, usage })) => {
                        if done == 0 {
                            total.prompt_tokens = usage.prompt_tokens;
                        }
                        total.completion_tokens += usage.completion_tokens;
                        total.reasoning_tokens += usage.reasoning_tokens;
                        done += 1;
                        let event = (index, Event::Done { finish_reason, usage });
                        if done == n {
                            break Ending::Done(event, total);
                        }
                        if tx.send(event).is_err() {
                            break Ending::Cancelled;
                        }
                    }
                    Some(failed @ (_, Event::Failed(_))) => break Ending::Failed(failed),
                    None => break Ending::Vanished,
                },
                () = tx.closed() => break Ending::Cancelled,
            }
        };
        // Dropping the engine's receiver now cancels a generation whose client went away.
        drop(engine_rx);
        let prompt_tokens = self.prompt_tokens;
        let error = StatusCode::INTERNAL_SERVER_ERROR;
        match ending {
            Ending::Done(last, total) => {
                let (p, c, r) = (
                    total.prompt_tokens as u64,
                    total.completion_tokens as u64,
                    total.reasoning_tokens as u64,
                );
                self.settle(p, c, r, ttft_us, "ok", StatusCode::OK, output)
                    .await;
                let _ = tx.send(last);
            }
            Ending::Failed(failed) => {
                self.settle(prompt_tokens, pieces, 0, ttft_us, "failed", error, output)
                    .await;
                let _ = tx.send(failed);
            }
            Ending::Vanished => {
                self.settle(prompt_tokens, pieces, 0, ttft_us, "failed", error, output)
                    .await;
            }
            Ending::Cancelled => {
                // Without a `Done`, the text pieces sent stand for the tokens generated.
                let client_closed = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
                self.settle(
                    prompt_tokens,
                    pieces,
                    0,
                    ttft_us,
                    "cancelled",
                    client_closed,
                    output,
                )
                .await;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn settle(
        self,
        prompt_tokens: u64,
        completion_tokens: u64,
        reasoning_tokens: u64,
        ttft_us: Option<u64>,
        status: &str,
        http_status: StatusCode,
        output: Option<String>,
    ) {
        let inner = &self.admission.0;
        let content = match (&inner.prompt, output) {
            (Some(prompt), Some(output)) => Some((prompt.clone(), output)),
            _ => None,
        };
        let outcome = Outcome {
            request_id: self.request_id,
            model: inner.model.clone(),
            prompt_tokens,
            completion_tokens,
            reasoning_tokens,
            ttft_us,
            duration_us: micros(inner.started),
            status: status.to_owned(),
            http_status: http_status.as_u16(),
            content,
        };
        record(&inner.control, &inner.ctx, Some(self.reservation), outcome).await;
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
    fn model_is_peeked_leniently() {
        assert_eq!(peek_model(br#"{"model":"m","x":1}"#).as_deref(), Some("m"));
        assert_eq!(peek_model(br#"{"model":3}"#), None);
        assert_eq!(peek_model(b"not json"), None);
        assert_eq!(peek_model(b"{}"), None);
    }

    #[test]
    fn refusals_have_openai_shapes() {
        let quota = refusal(ControlError::Denied(Denial::QuotaExceeded {
            requested: 5,
            remaining: 1,
            retry_after_secs: Some(30),
        }));
        assert_eq!(quota.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(quota.code(), Some("insufficient_quota"));
        assert_eq!(quota.error_type(), "insufficient_quota");
        let response = quota.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "30");
        let down = refusal(ControlError::Timeout { timeout_ms: 5 });
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.error_type(), "server_error");
        let model = refusal(ControlError::Denied(Denial::ModelNotAllowed {
            model: "m".into(),
        }));
        assert_eq!(model.status(), StatusCode::FORBIDDEN);
        assert_eq!(model.param(), Some("model"));
    }
}
