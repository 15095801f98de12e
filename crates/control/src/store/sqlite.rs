//! The embedded backend: one SQLite file in write-ahead-log mode.
//!
//! `synchronous = NORMAL` in WAL mode makes each commit durable against the process dying
//! (the case the server must survive: a crash, `kill -9`); only a power cut can lose the last
//! commits. One connection behind a mutex serves the process: SQLite takes one writer at a
//! time anyway, and other processes (the `souverain admin` commands) wait on the busy timeout.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{Connection, ErrorCode, OptionalExtension, ToSql, TransactionBehavior};

use super::{
    AUDIT_COLUMNS, CONTENT_COLUMNS, GET_RESPONSE_SQL, HOLDERS_SQL, Holder, HolderRow, KEY_COLUMNS,
    KEY_CONTEXT_SQL, MIGRATIONS, Mutation, Param, Row, Store, USAGE_COLUMNS, audit_append_sql,
    audit_from_row, content_from_row, get_object_sql, hold_sql, holder_from_row,
    key_context_from_row, key_from_row, latest_schema_version, list_objects_sql, mutation_sql,
    object_from_row, org_from_row, project_from_row, response_from_row, usage_from_row,
    usage_where,
};
use crate::audit::{self, AuditDraft, AuditEntry, AuditHead};
use crate::error::StoreError;
use crate::types::{
    KeyContext, KeyRecord, ObjectFilter, ObjectKind, Organisation, Project, RetainedContent,
    StoredObject, StoredResponse, UsageFilter, UsageRecord,
};

/// How long a statement waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// The write-ahead log's file (none for an in-memory database): whoever takes the
    /// connection and finds it past [`WAL_SIZE_LIMIT`] checkpoints it to nothing first.
    wal: Option<std::path::PathBuf>,
    /// Tells the checkpoint thread that the store is gone.
    alive: Arc<()>,
    /// When a truncating checkpoint that could not finish may be tried again, and the delay
    /// after the next failure.
    next_truncate: Mutex<(Option<std::time::Instant>, Duration)>,
}

/// How long a truncating checkpoint waits for others to let go of the log.
const TRUNCATE_WAIT: Duration = Duration::from_secs(1);
/// The first delay after a truncating checkpoint that could not finish.
const TRUNCATE_RETRY: Duration = Duration::from_millis(10);
/// The longest delay between tries while they keep failing.
const TRUNCATE_RETRY_MAX: Duration = Duration::from_secs(10);

/// The size the write-ahead log file is cut back to when it restarts, in bytes.
const WAL_SIZE_LIMIT: u64 = 1 << 20;

/// How often the background thread moves the write-ahead log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the write-ahead log from a connection of its own, so that no request waits on
/// a checkpoint's disk flush (SQLite would otherwise run it inside the commit that crosses
/// its threshold, holding the store's one connection). The thread ends once the store is
/// dropped.
///
/// A passive checkpoint never blocks a writer, so under a steady stream of commits it seldom
/// reaches the end of the log, the log seldom restarts, and it grows for as long as the
/// stream lasts. On a volume that fills up, that is a trap: a checkpoint can need the
/// database to grow by a few pages while the log holds all the space, and then neither can
/// move, and the store refuses every write for good, even once space is freed (the log takes
/// it back first). So [`SqliteStore::conn`] also looks at the log's size: past
/// [`WAL_SIZE_LIMIT`], the next user of the connection runs a truncating checkpoint before its
/// own statement. Writers take turns with it instead of starving it (as they starve a
/// checkpoint from another connection), so the log stays near the limit and the space it frees
/// comes back at once.
fn spawn_checkpointer(path: &Path, alive: std::sync::Weak<()>) {
    let Ok(conn) = Connection::open(path) else {
        return;
    };
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
    let spawned = std::thread::Builder::new()
        .name("sqlite-checkpoint".to_owned())
        .spawn(move || {
            while alive.strong_count() > 0 {
                std::thread::sleep(CHECKPOINT_EVERY);
                if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %err, "WAL checkpoint failed; retried later");
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "no checkpoint thread; SQLite checkpoints inline");
    }
}

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Param::Int(Some(v)) => ToSqlOutput::Owned(Value::Integer(*v)),
            Param::Text(Some(v)) => ToSqlOutput::Borrowed(v.as_str().into()),
            Param::Int(None) | Param::Text(None) => ToSqlOutput::Owned(Value::Null),
        })
    }
}

fn map_err(err: rusqlite::Error) -> StoreError {
    let detail = err.to_string();
    match err.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict { detail },
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::FileLockingProtocolFailed,
        ) => StoreError::Unavailable { detail },
        _ => StoreError::Other { detail },
    }
}

struct SqliteRow<'a, 'b>(&'a rusqlite::Row<'b>);

impl Row for SqliteRow<'_, '_> {
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.0.get(i).map_err(map_err)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.0.get(i).map_err(map_err)
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.0.get(i).map_err(map_err)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.0.get(i).map_err(map_err)
    }
}

/// Runs a query and decodes every row.
fn query<T>(
    conn: &Connection,
    sql: &str,
    params: &[Param],
    decode: impl Fn(&dyn Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut statement = conn.prepare_cached(sql).map_err(map_err)?;
    let mut rows = statement
        .query(rusqlite::params_from_iter(params.iter()))
        .map_err(map_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(map_err)? {
        out.push(decode(&SqliteRow(row))?);
    }
    Ok(out)
}

fn read_head(conn: &Connection) -> Result<AuditHead, StoreError> {
    conn.query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |row| {
        Ok(AuditHead {
            seq: row.get(0)?,
            hash: row.get(1)?,
        })
    })
    .optional()
    .map_err(map_err)?
    .ok_or_else(|| StoreError::Corrupt {
        table: "audit_head",
        detail: "the head row is missing".to_owned(),
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and brings its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError::Unavailable {
            detail: format!("opening {}: {e}", path.display()),
        })?;
        let mut store = Self::from_connection(conn)?;
        // Checkpoints move to a thread of their own; the commits no longer run them. A
        // write-ahead log that grew (a burst, a backlog after an outage) goes back to at most
        // `WAL_SIZE_LIMIT` bytes when it restarts, so that the space comes back to the
        // database: on a volume that was full, the database must be able to grow for a
        // checkpoint to complete at all.
        store
            .conn()
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
            ))
            .map_err(map_err)?;
        spawn_checkpointer(path, Arc::downgrade(&store.alive));
        let mut wal = path.as_os_str().to_os_string();
        wal.push("-wal");
        store.wal = Some(wal.into());
        Ok(store)
    }

    /// A private in-memory database (for tests and benchmarks).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::from_connection(Connection::open_in_memory().map_err(map_err)?)
    }

    fn from_connection(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
        // `journal_mode` answers with the mode set, so it is a query, not a plain pragma.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(map_err)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(map_err)?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            wal: None,
            alive: Arc::new(()),
            next_truncate: Mutex::new((None, TRUNCATE_RETRY)),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the transaction rolls back
        // when dropped), so a poisoned lock is safe to take over.
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let long = |wal: &std::path::PathBuf| {
            std::fs::metadata(wal).is_ok_and(|m| m.len() > WAL_SIZE_LIMIT)
        };
        if self.wal.as_ref().is_some_and(long) {
            self.truncate_wal(&conn);
        }
        conn
    }

    /// A truncating checkpoint that waits a moment ([`TRUNCATE_WAIT`], enough for the
    /// checkpoint thread's passive pass) but not for a long reader (a backup, an admin
    /// report): one that cannot finish is tried again after a delay that doubles while it
    /// keeps failing (from [`TRUNCATE_RETRY`] to [`TRUNCATE_RETRY_MAX`]), not by every
    /// statement meanwhile.
    fn truncate_wal(&self, conn: &Connection) {
        let mut retry = self.next_truncate.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if retry.0.is_some_and(|t| now < t) {
            return;
        }
        let _ = conn.busy_timeout(TRUNCATE_WAIT);
        // (busy, log frames, checkpointed frames): busy when a reader or writer held it off.
        let done = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
            row.get::<_, i64>(0)
        });
        let _ = conn.busy_timeout(BUSY_TIMEOUT);
        *retry = match done {
            Ok(0) => (None, TRUNCATE_RETRY),
            other => {
                if let Err(err) = other {
                    tracing::debug!(error = %err, "truncating WAL checkpoint failed");
                }
                (Some(now + retry.1), (retry.1 * 2).min(TRUNCATE_RETRY_MAX))
            }
        };
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
    )
    .map_err(map_err)?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(map_err)?;
    if current > latest_schema_version() {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: latest_schema_version(),
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql).map_err(map_err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?, ?)",
            rusqlite::params![
                version,
                crate::time::Clock::now_ms(&crate::time::SystemClock)
            ],
        )
        .map_err(map_err)?;
        tracing::info!(version, "sqlite schema migrated");
    }
    tx.commit().map_err(map_err)
}

/// Runs one statement; returns how many rows it changed.
fn execute(conn: &Connection, sql: &str, params: &[Param]) -> Result<usize, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute(rusqlite::params_from_iter(params.iter())))
        .map_err(map_err)
}

/// Applies `mutations` and appends the audit entry (if any) inside `tx`.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    mutations: &[Mutation],
    audit_draft: Option<&AuditDraft>,
) -> Result<Option<AuditEntry>, StoreError> {
    for mutation in mutations {
        let (statements, must_change) = mutation_sql(mutation);
        for (i, (sql, params)) in statements.iter().enumerate() {
            let changed = execute(tx, sql, params)?;
            if i == 0
                && changed == 0
                && let Some((kind, id)) = must_change.clone()
            {
                return Err(StoreError::NotFound { kind, id });
            }
        }
    }
    let entry = match audit_draft {
        Some(draft) => {
            let entry = audit::seal(&read_head(tx)?, draft);
            for (sql, params) in audit_append_sql(&entry) {
                execute(tx, sql, &params)?;
            }
            Some(entry)
        }
        None => None,
    };
    Ok(entry)
}

impl Store for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn()
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )
            .map_err(map_err)
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.conn()
            .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map(|_| ())
            .map_err(map_err)
    }

    fn commit(
        &self,
        mutations: &[Mutation],
        audit_draft: Option<&AuditDraft>,
    ) -> Result<Option<AuditEntry>, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(map_err)?;
        let entry = apply(&tx, mutations, audit_draft)?;
        tx.commit().map_err(map_err)?;
        Ok(entry)
    }

    fn commit_batch(
        &self,
        batch: &[(Vec<Mutation>, Option<AuditDraft>)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(map_err)?;
        for (mutations, audit_draft) in batch {
            apply(&tx, mutations, audit_draft.as_ref())?;
        }
        tx.commit().map_err(map_err)
    }

    fn reserve_budget(
        &self,
        holder: &Holder,
        now_ms: i64,
        key_id: &str,
        period_start_ms: i64,
        limit: i64,
        tokens: i64,
    ) -> Result<Result<i64, i64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(map_err)?;
        tx.prepare_cached(
            "INSERT INTO budget_usage (key_id, period_start_ms, used_tokens) VALUES (?, ?, 0) \
             ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| s.execute(rusqlite::params![key_id, period_start_ms]))
        .map_err(map_err)?;
        let changed = tx
            .prepare_cached(
                "UPDATE budget_usage SET used_tokens = used_tokens + ? \
                 WHERE key_id = ? AND period_start_ms = ? AND used_tokens + ? <= ?",
            )
            .and_then(|mut s| {
                s.execute(rusqlite::params![
                    tokens,
                    key_id,
                    period_start_ms,
                    tokens,
                    limit
                ])
            })
            .map_err(map_err)?;
        let used: i64 = tx
            .query_row(
                "SELECT used_tokens FROM budget_usage WHERE key_id = ? AND period_start_ms = ?",
                rusqlite::params![key_id, period_start_ms],
                |r| r.get(0),
            )
            .map_err(map_err)?;
        if changed == 1 {
            for (sql, params) in hold_sql(holder, now_ms, key_id, period_start_ms, tokens) {
                execute(&tx, sql, &params)?;
            }
        }
        tx.commit().map_err(map_err)?;
        Ok(if changed == 1 { Ok(used) } else { Err(used) })
    }

    fn holders(&self) -> Result<Vec<HolderRow>, StoreError> {
        query(&self.conn(), HOLDERS_SQL, &[], holder_from_row)
    }

    fn budget_used(&self, key_id: &str, period_start_ms: i64) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT used_tokens FROM budget_usage WHERE key_id = ? AND period_start_ms = ?",
                rusqlite::params![key_id, period_start_ms],
                |r| r.get(0),
            )
            .optional()
            .map_err(map_err)?
            .unwrap_or(0))
    }

    fn get_org(&self, org_id: &str) -> Result<Option<Organisation>, StoreError> {
        Ok(query(
            &self.conn(),
            "SELECT id, name, allowed_regions, created_at_ms FROM organizations WHERE id = ?",
            &[org_id.into()],
            |r| org_from_row(r, 0),
        )?
        .pop())
    }

    fn list_orgs(&self) -> Result<Vec<Organisation>, StoreError> {
        query(
            &self.conn(),
            "SELECT id, name, allowed_regions, created_at_ms FROM organizations \
             ORDER BY created_at_ms, id",
            &[],
            |r| org_from_row(r, 0),
        )
    }

    fn get_project(&self, project_id: &str) -> Result<Option<Project>, StoreError> {
        Ok(query(
            &self.conn(),
            "SELECT id, org_id, name, retention_secs, created_at_ms FROM projects WHERE id = ?",
            &[project_id.into()],
            |r| project_from_row(r, 0),
        )?
        .pop())
    }

    fn list_projects(&self, org_id: &str) -> Result<Vec<Project>, StoreError> {
        query(
            &self.conn(),
            "SELECT id, org_id, name, retention_secs, created_at_ms FROM projects \
             WHERE org_id = ? ORDER BY created_at_ms, id",
            &[org_id.into()],
            |r| project_from_row(r, 0),
        )
    }

    fn list_keys(&self, project_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE project_id = ? ORDER BY created_at_ms, id"
        );
        query(&self.conn(), &sql, &[project_id.into()], |r| {
            key_from_row(r, 0)
        })
    }

    fn key_context(&self, key_id: &str) -> Result<Option<KeyContext>, StoreError> {
        Ok(query(
            &self.conn(),
            KEY_CONTEXT_SQL,
            &[key_id.into()],
            key_context_from_row,
        )?
        .pop())
    }

    fn usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        let (clause, params) = usage_where(filter);
        let sql =
            format!("SELECT {USAGE_COLUMNS} FROM usage_records{clause} ORDER BY created_at_ms, id");
        query(&self.conn(), &sql, &params, usage_from_row)
    }

    fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq");
        query(&self.conn(), &sql, &[], audit_from_row)
    }

    fn audit_head(&self) -> Result<AuditHead, StoreError> {
        read_head(&self.conn())
    }

    fn retained_content(&self, project_id: &str) -> Result<Vec<RetainedContent>, StoreError> {
        let sql = format!(
            "SELECT {CONTENT_COLUMNS} FROM retained_content WHERE project_id = ? \
             ORDER BY created_at_ms, request_id"
        );
        query(&self.conn(), &sql, &[project_id.into()], content_from_row)
    }

    fn purge_expired_content(&self, now_ms: i64) -> Result<u64, StoreError> {
        let deleted = self
            .conn()
            .execute(
                "DELETE FROM retained_content WHERE expires_at_ms <= ?",
                [now_ms],
            )
            .map_err(map_err)?;
        Ok(deleted as u64)
    }
    fn get_response(
        &self,
        id: &str,
        project_id: &str,
        now_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let params = [id.into(), project_id.into(), now_ms.into()];
        let rows = query(&self.conn(), GET_RESPONSE_SQL, &params, response_from_row)?;
        Ok(rows.into_iter().next())
    }

    fn purge_expired_responses(&self, now_ms: i64) -> Result<u64, StoreError> {
        let deleted = self
            .conn()
            .execute(
                "DELETE FROM stored_responses WHERE expires_at_ms <= ?",
                [now_ms],
            )
            .map_err(map_err)?;
        Ok(deleted as u64)
    }

    fn get_object(
        &self,
        kind: ObjectKind,
        id: &str,
        project_id: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<StoredObject>, StoreError> {
        let (sql, params) = get_object_sql(kind, id, project_id, now_ms);
        let rows = query(&self.conn(), &sql, &params, object_from_row)?;
        Ok(rows.into_iter().next())
    }

    fn list_objects(
        &self,
        filter: &ObjectFilter,
        now_ms: i64,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let (sql, params) = list_objects_sql(filter, now_ms);
        query(&self.conn(), &sql, &params, object_from_row)
    }

    fn purge_expired_objects(&self, now_ms: i64) -> Result<u64, StoreError> {
        let deleted = self
            .conn()
            .execute(
                "DELETE FROM stored_objects WHERE expires_at_ms <= ?",
                [now_ms],
            )
            .map_err(map_err)?;
        Ok(deleted as u64)
    }
}
