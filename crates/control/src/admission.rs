//! The admission flow, written once for every front: `serve --auth`'s middleware, the router
//! (`route`) and the Gateway API endpoint picker (`picker`).
//!
//! A request goes through four steps, each a method of [`Gate`]:
//!
//! 1. [`Gate::authenticate`]: the presented key (or why none could be read, audited) becomes
//!    a [`KeyContext`], from the key cache when it can answer, else from the store.
//! 2. [`Gate::check`]: the deployment's region, the key's model list and its request rate
//!    ([`Checks`] says which apply), in memory.
//! 3. [`Gate::reserve`]: prompt plus completion limit from the key's token bucket and budget,
//!    from this process's budget lease when it covers them, else in the store.
//! 4. [`Gate::settle`]: the request's real use, however it ended; committed before the
//!    answer ends ([`Settlement::Committed`], `serve`) or queued for the group-committing
//!    writer, whose commit it awaits ([`Settlement::Queued`], the router).
//!
//! A request refused after its key is known is recorded as the key's use with no tokens
//! ([`Gate::record_refusal`]). The gate knows nothing of HTTP: the front gives it the status
//! each refusal is answered with, through the function it was built with.

use std::sync::Arc;
use std::time::Instant;

use crate::error::{ControlError, Denial};
use crate::plane::{ControlPlane, Outcome, Reservation};
use crate::types::KeyContext;

/// When a settlement reaches the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Before [`Gate::settle`] returns: a response received is a response metered.
    Committed,
    /// Queued for the control plane's writer thread, which commits settlements in groups
    /// ([`ControlPlane::settle_queued`]); the in-memory part (rate bucket, lease) is done at
    /// once, and [`Gate::settle`] returns when the group is committed (at most
    /// [`QUEUED_COMMIT_WAIT`]), or at once while the store is down: a response received is a
    /// response metered, `kill -9` included, yet many share one transaction.
    Queued,
}

/// How long [`Gate::settle`] waits for a queued settlement's commit before the answer goes
/// on without it (the settlement stays queued).
pub const QUEUED_COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which in-memory checks [`Gate::check`] makes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checks<'a> {
    /// The key's organisation may be served in this deployment's region.
    pub region: bool,
    /// The key may use this model (nothing is checked for an empty name).
    pub model: &'a str,
    /// Take one request from the key's requests-per-minute bucket.
    pub request_rate: bool,
}

/// The HTTP status a front answers a control-plane error with (recorded in usage records).
pub type StatusOf = fn(&ControlError) -> u16;

/// The admission flow over one control plane.
#[derive(Clone, Debug)]
pub struct Gate {
    control: Arc<ControlPlane>,
    settlement: Settlement,
    status_of: StatusOf,
}

impl Gate {
    /// A gate settling as `settlement` says, recording refusals with the status `status_of`
    /// gives them.
    pub fn new(control: Arc<ControlPlane>, settlement: Settlement, status_of: StatusOf) -> Self {
        Gate {
            control,
            settlement,
            status_of,
        }
    }

    /// The control plane behind the gate.
    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.control
    }

    /// The status a refusal is answered with, as the front maps it.
    pub fn status_of(&self, err: &ControlError) -> u16 {
        (self.status_of)(err)
    }

    /// Step 1: the key presented with the request, or why none could be read (recorded in
    /// the audit log, and answered as it is whether or not that record could be written).
    pub async fn authenticate(
        &self,
        presented: Result<String, Denial>,
    ) -> Result<Arc<KeyContext>, ControlError> {
        let presented = match presented {
            Ok(key) => key,
            Err(denial) => {
                let audited = denial.clone();
                let _ = self
                    .control
                    .run(move |c| Err::<(), _>(c.refuse_authentication(audited)))
                    .await;
                return Err(denial.into());
            }
        };
        if let Some(ctx) = self.control.cached_key(&presented) {
            return Ok(ctx);
        }
        self.control
            .run(move |c| c.authenticate(&presented))
            .await
            .map(Arc::new)
    }

    /// Step 2: the checks `checks` names, in memory.
    pub fn check(&self, ctx: &KeyContext, checks: Checks<'_>) -> Result<(), ControlError> {
        if checks.region {
            self.control.check_region(ctx)?;
        }
        if !checks.model.is_empty() {
            self.control.check_model(ctx, checks.model)?;
        }
        if checks.request_rate {
            self.control.check_request_rate(ctx)?;
        }
        Ok(())
    }

    /// Step 3: sets aside `prompt_tokens + completion_limit` tokens: in memory when the
    /// key has no budget or this process's lease covers them, else in the store.
    pub async fn reserve(
        &self,
        ctx: &Arc<KeyContext>,
        prompt_tokens: u64,
        completion_limit: u64,
    ) -> Result<Reservation, ControlError> {
        if let Some(result) = self
            .control
            .try_reserve(ctx, prompt_tokens, completion_limit)
        {
            return result;
        }
        let ctx = Arc::clone(ctx);
        self.control
            .run(move |c| c.reserve(&ctx, prompt_tokens, completion_limit))
            .await
    }

    /// Step 4: records what the request used. A store that is down keeps the record queued
    /// (the control plane retries it), which is logged, not answered.
    pub async fn settle(
        &self,
        ctx: &Arc<KeyContext>,
        reservation: Option<Reservation>,
        outcome: Outcome,
    ) {
        match self.settlement {
            Settlement::Queued => {
                if !self
                    .control
                    .settle_queued(ctx, reservation.as_ref(), outcome, QUEUED_COMMIT_WAIT)
                    .await
                {
                    tracing::warn!("usage not recorded yet");
                }
            }
            Settlement::Committed => {
                let ctx = Arc::clone(ctx);
                if let Err(err) = self
                    .control
                    .run(move |c| c.settle(&ctx, reservation.as_ref(), outcome))
                    .await
                {
                    tracing::warn!(error = %err, "usage not recorded yet");
                }
            }
        }
    }

    /// Records a request refused after its key was known (by a check, a reservation or the
    /// front's own validation, answered with `http_status`) as the key's use with no tokens.
    pub async fn record_refusal(
        &self,
        ctx: &Arc<KeyContext>,
        model: &str,
        started: Instant,
        http_status: u16,
    ) {
        self.settle(ctx, None, rejected_outcome(model, started, http_status))
            .await;
    }

    /// Steps 1 to 3 for a front that knows the whole request on arrival (the router): the
    /// key, the checks, and the reservation; a refusal after the key is known is recorded.
    pub async fn admit(
        &self,
        presented: Result<String, Denial>,
        checks: Checks<'_>,
        prompt_tokens: u64,
        completion_limit: u64,
        started: Instant,
    ) -> Result<(Arc<KeyContext>, Reservation), ControlError> {
        let ctx = self.authenticate(presented).await?;
        let result = match self.check(&ctx, checks) {
            Ok(()) => self.reserve(&ctx, prompt_tokens, completion_limit).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(reservation) => Ok((ctx, reservation)),
            Err(err) => {
                let status = self.status_of(&err);
                self.record_refusal(&ctx, checks.model, started, status)
                    .await;
                Err(err)
            }
        }
    }
}

/// The usage record of a request refused before it generated anything.
pub fn rejected_outcome(model: &str, started: Instant, http_status: u16) -> Outcome {
    Outcome {
        request_id: format!("req-{}", crate::keys::random_base62(24)),
        model: model.to_owned(),
        prompt_tokens: 0,
        completion_tokens: 0,
        reasoning_tokens: 0,
        ttft_us: None,
        duration_us: micros_since(started),
        status: "rejected".to_owned(),
        http_status,
        content: None,
        energy: None,
    }
}

/// Microseconds since `started`, saturating.
pub fn micros_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}
