//! The production backend: PostgreSQL through the synchronous `postgres` driver, with a small
//! pool of connections.
//!
//! A connection that breaks (the server restarted, the network dropped) is thrown away and the
//! operation fails with [`StoreError::Unavailable`]; the next operation connects afresh, so the
//! store recovers by itself when the server comes back. Connecting gives up after
//! [`CONNECT_TIMEOUT`], and the server cancels any statement that runs past
//! [`STATEMENT_TIMEOUT_MS`], so no call waits for ever.

use std::sync::Mutex;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Transaction};

use super::{
    AUDIT_COLUMNS, CONTENT_COLUMNS, GET_RESPONSE_SQL, HOLDERS_SQL, Holder, HolderRow, KEY_COLUMNS,
    KEY_CONTEXT_SQL, MIGRATIONS, Mutation, Param, Row, Store, USAGE_COLUMNS, audit_append_sql,
    audit_from_row, content_from_row, get_object_sql, hold_sql, holder_from_row,
    key_context_from_row, key_from_row, latest_schema_version, list_objects_sql, mutation_sql,
    numbered_placeholders, object_from_row, org_from_row, project_from_row, response_from_row,
    usage_from_row, usage_where,
};
use crate::audit::{self, AuditDraft, AuditEntry, AuditHead};
use crate::error::StoreError;
use crate::types::{
    KeyContext, KeyRecord, ObjectFilter, ObjectKind, Organisation, Project, RetainedContent,
    StoredObject, StoredResponse, UsageFilter, UsageRecord,
};

/// How long opening a connection may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The server cancels statements that run longer (lock waits included).
pub(crate) const STATEMENT_TIMEOUT_MS: u64 = 10_000;
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;
/// The advisory lock that serialises migrations across processes.
const MIGRATION_LOCK: i64 = 0x536f_7576_6572;

/// The PostgreSQL store.
pub struct PostgresStore {
    config: Config,
    idle: Mutex<Vec<Client>>,
    schema: Option<String>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

fn map_err(err: postgres::Error) -> StoreError {
    let detail = err.to_string();
    let detail = match err.as_db_error() {
        Some(db) => format!("{detail}: {}", db.message()),
        None => detail,
    };
    match err.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::Conflict { detail },
        Some(code)
            if *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::QUERY_CANCELED
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || code.code().starts_with("08") =>
        {
            StoreError::Unavailable { detail }
        }
        Some(_) => StoreError::Other { detail },
        // No SQLSTATE: the connection itself failed (refused, reset, closed).
        None => StoreError::Unavailable { detail },
    }
}

struct PgRow<'a>(&'a postgres::Row);

fn decode_err(err: postgres::Error) -> StoreError {
    StoreError::Corrupt {
        table: "(postgres row)",
        detail: err.to_string(),
    }
}

impl Row for PgRow<'_> {
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.0.try_get(i).map_err(decode_err)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.0.try_get(i).map_err(decode_err)
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.0.try_get(i).map_err(decode_err)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.0.try_get(i).map_err(decode_err)
    }
}

/// Boxes parameters for the driver.
fn boxed(params: &[Param]) -> Vec<Box<dyn ToSql + Sync>> {
    params
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync> {
            match p {
                Param::Int(v) => Box::new(*v),
                Param::Text(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

fn refs(params: &[Box<dyn ToSql + Sync>]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref()).collect()
}

fn query<T>(
    client: &mut impl postgres::GenericClient,
    sql: &str,
    params: &[Param],
    decode: impl Fn(&dyn Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let owned = boxed(params);
    let rows = client
        .query(numbered_placeholders(sql).as_str(), &refs(&owned))
        .map_err(map_err)?;
    rows.iter().map(|row| decode(&PgRow(row))).collect()
}

fn execute(tx: &mut Transaction<'_>, sql: &str, params: &[Param]) -> Result<u64, StoreError> {
    let owned = boxed(params);
    tx.execute(numbered_placeholders(sql).as_str(), &refs(&owned))
        .map_err(map_err)
}

/// Whether `name` is safe to splice into SQL as a schema name.
fn valid_schema_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`, or libpq's
    /// `key=value` form) and brings the schema up to date.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_in_schema(url, None)
    }

    /// As [`PostgresStore::connect`], with every table in the schema `schema` (created if
    /// missing; lowercase letters, digits and `_`). Lets one database hold several
    /// independent control planes, as the tests do.
    pub fn connect_in_schema(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(|e| StoreError::Unavailable {
            detail: format!("invalid database URL: {e}"),
        })?;
        let mut options = format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}");
        if let Some(schema) = schema {
            if !valid_schema_name(schema) {
                return Err(StoreError::Other {
                    detail: format!("invalid schema name `{schema}`"),
                });
            }
            options.push_str(&format!(" -c search_path={schema}"));
        }
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .options(&options)
            .application_name("souverain");
        let store = PostgresStore {
            config,
            idle: Mutex::new(Vec::new()),
            schema: schema.map(str::to_owned),
        };
        store.with_client(|client| {
            if let Some(schema) = &store.schema {
                client
                    .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                    .map_err(map_err)?;
            }
            migrate(client)
        })?;
        Ok(store)
    }

    /// Runs `f` on a pooled connection; a connection that broke is not returned to the pool.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut client = match pooled {
            Some(client) if !client.is_closed() => client,
            _ => self.config.connect(NoTls).map_err(map_err)?,
        };
        let result = f(&mut client);
        let broken = client.is_closed()
            || matches!(result, Err(StoreError::Unavailable { .. }))
                && client.is_valid(Duration::from_secs(1)).is_err();
        if !broken {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(client);
            }
        }
        result
    }

    /// Runs `f` in a transaction and commits it.
    fn in_transaction<T>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_client(|client| {
            let mut tx = client.transaction().map_err(map_err)?;
            let value = f(&mut tx)?;
            tx.commit().map_err(map_err)?;
            Ok(value)
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Each client owns a small runtime, which must not be dropped on an async worker
        // thread: hand them to a plain thread to close.
        let clients = std::mem::take(self.idle.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !clients.is_empty() {
            let _ = std::thread::Builder::new()
                .name("pg-close".to_owned())
                .spawn(move || drop(clients));
        }
    }
}

fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(map_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(map_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
    )
    .map_err(map_err)?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .and_then(|row| row.try_get(0))
        .map_err(map_err)?;
    if current > latest_schema_version() {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: latest_schema_version(),
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).map_err(map_err)?;
        let now = crate::time::Clock::now_ms(&crate::time::SystemClock);
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
            &[version, &now],
        )
        .map_err(map_err)?;
        tracing::info!(version, "postgres schema migrated");
    }
    tx.commit().map_err(map_err)
}

impl Store for PostgresStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        self.with_client(|c| {
            c.query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .and_then(|row| row.try_get(0))
            .map_err(map_err)
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_client(|c| c.batch_execute("SELECT 1").map_err(map_err))
    }

    fn commit(
        &self,
        mutations: &[Mutation],
        audit_draft: Option<&AuditDraft>,
    ) -> Result<Option<AuditEntry>, StoreError> {
        self.in_transaction(|tx| {
            for mutation in mutations {
                let (statements, must_change) = mutation_sql(mutation);
                for (i, (sql, params)) in statements.iter().enumerate() {
                    if execute(tx, sql, params)? == 0
                        && i == 0
                        && let Some((kind, id)) = must_change.clone()
                    {
                        return Err(StoreError::NotFound { kind, id });
                    }
                }
            }
            let Some(draft) = audit_draft else {
                return Ok(None);
            };
            // The row lock on the head serialises appends across connections and processes.
            let head = tx
                .query_opt(
                    "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .map_err(map_err)?
                .ok_or_else(|| StoreError::Corrupt {
                    table: "audit_head",
                    detail: "the head row is missing".to_owned(),
                })?;
            let head = AuditHead {
                seq: head.try_get(0).map_err(decode_err)?,
                hash: head.try_get(1).map_err(decode_err)?,
            };
            let entry = audit::seal(&head, draft);
            for (sql, params) in audit_append_sql(&entry) {
                execute(tx, sql, &params)?;
            }
            Ok(Some(entry))
        })
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
        self.in_transaction(|tx| {
            tx.execute(
                "INSERT INTO budget_usage (key_id, period_start_ms, used_tokens) \
                 VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
                &[&key_id, &period_start_ms],
            )
            .map_err(map_err)?;
            // Under READ COMMITTED the row lock makes concurrent updates queue, and each
            // re-checks the condition against the value the one before it committed.
            let reserved = tx
                .query_opt(
                    "UPDATE budget_usage SET used_tokens = used_tokens + $1 \
                     WHERE key_id = $2 AND period_start_ms = $3 AND used_tokens + $1 <= $4 \
                     RETURNING used_tokens",
                    &[&tokens, &key_id, &period_start_ms, &limit],
                )
                .map_err(map_err)?;
            if let Some(row) = reserved {
                let used = row.try_get(0).map_err(decode_err)?;
                for (sql, params) in hold_sql(holder, now_ms, key_id, period_start_ms, tokens) {
                    execute(tx, sql, &params)?;
                }
                return Ok(Ok(used));
            }
            let used: i64 = tx
                .query_one(
                    "SELECT used_tokens FROM budget_usage WHERE key_id = $1 AND period_start_ms = $2",
                    &[&key_id, &period_start_ms],
                )
                .and_then(|row| row.try_get(0))
                .map_err(map_err)?;
            Ok(Err(used))
        })
    }

    fn holders(&self) -> Result<Vec<HolderRow>, StoreError> {
        self.with_client(|c| query(c, HOLDERS_SQL, &[], holder_from_row))
    }

    fn budget_used(&self, key_id: &str, period_start_ms: i64) -> Result<i64, StoreError> {
        self.with_client(|c| {
            Ok(query(
                c,
                "SELECT used_tokens FROM budget_usage WHERE key_id = ? AND period_start_ms = ?",
                &[key_id.into(), period_start_ms.into()],
                |r| r.int(0),
            )?
            .pop()
            .unwrap_or(0))
        })
    }

    fn get_org(&self, org_id: &str) -> Result<Option<Organisation>, StoreError> {
        self.with_client(|c| {
            Ok(query(
                c,
                "SELECT id, name, allowed_regions, created_at_ms FROM organizations WHERE id = ?",
                &[org_id.into()],
                |r| org_from_row(r, 0),
            )?
            .pop())
        })
    }

    fn list_orgs(&self) -> Result<Vec<Organisation>, StoreError> {
        self.with_client(|c| {
            query(
                c,
                "SELECT id, name, allowed_regions, created_at_ms FROM organizations \
                 ORDER BY created_at_ms, id",
                &[],
                |r| org_from_row(r, 0),
            )
        })
    }

    fn get_project(&self, project_id: &str) -> Result<Option<Project>, StoreError> {
        self.with_client(|c| {
            Ok(query(
                c,
                "SELECT id, org_id, name, retention_secs, created_at_ms FROM projects WHERE id = ?",
                &[project_id.into()],
                |r| project_from_row(r, 0),
            )?
            .pop())
        })
    }

    fn list_projects(&self, org_id: &str) -> Result<Vec<Project>, StoreError> {
        self.with_client(|c| {
            query(
                c,
                "SELECT id, org_id, name, retention_secs, created_at_ms FROM projects \
                 WHERE org_id = ? ORDER BY created_at_ms, id",
                &[org_id.into()],
                |r| project_from_row(r, 0),
            )
        })
    }

    fn list_keys(&self, project_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE project_id = ? ORDER BY created_at_ms, id"
        );
        self.with_client(|c| query(c, &sql, &[project_id.into()], |r| key_from_row(r, 0)))
    }

    fn key_context(&self, key_id: &str) -> Result<Option<KeyContext>, StoreError> {
        self.with_client(|c| {
            Ok(query(c, KEY_CONTEXT_SQL, &[key_id.into()], key_context_from_row)?.pop())
        })
    }

    fn usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRecord>, StoreError> {
        let (clause, params) = usage_where(filter);
        let sql =
            format!("SELECT {USAGE_COLUMNS} FROM usage_records{clause} ORDER BY created_at_ms, id");
        self.with_client(|c| query(c, &sql, &params, usage_from_row))
    }

    fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq");
        self.with_client(|c| query(c, &sql, &[], audit_from_row))
    }

    fn audit_head(&self) -> Result<AuditHead, StoreError> {
        self.with_client(|c| {
            query(
                c,
                "SELECT seq, hash FROM audit_head WHERE id = 1",
                &[],
                |r| {
                    Ok(AuditHead {
                        seq: r.int(0)?,
                        hash: r.text(1)?,
                    })
                },
            )?
            .pop()
            .ok_or_else(|| StoreError::Corrupt {
                table: "audit_head",
                detail: "the head row is missing".to_owned(),
            })
        })
    }

    fn retained_content(&self, project_id: &str) -> Result<Vec<RetainedContent>, StoreError> {
        let sql = format!(
            "SELECT {CONTENT_COLUMNS} FROM retained_content WHERE project_id = ? \
             ORDER BY created_at_ms, request_id"
        );
        self.with_client(|c| query(c, &sql, &[project_id.into()], content_from_row))
    }

    fn purge_expired_content(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.with_client(|c| {
            c.execute(
                "DELETE FROM retained_content WHERE expires_at_ms <= $1",
                &[&now_ms],
            )
            .map_err(map_err)
        })
    }
    fn get_response(
        &self,
        id: &str,
        project_id: &str,
        now_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let params = [id.into(), project_id.into(), now_ms.into()];
        let rows = self.with_client(|c| query(c, GET_RESPONSE_SQL, &params, response_from_row))?;
        Ok(rows.into_iter().next())
    }

    fn purge_expired_responses(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.with_client(|c| {
            c.execute(
                "DELETE FROM stored_responses WHERE expires_at_ms <= $1",
                &[&now_ms],
            )
            .map_err(map_err)
        })
    }

    fn get_object(
        &self,
        kind: ObjectKind,
        id: &str,
        project_id: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<StoredObject>, StoreError> {
        let (sql, params) = get_object_sql(kind, id, project_id, now_ms);
        let rows = self.with_client(|c| query(c, &sql, &params, object_from_row))?;
        Ok(rows.into_iter().next())
    }

    fn list_objects(
        &self,
        filter: &ObjectFilter,
        now_ms: i64,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let (sql, params) = list_objects_sql(filter, now_ms);
        self.with_client(|c| query(c, &sql, &params, object_from_row))
    }

    fn purge_expired_objects(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.with_client(|c| {
            c.execute(
                "DELETE FROM stored_objects WHERE expires_at_ms <= $1",
                &[&now_ms],
            )
            .map_err(map_err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        assert!(valid_schema_name("t_abc123"));
        for bad in ["", "1abc", "a-b", "A", "a;drop", &"a".repeat(64)] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
    }

    #[test]
    fn an_unreachable_server_is_unavailable_not_a_hang() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let started = std::time::Instant::now();
        let err = PostgresStore::connect("postgres://nobody@127.0.0.1:1/none").unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(started.elapsed() < CONNECT_TIMEOUT * 2);
        let err = PostgresStore::connect("not a url at all ::").unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    }
}
