//! The router's HTTP side: the OpenAI API of the replicas behind it, with the control plane
//! enforced once, here.
//!
//! For each generation request: authenticate the key, check its model and request rate, and
//! reserve the prompt plus the completion limit from its token rate and budget, in one trip to
//! the store (so a budget is exact across every replica: replicas never see a request the
//! budget could not pay for); pick an upstream among those in the organisation's allowed
//! regions; forward the body (asking for usage in streams); retry on another upstream while
//! no byte has reached the client; then relay the answer and settle the reservation to the
//! usage the upstream reported, before the last event reaches the client.
//!
//! The prompt's tokens are not known before an upstream tokenises it, so the reservation
//! counts the body's bytes as prompt tokens: a byte-level tokenizer never makes more tokens
//! than bytes, and the JSON around each message outweighs the chat template's markers. The
//! settlement then charges what was used.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, OriginalUri, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use control::admission::micros_since;
use control::{Checks, ControlPlane, Gate, KeyContext, Outcome, Reservation, Settlement};
use edge::{ApiError, MAX_BODY_BYTES, Refusal};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::client::HttpClient;
use crate::config::ProxyConfig;
use crate::exposition;
use crate::picker::{PickError, PickRequest, Picker};
use crate::request::routing_key;
use crate::upstream::Upstream;

/// The most bytes of a non-streamed upstream answer relayed.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The header carrying the router's id of a request (its usage record's id).
pub const REQUEST_ID_HEADER: &str = "x-souverain-request-id";

/// The header naming the upstream that served a request.
pub const UPSTREAM_HEADER: &str = "x-souverain-upstream";

/// Counts kept by the router, for `/metrics`.
#[derive(Debug, Default)]
pub struct RouterStats {
    ok: AtomicU64,
    refused: AtomicU64,
    shed: AtomicU64,
    unavailable: AtomicU64,
    upstream_failed: AtomicU64,
    retries: AtomicU64,
    cancelled: AtomicU64,
}

/// The router: picker, client, control plane.
#[derive(Debug)]
pub struct FleetRouter {
    picker: Arc<Picker>,
    client: HttpClient,
    gate: Option<Gate>,
    config: ProxyConfig,
    stats: RouterStats,
}

impl FleetRouter {
    /// A router over `picker`'s pool; with `control`, keys, limits, budgets and metering are
    /// enforced.
    pub fn new(
        picker: Arc<Picker>,
        client: HttpClient,
        control: Option<Arc<ControlPlane>>,
        config: ProxyConfig,
    ) -> Self {
        FleetRouter {
            picker,
            client,
            gate: control.map(|c| edge::gate(c, Settlement::Queued)),
            config,
            stats: RouterStats::default(),
        }
    }

    /// The picker.
    pub fn picker(&self) -> &Arc<Picker> {
        &self.picker
    }
}

/// The router's application: the OpenAI API, the browser console under `/console`, and with
/// a control plane the admin API under `/admin/v1` (with `/replicas`).
pub fn app(router: Arc<FleetRouter>) -> Router {
    let admin = router.gate.as_ref().map(|gate| {
        let replicas = crate::replicas::router(Arc::clone(&router.picker));
        edge::admin::router(Arc::clone(gate.control()), replicas)
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(forward))
        .route("/v1/completions", post(forward))
        .route("/v1/fim/completions", post(forward))
        .route("/v1/embeddings", post(forward))
        .fallback(unknown)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(router)
        .merge(console::router());
    match admin {
        Some(admin) => app.nest("/admin/v1", admin),
        None => app,
    }
}

/// Serves [`app`] until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Arc<FleetRouter>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Hyper's own answers to unparsable requests get the error object too, and header
    // sections past edge's limit a JSON 431.
    let app = app(router).layer(axum::middleware::from_fn(edge::header_limit));
    axum::serve(edge::JsonParseErrors(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn refused(
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
) -> ApiError {
    ApiError::Refused(Box::new(Refusal {
        status,
        kind,
        code: Some(code),
        param: None,
        message,
        retry_after_s: (status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::SERVICE_UNAVAILABLE)
            .then_some(1),
    }))
}

async fn unknown(method: Method, uri: OriginalUri) -> ApiError {
    ApiError::UnknownUrl {
        method,
        path: uri.path().to_owned(),
    }
}

async fn health(State(router): State<Arc<FleetRouter>>) -> Response {
    let members = router.picker.pool().snapshot();
    let healthy = members.iter().filter(|u| u.is_healthy()).count();
    let status = if healthy > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if healthy > 0 { "ok" } else { "unavailable" },
        "upstreams": members.len(),
        "healthy": healthy,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(router): State<Arc<FleetRouter>>) -> Response {
    let mut out = String::new();
    let s = &router.stats;
    exposition::write_counter(
        &mut out,
        "souverain_router_requests_total",
        "Requests the router answered, by outcome.",
        "outcome",
        &[
            ("ok", s.ok.load(Ordering::Relaxed)),
            ("refused", s.refused.load(Ordering::Relaxed)),
            ("shed", s.shed.load(Ordering::Relaxed)),
            ("unavailable", s.unavailable.load(Ordering::Relaxed)),
            ("upstream_failed", s.upstream_failed.load(Ordering::Relaxed)),
            ("cancelled", s.cancelled.load(Ordering::Relaxed)),
        ],
    );
    let _ = writeln!(
        out,
        "# HELP souverain_router_retries_total Requests sent to another upstream after a failure.\n\
         # TYPE souverain_router_retries_total counter\nsouverain_router_retries_total {}",
        s.retries.load(Ordering::Relaxed)
    );
    let members = router.picker.pool().snapshot();
    exposition::write_upstreams(
        &mut out,
        "souverain_router_upstream",
        &members,
        &exposition::SHARED,
    );
    exposition::write_upstreams(
        &mut out,
        "souverain_router_upstream",
        &members,
        &[
            exposition::UpstreamSeries {
                suffix: "in_flight",
                help: "Requests in flight to the upstream.",
                kind: "gauge",
                value: |u| u.in_flight() as f64,
            },
            exposition::UpstreamSeries {
                suffix: "in_flight_tokens",
                help: "Tokens reserved by requests in flight to the upstream.",
                kind: "gauge",
                value: |u| u.in_flight_tokens() as f64,
            },
            exposition::UpstreamSeries {
                suffix: "failures_total",
                help: "Failed connections to the upstream.",
                kind: "counter",
                value: |u| u.failures() as f64,
            },
        ],
    );
    exposition::response(out)
}

async fn models(State(router): State<Arc<FleetRouter>>, headers: HeaderMap) -> Response {
    let ctx = match &router.gate {
        Some(gate) => match gate.authenticate(edge::bearer(&headers)).await {
            Ok(ctx) => Some(ctx),
            Err(err) => return ApiError::from(err).into_response(),
        },
        None => None,
    };
    let members = router.picker.pool().snapshot();
    let visible: Vec<&Arc<Upstream>> = members
        .iter()
        .filter(|u| u.is_healthy())
        .filter(|u| {
            ctx.as_ref()
                .is_none_or(|c| c.org.allowed_regions.contains(&u.spec().region))
        })
        .collect();
    let lists = futures::future::join_all(visible.iter().map(|u| {
        let url = format!("{}/v1/models", u.spec().url.trim_end_matches('/'));
        let client = router.client.clone();
        async move {
            crate::scrape::get_text(&client, &url, Duration::from_secs(2), 4 << 20)
                .await
                .ok()
        }
    }))
    .await;
    let mut data: Vec<Value> = Vec::new();
    for list in lists.into_iter().flatten() {
        let Ok(list) = serde_json::from_str::<Value>(&list) else {
            continue;
        };
        for model in list["data"].as_array().into_iter().flatten() {
            let Some(id) = model["id"].as_str() else {
                continue;
            };
            let allowed = ctx.as_ref().is_none_or(|c| c.key.policy.allows_model(id));
            if allowed && !data.iter().any(|m| m["id"] == id) {
                data.push(model.clone());
            }
        }
    }
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

/// Tokens used, and the energy spent, as an upstream reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    prompt: u64,
    completion: u64,
    reasoning: u64,
    /// A Souverain replica's `energy_joules`/`energy_source`; other engines report none.
    energy: Option<control::EnergyUse>,
}

/// Most joules one request's usage may claim (a replica's report beyond it is dropped, not
/// stored): a day of a 100 kW machine.
const MAX_REPORTED_JOULES: f64 = 100e3 * 86_400.0;

fn usage_of(value: &Value) -> Option<Usage> {
    let usage = value.get("usage")?.as_object()?;
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        prompt: n(usage.get("prompt_tokens")),
        completion: n(usage.get("completion_tokens")),
        reasoning: n(usage
            .get("completion_tokens_details")
            .and_then(|d| d.get("reasoning_tokens"))),
        energy: energy_of(usage),
    })
}

/// The energy an upstream's usage reports: finite, not negative, bounded, with a known source.
fn energy_of(usage: &serde_json::Map<String, Value>) -> Option<control::EnergyUse> {
    let joules = usage.get("energy_joules")?.as_f64()?;
    let source = control::EnergySource::parse(usage.get("energy_source")?.as_str()?)?;
    if !joules.is_finite() || !(0.0..=MAX_REPORTED_JOULES).contains(&joules) {
        return None;
    }
    Some(control::EnergyUse {
        // In range by the check above: at most 8.64e15 µJ.
        microjoules: (joules * 1e6).round() as u64,
        source,
    })
}

/// A request let through: what settling it needs.
struct Metering {
    gate: Gate,
    ctx: Arc<KeyContext>,
    reservation: Reservation,
}

/// The request as it travels through the router.
struct Ticket {
    /// The router's id for the request: the usage record's key and the client's
    /// `x-souverain-request-id` (upstreams' own ids may repeat across replicas).
    id: String,
    metering: Option<Metering>,
    model: String,
    started: Instant,
    prompt_estimate: u64,
}

impl Ticket {
    async fn settle(
        self,
        usage: Usage,
        ttft_us: Option<u64>,
        status: &str,
        http_status: StatusCode,
    ) {
        let Some(m) = self.metering else {
            return;
        };
        let outcome = Outcome {
            request_id: self.id,
            model: self.model,
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            reasoning_tokens: usage.reasoning,
            ttft_us,
            duration_us: micros_since(self.started),
            status: status.to_owned(),
            http_status: http_status.as_u16(),
            content: None,
            energy: usage.energy,
        };
        // In memory now (budget lease, rate bucket); the store's part is group-committed by
        // the control plane's writer thread, off the response's path.
        m.gate.settle(&m.ctx, Some(m.reservation), outcome).await;
    }
}

/// The completion limit a request reserves: its `max_completion_tokens` or `max_tokens`
/// (or the configured default) times `n`; embeddings complete nothing.
fn completion_limit(path: &str, body: &Value, default: u64) -> u64 {
    if path == "/v1/embeddings" {
        return 0;
    }
    let limit = body
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
        .unwrap_or(default);
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    limit.saturating_mul(n)
}

fn forwarded_headers(headers: &HeaderMap, session_header: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for name in [header::ACCEPT.as_str(), "x-request-id", session_header] {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
            && let Some(value) = headers.get(&name)
        {
            out.insert(name, value.clone());
        }
    }
    out
}

async fn forward(
    State(router): State<Arc<FleetRouter>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let path = uri.path().to_owned();
    let mut json: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return ApiError::invalid_body("The body must be a JSON object").into_response(),
        Err(err) => {
            return ApiError::invalid_body(format!("The body is not valid JSON: {err}"))
                .into_response();
        }
    };
    let key = routing_key(&json, &headers, router.picker.config());
    let prompt_estimate = body.len() as u64;
    let limit = completion_limit(&path, &json, router.config.default_max_tokens);
    let metering = match &router.gate {
        Some(gate) => {
            let checks = Checks {
                model: &key.model,
                request_rate: true,
                ..Checks::default()
            };
            let admitted = gate
                .admit(
                    edge::bearer(&headers),
                    checks,
                    prompt_estimate,
                    limit,
                    started,
                )
                .await;
            match admitted {
                Ok((ctx, reservation)) => Some(Metering {
                    gate: gate.clone(),
                    ctx,
                    reservation,
                }),
                Err(err) => {
                    router.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return ApiError::from(err).into_response();
                }
            }
        }
        None => None,
    };
    let regions = metering.as_ref().map(|m| m.ctx.org.allowed_regions.clone());
    let ticket = Ticket {
        id: format!("req-{}", control::keys::random_base62(24)),
        metering,
        model: key.model.clone(),
        started,
        prompt_estimate,
    };
    // Streams are asked for usage, so that they can be metered; the client sees the usage
    // chunk only if it asked for it.
    let stream = json.get("stream").and_then(Value::as_bool) == Some(true);
    let client_wants_usage = json
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let body = if stream && !client_wants_usage && ticket.metering.is_some() {
        if let Some(object) = json.as_object_mut() {
            object.insert(
                "stream_options".to_owned(),
                serde_json::json!({"include_usage": true}),
            );
        }
        match serde_json::to_vec(&json) {
            Ok(bytes) => Bytes::from(bytes),
            Err(_) => body,
        }
    } else {
        body
    };
    let forwarded = forwarded_headers(&headers, &router.picker.config().session_header);
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut tried: Vec<String> = Vec::new();
    loop {
        let picked = router.picker.pick(&PickRequest {
            model: &key.model,
            prefix: &key.prefix,
            session: key.session.as_deref(),
            regions: regions.as_deref(),
            subset: None,
            exclude: &tried,
        });
        let pick = match picked {
            Ok(pick) => pick,
            Err(err) => {
                return refuse_pick(&router, ticket, err, !tried.is_empty()).await;
            }
        };
        let upstream = Arc::clone(&pick.upstream);
        let in_flight = upstream.begin(prompt_estimate.saturating_add(limit));
        let url = format!("{}{path}{query}", upstream.spec().url.trim_end_matches('/'));
        let mut request = axum::http::Request::post(url);
        if let Some(h) = request.headers_mut() {
            h.extend(forwarded.clone());
        }
        let request = match request.body(Body::from(body.clone())) {
            Ok(r) => r,
            Err(err) => {
                let error = format!("building the upstream request: {err}");
                return ApiError::internal(error).into_response();
            }
        };
        let timeout = Duration::from_millis(router.config.connect_timeout_ms);
        let answer = tokio::time::timeout(timeout, router.client.request(request)).await;
        let failure = match answer {
            Ok(Ok(response)) => {
                let status = response.status();
                let overloaded = status == StatusCode::SERVICE_UNAVAILABLE
                    || status == StatusCode::TOO_MANY_REQUESTS;
                if overloaded && tried.len() < router.config.retries {
                    // Nothing reached the client: another replica may take it.
                    tracing::debug!(upstream = upstream.name(), %status, "upstream refused; retrying");
                    router.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tried.push(upstream.name().to_owned());
                    continue;
                }
                router
                    .picker
                    .routed(&upstream, &key.prefix, key.session.as_deref());
                return relay(
                    &router,
                    ticket,
                    in_flight,
                    response,
                    stream && status.is_success(),
                    client_wants_usage,
                )
                .await;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {} ms", timeout.as_millis()),
        };
        // Failed before the first byte: take it out of rotation and try another.
        tracing::warn!(upstream = upstream.name(), error = %failure, "upstream request failed");
        upstream.connection_failed();
        drop(in_flight);
        tried.push(upstream.name().to_owned());
        if tried.len() > router.config.retries {
            router.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            let status = StatusCode::BAD_GATEWAY;
            ticket
                .settle(Usage::default(), None, "failed", status)
                .await;
            return refused(
                status,
                "server_error",
                "upstream_unavailable",
                format!("{} replicas failed to answer; retry later", tried.len()),
            )
            .into_response();
        }
        router.stats.retries.fetch_add(1, Ordering::Relaxed);
    }
}

async fn refuse_pick(
    router: &FleetRouter,
    ticket: Ticket,
    err: PickError,
    retried: bool,
) -> Response {
    let (status, kind, code, counter) = match &err {
        PickError::Saturated => (
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "replicas_saturated",
            &router.stats.shed,
        ),
        _ if retried => (
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_unavailable",
            &router.stats.upstream_failed,
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_replica",
            &router.stats.unavailable,
        ),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    ticket
        .settle(Usage::default(), None, "rejected", status)
        .await;
    refused(status, kind, code, err.to_string()).into_response()
}

fn relay_headers(
    response: &mut Response,
    upstream: &Upstream,
    request_id: &str,
    content_type: Option<HeaderValue>,
) {
    if let Ok(id) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Ok(name) = HeaderValue::from_str(upstream.name()) {
        response.headers_mut().insert(UPSTREAM_HEADER, name);
    }
}

async fn relay(
    router: &Arc<FleetRouter>,
    ticket: Ticket,
    in_flight: crate::upstream::InFlight,
    response: axum::http::Response<hyper::body::Incoming>,
    stream: bool,
    client_wants_usage: bool,
) -> Response {
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let upstream = Arc::clone(in_flight.upstream());
    let request_id = ticket.id.clone();
    if stream {
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        let router = Arc::clone(router);
        tokio::spawn(relay_stream(
            router,
            ticket,
            in_flight,
            response.into_body(),
            tx,
            client_wants_usage,
        ));
        let mut out = Response::new(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        *out.status_mut() = status;
        relay_headers(&mut out, &upstream, &request_id, content_type);
        out.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return out;
    }
    let collected = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await;
    drop(in_flight);
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(err) => {
            // The upstream began answering, then failed: not retried (it may have run).
            router.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = upstream.name(), error = %err, "upstream answer failed");
            let s = StatusCode::BAD_GATEWAY;
            ticket.settle(Usage::default(), None, "failed", s).await;
            return refused(
                s,
                "server_error",
                "upstream_failed",
                "The replica's answer broke off; retry".to_owned(),
            )
            .into_response();
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    if status.is_success() {
        router.stats.ok.fetch_add(1, Ordering::Relaxed);
        let usage = parsed.as_ref().and_then(usage_of).unwrap_or(Usage {
            prompt: ticket.prompt_estimate,
            ..Usage::default()
        });
        ticket.settle(usage, None, "ok", status).await;
    } else {
        ticket
            .settle(Usage::default(), None, "rejected", status)
            .await;
    }
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    relay_headers(&mut out, &upstream, &request_id, content_type);
    out
}

/// Splits off the next whole server-sent event (through its blank line), if there is one.
fn next_event(buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let end = match (lf, crlf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let rest = buffer.split_off(end);
    Some(std::mem::replace(buffer, rest))
}

/// The `data:` payload of an event (its lines joined), if it has one.
fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_owned()),
            }
        }
    }
    data
}

/// Relays a stream event by event, metering it; settles before `[DONE]` reaches the client,
/// or when either side goes away.
async fn relay_stream(
    router: Arc<FleetRouter>,
    ticket: Ticket,
    in_flight: crate::upstream::InFlight,
    mut body: hyper::body::Incoming,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    client_wants_usage: bool,
) {
    let started = ticket.started;
    let mut buffer: Vec<u8> = Vec::new();
    let mut usage: Option<Usage> = None;
    let mut ttft_us = None;
    let mut pieces: u64 = 0;
    let mut ticket = Some(ticket);
    let mut outcome = "ok";
    'relay: loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tx.closed() => {
                outcome = "cancelled";
                break 'relay;
            }
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(err)) => {
                tracing::warn!(upstream = in_flight.upstream().name(), error = %err, "stream broke off");
                outcome = "failed";
                break 'relay;
            }
            None => break 'relay,
        };
        buffer.extend_from_slice(&data);
        while let Some(event) = next_event(&mut buffer) {
            let payload = event_data(&event);
            let mut forward = true;
            match payload.as_deref() {
                Some("[DONE]") => {
                    if let Some(t) = ticket.take() {
                        let used = usage.unwrap_or(Usage {
                            prompt: t.prompt_estimate,
                            completion: pieces,
                            ..Usage::default()
                        });
                        t.settle(used, ttft_us, "ok", StatusCode::OK).await;
                    }
                }
                Some(json) => {
                    ttft_us.get_or_insert_with(|| micros_since(started));
                    pieces += 1;
                    if json.contains("\"usage\"")
                        && let Ok(value) = serde_json::from_str::<Value>(json)
                        && let Some(u) = usage_of(&value)
                    {
                        usage = Some(u);
                        let empty = value
                            .get("choices")
                            .and_then(Value::as_array)
                            .is_some_and(Vec::is_empty);
                        if empty && !client_wants_usage {
                            forward = false;
                            pieces -= 1;
                        }
                    }
                }
                None => {}
            }
            if forward && tx.send(Ok(Bytes::from(event))).await.is_err() {
                outcome = "cancelled";
                break 'relay;
            }
        }
    }
    // Dropping the upstream body now cancels a generation whose client went away.
    drop(body);
    drop(in_flight);
    if outcome == "ok" && !buffer.is_empty() {
        let _ = tx.send(Ok(Bytes::from(std::mem::take(&mut buffer)))).await;
    }
    let counter = match outcome {
        "ok" => &router.stats.ok,
        "cancelled" => &router.stats.cancelled,
        _ => &router.stats.upstream_failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Some(t) = ticket.take() {
        let used = usage.unwrap_or(Usage {
            prompt: t.prompt_estimate,
            completion: pieces,
            ..Usage::default()
        });
        let status = match outcome {
            "ok" => StatusCode::OK,
            "cancelled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            _ => StatusCode::BAD_GATEWAY,
        };
        t.settle(used, ttft_us, outcome, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines() {
        let mut buffer = b"data: {\"a\":1}\n\ndata: [DONE]\r\n\r\ndata: part".to_vec();
        let first = next_event(&mut buffer).unwrap();
        assert_eq!(event_data(&first).as_deref(), Some("{\"a\":1}"));
        let second = next_event(&mut buffer).unwrap();
        assert_eq!(event_data(&second).as_deref(), Some("[DONE]"));
        assert_eq!(next_event(&mut buffer), None);
        assert_eq!(buffer, b"data: part");
        assert_eq!(event_data(b": comment\n\n"), None);
        assert_eq!(event_data(b"data:x\ndata: y\n\n").as_deref(), Some("x\ny"));
    }

    #[test]
    fn limits_and_usage_are_read_from_bodies() {
        let body = serde_json::json!({"max_tokens": 10, "n": 3});
        assert_eq!(completion_limit("/v1/chat/completions", &body, 99), 30);
        let body = serde_json::json!({"max_completion_tokens": 7, "max_tokens": 10});
        assert_eq!(completion_limit("/v1/chat/completions", &body, 99), 7);
        assert_eq!(
            completion_limit("/v1/completions", &serde_json::json!({}), 99),
            99
        );
        assert_eq!(completion_limit("/v1/embeddings", &body, 99), 0);
        let answer = serde_json::json!({"usage": {"prompt_tokens": 5, "completion_tokens": 2,
            "completion_tokens_details": {"reasoning_tokens": 1}}});
        assert_eq!(
            usage_of(&answer),
            Some(Usage {
                prompt: 5,
                completion: 2,
                reasoning: 1,
                energy: None,
            })
        );
        assert_eq!(usage_of(&serde_json::json!({"usage": null})), None);
        // A Souverain replica's energy is kept to the microjoule; a report that is not a
        // finite, bounded, non-negative figure with a known source is dropped.
        let with = |joules: Value, source: Value| {
            usage_of(
                &serde_json::json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1,
                "energy_joules": joules, "energy_source": source}}),
            )
            .unwrap()
            .energy
        };
        assert_eq!(
            with(serde_json::json!(3.452406), serde_json::json!("modelled")),
            Some(control::EnergyUse {
                microjoules: 3_452_406,
                source: control::EnergySource::Modelled
            })
        );
        assert_eq!(
            with(serde_json::json!(0.5), serde_json::json!("measured")).map(|e| e.source),
            Some(control::EnergySource::Measured)
        );
        for (joules, source) in [
            (serde_json::json!(-1.0), serde_json::json!("modelled")),
            (serde_json::json!(1e300), serde_json::json!("modelled")),
            (serde_json::json!("3"), serde_json::json!("modelled")),
            (serde_json::json!(1.0), serde_json::json!("guessed")),
            (serde_json::json!(1.0), Value::Null),
        ] {
            assert_eq!(
                with(joules.clone(), source.clone()),
                None,
                "{joules} {source}"
            );
        }
    }
}
