//! A request under `--auth`, from the middleware's admission to its settlement.
//!
//! The middleware (`middleware::authenticate`) authenticates the key and checks the
//! deployment's region, then hands the handler an [`Admission`]. The handler parses the body
//! (once, with [`AdmittedJson`]), which names the model: the admission checks the key's model
//! list and request rate. Once the prompt is tokenised the handler calls
//! [`Admission::reserve`], which reserves prompt plus completion limit from the token bucket
//! and the budget (429 `insufficient_quota`), and [`Meter::track`] wraps the engine's event
//! channel so that the request is settled to its real token counts when it ends, however it
//! ends (done, failed, client gone). The settlement commits before the last event reaches the
//! client, so a response received is a response metered. Every step is the control plane's
//! one admission flow ([`control::Gate`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use control::admission::micros_since;
use control::{Checks, Gate, KeyContext, Outcome, Reservation};
use edge::{Json, parse_json, read_json_body};
use engine::{EngineError, Event};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::error::{ApiError, engine_error};

/// An engine event tagged with the index of the choice it belongs to.
pub(crate) type Tagged = (u32, Event);

/// A request body that names the model it asks for.
pub(crate) trait NamesModel {
    /// The `model` field, when it is a string.
    fn model_name(&self) -> Option<&str>;
}

/// A JSON body parsed once into `T`; under `--auth` the model it names is then checked
/// against the key's list and the key's request rate is taken, before the handler validates
/// anything else (a 403 or 429 here, recorded as the key's use by the middleware).
pub(crate) struct AdmittedJson<T> {
    pub(crate) body: T,
    pub(crate) admission: Option<Admission>,
}

impl<S, T> FromRequest<S> for AdmittedJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + NamesModel,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let admission = req.extensions().get::<Admission>().cloned();
        let Some(admission) = admission else {
            let Json(body) = Json::<T>::from_request(req, state).await?;
            return Ok(AdmittedJson {
                body,
                admission: None,
            });
        };
        let bytes = read_json_body(req, state).await?;
        let body: T = parse_json(&bytes)?;
        admission.admit(body.model_name().unwrap_or_default(), &bytes)?;
        Ok(AdmittedJson {
            body,
            admission: Some(admission),
        })
    }
}

/// The key behind an authenticated request and the gate it came through: what a handler
/// needs to read or write the key's own state (its project's stored responses). Put in every
/// authenticated request's extensions by the middleware.
#[derive(Clone)]
pub(crate) struct Caller {
    pub(crate) gate: Gate,
    pub(crate) ctx: Arc<KeyContext>,
}

impl Caller {
    /// Whether the key's project keeps content (a retention is set): zero retention, the
    /// default, keeps nothing.
    pub(crate) fn retains(&self) -> bool {
        self.ctx.project.retention_secs.is_some()
    }

    /// Runs `f` with the control plane and the key on the blocking pool, within the store's
    /// time limit.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&control::ControlPlane, &KeyContext) -> Result<T, control::ControlError>
            + Send
            + 'static,
    {
        let ctx = Arc::clone(&self.ctx);
        self.gate
            .control()
            .run(move |plane| f(plane, &ctx))
            .await
            .map_err(ApiError::from)
    }
}

/// A batch's request, sent in-process by the Batch API's runner: the key it runs as. The
/// middleware takes it instead of a presented key; no client can set a request extension.
#[derive(Clone)]
pub(crate) struct BatchIdentity {
    pub(crate) ctx: Arc<KeyContext>,
}

/// A request let through by the middleware, waiting for its body and then its prompt.
#[derive(Clone)]
pub(crate) struct Admission(Arc<AdmissionInner>);

struct AdmissionInner {
    gate: Gate,
    ctx: Arc<KeyContext>,
    /// The model the body names, once it is parsed.
    model: OnceLock<String>,
    /// The request body, kept only when the project retains content.
    prompt: OnceLock<String>,
    started: Instant,
    /// Set once a [`Meter`] is responsible for recording the request.
    metered: AtomicBool,
}

impl Admission {
    /// A request of the key `ctx`, arrived at `started`.
    pub(crate) fn new(gate: Gate, ctx: Arc<KeyContext>, started: Instant) -> Self {
        Admission(Arc::new(AdmissionInner {
            gate,
            ctx,
            model: OnceLock::new(),
            prompt: OnceLock::new(),
            started,
            metered: AtomicBool::new(false),
        }))
    }

    /// Whether a [`Meter`] has become responsible for recording the request.
    pub(crate) fn is_metered(&self) -> bool {
        self.0.metered.load(Ordering::SeqCst)
    }

    /// The model the body named (empty before it was read, or when it names none).
    pub(crate) fn model(&self) -> &str {
        self.0.model.get().map_or("", String::as_str)
    }

    /// The body is read: the key may use `model`, and one request is taken from its rate.
    /// The body is kept for the usage record when the key's project retains content.
    fn admit(&self, model: &str, body: &Bytes) -> Result<(), ApiError> {
        let inner = &self.0;
        let _ = inner.model.set(model.to_owned());
        if inner.ctx.project.retention_secs.is_some() {
            let _ = inner.prompt.set(String::from_utf8_lossy(body).into_owned());
        }
        let checks = Checks {
            model,
            request_rate: true,
            ..Checks::default()
        };
        inner.gate.check(&inner.ctx, checks).map_err(ApiError::from)
    }

    /// Reserves `prompt_tokens + completion_limit` tokens for the request.
    pub(crate) async fn reserve(
        &self,
        request_id: &str,
        prompt_tokens: usize,
        completion_limit: usize,
    ) -> Result<Meter, ApiError> {
        let inner = &self.0;
        let (prompt, limit) = (prompt_tokens as u64, completion_limit as u64);
        let reservation = inner
            .gate
            .reserve(&inner.ctx, prompt, limit)
            .await
            .map_err(ApiError::from)?;
        inner.metered.store(true, Ordering::SeqCst);
        Ok(Meter {
            admission: self.clone(),
            request_id: request_id.to_owned(),
            reservation,
            prompt_tokens: prompt,
            tap: Arc::new(engine::EnergyTap::default()),
        })
    }
}

/// Records one request's use when it ends.
pub(crate) struct Meter {
    admission: Admission,
    request_id: String,
    reservation: Reservation,
    prompt_tokens: u64,
    /// Given to the engine with the request's sequences: what they used, also when the
    /// request ends without the engine's `Done` (cancelled, failed).
    tap: Arc<engine::EnergyTap>,
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

/// How long a request that ended without the engine's `Done` waits for the engine to let go
/// of its sequences before it is recorded with the energy charged so far.
const TAP_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The control plane's record of energy the engine reports.
fn energy_use(e: engine::Energy) -> control::EnergyUse {
    control::EnergyUse {
        microjoules: e.microjoules,
        source: match e.kind {
            engine::EnergyKind::Measured => control::EnergySource::Measured,
            engine::EnergyKind::Modelled => control::EnergySource::Modelled,
        },
    }
}

impl Meter {
    /// The tap to give the engine with each of the request's sequences
    /// (`GenerateRequest::energy_tap`).
    pub(crate) fn energy_tap(&self) -> Arc<engine::EnergyTap> {
        Arc::clone(&self.tap)
    }

    /// The energy the engine charged to the request's sequences, once it has let go of them
    /// all (it does at its next step after a cancel; waited for at most
    /// [`TAP_RELEASE_WAIT`], a step on a slow machine included): for a request that ends
    /// without the engine's `Done`. Nobody waits on it: the client is gone or has its error.
    async fn tapped_energy(&self) -> Option<control::EnergyUse> {
        let deadline = tokio::time::Instant::now() + TAP_RELEASE_WAIT;
        while Arc::strong_count(&self.tap) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The engine's last `Arc` drop (a release) comes after its last charge.
        std::sync::atomic::fence(Ordering::Acquire);
        self.tap.energy().map(energy_use)
    }

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
                let err = engine_error(err);
                let status = err.status();
                tokio::spawn(async move {
                    self.settle(0, 0, 0, None, "failed", status, None, None)
                        .await;
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
        let mut output = self.admission.0.prompt.get().map(|_| String::new());
        let mut total = engine::Usage::default();
        let mut done = 0;
        let ending = loop {
            tokio::select! {
                event = engine_rx.recv() => match event {
                    Some((index, Event::Text(text))) => {
                        ttft_us.get_or_insert_with(|| micros_since(started));
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
                        total.add_choice(&usage);
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
                // The prompt as reserved: every prompt of a batch once, not once per choice.
                let (p, c, r) = (
                    prompt_tokens,
                    total.completion_tokens as u64,
                    total.reasoning_tokens as u64,
                );
                let energy = total.energy.map(energy_use);
                self.settle(p, c, r, ttft_us, "ok", StatusCode::OK, output, energy)
                    .await;
                let _ = tx.send(last);
            }
            ending @ (Ending::Failed(_) | Ending::Vanished) => {
                let energy = self.tapped_energy().await;
                self.settle(
                    prompt_tokens,
                    pieces,
                    0,
                    ttft_us,
                    "failed",
                    error,
                    output,
                    energy,
                )
                .await;
                if let Ending::Failed(failed) = ending {
                    let _ = tx.send(failed);
                }
            }
            Ending::Cancelled => {
                // Without a `Done`, the text pieces sent stand for the tokens generated.
                let client_closed = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
                let energy = self.tapped_energy().await;
                self.settle(
                    prompt_tokens,
                    pieces,
                    0,
                    ttft_us,
                    "cancelled",
                    client_closed,
                    output,
                    energy,
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
        energy: Option<control::EnergyUse>,
    ) {
        let inner = &self.admission.0;
        let content = match (inner.prompt.get(), output) {
            (Some(prompt), Some(output)) => Some((prompt.clone(), output)),
            _ => None,
        };
        let outcome = Outcome {
            request_id: self.request_id,
            model: self.admission.model().to_owned(),
            prompt_tokens,
            completion_tokens,
            reasoning_tokens,
            ttft_us,
            duration_us: micros_since(inner.started),
            status: status.to_owned(),
            http_status: http_status.as_u16(),
            content,
            energy,
        };
        inner
            .gate
            .settle(&inner.ctx, Some(self.reservation), outcome)
            .await;
    }
}

impl NamesModel for crate::openai::ChatCompletionRequest {
    fn model_name(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

impl NamesModel for crate::openai::CompletionRequest {
    fn model_name(&self) -> Option<&str> {
        self.model.as_deref()
    }
}
