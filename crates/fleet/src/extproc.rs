//! The Gateway API Inference Extension's endpoint-picker protocol (v1.0), served as an Envoy
//! `ext_proc` gRPC service: the gateway (Envoy, or any proxy speaking the protocol) asks which
//! replica of the pool serves each request, and the same [`Picker`] as the HTTP router answers.
//!
//! One port serves `envoy.service.ext_proc.v3.ExternalProcessor` and `grpc.health.v1.Health`.
//! Per HTTP request the gateway opens one `Process` stream:
//!
//! 1. Request headers arrive. With `end_of_stream` (no body) the request is placed at once,
//!    from its headers only.
//! 2. In `FULL_DUPLEX_STREAMED` body mode (the protocol's, assumed when the gateway sends no
//!    protocol configuration) the body's chunks are buffered, up to a bound (413 beyond),
//!    until the last one. In `BUFFERED` mode the headers are answered at once and the body
//!    comes whole. Other body modes are placed from the headers only.
//! 3. The body is parsed (400 if it is not a JSON object), its [`crate::routing_key`]
//!    computed; with a control plane the `Authorization: Bearer` key is authenticated (401)
//!    and may use the model (403), and the organisation's allowed regions bound the choice;
//!    the gateway's endpoint-subset hint (filter metadata `envoy.lb.subset_hint`, key
//!    `x-gateway-destination-endpoint-subset`) bounds it too.
//! 4. The pick is answered with the header `x-gateway-destination-endpoint: ip:port` and the
//!    same value in the dynamic metadata namespace `envoy.lb`; the buffered body is streamed
//!    back unchanged. No eligible replica: 503; every eligible replica saturated: 429. Both
//!    are immediate responses with OpenAI-shaped JSON error bodies.
//! 5. The response's headers, body and trailers pass through unchanged.
//!
//! Health: the overall service (`""`), the ext_proc service and `readiness` are `SERVING`
//! while the pool has a healthy member, `NOT_SERVING` otherwise; `liveness` is always
//! `SERVING`.
//!
//! Metrics: [`metrics_app`] is a small HTTP application (`/metrics`, `/health`) for a port of
//! its own (`souverain picker --metrics-listen`, as the reference picker serves its metrics
//! apart from gRPC): `souverain_picker_requests_total` by outcome (`placed`, `shed` 429,
//! `unavailable` 503, `refused` 401/403, `invalid` 400/413) and, per upstream, health,
//! requests placed and the scraped load, written as the router writes its own.
//!
//! ```no_run
//! use std::sync::Arc;
//! use souverain_fleet::{Picker, Pool, RoutingConfig, serve_ext_proc};
//!
//! # async fn run() -> Result<(), souverain_fleet::FleetError> {
//! let pool = Arc::new(Pool::new());
//! let picker = Arc::new(Picker::new(pool, RoutingConfig::default()));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:9002")
//!     .await
//!     .map_err(|source| souverain_fleet::FleetError::Io { context: "binding".into(), source })?;
//! serve_ext_proc(listener, picker, None, std::future::pending()).await
//! # }
//! ```

use std::future::{Future, IntoFuture};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::routing::get;
use control::{Checks, ControlError, ControlPlane, Gate, Settlement};
use edge::ApiError;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use ep::processing_response::Response as Out;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::FleetError;
use crate::exposition;
use crate::picker::{PickError, PickRequest, Picker};
use crate::request::{RoutingKey, routing_key};
use crate::upstream::Pool;

pub use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer, SERVICE_NAME,
};

/// The filter-metadata namespace of the gateway's endpoint-subset hint.
pub const SUBSET_HINT_NAMESPACE: &str = "envoy.lb.subset_hint";
/// The key, in [`SUBSET_HINT_NAMESPACE`], of the endpoints (`ip:port`s) the pick must be among.
pub const SUBSET_HINT_KEY: &str = "x-gateway-destination-endpoint-subset";
/// The dynamic-metadata namespace the picked endpoint is written in.
pub const DESTINATION_NAMESPACE: &str = "envoy.lb";
/// The header (and dynamic-metadata key) naming the picked endpoint, `ip:port`.
pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";
/// The largest request body buffered by default; a larger one is answered 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// How often the health service re-reads the pool.
pub const HEALTH_POLL: Duration = Duration::from_millis(150);

/// Bytes per body chunk streamed back to the gateway.
const CHUNK_BYTES: usize = 64 << 10;
/// Responses queued per stream before the stream's task waits for the gateway.
const QUEUE: usize = 32;

/// Counts kept by the endpoint picker, for its `/metrics`: one per answer to the gateway.
#[derive(Debug, Default)]
pub struct ExtProcStats {
    placed: AtomicU64,
    shed: AtomicU64,
    unavailable: AtomicU64,
    refused: AtomicU64,
    invalid: AtomicU64,
}

/// How the picker answered one request.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// A destination endpoint.
    Placed,
    /// 429: every eligible replica saturated.
    Shed,
    /// 503: no replica eligible.
    Unavailable,
    /// 401/403: the control plane refused the key (or 429 for its limits).
    Refused,
    /// 400/413: the body.
    Invalid,
}

impl ExtProcStats {
    fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Placed => &self.placed,
            Outcome::Shed => &self.shed,
            Outcome::Unavailable => &self.unavailable,
            Outcome::Refused => &self.refused,
            Outcome::Invalid => &self.invalid,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(outcome label, count)` for every outcome.
    pub fn outcomes(&self) -> [(&'static str, u64); 5] {
        [
            ("placed", self.placed.load(Ordering::Relaxed)),
            ("shed", self.shed.load(Ordering::Relaxed)),
            ("unavailable", self.unavailable.load(Ordering::Relaxed)),
            ("refused", self.refused.load(Ordering::Relaxed)),
            ("invalid", self.invalid.load(Ordering::Relaxed)),
        ]
    }
}

/// The `ExternalProcessor` service: places each request the gateway asks about.
#[derive(Debug, Clone)]
pub struct EndpointPicker {
    picker: Arc<Picker>,
    gate: Option<Gate>,
    max_body_bytes: usize,
    stats: Arc<ExtProcStats>,
}

impl EndpointPicker {
    /// A service picking with `picker`; with `control`, requests are authenticated and kept
    /// in their organisation's allowed regions.
    pub fn new(picker: Arc<Picker>, control: Option<Arc<ControlPlane>>) -> Self {
        EndpointPicker {
            picker,
            gate: control.map(|c| edge::gate(c, Settlement::Queued)),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            stats: Arc::new(ExtProcStats::default()),
        }
    }

    /// Its counts, for [`metrics_app`].
    pub fn stats(&self) -> &Arc<ExtProcStats> {
        &self.stats
    }

    /// The picker it places with.
    pub fn picker(&self) -> &Arc<Picker> {
        &self.picker
    }

    /// Sets the largest request body buffered (default [`DEFAULT_MAX_BODY_BYTES`]).
    pub fn with_max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self
    }
}

#[tonic::async_trait]
impl ExternalProcessor for EndpointPicker {
    type ProcessStream = ReceiverStream<Result<ep::ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ep::ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let exchange = Exchange::new(self.clone(), tx);
        tokio::spawn(exchange.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Whether the pool can serve: at least one healthy member.
fn pool_serving(pool: &Pool) -> bool {
    pool.snapshot().iter().any(|u| u.is_healthy())
}

async fn report_health(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", SERVICE_NAME, "readiness"] {
        reporter.set_service_status(service, status).await;
    }
}

async fn watch_health(pool: Arc<Pool>, reporter: HealthReporter, mut serving: bool) {
    loop {
        tokio::time::sleep(HEALTH_POLL).await;
        let now = pool_serving(&pool);
        if now != serving {
            tracing::debug!(serving = now, "ext_proc health changed");
            report_health(&reporter, now).await;
            serving = now;
        }
    }
}

/// Serves the endpoint picker (`envoy.service.ext_proc.v3.ExternalProcessor`) and the gRPC
/// health service on `listener` until `shutdown` completes.
pub async fn serve_ext_proc(
    listener: tokio::net::TcpListener,
    picker: Arc<Picker>,
    control: Option<Arc<ControlPlane>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), FleetError> {
    serve_endpoint_picker(listener, EndpointPicker::new(picker, control), shutdown).await
}

/// The picker's HTTP side, for a port of its own: `/metrics` (Prometheus text) and `/health`
/// (200 while the pool has a healthy member, else 503).
pub fn metrics_app(service: &EndpointPicker) -> Router {
    Router::new()
        .route("/metrics", get(picker_metrics))
        .route("/health", get(picker_health))
        .with_state((Arc::clone(&service.picker), Arc::clone(&service.stats)))
}

/// Serves [`metrics_app`] on `listener` until `shutdown` completes.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    service: &EndpointPicker,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
    axum::serve(listener, metrics_app(service))
        .with_graceful_shutdown(shutdown)
        .into_future()
}

type MetricsState = (Arc<Picker>, Arc<ExtProcStats>);

async fn picker_metrics(State((picker, stats)): State<MetricsState>) -> axum::response::Response {
    let mut out = String::new();
    exposition::write_counter(
        &mut out,
        "souverain_picker_requests_total",
        "Requests the endpoint picker answered the gateway about, by outcome.",
        "outcome",
        &stats.outcomes(),
    );
    exposition::write_upstreams(
        &mut out,
        "souverain_picker_upstream",
        &picker.pool().snapshot(),
        &exposition::SHARED,
    );
    exposition::response(out)
}

async fn picker_health(State((picker, _)): State<MetricsState>) -> StatusCode {
    if pool_serving(picker.pool()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Serves `service` (`envoy.service.ext_proc.v3.ExternalProcessor`) and the gRPC health
/// service on `listener` until `shutdown` completes.
pub async fn serve_endpoint_picker(
    listener: tokio::net::TcpListener,
    service: EndpointPicker,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), FleetError> {
    let picker = Arc::clone(&service.picker);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    let pool = Arc::clone(picker.pool());
    let serving = pool_serving(&pool);
    report_health(&reporter, serving).await;
    let health = tokio::spawn(watch_health(pool, reporter, serving));
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, "endpoint picker (ext_proc) listening");
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(ExternalProcessorServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await;
    health.abort();
    result.map_err(|e| FleetError::Io {
        context: "serving the ext_proc endpoint picker".to_owned(),
        source: std::io::Error::other(e),
    })
}

/// Where one stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for the request headers.
    Headers,
    /// Buffering the request body.
    Body,
    /// Placed; the rest passes through.
    Placed,
}

/// The conversation about one HTTP request.
struct Exchange {
    service: EndpointPicker,
    tx: mpsc::Sender<Result<ep::ProcessingResponse, Status>>,
    request_mode: BodySendMode,
    response_mode: Option<BodySendMode>,
    headers: HeaderMap,
    subset: Option<Vec<String>>,
    body: Vec<u8>,
    stage: Stage,
}

type Flow = ControlFlow<()>;

impl Exchange {
    fn new(
        service: EndpointPicker,
        tx: mpsc::Sender<Result<ep::ProcessingResponse, Status>>,
    ) -> Self {
        Exchange {
            service,
            tx,
            request_mode: BodySendMode::FullDuplexStreamed,
            response_mode: None,
            headers: HeaderMap::new(),
            subset: None,
            body: Vec::new(),
            stage: Stage::Headers,
        }
    }

    async fn run(mut self, mut inbound: Streaming<ep::ProcessingRequest>) {
        loop {
            let message = match inbound.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%status, "ext_proc stream ended with an error");
                    break;
                }
            };
            if self.handle(message).await.is_break() {
                break;
            }
        }
    }

    async fn send(&self, response: ep::ProcessingResponse) -> Flow {
        match self.tx.send(Ok(response)).await {
            Ok(()) => Flow::Continue(()),
            Err(_) => Flow::Break(()),
        }
    }

    async fn fail(&self, status: Status) -> Flow {
        tracing::debug!(%status, "ext_proc stream refused");
        let _ = self.tx.send(Err(status)).await;
        Flow::Break(())
    }

    async fn handle(&mut self, message: ep::ProcessingRequest) -> Flow {
        if let Some(config) = &message.protocol_config {
            self.request_mode = BodySendMode::try_from(config.request_body_mode)
                .unwrap_or(BodySendMode::FullDuplexStreamed);
            self.response_mode = BodySendMode::try_from(config.response_body_mode).ok();
        }
        if self.stage != Stage::Placed
            && self.subset.is_none()
            && let Some(subset) = subset_hint(message.metadata_context.as_ref())
        {
            self.subset = Some(subset);
        }
        let Some(request) = message.request else {
            return Flow::Continue(());
        };
        use ep::processing_request::Request as In;
        match request {
            In::RequestHeaders(headers) => self.request_headers(headers).await,
            In::RequestBody(body) => self.request_body(body).await,
            In::RequestTrailers(_) => {
                if self.stage == Stage::Body {
                    self.place(true).await?;
                }
                self.send(reply(Out::RequestTrailers(ep::TrailersResponse::default())))
                    .await
            }
            In::ResponseHeaders(_) => {
                self.send(reply(Out::ResponseHeaders(ep::HeadersResponse {
                    response: Some(ep::CommonResponse::default()),
                })))
                .await
            }
            In::ResponseBody(body) => {
                let streamed = matches!(
                    self.response_mode,
                    Some(BodySendMode::FullDuplexStreamed | BodySendMode::Grpc)
                );
                let response = if streamed {
                    streamed_body(body.body, body.end_of_stream)
                } else {
                    ep::CommonResponse::default()
                };
                self.send(reply(Out::ResponseBody(ep::BodyResponse {
                    response: Some(response),
                })))
                .await
            }
            In::ResponseTrailers(_) => {
                self.send(reply(
                    Out::ResponseTrailers(ep::TrailersResponse::default()),
                ))
                .await
            }
        }
    }

    async fn request_headers(&mut self, headers: ep::HttpHeaders) -> Flow {
        if self.stage != Stage::Headers {
            return self
                .fail(Status::invalid_argument("request headers arrived twice"))
                .await;
        }
        self.headers = header_map(headers.headers.as_ref());
        if headers.end_of_stream {
            return self.place(false).await;
        }
        match self.request_mode {
            BodySendMode::FullDuplexStreamed => {
                self.stage = Stage::Body;
                Flow::Continue(())
            }
            BodySendMode::Buffered => {
                self.stage = Stage::Body;
                self.send(reply(Out::RequestHeaders(ep::HeadersResponse {
                    response: Some(ep::CommonResponse::default()),
                })))
                .await
            }
            other => {
                tracing::debug!(
                    mode = other.as_str_name(),
                    "request body mode without buffering: placing from the headers"
                );
                self.place(false).await
            }
        }
    }

    async fn request_body(&mut self, body: ep::HttpBody) -> Flow {
        match self.stage {
            Stage::Placed => {
                // Header-placed modes: the body passes through as it is.
                let response = if self.request_mode == BodySendMode::Grpc {
                    streamed_body(body.body, body.end_of_stream)
                } else {
                    ep::CommonResponse::default()
                };
                return self
                    .send(reply(Out::RequestBody(ep::BodyResponse {
                        response: Some(response),
                    })))
                    .await;
            }
            // A body before any headers (request headers skipped): place from the body alone.
            Stage::Headers => self.stage = Stage::Body,
            Stage::Body => {}
        }
        let max = self.service.max_body_bytes;
        if self.body.len().saturating_add(body.body.len()) > max {
            tracing::debug!(max, "request body too large");
            self.service.stats.count(Outcome::Invalid);
            let message = format!("The request body is larger than {max} bytes.");
            let _ = self
                .send(immediate(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    error_json(&message, "invalid_request_error", "request_too_large"),
                    Vec::new(),
                    "request body too large",
                ))
                .await;
            return Flow::Break(());
        }
        self.body.extend_from_slice(&body.body);
        if body.end_of_stream {
            self.place(false).await
        } else {
            Flow::Continue(())
        }
    }

    /// Places the request (its body, if any, complete) and answers the gateway. `trailers`:
    /// the body ended with trailers rather than with an end-of-stream chunk.
    async fn place(&mut self, trailers: bool) -> Flow {
        let had_body = self.stage == Stage::Body;
        let parsed = if self.body.is_empty() {
            Value::Object(serde_json::Map::new())
        } else {
            match serde_json::from_slice::<Value>(&self.body) {
                Ok(value @ Value::Object(_)) => value,
                Ok(_) => {
                    return self
                        .refuse(
                            StatusCode::BAD_REQUEST,
                            "The request body must be a JSON object.",
                            "invalid_request_error",
                            "invalid_json",
                        )
                        .await;
                }
                Err(e) => {
                    let message = format!("We could not parse the JSON body of your request: {e}");
                    return self
                        .refuse(
                            StatusCode::BAD_REQUEST,
                            &message,
                            "invalid_request_error",
                            "invalid_json",
                        )
                        .await;
                }
            }
        };
        let key = routing_key(&parsed, &self.headers, self.service.picker.config());
        let regions = match &self.service.gate {
            None => None,
            Some(gate) => match authorize(gate, &self.headers, &key).await {
                Ok(regions) => Some(regions),
                Err(response) => {
                    self.service.stats.count(Outcome::Refused);
                    self.send(response).await?;
                    return Flow::Break(());
                }
            },
        };
        let picked = self.service.picker.pick(&PickRequest {
            model: &key.model,
            prefix: &key.prefix,
            session: key.session.as_deref(),
            regions: regions.as_deref(),
            subset: self.subset.as_deref(),
            exclude: &[],
        });
        let pick = match picked {
            Ok(pick) => pick,
            Err(PickError::NoneEligible { reason }) => {
                tracing::debug!(model = %key.model, reason, "no replica eligible: 503");
                let message = format!("No replica may serve this request now: {reason}.");
                return self
                    .refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &message,
                        "server_error",
                        "no_replica_available",
                    )
                    .await;
            }
            Err(PickError::Saturated) => {
                tracing::debug!(model = %key.model, "every eligible replica saturated: 429");
                self.service.stats.count(Outcome::Shed);
                let _ = self
                    .send(immediate(
                        StatusCode::TOO_MANY_REQUESTS,
                        error_json(
                            "Every replica that may serve this request is saturated; retry later.",
                            "server_error",
                            "server_overloaded",
                        ),
                        vec![("retry-after".to_owned(), b"1".to_vec())],
                        "every eligible replica saturated",
                    ))
                    .await;
                return Flow::Break(());
            }
        };
        let endpoint = pick.upstream.authority().to_owned();
        tracing::debug!(
            upstream = pick.upstream.name(),
            endpoint = %endpoint,
            model = %key.model,
            prefix_blocks = pick.prefix_blocks,
            body_bytes = self.body.len(),
            "ext_proc placed a request"
        );
        let mut set = vec![header_option(DESTINATION_ENDPOINT, endpoint.as_bytes())];
        if had_body && !self.body.is_empty() {
            set.push(header_option(
                "content-length",
                self.body.len().to_string().as_bytes(),
            ));
        }
        let common = ep::CommonResponse {
            header_mutation: Some(ep::HeaderMutation {
                set_headers: set,
                remove_headers: Vec::new(),
            }),
            clear_route_cache: true,
            ..Default::default()
        };
        let metadata = Some(destination_metadata(&endpoint));
        let buffered = had_body && self.request_mode == BodySendMode::Buffered;
        if buffered {
            // The headers were answered already; in BUFFERED mode the body's answer carries
            // the header mutation, and the body passes unchanged.
            self.send(ep::ProcessingResponse {
                dynamic_metadata: metadata,
                response: Some(Out::RequestBody(ep::BodyResponse {
                    response: Some(common),
                })),
                ..Default::default()
            })
            .await?;
        } else {
            self.send(ep::ProcessingResponse {
                dynamic_metadata: metadata,
                response: Some(Out::RequestHeaders(ep::HeadersResponse {
                    response: Some(common),
                })),
                ..Default::default()
            })
            .await?;
            if had_body {
                let body = std::mem::take(&mut self.body);
                let chunks: Vec<&[u8]> = if body.is_empty() {
                    vec![&[]]
                } else {
                    body.chunks(CHUNK_BYTES).collect()
                };
                let last = chunks.len().saturating_sub(1);
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let end = i == last && !trailers;
                    self.send(reply(Out::RequestBody(ep::BodyResponse {
                        response: Some(streamed_body(chunk.to_vec(), end)),
                    })))
                    .await?;
                }
            }
        }
        self.body = Vec::new();
        self.stage = Stage::Placed;
        self.service.stats.count(Outcome::Placed);
        pick.upstream.placed();
        self.service
            .picker
            .routed(&pick.upstream, &key.prefix, key.session.as_deref());
        Flow::Continue(())
    }

    /// Answers the gateway with an error (400 or 503) and ends the stream.
    async fn refuse(&self, status: StatusCode, message: &str, kind: &str, code: &str) -> Flow {
        self.service
            .stats
            .count(if status == StatusCode::SERVICE_UNAVAILABLE {
                Outcome::Unavailable
            } else {
                Outcome::Invalid
            });
        let _ = self
            .send(immediate(
                status,
                error_json(message, kind, code),
                Vec::new(),
                code,
            ))
            .await;
        Flow::Break(())
    }
}

/// Authenticates the request's key and checks it may use the model; returns its
/// organisation's allowed regions, or the immediate response refusing it.
async fn authorize(
    gate: &Gate,
    headers: &HeaderMap,
    key: &RoutingKey,
) -> Result<Vec<String>, ep::ProcessingResponse> {
    let ctx = gate
        .authenticate(edge::bearer(headers))
        .await
        .map_err(refusal)?;
    let checks = Checks {
        model: &key.model,
        ..Checks::default()
    };
    gate.check(&ctx, checks).map_err(refusal)?;
    tracing::debug!(
        key = %ctx.key.id,
        org = %ctx.org.id,
        regions = ?ctx.org.allowed_regions,
        "ext_proc authenticated a request"
    );
    Ok(ctx.org.allowed_regions.clone())
}

/// The immediate response the HTTP API would give for a control-plane refusal.
fn refusal(err: ControlError) -> ep::ProcessingResponse {
    let details = err.to_string();
    tracing::debug!(error = %details, "ext_proc refused a request");
    let err = ApiError::from(err);
    let extra: Vec<(String, Vec<u8>)> = err
        .retry_after_s()
        .map(|s| vec![("retry-after".to_owned(), s.to_string().into_bytes())])
        .unwrap_or_default();
    let body = serde_json::to_vec(&err.body()).unwrap_or_default();
    immediate(err.status(), body, extra, &details)
}

fn reply(response: Out) -> ep::ProcessingResponse {
    ep::ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

fn streamed_body(body: Vec<u8>, end_of_stream: bool) -> ep::CommonResponse {
    ep::CommonResponse {
        body_mutation: Some(ep::BodyMutation {
            mutation: Some(ep::body_mutation::Mutation::StreamedResponse(
                ep::StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    }
}

fn header_option(name: &str, value: &[u8]) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: name.to_owned(),
            raw_value: value.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_value(s: &str) -> PbValue {
    PbValue {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": endpoint}}`.
fn destination_metadata(endpoint: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_ENDPOINT.to_owned(), string_value(endpoint))].into(),
    };
    Struct {
        fields: [(
            DESTINATION_NAMESPACE.to_owned(),
            PbValue {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

/// `{"error": {"message", "type", "param": null, "code"}}`.
fn error_json(message: &str, kind: &str, code: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    }))
    .unwrap_or_default()
}

/// An immediate response: the gateway answers the client with it and stops.
fn immediate(
    status: StatusCode,
    body: Vec<u8>,
    extra_headers: Vec<(String, Vec<u8>)>,
    details: &str,
) -> ep::ProcessingResponse {
    let mut set_headers = vec![header_option("content-type", b"application/json")];
    set_headers.extend(extra_headers.iter().map(|(k, v)| header_option(k, v)));
    reply(Out::ImmediateResponse(ep::ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(status.as_u16()),
        }),
        headers: Some(ep::HeaderMutation {
            set_headers,
            remove_headers: Vec::new(),
        }),
        body,
        grpc_status: None,
        details: details.chars().take(256).collect(),
    }))
}

/// The gateway's headers as an HTTP header map: the value is in `raw_value` (or, from older
/// gateways, `value`); pseudo-headers and invalid ones are left out.
fn header_map(headers: Option<&core::HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for h in headers.map(|h| h.headers.as_slice()).unwrap_or_default() {
        let value = if h.raw_value.is_empty() {
            h.value.as_bytes()
        } else {
            h.raw_value.as_slice()
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.key.as_bytes()),
            HeaderValue::from_bytes(value),
        ) && out.try_append(name, value).is_err()
        {
            break;
        }
    }
    out
}

/// The endpoint-subset hint, if the gateway sent one: a list of `ip:port` strings (a single
/// comma-separated string is accepted too). An empty list allows no endpoint.
fn subset_hint(metadata: Option<&core::Metadata>) -> Option<Vec<String>> {
    let value = metadata?
        .filter_metadata
        .get(SUBSET_HINT_NAMESPACE)?
        .fields
        .get(SUBSET_HINT_KEY)?;
    let mut out = Vec::new();
    let mut push = |s: &str| {
        for part in s.split(',') {
            let part = part.trim();
            if !part.is_empty() {
                out.push(part.to_owned());
            }
        }
    };
    match &value.kind {
        Some(Kind::ListValue(list)) => {
            for v in &list.values {
                if let Some(Kind::StringValue(s)) = &v.kind {
                    push(s);
                }
            }
        }
        Some(Kind::StringValue(s)) => push(s),
        _ => {}
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    #[test]
    fn headers_come_from_raw_or_plain_values() {
        let map = core::HeaderMap {
            headers: vec![
                core::HeaderValue {
                    key: ":path".into(),
                    raw_value: b"/v1/chat/completions".to_vec(),
                    ..Default::default()
                },
                core::HeaderValue {
                    key: "Authorization".into(),
                    raw_value: b"Bearer sk".to_vec(),
                    ..Default::default()
                },
                core::HeaderValue {
                    key: "x-session-id".into(),
                    value: "s1".into(),
                    ..Default::default()
                },
                core::HeaderValue {
                    key: "bad header".into(),
                    value: "x".into(),
                    ..Default::default()
                },
            ],
        };
        let h = header_map(Some(&map));
        assert_eq!(h.len(), 2);
        assert_eq!(h["authorization"], "Bearer sk");
        assert_eq!(h["x-session-id"], "s1");
        assert!(header_map(None).is_empty());
    }

    #[test]
    fn the_subset_hint_is_read_from_filter_metadata() {
        let list = |items: &[&str]| PbValue {
            kind: Some(Kind::ListValue(ListValue {
                values: items.iter().map(|s| string_value(s)).collect(),
            })),
        };
        let metadata = |value: PbValue| core::Metadata {
            filter_metadata: [(
                SUBSET_HINT_NAMESPACE.to_owned(),
                Struct {
                    fields: [(SUBSET_HINT_KEY.to_owned(), value)].into(),
                },
            )]
            .into(),
            ..Default::default()
        };
        assert_eq!(
            subset_hint(Some(&metadata(list(&["10.0.0.1:8000", " 10.0.0.2:8000 "])))),
            Some(vec!["10.0.0.1:8000".to_owned(), "10.0.0.2:8000".to_owned()])
        );
        assert_eq!(subset_hint(Some(&metadata(list(&[])))), Some(vec![]));
        assert_eq!(
            subset_hint(Some(&metadata(string_value("a:1,b:2")))),
            Some(vec!["a:1".to_owned(), "b:2".to_owned()])
        );
        assert_eq!(subset_hint(Some(&core::Metadata::default())), None);
        assert_eq!(subset_hint(None), None);
    }

    #[test]
    fn immediate_responses_carry_openai_errors() {
        let r = immediate(
            StatusCode::SERVICE_UNAVAILABLE,
            error_json("m", "server_error", "c"),
            vec![],
            "d",
        );
        let Some(Out::ImmediateResponse(i)) = r.response else {
            panic!("not an immediate response");
        };
        assert_eq!(i.status.map(|s| s.code), Some(503));
        let body: Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["code"], "c");
        let meta = destination_metadata("1.2.3.4:5");
        let Some(Kind::StructValue(inner)) = &meta.fields[DESTINATION_NAMESPACE].kind else {
            panic!("no namespace");
        };
        assert_eq!(
            inner.fields[DESTINATION_ENDPOINT].kind,
            Some(Kind::StringValue("1.2.3.4:5".into()))
        );
    }
}
