//! Souverain's sovereign control plane: organisations, projects within them and API keys
//! within projects; per-key model lists, rate limits, token budgets, expiry and revocation;
//! usage metering; a tamper-evident audit log; data residency and retention.
//!
//! The HTTP layer calls a [`ControlPlane`]; the control plane keeps its state in a [`Store`]
//! ([`SqliteStore`], embedded, or [`PostgresStore`]). It knows nothing of HTTP, models or
//! kernels: the server tells it what a request asked for and how it ended.
//!
//! ```
//! use std::sync::Arc;
//! use souverain_control::{ControlConfig, ControlPlane, KeyPolicy, SqliteStore};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(SqliteStore::open_in_memory()?);
//! let plane = ControlPlane::new(store, ControlConfig::new("eu-west-paris", b"server secret".to_vec()));
//! let org = plane.create_org("admin", "Acme", None)?;
//! let project = plane.create_project("admin", &org.id, "chatbot", None)?;
//! let key = plane.create_key("admin", &project.id, "prod", KeyPolicy::default())?;
//!
//! // The plaintext is shown once; only its salted hash is stored.
//! let ctx = plane.authenticate(&key.plaintext)?;
//! assert_eq!(ctx.org.id, org.id);
//! plane.check_region(&ctx)?;
//! assert!(plane.verify_audit()?.is_intact());
//! # Ok(())
//! # }
//! ```

pub mod admission;
pub mod audit;
mod error;
mod hot;
pub mod keys;
mod plane;
mod ratelimit;
pub mod store;
pub mod time;
mod types;
pub mod usage;

pub use crate::admission::{Checks, Gate, QUEUED_COMMIT_WAIT, Settlement, rejected_outcome};
pub use crate::audit::{AuditDraft, AuditEntry, AuditHead, Tamper, VerifyReport};
pub use crate::error::{ControlError, Denial, RateLimitKind, StoreError};
pub use crate::plane::{
    BudgetStatus, ControlConfig, ControlPlane, CreatedKey, HOLDER_BEAT, HOLDER_TIMEOUT,
    MAX_STORED_FIELD_CHARS, MAX_STORED_RESPONSE_BYTES, ObjectAudit, Outcome, Reservation,
    valid_region,
};
pub use crate::ratelimit::RateLimiter;
pub use crate::store::{Holder, HolderRow, Mutation, PostgresStore, SqliteStore, Store};
pub use crate::time::{Clock, ManualClock, SystemClock};
pub use crate::types::{
    Budget, BudgetPeriod, EnergySource, EnergyUse, KeyContext, KeyPolicy, KeyRecord, ObjectFilter,
    ObjectKind, Organisation, Project, RetainedContent, StoredObject, StoredResponse, UsageFilter,
    UsageRecord,
};
pub use crate::usage::{GroupBy, UsageGroup};
