//! [`ControlPlane`]: the operations the server and the admin tools call, over a [`Store`].
//!
//! Each admin action and its audit entry commit together. A request goes through
//! [`ControlPlane::authenticate`] (key, revocation, expiry), the region and model checks, the
//! request-rate bucket, then [`ControlPlane::reserve`] once its prompt is tokenised (the
//! token-rate bucket, then the budget, reserved atomically in the store for the prompt plus
//! the most the completion may take), and at its end [`ControlPlane::settle`], which turns the
//! reservation into actual use and writes the usage record, the retained content (projects
//! that opted in) and the `key.use` audit entry in one transaction.
//!
//! A settlement the store cannot take (it is down) waits in memory and is retried before the
//! next one and by the background task, so a database outage delays records, not loses them
//! (unless the process dies during the outage).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::audit::{self, AuditDraft, AuditEntry, VerifyReport};
use crate::error::{ControlError, Denial, RateLimitKind, StoreError};
use crate::hot::{self, KeyCache, Leases, MAX_GROUP, Pending, Writer, commit_group};
use crate::keys;
use crate::ratelimit::{RateLimiter, Which};
use crate::store::{Holder, HolderRow, Mutation, Store};
use crate::time::{Clock, SystemClock};
use crate::types::{
    EnergyUse, KeyContext, KeyPolicy, KeyRecord, ObjectFilter, ObjectKind, Organisation, Project,
    RetainedContent, StoredObject, StoredResponse, UsageFilter, UsageRecord,
};

/// The longest a name may be, in characters.
const MAX_NAME_CHARS: usize = 200;
/// The most characters of a request's own strings (model name, status, request id) that a
/// usage record or an audit entry keeps: a client's 3 MB `model` must not become 3 MB of
/// storage (twice: record and audit).
pub const MAX_STORED_FIELD_CHARS: usize = 256;
/// The most bytes a stored response may hold, its input items and its response object
/// together: a chain of `previous_response_id`s cannot grow a row without bound.
pub const MAX_STORED_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// The longest retention a project may ask for: ten years.
const MAX_RETENTION_SECS: i64 = 10 * 366 * 86_400;
/// Settlements kept in memory while the store is down; beyond this the oldest are dropped
/// (and logged).
const MAX_BACKLOG: usize = 100_000;

/// How often a serving process tells the store it is alive ([`ControlPlane::keep_alive`]).
pub const HOLDER_BEAT: Duration = Duration::from_secs(5);
/// How long a holder of budget reservations may go unseen before another process takes it
/// for dead and gives back what it held.
pub const HOLDER_TIMEOUT: Duration = Duration::from_secs(30);

/// The machine, boot and process namespace this process runs in: two processes with the
/// same value see the same pids.
fn process_host() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let pid_ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let host = format!(
        "{}/{}/{}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id"),
        pid_ns
    );
    host.chars().take(MAX_STORED_FIELD_CHARS).collect()
}

/// Whether process `pid` of this namespace is running (not gone, not a zombie). Where
/// `/proc` is missing the answer is yes, and only the timeout tells a dead holder.
fn process_alive(pid: i64) -> bool {
    if !std::path::Path::new("/proc/self").exists() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

/// How the control plane is set up.
#[derive(Clone)]
pub struct ControlConfig {
    /// This deployment's region label, e.g. `eu-west-paris`.
    pub region: String,
    /// The server secret that keys the hashes of API keys. Losing it invalidates every key.
    pub key_hash_secret: Vec<u8>,
    /// The admin API's key; `None` disables the admin API.
    pub admin_key: Option<String>,
    /// How long a store call may take before the request is answered "unavailable".
    pub store_timeout: Duration,
    /// How long an authenticated key may be used again without reading the store (zero: read
    /// it for every request). Revocations and other admin changes made through this process
    /// take effect at once; made by another process, within this time.
    pub key_cache_ttl: Duration,
    /// Tokens of a key's budget reserved in the store at a time and handed to requests from
    /// memory (zero: every request reserves in the store). See [`ControlPlane::reserve`].
    pub budget_lease_tokens: u64,
}

impl std::fmt::Debug for ControlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConfig")
            .field("region", &self.region)
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<set>"))
            .field("store_timeout", &self.store_timeout)
            .field("key_cache_ttl", &self.key_cache_ttl)
            .field("budget_lease_tokens", &self.budget_lease_tokens)
            .finish_non_exhaustive()
    }
}

impl ControlConfig {
    /// A configuration for `region` with the given hash secret, no admin key, a 5 s store
    /// timeout, no key cache and no budget leases.
    pub fn new(region: impl Into<String>, key_hash_secret: impl Into<Vec<u8>>) -> Self {
        ControlConfig {
            region: region.into(),
            key_hash_secret: key_hash_secret.into(),
            admin_key: None,
            store_timeout: Duration::from_secs(5),
            key_cache_ttl: Duration::ZERO,
            budget_lease_tokens: 0,
        }
    }
}

/// A key just created: its record and the plaintext, shown once.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// What is stored.
    pub record: KeyRecord,
    /// The key itself (`sk-sov-...`): not stored anywhere.
    pub plaintext: String,
}

/// What [`ControlPlane::reserve`] set aside for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Tokens reserved: the prompt plus the most the completion may take.
    pub tokens: u64,
    /// The budget period the tokens were reserved in, if the key has a budget.
    pub budget_period_start_ms: Option<i64>,
    /// Whether tokens were taken from the key's token-rate bucket.
    pub rate_limited: bool,
    /// Whether the budget's tokens came from this process's lease (where unused ones go back).
    pub leased: bool,
}

/// A key's budget in the current period ([`ControlPlane::budget_status`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BudgetStatus {
    /// The key.
    pub key_id: String,
    /// `hour`, `day` or `month`.
    pub period: String,
    /// When the current period started.
    pub period_start_ms: i64,
    /// The budget.
    pub limit_tokens: u64,
    /// Tokens counted against it: used, reserved by requests in flight, held by leases.
    pub counted_tokens: u64,
}

/// How a request ended, for [`ControlPlane::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The request's id (the response id).
    pub request_id: String,
    /// The model asked for.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Time to the first text.
    pub ttft_us: Option<u64>,
    /// Time to the end.
    pub duration_us: u64,
    /// `ok`, `cancelled`, `failed` or `rejected`.
    pub status: String,
    /// The HTTP status answered.
    pub http_status: u16,
    /// The prompt and output, kept only if the project retains content.
    pub content: Option<(String, String)>,
    /// The energy the request took, where the engine metered it.
    pub energy: Option<EnergyUse>,
}

/// Who changed a Batch API object, for the audit log.
#[derive(Debug, Clone)]
pub struct ObjectAudit<'a> {
    /// The key that made or changed it.
    pub key_id: &'a str,
    /// `file.create`, `batch.create`, `batch.cancel`...
    pub action: &'a str,
    /// The object's id.
    pub target: &'a str,
    /// Details, JSON.
    pub detail: serde_json::Value,
}

/// The control plane: the store, the rate limiter and the configuration.
pub struct ControlPlane {
    store: Arc<dyn Store>,
    config: ControlConfig,
    clock: Arc<dyn Clock>,
    limiter: RateLimiter,
    backlog: Mutex<VecDeque<Pending>>,
    keys: KeyCache,
    leases: Arc<Leases>,
    writer: Writer,
    /// This process, as the holder of its budget reservations in the store.
    holder: Holder,
    /// Whether this process has registered itself as a holder (by a keep-alive).
    registered: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("store", &self.store.backend_name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn check_name(field: &'static str, name: &str) -> Result<(), ControlError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(ControlError::invalid(field, "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(ControlError::invalid(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ControlError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// `text` cut to its first [`MAX_STORED_FIELD_CHARS`] characters.
fn bounded(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_STORED_FIELD_CHARS) {
        text.truncate(cut);
    }
    text
}

/// Whether `region` is a valid region label: 1 to 64 of `a-z`, `0-9` and `-`.
pub fn valid_region(region: &str) -> bool {
    (1..=64).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_regions(regions: &[String]) -> Result<(), ControlError> {
    match regions.iter().find(|r| !valid_region(r)) {
        Some(bad) => Err(ControlError::invalid(
            "allowed_regions",
            format!("`{bad}` is not a region label (1 to 64 of a-z, 0-9 and -)"),
        )),
        None => Ok(()),
    }
}

impl ControlPlane {
    /// A control plane over `store`.
    pub fn new(store: Arc<dyn Store>, config: ControlConfig) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let holder = Holder {
            id: keys::random_base62(22),
            host: process_host(),
            pid: i64::from(std::process::id()),
            started_at_ms: clock.now_ms(),
        };
        let leases = Arc::new(Leases::new(config.budget_lease_tokens, holder.id.clone()));
        ControlPlane {
            writer: Writer::new(
                Arc::clone(&store),
                Arc::clone(&leases),
                Arc::clone(&clock),
                MAX_BACKLOG,
            ),
            keys: KeyCache::new(config.key_cache_ttl),
            leases,
            store,
            config,
            clock,
            limiter: RateLimiter::new(),
            backlog: Mutex::new(VecDeque::new()),
            holder,
            registered: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Replaces the clock (tests move time by hand): dates, budget periods, the key cache's
    /// time to live and the leases' idle time all follow it. Call it before the plane is used.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.writer.clock = Arc::clone(&clock);
        self.clock = clock;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// Now, by the control plane's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Runs a blocking control-plane call on tokio's blocking pool, giving up after the
    /// configured store timeout (the call goes on in the background; its effects, if any,
    /// still commit atomically).
    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, ControlError>
    where
        T: Send + 'static,
        F: FnOnce(&ControlPlane) -> Result<T, ControlError> + Send + 'static,
    {
        let plane = Arc::clone(self);
        let timeout = self.config.store_timeout;
        let task = tokio::task::spawn_blocking(move || f(&plane));
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ControlError::Task {
                detail: join.to_string(),
            }),
            Err(_) => Err(ControlError::Timeout {
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    fn draft(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> AuditDraft {
        AuditDraft {
            at_ms: self.now_ms(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail: detail.to_string(),
        }
    }

    fn commit(&self, mutations: Vec<Mutation>, draft: AuditDraft) -> Result<(), ControlError> {
        // An admin change may concern a cached key (revoked, its organisation's regions).
        self.keys.clear();
        self.store.commit(&mutations, Some(&draft))?;
        self.keys.clear();
        Ok(())
    }

    // ---- admin -------------------------------------------------------------------------

    /// Creates an organisation. Without `allowed_regions` it may be served in this
    /// deployment's region only.
    pub fn create_org(
        &self,
        actor: &str,
        name: &str,
        allowed_regions: Option<Vec<String>>,
    ) -> Result<Organisation, ControlError> {
        check_name("name", name)?;
        let allowed_regions = allowed_regions.unwrap_or_else(|| vec![self.config.region.clone()]);
        check_regions(&allowed_regions)?;
        let org = Organisation {
            id: format!("org_{}", keys::random_base62(16)),
            name: name.to_owned(),
            allowed_regions,
            created_at_ms: self.now_ms(),
        };
        let draft = self.draft(
            actor,
            "org.create",
            &org.id,
            json!({"name": org.name, "allowed_regions": org.allowed_regions}),
        );
        self.commit(vec![Mutation::InsertOrg(org.clone())], draft)?;
        Ok(org)
    }

    /// Replaces an organisation's allowed regions.
    pub fn set_org_regions(
        &self,
        actor: &str,
        org_id: &str,
        regions: Vec<String>,
    ) -> Result<Organisation, ControlError> {
        check_regions(&regions)?;
        let draft = self.draft(
            actor,
            "org.set_regions",
            org_id,
            json!({"allowed_regions": regions}),
        );
        self.commit(
            vec![Mutation::SetOrgRegions {
                org_id: org_id.to_owned(),
                regions,
            }],
            draft,
        )?;
        self.store.get_org(org_id)?.ok_or_else(|| {
            ControlError::Store(StoreError::NotFound {
                kind: "organization",
                id: org_id.to_owned(),
            })
        })
    }

    /// All organisations.
    pub fn list_orgs(&self) -> Result<Vec<Organisation>, ControlError> {
        Ok(self.store.list_orgs()?)
    }

    /// Creates a project. `retention_secs`: `None` keeps no content (the default); a number
    /// of seconds opts the project in to keeping prompts and outputs that long.
    pub fn create_project(
        &self,
        actor: &str,
        org_id: &str,
        name: &str,
        retention_secs: Option<i64>,
    ) -> Result<Project, ControlError> {
        check_name("name", name)?;
        if let Some(secs) = retention_secs
            && !(1..=MAX_RETENTION_SECS).contains(&secs)
        {
            return Err(ControlError::invalid(
                "retention_secs",
                format!("must be between 1 and {MAX_RETENTION_SECS} seconds"),
            ));
        }
        if self.store.get_org(org_id)?.is_none() {
            return Err(StoreError::NotFound {
                kind: "organization",
                id: org_id.to_owned(),
            }
            .into());
        }
        let project = Project {
            id: format!("proj_{}", keys::random_base62(16)),
            org_id: org_id.to_owned(),
            name: name.to_owned(),
            retention_secs,
            created_at_ms: self.now_ms(),
        };
        let draft = self.draft(
            actor,
            "project.create",
            &project.id,
            json!({"org_id": org_id, "name": name, "retention_secs": retention_secs}),
        );
        self.commit(vec![Mutation::InsertProject(project.clone())], draft)?;
        Ok(project)
    }

    /// An organisation's projects.
    pub fn list_projects(&self, org_id: &str) -> Result<Vec<Project>, ControlError> {
        Ok(self.store.list_projects(org_id)?)
    }

    /// Creates a key; the plaintext in the answer is the only copy.
    pub fn create_key(
        &self,
        actor: &str,
        project_id: &str,
        name: &str,
        policy: KeyPolicy,
    ) -> Result<CreatedKey, ControlError> {
        check_name("name", name)?;
        if policy.allowed_models.iter().any(|m| m.trim().is_empty()) {
            return Err(ControlError::invalid(
                "allowed_models",
                "model names must not be empty",
            ));
        }
        for (field, limit) in [
            ("requests_per_minute", policy.requests_per_minute),
            ("tokens_per_minute", policy.tokens_per_minute),
            ("budget.tokens", policy.budget.map(|b| b.tokens)),
        ] {
            if limit == Some(0) || limit.is_some_and(|l| l > i64::MAX as u64) {
                return Err(ControlError::invalid(
                    field,
                    "must be a positive number (leave it out for no limit)",
                ));
            }
        }
        if let Some(expires) = policy.expires_at_ms
            && expires <= self.now_ms()
        {
            return Err(ControlError::invalid("expires_at", "must be in the future"));
        }
        if self.store.get_project(project_id)?.is_none() {
            return Err(StoreError::NotFound {
                kind: "project",
                id: project_id.to_owned(),
            }
            .into());
        }
        let generated = keys::generate(&self.config.key_hash_secret);
        let record = KeyRecord {
            id: generated.id,
            project_id: project_id.to_owned(),
            name: name.to_owned(),
            policy,
            salt_hex: generated.salt_hex,
            hash_hex: generated.hash_hex,
            created_at_ms: self.now_ms(),
            revoked_at_ms: None,
        };
        let draft = self.draft(
            actor,
            "key.create",
            &record.id,
            json!({"project_id": project_id, "name": name, "policy": record.policy}),
        );
        self.commit(vec![Mutation::InsertKey(record.clone())], draft)?;
        Ok(CreatedKey {
            record,
            plaintext: generated.plaintext,
        })
    }

    /// A project's keys (without their hashes when serialised).
    pub fn list_keys(&self, project_id: &str) -> Result<Vec<KeyRecord>, ControlError> {
        Ok(self.store.list_keys(project_id)?)
    }

    /// A key's budget in the current period: its limit and the tokens counted against it
    /// (used, plus reserved by requests in flight and held by budget leases). `None` for a
    /// key without a budget; an unknown key is `NotFound`.
    pub fn budget_status(&self, key_id: &str) -> Result<Option<BudgetStatus>, ControlError> {
        let ctx = self
            .store
            .key_context(key_id)?
            .ok_or_else(|| StoreError::NotFound {
                kind: "key",
                id: key_id.to_owned(),
            })?;
        let Some(budget) = ctx.key.policy.budget else {
            return Ok(None);
        };
        let period_start_ms = budget.period.start_ms(self.now_ms());
        Ok(Some(BudgetStatus {
            key_id: key_id.to_owned(),
            period: budget.period.as_str().to_owned(),
            period_start_ms,
            limit_tokens: budget.tokens,
            counted_tokens: u64::try_from(self.store.budget_used(key_id, period_start_ms)?)
                .unwrap_or(0),
        }))
    }

    /// Revokes a key: it fails authentication from now on, in every process.
    pub fn revoke_key(&self, actor: &str, key_id: &str) -> Result<(), ControlError> {
        let draft = self.draft(actor, "key.revoke", key_id, json!({}));
        self.commit(
            vec![Mutation::RevokeKey {
                key_id: key_id.to_owned(),
                at_ms: self.now_ms(),
            }],
            draft,
        )
    }

    /// Usage records matching `filter`.
    pub fn usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, ControlError> {
        Ok(self.store.usage(filter)?)
    }

    /// The whole audit log.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>, ControlError> {
        Ok(self.store.audit_entries()?)
    }

    /// Checks the audit chain.
    pub fn verify_audit(&self) -> Result<VerifyReport, ControlError> {
        let entries = self.store.audit_entries()?;
        let head = self.store.audit_head()?;
        Ok(audit::verify(&entries, &head))
    }

    /// Checks a presented admin key in constant time. A failure is audited.
    pub fn check_admin_key(&self, presented: Option<&str>) -> Result<(), ControlError> {
        let denial = match (&self.config.admin_key, presented) {
            (Some(expected), Some(given)) if keys::secrets_equal(expected, given) => {
                return Ok(());
            }
            (_, None) => Denial::MissingKey,
            (None, Some(_)) | (Some(_), Some(_)) => Denial::UnknownKey,
        };
        let draft = self.draft(
            "anonymous",
            "admin.auth_failure",
            "",
            json!({"reason": denial.code()}),
        );
        self.record_best_effort(Vec::new(), draft);
        Err(denial.into())
    }

    // ---- requests ----------------------------------------------------------------------

    /// Records an authentication failure decided before a key could be read (no header, a
    /// header that is not `Bearer`), and returns it as the error to answer.
    pub fn refuse_authentication(&self, denial: Denial) -> ControlError {
        let draft = self.draft(
            "anonymous",
            "auth.failure",
            "",
            json!({"reason": denial.code(), "message": denial.to_string()}),
        );
        self.record_best_effort(Vec::new(), draft);
        denial.into()
    }

    /// Authenticates a presented key: well formed, known, secret matching, not revoked, not
    /// expired. Failures are audited with the key id when there is one.
    pub fn authenticate(&self, presented: &str) -> Result<KeyContext, ControlError> {
        let parsed = match keys::parse(presented) {
            Ok(parsed) => parsed,
            Err(reason) => {
                return Err(self.refuse_authentication(Denial::MalformedKey { reason }));
            }
        };
        let context = self.store.key_context(parsed.id)?;
        let denial = match &context {
            None => Denial::UnknownKey,
            Some(ctx)
                if !keys::verify(
                    &self.config.key_hash_secret,
                    &ctx.key.salt_hex,
                    &ctx.key.hash_hex,
                    parsed.secret,
                ) =>
            {
                Denial::UnknownKey
            }
            Some(ctx) if ctx.key.revoked_at_ms.is_some() => Denial::RevokedKey,
            Some(ctx)
                if ctx
                    .key
                    .policy
                    .expires_at_ms
                    .is_some_and(|at| at <= self.now_ms()) =>
            {
                Denial::ExpiredKey
            }
            Some(ctx) => {
                self.keys.put(ctx, self.clock.instant());
                return context.ok_or_else(|| Denial::UnknownKey.into());
            }
        };
        let draft = self.draft(
            "anonymous",
            "auth.failure",
            parsed.id,
            json!({"reason": denial.code(), "message": denial.to_string()}),
        );
        self.record_best_effort(Vec::new(), draft);
        Err(denial.into())
    }

    /// Whether the key's organisation may be served in this deployment's region.
    pub fn check_region(&self, ctx: &KeyContext) -> Result<(), Denial> {
        if ctx.org.allowed_regions.contains(&self.config.region) {
            Ok(())
        } else {
            Err(Denial::RegionNotAllowed {
                region: self.config.region.clone(),
            })
        }
    }

    /// Whether the key may use `model`.
    pub fn check_model(&self, ctx: &KeyContext, model: &str) -> Result<(), Denial> {
        if ctx.key.policy.allows_model(model) {
            Ok(())
        } else {
            Err(Denial::ModelNotAllowed {
                model: model.to_owned(),
            })
        }
    }

    /// Takes one request from the key's requests-per-minute bucket.
    pub fn check_request_rate(&self, ctx: &KeyContext) -> Result<(), Denial> {
        let Some(limit) = ctx.key.policy.requests_per_minute else {
            return Ok(());
        };
        self.limiter
            .take(&ctx.key.id, Which::Requests, limit, 1, self.clock.instant())
            .map_err(|retry_after_secs| Denial::RateLimited {
                kind: RateLimitKind::Requests,
                limit,
                retry_after_secs,
            })
    }

    /// The key's context from the key cache, when the cache is on and holds it: the presented
    /// secret is checked against the stored hash, and the revocation mark and the expiry
    /// date, as [`ControlPlane::authenticate`] does, without a trip to the store. `None` when
    /// the cache cannot answer; then call `authenticate` (which reads the store, audits a
    /// failure and fills the cache).
    pub fn cached_key(&self, presented: &str) -> Option<Arc<KeyContext>> {
        let parsed = keys::parse(presented).ok()?;
        let ctx = self.keys.get(parsed.id, self.clock.instant())?;
        let good = keys::verify(
            &self.config.key_hash_secret,
            &ctx.key.salt_hex,
            &ctx.key.hash_hex,
            parsed.secret,
        ) && ctx.key.revoked_at_ms.is_none()
            && ctx
                .key
                .policy
                .expires_at_ms
                .is_none_or(|at| at > self.now_ms());
        good.then_some(ctx)
    }

    /// Sets aside `prompt_tokens + completion_limit` tokens for a request: from the key's
    /// tokens-per-minute bucket, then from its budget, atomically in the store.
    ///
    /// With budget leases on ([`ControlConfig::budget_lease_tokens`]) the budget's tokens come
    /// from this process's lease on the key's budget; when the lease is short, the shortfall
    /// and a new lease (at most a sixteenth of the budget) are reserved in the store in one
    /// step, or the shortfall alone at the budget's edge.
    pub fn reserve(
        &self,
        ctx: &KeyContext,
        prompt_tokens: u64,
        completion_limit: u64,
    ) -> Result<Reservation, ControlError> {
        self.reserve_inner(ctx, prompt_tokens, completion_limit, true)
            .unwrap_or_else(|| {
                Err(ControlError::Task {
                    detail: "a blocking reservation did not run".to_owned(),
                })
            })
    }

    /// [`ControlPlane::reserve`] when it can be done without waiting on the store (the key
    /// has no budget, or its lease covers the request); `None` otherwise, with nothing taken.
    pub fn try_reserve(
        &self,
        ctx: &KeyContext,
        prompt_tokens: u64,
        completion_limit: u64,
    ) -> Option<Result<Reservation, ControlError>> {
        self.reserve_inner(ctx, prompt_tokens, completion_limit, false)
    }

    fn reserve_inner(
        &self,
        ctx: &KeyContext,
        prompt_tokens: u64,
        completion_limit: u64,
        may_block: bool,
    ) -> Option<Result<Reservation, ControlError>> {
        let tokens = prompt_tokens.saturating_add(completion_limit);
        let policy = &ctx.key.policy;
        if let Some(limit) = policy.tokens_per_minute
            && let Err(retry_after_secs) = self.limiter.take(
                &ctx.key.id,
                Which::Tokens,
                limit,
                tokens,
                self.clock.instant(),
            )
        {
            return Some(Err(Denial::RateLimited {
                kind: RateLimitKind::Tokens,
                limit,
                retry_after_secs,
            }
            .into()));
        }
        let refund_rate = || {
            if policy.tokens_per_minute.is_some() {
                self.limiter.give_back(&ctx.key.id, Which::Tokens, tokens);
            }
        };
        let mut budget_period_start_ms = None;
        let leased = self.leases.enabled();
        if let Some(budget) = policy.budget {
            let now = self.now_ms();
            let start = budget.period.start_ms(now);
            let taken = if leased {
                self.take_from_lease(&ctx.key.id, budget.tokens, start, tokens, may_block)
            } else if may_block {
                Some(
                    self.reserve_in_store(&ctx.key.id, start, budget.tokens, tokens)
                        .map(|r| {
                            r.map(|_| ()).map_err(|used| {
                                budget
                                    .tokens
                                    .saturating_sub(u64::try_from(used).unwrap_or(0))
                            })
                        }),
                )
            } else {
                None
            };
            match taken {
                Some(Ok(Ok(()))) => budget_period_start_ms = Some(start),
                Some(Ok(Err(remaining))) => {
                    refund_rate();
                    let retry_after_secs = budget
                        .period
                        .next_start_ms(now)
                        .map(|next| u64::try_from((next - now + 999) / 1000).unwrap_or(1).max(1));
                    return Some(Err(Denial::QuotaExceeded {
                        requested: tokens,
                        remaining,
                        retry_after_secs,
                    }
                    .into()));
                }
                Some(Err(err)) => {
                    refund_rate();
                    return Some(Err(err.into()));
                }
                None => {
                    refund_rate();
                    return None;
                }
            }
        }
        Some(Ok(Reservation {
            tokens,
            budget_period_start_ms,
            rate_limited: policy.tokens_per_minute.is_some(),
            leased,
        }))
    }

    /// Takes `tokens` from the key's lease in the period starting at `start`, topping the
    /// lease up from the store when it is short (only if `may_block`; else `None`). Returns
    /// `Ok(Err(remaining))` when the budget cannot cover the request.
    fn take_from_lease(
        &self,
        key_id: &str,
        limit: u64,
        start: i64,
        tokens: u64,
        may_block: bool,
    ) -> Option<Result<Result<(), u64>, StoreError>> {
        let lease = self.leases.of(key_id, start, self.clock.instant());
        let mut lease = if may_block {
            hot::lock(&lease)
        } else {
            lease.try_lock().ok()?
        };
        if lease.period_start_ms != start {
            // A new period: what is left of the old one's lease goes back to its period.
            if lease.available > 0 {
                let back = self
                    .leases
                    .give_back(key_id, lease.period_start_ms, lease.available);
                if !self.writer.push((vec![back], None)) {
                    tracing::error!(
                        "a budget lease could not be given back: too many settlements wait"
                    );
                }
            }
            lease.period_start_ms = start;
            lease.available = 0;
        }
        lease.last_used = self.clock.instant();
        if lease.available >= tokens {
            lease.available -= tokens;
            return Some(Ok(Ok(())));
        }
        if !may_block {
            return None;
        }
        let need = tokens - lease.available;
        let ahead = self.leases.chunk.min(limit / 16);
        let reserve = |n: u64| self.reserve_in_store(key_id, start, limit, n);
        if ahead > 0 {
            match reserve(need.saturating_add(ahead)) {
                Ok(Ok(_)) => {
                    lease.available = ahead;
                    return Some(Ok(Ok(())));
                }
                Ok(Err(_)) => {}
                Err(err) => return Some(Err(err)),
            }
        }
        Some(match reserve(need) {
            Ok(Ok(_)) => {
                lease.available = 0;
                Ok(Ok(()))
            }
            Ok(Err(used)) => Ok(Err(limit
                .saturating_sub(u64::try_from(used).unwrap_or(0))
                .saturating_add(lease.available))),
            Err(err) => Err(err),
        })
    }

    /// Reserves `tokens` of a key's budget in the store, held by this process.
    fn reserve_in_store(
        &self,
        key_id: &str,
        start: i64,
        limit: u64,
        tokens: u64,
    ) -> Result<Result<i64, i64>, StoreError> {
        let reserved = self.store.reserve_budget(
            &self.holder,
            self.now_ms(),
            key_id,
            start,
            to_i64(limit),
            to_i64(tokens),
        );
        if matches!(reserved, Ok(Ok(_))) {
            // The reservation registered this process as a holder.
            self.registered
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        reserved
    }

    /// Gives the unused part of a leased reservation back to the lease (or charges the
    /// lease for tokens used beyond it); what the lease cannot take right now (another
    /// period, a lease being topped up) is settled in the store instead. Either way the
    /// store learns what was used: tokens used stop being held by this process (so that a
    /// crash releases only what was never used), tokens back in the lease stay held.
    fn settle_lease(&self, key_id: &str, start: i64, reserved: u64, used: u64) -> Mutation {
        let settle = |reserved_tokens: u64| Mutation::SettleBudget {
            holder: self.holder.id.clone(),
            key_id: key_id.to_owned(),
            period_start_ms: start,
            reserved_tokens: to_i64(reserved_tokens),
            actual_tokens: to_i64(used),
        };
        let lease = self.leases.of(key_id, start, self.clock.instant());
        if let Ok(mut lease) = lease.try_lock()
            && lease.period_start_ms == start
        {
            lease.last_used = self.clock.instant();
            if used <= reserved {
                lease.available = lease.available.saturating_add(reserved - used);
                // The used tokens move from held to used; the rest stays held (the lease).
                return settle(used);
            }
            let extra = used - reserved;
            let covered = extra.min(lease.available);
            lease.available -= covered;
            // `reserved + covered` held tokens were used, the rest of `used` is new.
            return settle(reserved + covered);
        }
        settle(reserved)
    }

    /// Records how a request ended: settles its reservation (if any) to the tokens used and
    /// writes the usage record, the retained content (if the project keeps content) and the
    /// `key.use` audit entry in one transaction. If the store is down the settlement waits in
    /// memory and the error is returned; it is retried before the next settlement.
    pub fn settle(
        &self,
        ctx: &KeyContext,
        reservation: Option<&Reservation>,
        outcome: Outcome,
    ) -> Result<(), ControlError> {
        let (mutations, draft) = self.settlement(ctx, reservation, outcome);
        if self.backlog_is_empty() {
            return match self.store.commit(&mutations, Some(&draft)) {
                Ok(_) => Ok(()),
                Err(err @ StoreError::Unavailable { .. }) => {
                    self.push_backlog((mutations, Some(draft)));
                    Err(err.into())
                }
                Err(err) => Err(err.into()),
            };
        }
        // Records wait already: this one goes after them, in the same transactions.
        self.push_backlog((mutations, Some(draft)));
        match self.flush_backlog() {
            Ok(()) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    fn settlement(
        &self,
        ctx: &KeyContext,
        reservation: Option<&Reservation>,
        outcome: Outcome,
    ) -> (Vec<Mutation>, AuditDraft) {
        let outcome = Outcome {
            request_id: bounded(outcome.request_id),
            model: bounded(outcome.model),
            status: bounded(outcome.status),
            ..outcome
        };
        let now = self.now_ms();
        let used = outcome
            .prompt_tokens
            .saturating_add(outcome.completion_tokens);
        let mut mutations = Vec::with_capacity(3);
        if let Some(r) = reservation {
            if r.rate_limited && r.tokens > used {
                self.limiter
                    .give_back(&ctx.key.id, Which::Tokens, r.tokens - used);
            }
            if let Some(period_start_ms) = r.budget_period_start_ms
                && r.leased
            {
                mutations.push(self.settle_lease(&ctx.key.id, period_start_ms, r.tokens, used));
            } else if let Some(period_start_ms) = r.budget_period_start_ms {
                mutations.push(Mutation::SettleBudget {
                    holder: self.holder.id.clone(),
                    key_id: ctx.key.id.clone(),
                    period_start_ms,
                    reserved_tokens: to_i64(r.tokens),
                    actual_tokens: to_i64(used),
                });
            }
        }
        mutations.push(Mutation::InsertUsage(UsageRecord {
            id: outcome.request_id.clone(),
            created_at_ms: now,
            org_id: ctx.org.id.clone(),
            project_id: ctx.project.id.clone(),
            key_id: ctx.key.id.clone(),
            model: outcome.model.clone(),
            prompt_tokens: to_i64(outcome.prompt_tokens),
            completion_tokens: to_i64(outcome.completion_tokens),
            reasoning_tokens: to_i64(outcome.reasoning_tokens),
            ttft_us: outcome.ttft_us.map(to_i64),
            duration_us: to_i64(outcome.duration_us),
            status: outcome.status.clone(),
            http_status: i64::from(outcome.http_status),
            energy_uj: outcome.energy.map(|e| to_i64(e.microjoules)),
            energy_source: outcome.energy.map(|e| e.source),
        }));
        if let (Some(retention_secs), Some((prompt, output))) =
            (ctx.project.retention_secs, outcome.content)
        {
            mutations.push(Mutation::InsertContent(RetainedContent {
                request_id: outcome.request_id.clone(),
                project_id: ctx.project.id.clone(),
                key_id: ctx.key.id.clone(),
                created_at_ms: now,
                expires_at_ms: now.saturating_add(retention_secs.saturating_mul(1000)),
                prompt,
                output,
            }));
        }
        let draft = self.draft(
            &format!("key:{}", ctx.key.id),
            "key.use",
            &outcome.request_id,
            json!({
                "model": outcome.model,
                "status": outcome.status,
                "http_status": outcome.http_status,
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
            }),
        );
        (mutations, draft)
    }

    /// [`ControlPlane::settle`] off the caller's path: the in-memory part (rate bucket,
    /// budget lease) now, the store's part queued for the writer thread, which commits what
    /// has queued up in one transaction. [`ControlPlane::flush_writes`] waits for it.
    pub fn settle_later(
        &self,
        ctx: &KeyContext,
        reservation: Option<&Reservation>,
        outcome: Outcome,
    ) {
        let (mutations, draft) = self.settlement(ctx, reservation, outcome);
        if !self.writer.push((mutations, Some(draft))) {
            tracing::error!(
                "the store has been down too long: a usage or audit record was dropped"
            );
        }
    }

    /// [`ControlPlane::settle_later`], then waits (at most `timeout`) for the transaction
    /// that commits it, so that an answer that ends after this is metered even if the process
    /// is killed next. True when it is in the store; false when the store is down or slow
    /// (the settlement stays queued and is retried; nobody waits on a store known down).
    pub async fn settle_queued(
        &self,
        ctx: &KeyContext,
        reservation: Option<&Reservation>,
        outcome: Outcome,
        timeout: Duration,
    ) -> bool {
        let (mutations, draft) = self.settlement(ctx, reservation, outcome);
        match self.writer.push_numbered((mutations, Some(draft))) {
            Some(number) => self.writer.committed(number, timeout).await,
            None => {
                tracing::error!(
                    "the store has been down too long: a usage or audit record was dropped"
                );
                false
            }
        }
    }

    /// Waits until the settlements queued by [`ControlPlane::settle_later`] before this call
    /// are in the store, at most `timeout`; true when they are.
    pub fn flush_writes(&self, timeout: Duration) -> bool {
        self.writer.flush(timeout)
    }

    /// Gives every budget lease back to the store and waits (at most `timeout`) for the
    /// queued settlements: for a process about to stop. True when all is written.
    pub fn close(&self, timeout: Duration) -> bool {
        let returns = self.leases.take_idle(Duration::ZERO, self.clock.instant());
        if !returns.is_empty() && !self.writer.push((returns, None)) {
            tracing::error!("budget leases could not be given back: too many settlements wait");
        }
        // What this process still holds (requests that never ended) is given back by the
        // next process's keep-alive, as after a crash.
        self.writer.flush(timeout)
    }

    /// This process as the holder of its budget reservations.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Tells the store this process is alive, and gives back what dead processes held:
    /// reservations of requests that were in flight when a process was killed (and its
    /// budget leases) are never settled, so without this a crash would charge keys for work
    /// never done. A holder is dead when it has not been seen for [`HOLDER_TIMEOUT`], or at
    /// once when it ran on this host and its process is gone. Each release is audited
    /// (`budget.release`). Returns the tokens given back.
    pub fn keep_alive(&self) -> Result<u64, ControlError> {
        use std::sync::atomic::Ordering;
        let now = self.now_ms();
        let seen = Mutation::HolderSeen {
            holder: self.holder.id.clone(),
            seen_ms: now,
        };
        match self.store.commit(&[seen], None) {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => {
                if self.registered.swap(true, Ordering::Relaxed) {
                    // Another process took us for dead (the store was out of reach for
                    // longer than the timeout) and gave back what we held: the leases'
                    // tokens are no longer ours to hand out.
                    tracing::warn!(
                        "this process's budget holds were released by another: its leases are dropped"
                    );
                    self.leases.forget_all();
                }
                let register = Mutation::RegisterHolder {
                    holder: self.holder.clone(),
                    seen_ms: now,
                };
                self.store.commit(&[register], None)?;
            }
            Err(err) => return Err(err.into()),
        }
        self.registered.store(true, Ordering::Relaxed);
        let mut released = 0u64;
        for dead in self
            .store
            .holders()?
            .into_iter()
            .filter(|h| self.is_dead(h, now))
        {
            let (host, pid, seen_ms) = dead.seen.clone().unwrap_or_default();
            let draft = self.draft(
                "control",
                "budget.release",
                &format!("holder:{}", dead.id),
                json!({
                    "tokens": dead.held_tokens,
                    "host": host,
                    "pid": pid,
                    "last_seen_ms": seen_ms,
                }),
            );
            let release = Mutation::ReleaseHolder {
                holder: dead.id.clone(),
            };
            self.store.commit(&[release], Some(&draft))?;
            tracing::info!(
                holder = %dead.id,
                tokens = dead.held_tokens,
                "released the budget held by a process that is gone"
            );
            released = released.saturating_add(u64::try_from(dead.held_tokens).unwrap_or(0));
        }
        Ok(released)
    }

    fn is_dead(&self, h: &HolderRow, now_ms: i64) -> bool {
        if h.id == self.holder.id {
            return false;
        }
        let Some((host, pid, seen_ms)) = &h.seen else {
            // Holds whose holder was released already: nobody will settle them.
            return true;
        };
        let timeout_ms = i64::try_from(HOLDER_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
        if now_ms.saturating_sub(*seen_ms) > timeout_ms {
            return true;
        }
        // On this host (same machine, boot and process namespace) a holder whose process is
        // gone is dead now. (One whose pid was reused since waits for the timeout.)
        *host == self.holder.host && !process_alive(*pid)
    }

    /// Deletes retained content and stored responses whose time is up and retries waiting
    /// settlements; returns how many rows were deleted.
    pub fn enforce_retention(&self) -> Result<u64, ControlError> {
        self.flush_backlog()?;
        let now = self.now_ms();
        let content = self.store.purge_expired_content(now)?;
        let responses = self.store.purge_expired_responses(now)?;
        let objects = self.store.purge_expired_objects(now)?;
        Ok(content.saturating_add(responses).saturating_add(objects))
    }

    // ---- stored responses (OpenAI's Responses API) -------------------------------------

    /// Keeps response `id` (its input items and the response object, both JSON) for the
    /// key's project until the project's retention ends; audited as `response.store`. A
    /// project with zero retention (the default) keeps nothing: `Invalid` (`store`), as is a
    /// response larger than [`MAX_STORED_RESPONSE_BYTES`] or an id that is not one of ours.
    pub fn store_response(
        &self,
        ctx: &KeyContext,
        id: &str,
        input: String,
        response: String,
    ) -> Result<StoredResponse, ControlError> {
        let Some(retention_secs) = ctx.project.retention_secs else {
            return Err(ControlError::invalid(
                "store",
                format!(
                    "project {} keeps no content (zero retention), so no response is stored",
                    ctx.project.id
                ),
            ));
        };
        if id.is_empty()
            || id.len() > MAX_STORED_FIELD_CHARS
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ControlError::invalid(
                "id",
                "a response id is 1 to 256 ASCII letters, digits and underscores",
            ));
        }
        let bytes = input.len().saturating_add(response.len());
        if bytes > MAX_STORED_RESPONSE_BYTES {
            return Err(ControlError::invalid(
                "store",
                format!(
                    "the response and its input are {bytes} bytes; at most \
                     {MAX_STORED_RESPONSE_BYTES} bytes are stored"
                ),
            ));
        }
        let now = self.now_ms();
        let stored = StoredResponse {
            id: id.to_owned(),
            org_id: ctx.org.id.clone(),
            project_id: ctx.project.id.clone(),
            key_id: ctx.key.id.clone(),
            created_at_ms: now,
            expires_at_ms: now.saturating_add(retention_secs.saturating_mul(1000)),
            input,
            response,
        };
        let draft = self.draft(
            &format!("key:{}", ctx.key.id),
            "response.store",
            id,
            json!({"bytes": bytes, "expires_at_ms": stored.expires_at_ms}),
        );
        self.store
            .commit(&[Mutation::InsertResponse(stored.clone())], Some(&draft))?;
        Ok(stored)
    }

    /// Response `id` if the key's project stored it and its retention has not ended; another
    /// project's (another organisation's included) is `None`, as a missing one is.
    pub fn get_response(
        &self,
        ctx: &KeyContext,
        id: &str,
    ) -> Result<Option<StoredResponse>, ControlError> {
        if id.len() > MAX_STORED_FIELD_CHARS {
            return Ok(None);
        }
        Ok(self
            .store
            .get_response(id, &ctx.project.id, self.now_ms())?)
    }

    /// Deletes response `id` of the key's project; audited as `response.delete`. True when it
    /// was there (another project's is not touched, and is false).
    pub fn delete_response(&self, ctx: &KeyContext, id: &str) -> Result<bool, ControlError> {
        if self.get_response(ctx, id)?.is_none() {
            return Ok(false);
        }
        let draft = self.draft(
            &format!("key:{}", ctx.key.id),
            "response.delete",
            id,
            json!({}),
        );
        let delete = Mutation::DeleteResponse {
            id: id.to_owned(),
            project_id: ctx.project.id.clone(),
        };
        match self.store.commit(&[delete], Some(&draft)) {
            Ok(_) => Ok(true),
            // Deleted meanwhile (by another request, or the retention task).
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    // ---- the Batch API's files, batches and results --------------------------------------

    /// Commits Batch API objects in one transaction (`PutObject`, `DeleteObject`,
    /// `DeleteResults` only), audited as `action` by key `key_id` on `target` when an action
    /// is given (files and batches made, cancelled, ended, deleted; not each result).
    pub fn commit_objects(
        &self,
        mutations: Vec<Mutation>,
        audit: Option<ObjectAudit<'_>>,
    ) -> Result<(), ControlError> {
        if let Some(other) = mutations.iter().find(|m| {
            !matches!(
                m,
                Mutation::PutObject(_)
                    | Mutation::PutObjectIf { .. }
                    | Mutation::DeleteObject { .. }
                    | Mutation::DeleteResults { .. }
            )
        }) {
            return Err(ControlError::invalid(
                "mutations",
                format!("not a Batch API object change: {other:?}"),
            ));
        }
        let draft =
            audit.map(|a| self.draft(&format!("key:{}", a.key_id), a.action, a.target, a.detail));
        self.store.commit(&mutations, draft.as_ref())?;
        Ok(())
    }

    /// A Batch API object, if it exists, has not expired and belongs to `project_id` (any
    /// project's when `None`: the batch runner's reads).
    pub fn get_object(
        &self,
        kind: ObjectKind,
        id: &str,
        project_id: Option<&str>,
    ) -> Result<Option<StoredObject>, ControlError> {
        if id.len() > MAX_STORED_FIELD_CHARS {
            return Ok(None);
        }
        Ok(self.store.get_object(kind, id, project_id, self.now_ms())?)
    }

    /// The Batch API objects `filter` selects (unexpired).
    pub fn list_objects(&self, filter: &ObjectFilter) -> Result<Vec<StoredObject>, ControlError> {
        Ok(self.store.list_objects(filter, self.now_ms())?)
    }

    /// The key `key_id` with its project and organisation, if it still authenticates (not
    /// revoked, not expired): whose name a batch runs in.
    pub fn context_of_key(&self, key_id: &str) -> Result<Option<KeyContext>, ControlError> {
        let now = self.now_ms();
        Ok(self.store.key_context(key_id)?.filter(|ctx| {
            ctx.key.revoked_at_ms.is_none()
                && ctx.key.policy.expires_at_ms.is_none_or(|at| at > now)
        }))
    }

    /// Settlements waiting for the store.
    pub fn backlog_len(&self) -> usize {
        let queued = usize::try_from(self.writer.waiting()).unwrap_or(usize::MAX);
        self.backlog
            .lock()
            .map(|b| b.len())
            .unwrap_or(0)
            .saturating_add(queued)
    }

    /// Starts the background task that enforces retention every `every`, and, every
    /// [`HOLDER_BEAT`], retries settlements waiting for the store and keeps this process registered as a live holder of its budget
    /// reservations (releasing dead ones' holds, [`ControlPlane::keep_alive`]), starting now. It ends when the runtime shuts down or the handle is
    /// aborted.
    pub fn spawn_maintenance(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let plane = Arc::clone(self);
        tokio::spawn(async move {
            let mut beats = tokio::time::interval(HOLDER_BEAT.min(every));
            beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_retention = tokio::time::Instant::now();
            loop {
                beats.tick().await;
                // Records queued while the store was down go in as soon as it is back, not
                // only when the next request settles.
                if !plane.backlog_is_empty()
                    && let Err(err) = plane
                        .run(|p| p.flush_backlog().map_err(ControlError::from))
                        .await
                {
                    tracing::warn!(error = %err, waiting = plane.backlog_len(), "queued records still wait for the store");
                }
                if let Err(err) = plane.run(|p| p.keep_alive()).await {
                    tracing::warn!(error = %err, "budget keep-alive failed");
                }
                if last_retention.elapsed() < every {
                    continue;
                }
                last_retention = tokio::time::Instant::now();
                match plane.run(|p| p.enforce_retention()).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(deleted, "retention: expired content deleted"),
                    Err(err) => tracing::warn!(error = %err, "retention pass failed"),
                }
            }
        })
    }

    /// Writes an audit-only record, or queues it if the store is down.
    fn record_best_effort(&self, mutations: Vec<Mutation>, draft: AuditDraft) {
        if let Err(err) = self.store.commit(&mutations, Some(&draft)) {
            tracing::warn!(error = %err, action = %draft.action, "could not write an audit entry; queued");
            if matches!(err, StoreError::Unavailable { .. }) {
                self.push_backlog((mutations, Some(draft)));
            }
        }
    }

    fn push_backlog(&self, pending: Pending) {
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if backlog.len() >= MAX_BACKLOG {
            backlog.pop_front();
            tracing::error!(
                "the store has been down too long: a usage or audit record was dropped"
            );
        }
        backlog.push_back(pending);
    }

    fn backlog_is_empty(&self) -> bool {
        self.backlog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Commits waiting settlements in order, many to a transaction; stops at the first
    /// failure of the store (what is left stays queued, in order).
    ///
    /// One transaction per group, not per record: after an outage the backlog (every
    /// refusal and settlement of the outage) would otherwise rewrite the same table and
    /// index pages once per record, and on a volume that has just been freed that
    /// write-ahead log growth could take the space back before a checkpoint moves it into
    /// the database, which then cannot grow: the store would stay full for good.
    fn flush_backlog(&self) -> Result<(), StoreError> {
        loop {
            let mut group: Vec<Pending> = {
                let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
                let n = backlog.len().min(MAX_GROUP);
                backlog.drain(..n).collect()
            };
            if group.is_empty() {
                return Ok(());
            }
            if let Err(err) = commit_group(&*self.store, &mut group) {
                let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
                for pending in group.into_iter().rev() {
                    backlog.push_front(pending);
                }
                return Err(err);
            }
        }
    }
}
