//! Where the control plane's state lives: the [`Store`] trait and its two backends,
//! [`SqliteStore`] (embedded, the default, one file in WAL mode) and [`PostgresStore`]
//! (production). Both run the same versioned migrations ([`MIGRATIONS`]) and the same SQL,
//! written once with `?` placeholders.
//!
//! The trait is synchronous: both drivers block, and the control plane calls the store from
//! tokio's blocking pool with a time limit. Every write goes through [`Store::commit`], which
//! applies its mutations and appends its audit entry in one transaction, so an admin action
//! or a metered request is never recorded without its audit entry or the other way round.

mod postgres;
mod sqlite;

pub use self::postgres::PostgresStore;
pub use self::sqlite::SqliteStore;

use crate::audit::{AuditDraft, AuditEntry, AuditHead};
use crate::error::StoreError;
use crate::types::{
    EnergySource, KeyContext, KeyRecord, ObjectFilter, ObjectKind, Organisation, Project,
    RetainedContent, StoredObject, StoredResponse, UsageFilter, UsageRecord,
};

/// The schema, one step per version. A database records the versions applied in
/// `schema_migrations`; opening a store applies the missing ones in order, each in its own
/// transaction, and refuses a database newer than the last step.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE organizations (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            allowed_regions TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL
        );
        CREATE TABLE projects (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL REFERENCES organizations(id),
            name TEXT NOT NULL,
            retention_secs BIGINT,
            created_at_ms BIGINT NOT NULL
        );
        CREATE INDEX projects_by_org ON projects(org_id);
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            project_id TEXT NOT NULL REFERENCES projects(id),
            name TEXT NOT NULL,
            salt TEXT NOT NULL,
            hash TEXT NOT NULL,
            allowed_models TEXT NOT NULL,
            requests_per_minute BIGINT,
            tokens_per_minute BIGINT,
            budget_tokens BIGINT,
            budget_period TEXT,
            expires_at_ms BIGINT,
            created_at_ms BIGINT NOT NULL,
            revoked_at_ms BIGINT
        );
        CREATE INDEX api_keys_by_project ON api_keys(project_id);
        CREATE TABLE budget_usage (
            key_id TEXT NOT NULL REFERENCES api_keys(id),
            period_start_ms BIGINT NOT NULL,
            used_tokens BIGINT NOT NULL,
            PRIMARY KEY (key_id, period_start_ms)
        );
        CREATE TABLE usage_records (
            id TEXT PRIMARY KEY,
            created_at_ms BIGINT NOT NULL,
            org_id TEXT NOT NULL,
            project_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            reasoning_tokens BIGINT NOT NULL,
            ttft_us BIGINT,
            duration_us BIGINT NOT NULL,
            status TEXT NOT NULL,
            http_status BIGINT NOT NULL
        );
        CREATE INDEX usage_by_time ON usage_records(created_at_ms);
        CREATE TABLE audit_log (
            seq BIGINT PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE TABLE audit_head (
            id BIGINT PRIMARY KEY,
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL
        );
        INSERT INTO audit_head (id, seq, hash)
            VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');",
    ),
    (
        2,
        "CREATE TABLE retained_content (
            request_id TEXT PRIMARY KEY,
            project_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            expires_at_ms BIGINT NOT NULL,
            prompt TEXT NOT NULL,
            output TEXT NOT NULL
        );
        CREATE INDEX retained_content_by_expiry ON retained_content(expires_at_ms);
        CREATE INDEX usage_by_key ON usage_records(key_id, created_at_ms);",
    ),
    (
        3,
        "CREATE TABLE holders (
            holder TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid BIGINT NOT NULL,
            started_at_ms BIGINT NOT NULL,
            seen_ms BIGINT NOT NULL
        );
        CREATE TABLE budget_holds (
            holder TEXT NOT NULL,
            key_id TEXT NOT NULL,
            period_start_ms BIGINT NOT NULL,
            tokens BIGINT NOT NULL,
            PRIMARY KEY (holder, key_id, period_start_ms)
        );",
    ),
    (
        4,
        "ALTER TABLE usage_records ADD COLUMN energy_uj BIGINT;
        ALTER TABLE usage_records ADD COLUMN energy_source TEXT;",
    ),
    (
        5,
        "CREATE TABLE stored_responses (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL,
            project_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            expires_at_ms BIGINT NOT NULL,
            input TEXT NOT NULL,
            response TEXT NOT NULL
        );
        CREATE INDEX stored_responses_by_expiry ON stored_responses(expires_at_ms);",
    ),
    (
        6,
        "CREATE TABLE stored_objects (
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            project_id TEXT NOT NULL,
            parent TEXT,
            status TEXT,
            created_at_ms BIGINT NOT NULL,
            expires_at_ms BIGINT,
            meta TEXT NOT NULL,
            content TEXT,
            PRIMARY KEY (kind, id)
        );
        CREATE INDEX stored_objects_by_parent ON stored_objects(parent);
        CREATE INDEX stored_objects_by_status ON stored_objects(kind, status);
        CREATE INDEX stored_objects_by_expiry ON stored_objects(expires_at_ms);",
    ),
];

/// The newest schema version this binary knows.
pub fn latest_schema_version() -> i64 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// One change inside a [`Store::commit`] transaction.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Mutation {
    /// Add an organisation.
    InsertOrg(Organisation),
    /// Replace an organisation's allowed regions.
    SetOrgRegions {
        /// The organisation.
        org_id: String,
        /// Its new regions.
        regions: Vec<String>,
    },
    /// Add a project.
    InsertProject(Project),
    /// Add a key.
    InsertKey(KeyRecord),
    /// Revoke a key (a no-op on a key already revoked: the first time stays).
    RevokeKey {
        /// The key.
        key_id: String,
        /// When.
        at_ms: i64,
    },
    /// Turn a budget reservation into what was used: `used -= reserved; used += actual`, and
    /// the holder's hold on the key's budget drops by `reserved`. When the hold is smaller
    /// than `reserved` (it was released as a dead holder's meanwhile), only what is still
    /// held is taken back, so no token is given back twice.
    SettleBudget {
        /// The process whose reservation this was ([`Holder::id`]).
        holder: String,
        /// The key.
        key_id: String,
        /// The period the reservation was made in.
        period_start_ms: i64,
        /// What was reserved.
        reserved_tokens: i64,
        /// What was used.
        actual_tokens: i64,
    },
    /// Record a metered request.
    InsertUsage(UsageRecord),
    /// Keep a prompt and its output (projects that opted in only).
    InsertContent(RetainedContent),
    /// Keep a Responses API response (projects whose retention allows it only).
    InsertResponse(StoredResponse),
    /// Delete a stored response of a project (changing no row: it is not the project's, or
    /// gone).
    DeleteResponse {
        /// The response's id.
        id: String,
        /// The project that must own it.
        project_id: String,
    },
    /// Keep a Batch API object, replacing the one of the same kind and id.
    PutObject(StoredObject),
    /// Replace a Batch API object only while its status is one of `statuses` (one or two;
    /// changing no row otherwise: another writer moved it on, e.g. a cancel, or the runner
    /// ended it).
    PutObjectIf {
        /// The object as it is to be.
        object: StoredObject,
        /// The statuses it may have now.
        statuses: Vec<String>,
    },
    /// Delete a Batch API object of a project (changing no row: not the project's, or gone).
    DeleteObject {
        /// Its kind.
        kind: ObjectKind,
        /// Its id.
        id: String,
        /// The project that must own it.
        project_id: String,
    },
    /// Delete every result of a batch (however many there are, none included).
    DeleteResults {
        /// The batch's id.
        batch_id: String,
    },
    /// Record that a holder is alive at `seen_ms` (changes no row when it is not registered).
    HolderSeen {
        /// The holder's id.
        holder: String,
        /// When.
        seen_ms: i64,
    },
    /// Register a holder, alive at `seen_ms` (a no-op when it is registered).
    RegisterHolder {
        /// The holder.
        holder: Holder,
        /// When.
        seen_ms: i64,
    },
    /// Give back every token a holder holds (it is dead: its reservations will never be
    /// settled) and forget it.
    ReleaseHolder {
        /// The holder's id.
        holder: String,
    },
}

/// A process that reserves budget in the store: what it holds (reserved and not yet
/// settled, its budget leases included) is recorded under its id, so that when it dies
/// without settling, another process (or its own restart) gives those tokens back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Unique per process start.
    pub id: String,
    /// The machine and process namespace it runs in (host name, boot id, pid namespace):
    /// a holder of the same `host` whose `pid` is gone is dead at once.
    pub host: String,
    /// Its process id.
    pub pid: i64,
    /// When it started.
    pub started_at_ms: i64,
}

/// A holder as the store knows it: registered (`seen_ms` set) or only named by holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRow {
    /// The holder's id.
    pub id: String,
    /// Its host, pid and when it was last seen; `None` for holds whose holder is not
    /// registered (left by a holder already released).
    pub seen: Option<(String, i64, i64)>,
    /// Tokens it holds, over all keys and periods.
    pub held_tokens: i64,
}

/// The control plane's storage. Implementations must make [`Store::commit`] atomic and
/// [`Store::reserve_budget`] exact under concurrency (many processes included).
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend_name(&self) -> &'static str;

    /// The schema version applied.
    fn schema_version(&self) -> Result<i64, StoreError>;

    /// A round trip to the database.
    fn ping(&self) -> Result<(), StoreError>;

    /// Applies `mutations` and, if given, appends `audit` to the chain, all in one
    /// transaction. Returns the appended entry.
    fn commit(
        &self,
        mutations: &[Mutation],
        audit: Option<&AuditDraft>,
    ) -> Result<Option<AuditEntry>, StoreError>;

    /// Commits each `(mutations, audit)` pair as [`Store::commit`] would, in order. A backend
    /// that can should do it in one transaction (all or nothing): this one commits them one
    /// by one and stops at the first error.
    fn commit_batch(
        &self,
        batch: &[(Vec<Mutation>, Option<AuditDraft>)],
    ) -> Result<(), StoreError> {
        for (mutations, audit) in batch {
            self.commit(mutations, audit.as_ref())?;
        }
        Ok(())
    }

    /// Adds `tokens` to the key's use in the period starting at `period_start_ms` if that
    /// keeps it within `limit`; returns the use after the reservation, or `Err(used)` (the
    /// use as it stands) when it would not fit. Atomic: of many concurrent reservations, only
    /// those that fit succeed.
    ///
    /// A successful reservation is recorded as held by `holder` (registered as alive at
    /// `now_ms`) in the same transaction.
    fn reserve_budget(
        &self,
        holder: &Holder,
        now_ms: i64,
        key_id: &str,
        period_start_ms: i64,
        limit: i64,
        tokens: i64,
    ) -> Result<Result<i64, i64>, StoreError>;

    /// Every holder registered or named by a hold, with the tokens it holds.
    fn holders(&self) -> Result<Vec<HolderRow>, StoreError>;

    /// Tokens used (reserved included) by a key in a period.
    fn budget_used(&self, key_id: &str, period_start_ms: i64) -> Result<i64, StoreError>;

    /// An organisation.
    fn get_org(&self, org_id: &str) -> Result<Option<Organisation>, StoreError>;
    /// All organisations, oldest first.
    fn list_orgs(&self) -> Result<Vec<Organisation>, StoreError>;
    /// A project.
    fn get_project(&self, project_id: &str) -> Result<Option<Project>, StoreError>;
    /// An organisation's projects, oldest first.
    fn list_projects(&self, org_id: &str) -> Result<Vec<Project>, StoreError>;
    /// A project's keys, oldest first.
    fn list_keys(&self, project_id: &str) -> Result<Vec<KeyRecord>, StoreError>;
    /// A key with its project and organisation.
    fn key_context(&self, key_id: &str) -> Result<Option<KeyContext>, StoreError>;

    /// Usage records matching `filter`, oldest first.
    fn usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError>;

    /// The whole audit log in sequence order.
    fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError>;
    /// The chain's head as recorded.
    fn audit_head(&self) -> Result<AuditHead, StoreError>;

    /// Retained content of a project, oldest first.
    fn retained_content(&self, project_id: &str) -> Result<Vec<RetainedContent>, StoreError>;
    /// Deletes retained content whose time is up; returns how many rows went.
    fn purge_expired_content(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// A stored response, if project `project_id` owns it and its retention has not ended by
    /// `now_ms` (a row the retention task has not reached yet is already gone to readers).
    fn get_response(
        &self,
        id: &str,
        project_id: &str,
        now_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError>;
    /// Deletes stored responses whose retention has ended; returns how many rows went.
    fn purge_expired_responses(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// A Batch API object of `kind`, if it exists, is `project_id`'s (any project's when
    /// `None`) and has not expired by `now_ms`.
    fn get_object(
        &self,
        kind: ObjectKind,
        id: &str,
        project_id: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<StoredObject>, StoreError>;
    /// The Batch API objects `filter` selects that have not expired by `now_ms`.
    fn list_objects(
        &self,
        filter: &ObjectFilter,
        now_ms: i64,
    ) -> Result<Vec<StoredObject>, StoreError>;
    /// Deletes Batch API objects whose time has come; returns how many rows went.
    fn purge_expired_objects(&self, now_ms: i64) -> Result<u64, StoreError>;
}

/// A parameter of the shared SQL.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::Int(Some(v))
    }
}
impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Self {
        Param::Int(v)
    }
}
impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Param::Text(Some(v.to_owned()))
    }
}
impl From<String> for Param {
    fn from(v: String) -> Self {
        Param::Text(Some(v))
    }
}
impl From<Option<String>> for Param {
    fn from(v: Option<String>) -> Self {
        Param::Text(v)
    }
}

/// A statement and its parameters.
pub(crate) type Statement = (&'static str, Vec<Param>);

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn settle_sql(
    holder: &str,
    key_id: &str,
    start: i64,
    reserved: i64,
    actual: i64,
) -> Vec<Statement> {
    let hold = |p: &mut Vec<Param>| {
        p.extend([
            reserved.into(),
            reserved.into(),
            holder.into(),
            key_id.into(),
            start.into(),
        ]);
    };
    let mut used = vec![actual.into()];
    hold(&mut used);
    used.extend([key_id.into(), start.into()]);
    vec![
        // A reservation whose row is gone (a hand-cleaned table) must not lose the usage:
        // no row must change.
        (SETTLE_USED_SQL, used),
        (
            "UPDATE budget_holds SET tokens = CASE WHEN tokens < ? THEN 0 ELSE tokens - ? END \
             WHERE holder = ? AND key_id = ? AND period_start_ms = ?",
            vec![
                reserved.into(),
                reserved.into(),
                holder.into(),
                key_id.into(),
                start.into(),
            ],
        ),
    ]
}

const SETTLE_USED_SQL: &str = concat!(
    "UPDATE budget_usage SET used_tokens = used_tokens + ? - ",
    "COALESCE((SELECT CASE WHEN h.tokens < ? THEN h.tokens ELSE ? END \
     FROM budget_holds h WHERE h.holder = ? AND h.key_id = ? AND h.period_start_ms = ?), 0)",
    " WHERE key_id = ? AND period_start_ms = ?"
);

fn release_sql(holder: &str) -> Vec<Statement> {
    vec![
        (
            "UPDATE budget_usage SET used_tokens = used_tokens - COALESCE((SELECT h.tokens \
             FROM budget_holds h WHERE h.holder = ? AND h.key_id = budget_usage.key_id \
             AND h.period_start_ms = budget_usage.period_start_ms), 0) \
             WHERE EXISTS (SELECT 1 FROM budget_holds h WHERE h.holder = ? \
             AND h.key_id = budget_usage.key_id AND h.period_start_ms = budget_usage.period_start_ms)",
            vec![holder.into(), holder.into()],
        ),
        (
            "DELETE FROM budget_holds WHERE holder = ?",
            vec![holder.into()],
        ),
        ("DELETE FROM holders WHERE holder = ?", vec![holder.into()]),
    ]
}

/// What a successful reservation of `tokens` adds to `holder`'s hold (and its sign of life).
pub(crate) fn hold_sql(
    holder: &Holder,
    now_ms: i64,
    key_id: &str,
    period_start_ms: i64,
    tokens: i64,
) -> [Statement; 2] {
    [
        register_sql(holder, now_ms),
        (
            "INSERT INTO budget_holds (holder, key_id, period_start_ms, tokens) \
             VALUES (?, ?, ?, ?) ON CONFLICT (holder, key_id, period_start_ms) \
             DO UPDATE SET tokens = budget_holds.tokens + excluded.tokens",
            vec![
                holder.id.as_str().into(),
                key_id.into(),
                period_start_ms.into(),
                tokens.into(),
            ],
        ),
    ]
}

fn register_sql(holder: &Holder, now_ms: i64) -> Statement {
    (
        "INSERT INTO holders (holder, host, pid, started_at_ms, seen_ms) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (holder) DO UPDATE SET seen_ms = excluded.seen_ms",
        vec![
            holder.id.as_str().into(),
            holder.host.as_str().into(),
            holder.pid.into(),
            holder.started_at_ms.into(),
            now_ms.into(),
        ],
    )
}

/// The holders, registered or named by holds, with what they hold.
pub(crate) const HOLDERS_SQL: &str = "SELECT r.holder, r.host, r.pid, r.seen_ms, \
     COALESCE((SELECT CAST(SUM(b.tokens) AS BIGINT) FROM budget_holds b \
     WHERE b.holder = r.holder), 0) \
     FROM holders r \
     UNION ALL SELECT b.holder, NULL, NULL, NULL, CAST(SUM(b.tokens) AS BIGINT) FROM budget_holds b \
     WHERE b.holder NOT IN (SELECT holder FROM holders) GROUP BY b.holder";

pub(crate) fn holder_from_row(row: &dyn Row) -> Result<HolderRow, StoreError> {
    let id = row.text(0)?;
    let seen = match (row.opt_text(1)?, row.opt_int(2)?, row.opt_int(3)?) {
        (Some(host), Some(pid), Some(seen_ms)) => Some((host, pid, seen_ms)),
        _ => None,
    };
    Ok(HolderRow {
        id,
        seen,
        held_tokens: row.int(4)?,
    })
}

/// The statements a mutation runs, and the kind and id of the row its first statement must
/// change (for the ones that update: changing no row means the row does not exist).
pub(crate) fn mutation_sql(m: &Mutation) -> (Vec<Statement>, Option<(&'static str, String)>) {
    match m {
        Mutation::InsertOrg(org) => (
            vec![(
                "INSERT INTO organizations (id, name, allowed_regions, created_at_ms) VALUES (?, ?, ?, ?)",
                vec![
                    org.id.as_str().into(),
                    org.name.as_str().into(),
                    json_list(&org.allowed_regions).into(),
                    org.created_at_ms.into(),
                ],
            )],
            None,
        ),
        Mutation::SetOrgRegions { org_id, regions } => (
            vec![(
                "UPDATE organizations SET allowed_regions = ? WHERE id = ?",
                vec![json_list(regions).into(), org_id.as_str().into()],
            )],
            Some(("organization", org_id.clone())),
        ),
        Mutation::InsertProject(p) => (
            vec![(
                "INSERT INTO projects (id, org_id, name, retention_secs, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                vec![
                    p.id.as_str().into(),
                    p.org_id.as_str().into(),
                    p.name.as_str().into(),
                    p.retention_secs.into(),
                    p.created_at_ms.into(),
                ],
            )],
            None,
        ),
        Mutation::InsertKey(k) => (
            vec![(
                "INSERT INTO api_keys (id, project_id, name, salt, hash, allowed_models, \
                 requests_per_minute, tokens_per_minute, budget_tokens, budget_period, \
                 expires_at_ms, created_at_ms, revoked_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                vec![
                    k.id.as_str().into(),
                    k.project_id.as_str().into(),
                    k.name.as_str().into(),
                    k.salt_hex.as_str().into(),
                    k.hash_hex.as_str().into(),
                    json_list(&k.policy.allowed_models).into(),
                    k.policy.requests_per_minute.map(to_i64).into(),
                    k.policy.tokens_per_minute.map(to_i64).into(),
                    k.policy.budget.map(|b| to_i64(b.tokens)).into(),
                    k.policy.budget.map(|b| b.period.as_str().to_owned()).into(),
                    k.policy.expires_at_ms.into(),
                    k.created_at_ms.into(),
                    k.revoked_at_ms.into(),
                ],
            )],
            None,
        ),
        Mutation::RevokeKey { key_id, at_ms } => (
            vec![(
                "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?) WHERE id = ?",
                vec![(*at_ms).into(), key_id.as_str().into()],
            )],
            Some(("key", key_id.clone())),
        ),
        Mutation::InsertUsage(u) => (
            vec![(
                "INSERT INTO usage_records (id, created_at_ms, org_id, project_id, key_id, model, \
                 prompt_tokens, completion_tokens, reasoning_tokens, ttft_us, duration_us, status, \
                 http_status, energy_uj, energy_source) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                vec![
                    u.id.as_str().into(),
                    u.created_at_ms.into(),
                    u.org_id.as_str().into(),
                    u.project_id.as_str().into(),
                    u.key_id.as_str().into(),
                    u.model.as_str().into(),
                    u.prompt_tokens.into(),
                    u.completion_tokens.into(),
                    u.reasoning_tokens.into(),
                    u.ttft_us.into(),
                    u.duration_us.into(),
                    u.status.as_str().into(),
                    u.http_status.into(),
                    u.energy_uj.into(),
                    u.energy_source.map(|s| s.as_str().to_owned()).into(),
                ],
            )],
            None,
        ),
        Mutation::InsertContent(c) => (
            vec![(
                "INSERT INTO retained_content (request_id, project_id, key_id, created_at_ms, \
                 expires_at_ms, prompt, output) VALUES (?, ?, ?, ?, ?, ?, ?)",
                vec![
                    c.request_id.as_str().into(),
                    c.project_id.as_str().into(),
                    c.key_id.as_str().into(),
                    c.created_at_ms.into(),
                    c.expires_at_ms.into(),
                    c.prompt.as_str().into(),
                    c.output.as_str().into(),
                ],
            )],
            None,
        ),
        Mutation::InsertResponse(r) => (
            vec![(
                "INSERT INTO stored_responses (id, org_id, project_id, key_id, created_at_ms, \
                 expires_at_ms, input, response) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                vec![
                    r.id.as_str().into(),
                    r.org_id.as_str().into(),
                    r.project_id.as_str().into(),
                    r.key_id.as_str().into(),
                    r.created_at_ms.into(),
                    r.expires_at_ms.into(),
                    r.input.as_str().into(),
                    r.response.as_str().into(),
                ],
            )],
            None,
        ),
        Mutation::DeleteResponse { id, project_id } => (
            vec![(
                "DELETE FROM stored_responses WHERE id = ? AND project_id = ?",
                vec![id.as_str().into(), project_id.as_str().into()],
            )],
            Some(("response", id.clone())),
        ),
        Mutation::PutObject(o) => (
            vec![(
                "INSERT INTO stored_objects (kind, id, project_id, parent, status, created_at_ms, \
                 expires_at_ms, meta, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (kind, id) DO UPDATE SET parent = excluded.parent, \
                 status = excluded.status, expires_at_ms = excluded.expires_at_ms, \
                 meta = excluded.meta, content = excluded.content",
                vec![
                    o.kind.as_str().into(),
                    o.id.as_str().into(),
                    o.project_id.as_str().into(),
                    o.parent.clone().into(),
                    o.status.clone().into(),
                    o.created_at_ms.into(),
                    o.expires_at_ms.into(),
                    o.meta.as_str().into(),
                    o.content.clone().into(),
                ],
            )],
            None,
        ),
        Mutation::PutObjectIf {
            object: o,
            statuses,
        } => {
            // One or two statuses (a second one repeats the first when there is one).
            let first = statuses.first().cloned();
            let second = statuses.get(1).cloned().or_else(|| first.clone());
            (
                vec![(
                    "UPDATE stored_objects SET parent = ?, status = ?, expires_at_ms = ?, \
                     meta = ?, content = ? WHERE kind = ? AND id = ? AND status IN (?, ?)",
                    vec![
                        o.parent.clone().into(),
                        o.status.clone().into(),
                        o.expires_at_ms.into(),
                        o.meta.as_str().into(),
                        o.content.clone().into(),
                        o.kind.as_str().into(),
                        o.id.as_str().into(),
                        first.into(),
                        second.into(),
                    ],
                )],
                Some((o.kind.as_str(), o.id.clone())),
            )
        }
        Mutation::DeleteObject {
            kind,
            id,
            project_id,
        } => (
            vec![(
                "DELETE FROM stored_objects WHERE kind = ? AND id = ? AND project_id = ?",
                vec![
                    kind.as_str().into(),
                    id.as_str().into(),
                    project_id.as_str().into(),
                ],
            )],
            Some((kind.as_str(), id.clone())),
        ),
        Mutation::DeleteResults { batch_id } => (
            vec![(
                "DELETE FROM stored_objects WHERE kind = 'result' AND parent = ?",
                vec![batch_id.as_str().into()],
            )],
            None,
        ),
        Mutation::HolderSeen { holder, seen_ms } => (
            vec![(
                "UPDATE holders SET seen_ms = ? WHERE holder = ?",
                vec![(*seen_ms).into(), holder.as_str().into()],
            )],
            Some(("holder", holder.clone())),
        ),
        Mutation::RegisterHolder { holder, seen_ms } => {
            (vec![register_sql(holder, *seen_ms)], None)
        }
        Mutation::SettleBudget {
            holder,
            key_id,
            period_start_ms,
            reserved_tokens,
            actual_tokens,
        } => (
            settle_sql(
                holder,
                key_id,
                *period_start_ms,
                *reserved_tokens,
                *actual_tokens,
            ),
            None,
        ),
        Mutation::ReleaseHolder { holder } => (release_sql(holder), None),
    }
}

/// The `WHERE` clause and parameters of a usage filter.
pub(crate) fn usage_where(filter: &UsageFilter) -> (String, Vec<Param>) {
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    if let Some(from) = filter.from_ms {
        clauses.push("created_at_ms >= ?");
        params.push(from.into());
    }
    if let Some(to) = filter.to_ms {
        clauses.push("created_at_ms < ?");
        params.push(to.into());
    }
    for (column, value) in [
        ("org_id = ?", &filter.org_id),
        ("project_id = ?", &filter.project_id),
        ("key_id = ?", &filter.key_id),
    ] {
        if let Some(value) = value {
            clauses.push(column);
            params.push(value.as_str().into());
        }
    }
    let clause = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    (clause, params)
}

pub(crate) const USAGE_COLUMNS: &str = "id, created_at_ms, org_id, project_id, key_id, model, \
    prompt_tokens, completion_tokens, reasoning_tokens, ttft_us, duration_us, status, http_status, \
    energy_uj, energy_source";

pub(crate) const KEY_CONTEXT_SQL: &str = "SELECT k.id, k.project_id, k.name, k.salt, k.hash, \
    k.allowed_models, k.requests_per_minute, k.tokens_per_minute, k.budget_tokens, \
    k.budget_period, k.expires_at_ms, k.created_at_ms, k.revoked_at_ms, \
    p.id, p.org_id, p.name, p.retention_secs, p.created_at_ms, \
    o.id, o.name, o.allowed_regions, o.created_at_ms \
    FROM api_keys k JOIN projects p ON p.id = k.project_id JOIN organizations o ON o.id = p.org_id \
    WHERE k.id = ?";

pub(crate) const KEY_COLUMNS: &str = "id, project_id, name, salt, hash, allowed_models, \
    requests_per_minute, tokens_per_minute, budget_tokens, budget_period, expires_at_ms, \
    created_at_ms, revoked_at_ms";

pub(crate) const AUDIT_COLUMNS: &str = "seq, at_ms, actor, action, target, detail, prev_hash, hash";

pub(crate) const CONTENT_COLUMNS: &str =
    "request_id, project_id, key_id, created_at_ms, expires_at_ms, prompt, output";

/// One stored response of its project, unexpired.
pub(crate) const GET_RESPONSE_SQL: &str = "SELECT id, org_id, project_id, key_id, created_at_ms, \
    expires_at_ms, input, response FROM stored_responses \
    WHERE id = ? AND project_id = ? AND expires_at_ms > ?";

pub(crate) const OBJECT_COLUMNS: &str =
    "kind, id, project_id, parent, status, created_at_ms, expires_at_ms, meta, content";

/// One object of one kind, unexpired, optionally of one project.
pub(crate) fn get_object_sql(
    kind: ObjectKind,
    id: &str,
    project_id: Option<&str>,
    now_ms: i64,
) -> (String, Vec<Param>) {
    let mut sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM stored_objects WHERE kind = ? AND id = ? \
         AND (expires_at_ms IS NULL OR expires_at_ms > ?)"
    );
    let mut params = vec![kind.as_str().into(), id.into(), now_ms.into()];
    if let Some(project) = project_id {
        sql.push_str(" AND project_id = ?");
        params.push(project.into());
    }
    (sql, params)
}

/// The objects a filter selects, unexpired.
pub(crate) fn list_objects_sql(filter: &ObjectFilter, now_ms: i64) -> (String, Vec<Param>) {
    let columns = if filter.with_content {
        OBJECT_COLUMNS.to_owned()
    } else {
        OBJECT_COLUMNS.replace("content", "NULL")
    };
    let mut sql = format!(
        "SELECT {columns} FROM stored_objects WHERE kind = ? \
         AND (expires_at_ms IS NULL OR expires_at_ms > ?)"
    );
    let mut params: Vec<Param> = vec![filter.kind.as_str().into(), now_ms.into()];
    if let Some(project) = &filter.project_id {
        sql.push_str(" AND project_id = ?");
        params.push(project.as_str().into());
    }
    if let Some(parent) = &filter.parent {
        sql.push_str(" AND parent = ?");
        params.push(parent.as_str().into());
    }
    if !filter.statuses.is_empty() {
        let marks = vec!["?"; filter.statuses.len()].join(", ");
        sql.push_str(&format!(" AND status IN ({marks})"));
        params.extend(filter.statuses.iter().map(|s| s.as_str().into()));
    }
    if let Some(after) = &filter.after_id {
        sql.push_str(if filter.newest_first {
            " AND (created_at_ms, id) < (SELECT created_at_ms, id FROM stored_objects WHERE kind = ? AND id = ?)"
        } else {
            " AND (created_at_ms, id) > (SELECT created_at_ms, id FROM stored_objects WHERE kind = ? AND id = ?)"
        });
        params.push(filter.kind.as_str().into());
        params.push(after.as_str().into());
    }
    let order = if filter.newest_first { "DESC" } else { "ASC" };
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    sql.push_str(&format!(
        " ORDER BY created_at_ms {order}, id {order} LIMIT ?"
    ));
    params.push(limit.into());
    (sql, params)
}

pub(crate) fn object_from_row(row: &dyn Row) -> Result<StoredObject, StoreError> {
    let kind = match row.text(0)?.as_str() {
        "file" => ObjectKind::File,
        "batch" => ObjectKind::Batch,
        "result" => ObjectKind::Result,
        other => {
            return Err(StoreError::Corrupt {
                table: "stored_objects",
                detail: format!("unknown kind `{other}`"),
            });
        }
    };
    Ok(StoredObject {
        kind,
        id: row.text(1)?,
        project_id: row.text(2)?,
        parent: row.opt_text(3)?,
        status: row.opt_text(4)?,
        created_at_ms: row.int(5)?,
        expires_at_ms: row.opt_int(6)?,
        meta: row.text(7)?,
        content: row.opt_text(8)?,
    })
}

/// A row read the same way from both drivers: column `i` as the type asked for.
pub(crate) trait Row {
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    fn text(&self, i: usize) -> Result<String, StoreError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
}

fn corrupt(table: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: detail.into(),
    }
}

fn decode_list(table: &'static str, text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(table, format!("a list is not JSON: {e}")))
}

fn to_u64(table: &'static str, v: Option<i64>) -> Result<Option<u64>, StoreError> {
    v.map(|v| u64::try_from(v).map_err(|_| corrupt(table, format!("negative limit {v}"))))
        .transpose()
}

/// A key from [`KEY_COLUMNS`] starting at column `at`.
pub(crate) fn key_from_row(row: &dyn Row, at: usize) -> Result<KeyRecord, StoreError> {
    use crate::types::{Budget, BudgetPeriod, KeyPolicy};
    const T: &str = "api_keys";
    let budget = match (row.opt_int(at + 8)?, row.opt_text(at + 9)?) {
        (Some(tokens), Some(period)) => Some(Budget {
            tokens: to_u64(T, Some(tokens))?.unwrap_or(0),
            period: BudgetPeriod::parse(&period)
                .ok_or_else(|| corrupt(T, format!("unknown budget period `{period}`")))?,
        }),
        (None, None) => None,
        _ => return Err(corrupt(T, "a budget needs both tokens and a period")),
    };
    Ok(KeyRecord {
        id: row.text(at)?,
        project_id: row.text(at + 1)?,
        name: row.text(at + 2)?,
        salt_hex: row.text(at + 3)?,
        hash_hex: row.text(at + 4)?,
        policy: KeyPolicy {
            allowed_models: decode_list(T, &row.text(at + 5)?)?,
            requests_per_minute: to_u64(T, row.opt_int(at + 6)?)?,
            tokens_per_minute: to_u64(T, row.opt_int(at + 7)?)?,
            budget,
            expires_at_ms: row.opt_int(at + 10)?,
        },
        created_at_ms: row.int(at + 11)?,
        revoked_at_ms: row.opt_int(at + 12)?,
    })
}

/// A project from `id, org_id, name, retention_secs, created_at_ms` at column `at`.
pub(crate) fn project_from_row(row: &dyn Row, at: usize) -> Result<Project, StoreError> {
    Ok(Project {
        id: row.text(at)?,
        org_id: row.text(at + 1)?,
        name: row.text(at + 2)?,
        retention_secs: row.opt_int(at + 3)?,
        created_at_ms: row.int(at + 4)?,
    })
}

/// An organisation from `id, name, allowed_regions, created_at_ms` at column `at`.
pub(crate) fn org_from_row(row: &dyn Row, at: usize) -> Result<Organisation, StoreError> {
    Ok(Organisation {
        id: row.text(at)?,
        name: row.text(at + 1)?,
        allowed_regions: decode_list("organizations", &row.text(at + 2)?)?,
        created_at_ms: row.int(at + 3)?,
    })
}

pub(crate) fn key_context_from_row(row: &dyn Row) -> Result<KeyContext, StoreError> {
    Ok(KeyContext {
        key: key_from_row(row, 0)?,
        project: project_from_row(row, 13)?,
        org: org_from_row(row, 18)?,
    })
}

pub(crate) fn usage_from_row(row: &dyn Row) -> Result<UsageRecord, StoreError> {
    Ok(UsageRecord {
        id: row.text(0)?,
        created_at_ms: row.int(1)?,
        org_id: row.text(2)?,
        project_id: row.text(3)?,
        key_id: row.text(4)?,
        model: row.text(5)?,
        prompt_tokens: row.int(6)?,
        completion_tokens: row.int(7)?,
        reasoning_tokens: row.int(8)?,
        ttft_us: row.opt_int(9)?,
        duration_us: row.int(10)?,
        status: row.text(11)?,
        http_status: row.int(12)?,
        energy_uj: row.opt_int(13)?,
        energy_source: match row.opt_text(14)? {
            None => None,
            Some(text) => Some(EnergySource::parse(&text).ok_or_else(|| {
                corrupt(
                    "usage_records",
                    format!(
                        "energy source {:?}",
                        text.chars().take(32).collect::<String>()
                    ),
                )
            })?),
        },
    })
}

pub(crate) fn audit_from_row(row: &dyn Row) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: row.int(0)?,
        at_ms: row.int(1)?,
        actor: row.text(2)?,
        action: row.text(3)?,
        target: row.text(4)?,
        detail: row.text(5)?,
        prev_hash: row.text(6)?,
        hash: row.text(7)?,
    })
}

pub(crate) fn content_from_row(row: &dyn Row) -> Result<RetainedContent, StoreError> {
    Ok(RetainedContent {
        request_id: row.text(0)?,
        project_id: row.text(1)?,
        key_id: row.text(2)?,
        created_at_ms: row.int(3)?,
        expires_at_ms: row.int(4)?,
        prompt: row.text(5)?,
        output: row.text(6)?,
    })
}

pub(crate) fn response_from_row(row: &dyn Row) -> Result<StoredResponse, StoreError> {
    Ok(StoredResponse {
        id: row.text(0)?,
        org_id: row.text(1)?,
        project_id: row.text(2)?,
        key_id: row.text(3)?,
        created_at_ms: row.int(4)?,
        expires_at_ms: row.int(5)?,
        input: row.text(6)?,
        response: row.text(7)?,
    })
}

/// The audit statements of one append: the new entry and the new head.
pub(crate) fn audit_append_sql(entry: &AuditEntry) -> [Statement; 2] {
    [
        (
            "INSERT INTO audit_log (seq, at_ms, actor, action, target, detail, prev_hash, hash) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                entry.seq.into(),
                entry.at_ms.into(),
                entry.actor.as_str().into(),
                entry.action.as_str().into(),
                entry.target.as_str().into(),
                entry.detail.as_str().into(),
                entry.prev_hash.as_str().into(),
                entry.hash.as_str().into(),
            ],
        ),
        (
            "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1",
            vec![entry.seq.into(), entry.hash.as_str().into()],
        ),
    ]
}

/// Rewrites `?` placeholders as PostgreSQL's `$1, $2, ...` (the shared SQL holds no `?`
/// inside string literals).
pub(crate) fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(
            numbered_placeholders("UPDATE t SET a = ? WHERE b = ? AND c = ?"),
            "UPDATE t SET a = $1 WHERE b = $2 AND c = $3"
        );
    }

    #[test]
    fn migrations_are_in_order() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
        assert_eq!(latest_schema_version(), 6);
    }

    #[test]
    fn usage_filter_builds_where() {
        let (clause, params) = usage_where(&UsageFilter {
            from_ms: Some(5),
            key_id: Some("k".into()),
            ..UsageFilter::default()
        });
        assert_eq!(clause, " WHERE created_at_ms >= ? AND key_id = ?");
        assert_eq!(
            params,
            vec![Param::Int(Some(5)), Param::Text(Some("k".into()))]
        );
        assert_eq!(usage_where(&UsageFilter::default()).0, "");
    }
}
