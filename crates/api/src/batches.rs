//! OpenAI's Files and Batch APIs: `POST /v1/files` (purpose `batch`, JSONL), `GET /v1/files`,
//! `GET`/`DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`; `POST /v1/batches`, `GET
//! /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`.
//!
//! Everything lives in the control plane's store (`serve --auth`), owned by the key's project:
//! files, batches, and each finished request of a running batch, so that a batch resumes where
//! it was after a restart. The runner ([`spawn_runner`]) takes the oldest running batch and
//! sends its requests to the application itself, in the batch key's name (metered, budgeted,
//! audited like any request), at batch priority: the engine admits them only behind
//! interactive requests, in at most half of its running slots.
//!
//! Retention: a batch's files hold prompts and outputs, so they are kept only as long as the
//! batch needs them and the project's retention allows. An input file not used by a batch
//! goes after the project's retention or a day, whichever is longer; a batch's input file goes
//! when the batch ends (after the project's retention when it has one, and not while another
//! running batch reads it); its output and error files stay for the project's retention, at
//! least a day, and with zero retention (the default) they go ten minutes after their first
//! download. A project keeps at most 1,000 files and 4 GiB; a batch's results at most 256 MiB.
//!
//! One runner per store: several servers sharing a store each run batches, and a batch whose
//! server makes no progress for a minute is taken over by another; a server that stalls that
//! long (and then goes on) can send some requests of the batch twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use control::{
    ControlPlane, KeyContext, Mutation, ObjectAudit, ObjectFilter, ObjectKind, StoredObject,
};
use futures::StreamExt;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tower::ServiceExt;

use crate::admission::{BatchIdentity, Caller};
use crate::error::ApiError;
use crate::generation::PRIORITY;
use crate::state::{AppState, BatchSignals as Signals, response_id};

/// The largest file `POST /v1/files` takes.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// How long a zero-retention project's output file stays once downloaded.
const DOWNLOADED_GRACE_MS: i64 = 10 * 60_000;
/// Most files a project keeps, and most bytes in them.
const MAX_PROJECT_FILES: usize = 1000;
const MAX_PROJECT_FILE_BYTES: u64 = 4 << 30;
/// Most bytes of results one batch may produce: past it, it stops and fails.
const MAX_BATCH_OUTPUT_BYTES: usize = 256 << 20;
/// Most requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 50_000;
const MAX_CUSTOM_ID_CHARS: usize = 512;
const MAX_FILENAME_CHARS: usize = 256;
const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;
/// How long an input file waits for a batch, and the least time outputs are kept.
const DAY_MS: i64 = 86_400_000;
/// The endpoints a batch may call.
const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];
/// Statuses of batches the runner still has work on.
const RUNNING: [&str; 3] = ["in_progress", "finalizing", "cancelling"];
/// How long a runner's claim on a batch lasts without progress before another takes it.
const CLAIM_MS: i64 = 60_000;
/// Most times a request refused for load (429, 503) is tried again before it is recorded
/// as failed, and the longest wait between tries.
const MAX_TRIES: usize = 8;
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

fn caller(caller: Option<Extension<Caller>>) -> Result<Caller, ApiError> {
    caller
        .map(|Extension(c)| c)
        .ok_or_else(|| ApiError::InvalidRequest {
            message:
                "The Files and Batch APIs keep files and batches in the control plane's store: \
                  serve with `--auth` to use them."
                    .to_owned(),
            param: None,
            code: Some("batches_unavailable"),
        })
}

fn not_found(what: &str, id: &str) -> ApiError {
    let id: String = id.chars().take(edge::ECHOED_NAME_CHARS).collect();
    ApiError::Refused(Box::new(edge::Refusal {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: None,
        param: Some("id".to_owned()),
        message: format!("No {what} found with id '{id}'."),
        retry_after_s: None,
    }))
}

fn seconds(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

// ---- files ---------------------------------------------------------------------------------

/// One request line of a batch input file.
#[derive(Debug, Clone)]
struct Line {
    custom_id: String,
    url: String,
    body: Map<String, Value>,
}

/// Checks a Batch API input file as `POST /v1/files` and `POST /v1/batches` do: the number
/// of requests it holds, or why it is not one (naming the line).
pub fn check_batch_file(text: &str) -> Result<usize, String> {
    parse_lines(text).map(|lines| lines.len())
}

/// Parses and checks a JSONL batch file: every non-empty line a request (`custom_id`
/// unique, `method` POST, `url` one of [`ENDPOINTS`] and the same on every line, `body` an
/// object without `stream`), at most [`MAX_BATCH_REQUESTS`]. Errors name the line.
fn parse_lines(text: &str) -> Result<Vec<Line>, String> {
    let mut lines = Vec::new();
    let mut ids = HashSet::new();
    for (n, raw) in text.lines().enumerate() {
        let n = n + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if lines.len() == MAX_BATCH_REQUESTS {
            return Err(format!("more than {MAX_BATCH_REQUESTS} requests"));
        }
        let value: Value =
            serde_json::from_str(raw).map_err(|e| format!("line {n} is not JSON: {e}"))?;
        let Value::Object(mut object) = value else {
            return Err(format!("line {n} is not a JSON object"));
        };
        let custom_id = match object.remove("custom_id") {
            Some(Value::String(id))
                if !id.is_empty() && id.chars().count() <= MAX_CUSTOM_ID_CHARS =>
            {
                id
            }
            _ => {
                return Err(format!(
                    "line {n}: `custom_id` must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters"
                ));
            }
        };
        if !ids.insert(custom_id.clone()) {
            return Err(format!("line {n}: `custom_id` `{custom_id}` is used twice"));
        }
        match object.remove("method") {
            Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
            _ => return Err(format!("line {n}: `method` must be \"POST\"")),
        }
        let url = match object.remove("url") {
            Some(Value::String(url)) if ENDPOINTS.contains(&url.as_str()) => url,
            _ => {
                return Err(format!(
                    "line {n}: `url` must be one of {}",
                    ENDPOINTS.join(", ")
                ));
            }
        };
        if let Some(first) = lines.first().map(|l: &Line| &l.url)
            && *first != url
        {
            return Err(format!(
                "line {n}: `url` is {url} but earlier lines call {first}; a batch calls one endpoint"
            ));
        }
        let body = match object.remove("body") {
            Some(Value::Object(body)) => body,
            _ => return Err(format!("line {n}: `body` must be an object")),
        };
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            return Err(format!(
                "line {n}: a batch request cannot stream (`stream: true`)"
            ));
        }
        lines.push(Line {
            custom_id,
            url,
            body,
        });
    }
    if lines.is_empty() {
        return Err("the file holds no request".to_owned());
    }
    Ok(lines)
}

fn file_object(
    id: &str,
    bytes: usize,
    created_at_ms: i64,
    filename: &str,
    purpose: &str,
    expires_at_ms: Option<i64>,
) -> Value {
    json!({
        "id": id,
        "object": "file",
        "bytes": bytes,
        "created_at": seconds(created_at_ms),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": expires_at_ms.map(seconds),
    })
}

/// A file as the API shows it, with its current expiry.
fn file_view(stored: &StoredObject) -> Value {
    let mut meta: Value = serde_json::from_str(&stored.meta).unwrap_or(Value::Null);
    meta["expires_at"] = stored.expires_at_ms.map(seconds).into();
    meta
}

/// `POST /v1/files` (multipart: `purpose` = `batch`, `file` = a JSONL file).
pub(crate) async fn upload(
    c: Option<Extension<Caller>>,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let caller = caller(c)?;
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid("file", format!("the multipart body is malformed: {e}")))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| ApiError::invalid("purpose", e.to_string()))?,
                );
            }
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let bytes = field.bytes().await.map_err(|e| {
                    ApiError::invalid("file", format!("the file could not be read: {e}"))
                })?;
                file = Some((filename, bytes));
            }
            // Fields we do not use (`expires_after[...]`) are read and dropped.
            _ => {}
        }
    }
    match purpose.as_deref() {
        Some("batch") => {}
        Some(other) => {
            let other: String = other.chars().take(64).collect();
            return Err(ApiError::invalid(
                "purpose",
                format!("`purpose` is `{other}`; this server takes files for `batch` only"),
            ));
        }
        None => return Err(ApiError::invalid("purpose", "`purpose` is required")),
    }
    let Some((filename, bytes)) = file else {
        return Err(ApiError::invalid("file", "`file` is required"));
    };
    if filename.chars().count() > MAX_FILENAME_CHARS || filename.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "file",
            format!("the file name must be at most {MAX_FILENAME_CHARS} printable characters"),
        ));
    }
    if bytes.len() > MAX_FILE_BYTES {
        return Err(ApiError::invalid(
            "file",
            format!(
                "the file is {} bytes; at most {MAX_FILE_BYTES} are taken",
                bytes.len()
            ),
        ));
    }
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::invalid("file", "the file is not UTF-8 text"))?;
    parse_lines(&text)
        .map_err(|e| ApiError::invalid("file", format!("not a batch input file: {e}")))?;
    let id = response_id("file-");
    let size = text.len();
    let stored = caller
        .run(move |plane, ctx| {
            // A project holds a bounded number and size of files.
            let held = plane.list_objects(&ObjectFilter {
                kind: ObjectKind::File,
                project_id: Some(ctx.project.id.clone()),
                parent: None,
                statuses: Vec::new(),
                after_id: None,
                newest_first: false,
                limit: MAX_PROJECT_FILES,
                with_content: false,
            })?;
            let held_bytes: u64 = held.iter().map(|f| file_view(f)["bytes"].as_u64().unwrap_or(0)).sum();
            if held.len() >= MAX_PROJECT_FILES
                || held_bytes.saturating_add(size as u64) > MAX_PROJECT_FILE_BYTES
            {
                return Err(control::ControlError::Invalid {
                    field: "file",
                    message: format!(
                        "project {} holds {} files of {held_bytes} bytes; at most {MAX_PROJECT_FILES} \
                         files and {MAX_PROJECT_FILE_BYTES} bytes are kept: delete some first",
                        ctx.project.id,
                        held.len()
                    ),
                });
            }
            let now = plane.now_ms();
            let expires = now + keep_ms(ctx).max(DAY_MS);
            let meta = file_object(&id, size, now, &filename, "batch", Some(expires));
            let object = StoredObject {
                kind: ObjectKind::File,
                id: id.clone(),
                project_id: ctx.project.id.clone(),
                parent: None,
                status: None,
                created_at_ms: now,
                expires_at_ms: Some(expires),
                meta: meta.to_string(),
                content: Some(text),
            };
            plane.commit_objects(
                vec![Mutation::PutObject(object.clone())],
                Some(ObjectAudit {
                    key_id: &ctx.key.id,
                    action: "file.create",
                    target: &id,
                    detail: json!({"bytes": size, "purpose": "batch"}),
                }),
            )?;
            Ok(object)
        })
        .await?;
    Ok(axum::Json(file_view(&stored)).into_response())
}

/// The project's retention in milliseconds (0: zero retention).
fn keep_ms(ctx: &KeyContext) -> i64 {
    ctx.project
        .retention_secs
        .map_or(0, |s| s.saturating_mul(1000))
}

/// The key's project's file or batch `id`; a 404 for any other.
async fn get_owned(
    caller: &Caller,
    kind: ObjectKind,
    id: String,
) -> Result<StoredObject, ApiError> {
    let wanted = id.clone();
    caller
        .run(move |plane, ctx| plane.get_object(kind, &wanted, Some(&ctx.project.id)))
        .await?
        .ok_or_else(|| not_found(kind.as_str(), &id))
}

async fn get_file(caller: &Caller, id: String) -> Result<StoredObject, ApiError> {
    get_owned(caller, ObjectKind::File, id).await
}

/// Deletes the key's project's file `id`, audited with `detail`.
async fn delete_owned_file(caller: &Caller, id: String, detail: Value) -> Result<(), ApiError> {
    caller
        .run(move |plane, ctx| {
            plane.commit_objects(
                vec![Mutation::DeleteObject {
                    kind: ObjectKind::File,
                    id: id.clone(),
                    project_id: ctx.project.id.clone(),
                }],
                Some(ObjectAudit {
                    key_id: &ctx.key.id,
                    action: "file.delete",
                    target: &id,
                    detail,
                }),
            )
        })
        .await
}

/// `GET /v1/files/{id}`.
pub(crate) async fn retrieve_file(
    c: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = get_file(&caller(c)?, id).await?;
    Ok(axum::Json(file_view(&stored)).into_response())
}

/// `GET /v1/files/{id}/content`: the file's bytes. With zero retention a batch's output or
/// error file goes [`DOWNLOADED_GRACE_MS`] after it was first read (time to retry a transfer
/// that broke; a `HEAD` reads nothing and changes nothing).
pub(crate) async fn file_content(
    method: Method,
    c: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = caller(c)?;
    let mut stored = get_file(&caller, id).await?;
    let content = stored.content.clone().unwrap_or_default();
    let output = stored.parent.is_some();
    if output && !caller.retains() && method == Method::GET {
        caller
            .run(move |plane, _| {
                let soon = plane.now_ms() + DOWNLOADED_GRACE_MS;
                if stored.expires_at_ms.is_none_or(|at| at > soon) {
                    stored.expires_at_ms = Some(soon);
                    plane.commit_objects(vec![Mutation::PutObject(stored)], None)?;
                }
                Ok(())
            })
            .await?;
    }
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], content).into_response())
}

/// `DELETE /v1/files/{id}`.
pub(crate) async fn delete_file(
    c: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = caller(c)?;
    let stored = get_file(&caller, id.clone()).await?;
    delete_owned_file(&caller, stored.id, json!({})).await?;
    Ok(axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}

/// `GET /v1/files` and `GET /v1/batches`: `limit` (1 to 10000, default 20 / 10000 for files),
/// `after` (a cursor: the last id of the previous page), `purpose` (files).
#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
    purpose: Option<String>,
}

async fn list(
    caller: &Caller,
    kind: ObjectKind,
    q: ListQuery,
    default_limit: usize,
) -> Result<(Vec<StoredObject>, bool), ApiError> {
    let limit = q.limit.unwrap_or(default_limit);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            "`limit` must be between 1 and 10000",
        ));
    }
    let after = q.after.filter(|a| !a.is_empty());
    let objects = caller
        .run(move |plane, ctx| {
            plane.list_objects(&ObjectFilter {
                kind,
                project_id: Some(ctx.project.id.clone()),
                parent: None,
                statuses: Vec::new(),
                after_id: after,
                newest_first: true,
                limit: limit + 1,
                with_content: false,
            })
        })
        .await?;
    let more = objects.len() > limit;
    Ok((objects.into_iter().take(limit).collect(), more))
}

fn page(data: Vec<Value>, more: bool) -> Response {
    let first = data
        .first()
        .and_then(|v| v["id"].as_str())
        .map(str::to_owned);
    let last = data
        .last()
        .and_then(|v| v["id"].as_str())
        .map(str::to_owned);
    axum::Json(json!({
        "object": "list",
        "data": data,
        "first_id": first,
        "last_id": last,
        "has_more": more,
    }))
    .into_response()
}

/// `GET /v1/files`.
pub(crate) async fn list_files(
    c: Option<Extension<Caller>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let caller = caller(c)?;
    let purpose = q.purpose.clone();
    let (files, more) = list(&caller, ObjectKind::File, q, 10_000).await?;
    let data = files
        .iter()
        .map(file_view)
        .filter(|f| purpose.as_deref().is_none_or(|p| f["purpose"] == p))
        .collect();
    Ok(page(data, more))
}

// ---- batches -------------------------------------------------------------------------------

/// `POST /v1/batches` as received.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    /// OpenAI's output expiry policy: accepted; the project's retention decides.
    #[serde(default)]
    output_expires_after: Option<Value>,
}

/// What the runner keeps of a batch beside its public object (in the row's `content`).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct Internal {
    /// The key the batch runs as.
    key_id: String,
    /// The runner that holds it and when it last showed progress.
    claimed_by: Option<String>,
    claimed_at_ms: i64,
}

fn check_metadata(metadata: &Option<Map<String, Value>>) -> Result<Value, ApiError> {
    let Some(map) = metadata else {
        return Ok(json!({}));
    };
    if map.len() > MAX_METADATA_PAIRS {
        return Err(ApiError::invalid(
            "metadata",
            format!(
                "`metadata` has {} keys; at most {MAX_METADATA_PAIRS}",
                map.len()
            ),
        ));
    }
    for (k, v) in map {
        let fits = k.chars().count() <= MAX_METADATA_KEY_CHARS
            && v.as_str()
                .is_some_and(|v| v.chars().count() <= MAX_METADATA_VALUE_CHARS);
        if !fits {
            return Err(ApiError::invalid(
                "metadata",
                format!(
                    "`metadata` keys are at most {MAX_METADATA_KEY_CHARS} characters and values \
                     strings of at most {MAX_METADATA_VALUE_CHARS}"
                ),
            ));
        }
    }
    Ok(Value::Object(map.clone()))
}

/// `POST /v1/batches`: checks the input file's every line against the endpoint, then keeps
/// the batch (in progress) and wakes the runner. A bad file is a 400 naming the line, and
/// nothing is kept.
pub(crate) async fn create_batch(
    State(app): State<AppState>,
    c: Option<Extension<Caller>>,
    edge::Json(body): edge::Json<CreateBatch>,
) -> Result<Response, ApiError> {
    let caller = caller(c)?;
    if !ENDPOINTS.contains(&body.endpoint.as_str()) {
        return Err(ApiError::invalid(
            "endpoint",
            format!("`endpoint` must be one of {}", ENDPOINTS.join(", ")),
        ));
    }
    if body.completion_window != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            "`completion_window` must be \"24h\"",
        ));
    }
    let _ = body.output_expires_after;
    let metadata = check_metadata(&body.metadata)?;
    let input = get_file(&caller, body.input_file_id.clone())
        .await
        .map_err(|_| {
            ApiError::invalid(
                "input_file_id",
                "`input_file_id` names no file of this project",
            )
        })?;
    if input.parent.is_some() || file_view(&input)["purpose"] != "batch" {
        return Err(ApiError::invalid(
            "input_file_id",
            "the input file's purpose must be `batch`",
        ));
    }
    let lines = parse_lines(input.content.as_deref().unwrap_or_default()).map_err(|e| {
        ApiError::invalid("input_file_id", format!("the input file is not valid: {e}"))
    })?;
    if let Some(line) = lines.iter().position(|l| l.url != body.endpoint) {
        return Err(ApiError::invalid(
            "input_file_id",
            format!(
                "request {} of the input file calls {}, not the batch's endpoint {}",
                line + 1,
                lines[line].url,
                body.endpoint
            ),
        ));
    }
    let total = lines.len();
    let id = response_id("batch_");
    let endpoint = body.endpoint.clone();
    let stored = caller
        .run(move |plane, ctx| {
            let now = plane.now_ms();
            let object = json!({
                "id": id,
                "object": "batch",
                "endpoint": endpoint,
                "errors": null,
                "input_file_id": input.id,
                "completion_window": "24h",
                "status": "in_progress",
                "output_file_id": null,
                "error_file_id": null,
                "created_at": seconds(now),
                "in_progress_at": seconds(now),
                "expires_at": seconds(now + DAY_MS),
                "finalizing_at": null,
                "completed_at": null,
                "failed_at": null,
                "expired_at": null,
                "cancelling_at": null,
                "cancelled_at": null,
                "request_counts": {"total": total, "completed": 0, "failed": 0},
                "metadata": metadata,
            });
            let internal = Internal {
                key_id: ctx.key.id.clone(),
                claimed_by: None,
                claimed_at_ms: 0,
            };
            let batch = StoredObject {
                kind: ObjectKind::Batch,
                id: id.clone(),
                project_id: ctx.project.id.clone(),
                parent: None,
                status: Some("in_progress".to_owned()),
                created_at_ms: now,
                expires_at_ms: None,
                meta: object.to_string(),
                content: Some(serde_json::to_string(&internal).unwrap_or_default()),
            };
            // The input file is the batch's now: kept until the batch ends.
            let held = StoredObject {
                expires_at_ms: None,
                ..input
            };
            plane.commit_objects(
                vec![
                    Mutation::PutObject(batch.clone()),
                    Mutation::PutObject(held),
                ],
                Some(ObjectAudit {
                    key_id: &ctx.key.id,
                    action: "batch.create",
                    target: &id,
                    detail: json!({"requests": total, "endpoint": endpoint}),
                }),
            )?;
            Ok(batch)
        })
        .await?;
    app.batches.wake();
    Ok(axum::Json(batch_view(&stored)).into_response())
}

fn batch_view(stored: &StoredObject) -> Value {
    serde_json::from_str(&stored.meta).unwrap_or(Value::Null)
}

async fn get_batch(caller: &Caller, id: String) -> Result<StoredObject, ApiError> {
    get_owned(caller, ObjectKind::Batch, id).await
}

/// `GET /v1/batches/{id}`.
pub(crate) async fn retrieve_batch(
    c: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = get_batch(&caller(c)?, id).await?;
    Ok(axum::Json(batch_view(&stored)).into_response())
}

/// `GET /v1/batches`.
pub(crate) async fn list_batches(
    c: Option<Extension<Caller>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let (batches, more) = list(&caller(c)?, ObjectKind::Batch, q, 20).await?;
    Ok(page(batches.iter().map(batch_view).collect(), more))
}

/// `POST /v1/batches/{id}/cancel`: a running batch becomes `cancelling`; the runner sends no
/// further request of it, lets those in flight end, and writes what finished.
pub(crate) async fn cancel_batch(
    State(app): State<AppState>,
    c: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = caller(c)?;
    // Written only while the batch is still running (a conditional update): a batch the
    // runner ends meanwhile is answered as it ended, never brought back as `cancelling`.
    for _ in 0..3 {
        let mut stored = get_batch(&caller, id.clone()).await?;
        let status = stored.status.clone().unwrap_or_default();
        if status == "cancelling" || status == "cancelled" {
            return Ok(axum::Json(batch_view(&stored)).into_response());
        }
        if status != "in_progress" && status != "validating" {
            return Err(ApiError::Refused(Box::new(edge::Refusal {
                status: StatusCode::CONFLICT,
                kind: "invalid_request_error",
                code: None,
                param: None,
                message: format!("Cannot cancel a batch with status '{status}'."),
                retry_after_s: None,
            })));
        }
        let mut object = batch_view(&stored);
        object["status"] = "cancelling".into();
        let now = caller.run(|plane, _| Ok(plane.now_ms())).await?;
        object["cancelling_at"] = seconds(now).into();
        stored.meta = object.to_string();
        stored.status = Some("cancelling".to_owned());
        let write = stored.clone();
        let target = id.clone();
        let written = caller
            .run(move |plane, ctx| {
                let put = Mutation::PutObjectIf {
                    object: write,
                    statuses: vec!["in_progress".to_owned(), "validating".to_owned()],
                };
                let audit = ObjectAudit {
                    key_id: &ctx.key.id,
                    action: "batch.cancel",
                    target: &target,
                    detail: json!({}),
                };
                match plane.commit_objects(vec![put], Some(audit)) {
                    Ok(()) => Ok(true),
                    Err(control::ControlError::Store(control::StoreError::NotFound { .. })) => {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        if written {
            app.batches.cancel(&stored.id);
            app.batches.wake();
            return Ok(axum::Json(batch_view(&stored)).into_response());
        }
        // The runner wrote it meanwhile: look again.
    }
    Err(ApiError::unavailable(
        "the batch kept changing while being cancelled",
    ))
}

// ---- the runner ----------------------------------------------------------------------------

/// Starts the runner: it takes running batches (oldest first) from the store and sends their
/// requests through `app` at batch priority, `concurrency` at a time. `id` names this server
/// among those sharing the store (its host and port: restarted, it takes its batches back at
/// once; another server takes them after [`CLAIM_MS`] without progress).
pub(crate) fn spawn_runner(
    app: Router,
    control: Arc<ControlPlane>,
    signals: Arc<Signals>,
    concurrency: usize,
    id: String,
) -> tokio::task::JoinHandle<()> {
    let runner = Arc::new(Runner {
        app,
        control,
        signals,
        concurrency: concurrency.max(1),
        id,
    });
    tokio::spawn(async move {
        loop {
            match runner.next_batch().await {
                Ok(Some(batch)) => {
                    if let Err(e) = runner.run(batch).await {
                        tracing::warn!(error = %edge::Chain(&e), "batch run stopped; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                Ok(None) => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), runner.signals.woken()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %edge::Chain(&e), "batch store unreadable");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    })
}

struct Runner {
    app: Router,
    control: Arc<ControlPlane>,
    signals: Arc<Signals>,
    concurrency: usize,
    id: String,
}

/// A batch being run: its row, its public object and what the runner keeps.
struct Running {
    row: StoredObject,
    object: Value,
    internal: Internal,
}

type Failure = control::ControlError;

impl Runner {
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ControlPlane) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, Failure> {
        self.control.run(f).await
    }

    /// The oldest running batch no other runner holds (or whose holder went quiet).
    async fn next_batch(&self) -> Result<Option<Running>, Failure> {
        let rows = self
            .store(|plane| {
                plane.list_objects(&ObjectFilter {
                    kind: ObjectKind::Batch,
                    project_id: None,
                    parent: None,
                    statuses: RUNNING.iter().map(|s| (*s).to_owned()).collect(),
                    after_id: None,
                    newest_first: false,
                    limit: 64,
                    with_content: true,
                })
            })
            .await?;
        let now = self.control.now_ms();
        for row in rows {
            let internal: Internal = match row.content.as_deref().map(serde_json::from_str) {
                Some(Ok(internal)) => internal,
                _ => continue,
            };
            let free = internal
                .claimed_by
                .as_deref()
                .is_none_or(|by| by == self.id)
                || now - internal.claimed_at_ms > CLAIM_MS;
            if free {
                let object = batch_view(&row);
                return Ok(Some(Running {
                    row,
                    object,
                    internal,
                }));
            }
        }
        Ok(None)
    }

    /// Writes the batch's row (with `extra` changes in the same transaction).
    /// Writes the batch's row (with `extra` changes in the same transaction). A cancel that
    /// came meanwhile is seen at the next result's check (`cancelled`).
    async fn save(&self, batch: &mut Running, extra: Vec<Mutation>) -> Result<(), Failure> {
        batch.internal.claimed_by = Some(self.id.clone());
        batch.internal.claimed_at_ms = self.control.now_ms();
        batch.row.meta = batch.object.to_string();
        batch.row.status = batch.object["status"].as_str().map(str::to_owned);
        batch.row.content = Some(serde_json::to_string(&batch.internal).unwrap_or_default());
        let mut mutations = vec![Mutation::PutObject(batch.row.clone())];
        mutations.extend(extra);
        self.store(move |plane| plane.commit_objects(mutations, None))
            .await
    }

    /// Whether the batch was cancelled (here or in the store) since it was read, or its key
    /// no longer authenticates (revoked, expired: its requests stop too).
    async fn cancelled(&self, batch: &Running) -> Result<bool, Failure> {
        if self.signals.is_cancelled(&batch.row.id) {
            return Ok(true);
        }
        let (id, key_id) = (batch.row.id.clone(), batch.internal.key_id.clone());
        let (row, key) = self
            .store(move |plane| {
                Ok((
                    plane.get_object(ObjectKind::Batch, &id, None)?,
                    plane.context_of_key(&key_id)?,
                ))
            })
            .await?;
        Ok(key.is_none() || row.is_none_or(|row| row.status.as_deref() == Some("cancelling")))
    }

    async fn run(&self, mut batch: Running) -> Result<(), Failure> {
        let id = batch.row.id.clone();
        let key_id = batch.internal.key_id.clone();
        let input_id = batch.object["input_file_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let project = batch.row.project_id.clone();
        let (ctx, input, done) = {
            let (id, project) = (id.clone(), project.clone());
            self.store(move |plane| {
                let ctx = plane.context_of_key(&key_id)?;
                let input = plane.get_object(ObjectKind::File, &input_id, Some(&project))?;
                let done = plane.list_objects(&ObjectFilter {
                    kind: ObjectKind::Result,
                    project_id: None,
                    parent: Some(id),
                    statuses: Vec::new(),
                    after_id: None,
                    newest_first: false,
                    limit: MAX_BATCH_REQUESTS + 1,
                    with_content: true,
                })?;
                Ok((ctx, input, done))
            })
            .await?
        };
        let lines = input
            .as_ref()
            .and_then(|f| f.content.as_deref())
            .map(parse_lines)
            .and_then(Result::ok);
        let (Some(ctx), Some(lines)) = (ctx, lines) else {
            let why = "the batch's key was revoked or expired, or its input file is gone";
            return self.fail(batch, why).await;
        };
        let ctx = Arc::new(ctx);
        let finished: HashSet<usize> = done.iter().filter_map(|r| line_of(&r.id)).collect();
        let mut output_bytes: usize = done
            .iter()
            .map(|r| r.content.as_ref().map_or(0, String::len))
            .sum();
        if batch.object["status"] == "in_progress" {
            self.save(&mut batch, Vec::new()).await?;
            tracing::info!(batch = %id, requests = lines.len(), resumed = finished.len(), "running batch");
            let todo: Vec<(usize, Line)> = lines
                .iter()
                .cloned()
                .enumerate()
                .filter(|(n, _)| !finished.contains(n))
                .collect();
            // Set when the batch is cancelled or expires: requests not yet sent are skipped,
            // those in flight end and are recorded.
            let stopped = std::sync::atomic::AtomicBool::new(false);
            let mut results = futures::stream::iter(todo)
                .map(|(n, line)| {
                    let ctx = Arc::clone(&ctx);
                    let stopped = &stopped;
                    async move {
                        if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                            return (n, None);
                        }
                        (n, Some(self.send(&ctx, &line).await))
                    }
                })
                .buffer_unordered(self.concurrency);
            let deadline_ms = batch.row.created_at_ms + DAY_MS;
            while let Some((n, sent)) = results.next().await {
                let Some((ok, line)) = sent else {
                    continue;
                };
                output_bytes = output_bytes.saturating_add(line.len());
                let counts = &mut batch.object["request_counts"];
                let field = if ok { "completed" } else { "failed" };
                counts[field] = (counts[field].as_u64().unwrap_or(0) + 1).into();
                let result = StoredObject {
                    kind: ObjectKind::Result,
                    id: format!("{id}:{n:08}"),
                    project_id: project.clone(),
                    parent: Some(id.clone()),
                    status: None,
                    created_at_ms: self.control.now_ms(),
                    expires_at_ms: None,
                    meta: json!({"line": n, "ok": ok}).to_string(),
                    content: Some(line),
                };
                if !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    let stop = if self.cancelled(&batch).await? {
                        Some(("cancelling", "cancelling_at"))
                    } else if output_bytes > MAX_BATCH_OUTPUT_BYTES {
                        let why = format!(
                            "the batch's results passed {MAX_BATCH_OUTPUT_BYTES} bytes; split it"
                        );
                        batch.object["errors"] = json!({
                            "object": "list",
                            "data": [{"code": "output_too_large", "message": why,
                                      "param": null, "line": n + 1}],
                        });
                        Some(("finalizing", "failed_at"))
                    } else if self.control.now_ms() > deadline_ms {
                        Some(("finalizing", "expired_at"))
                    } else {
                        None
                    };
                    if let Some((status, at)) = stop {
                        tracing::info!(batch = %id, status, "batch stops sending requests");
                        stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                        batch.object["status"] = status.into();
                        if batch.object[at].is_null() {
                            batch.object[at] = seconds(self.control.now_ms()).into();
                        }
                    }
                }
                self.save(&mut batch, vec![Mutation::PutObject(result)])
                    .await?;
            }
        }
        self.finish(batch).await
    }

    /// Sends one request through the application as the batch's key, at batch priority;
    /// retries refusals for load. Returns whether it succeeded and its output line.
    async fn send(&self, ctx: &Arc<KeyContext>, line: &Line) -> (bool, String) {
        let body = Bytes::from(Value::Object(line.body.clone()).to_string());
        let mut tries = 0;
        loop {
            tries += 1;
            let mut request = Request::post(line.url.as_str())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.clone()))
                .unwrap_or_default();
            request.extensions_mut().insert(BatchIdentity {
                ctx: Arc::clone(ctx),
            });
            let call = self.app.clone().oneshot(request);
            let response = match PRIORITY.scope(engine::Priority::Batch, call).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let status = response.status();
            let retry = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = match response.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => Bytes::from(json!({"error": {"message": e.to_string()}}).to_string()),
            };
            let load = status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE;
            if load
                && tries < MAX_TRIES
                && let Some(wait) = retry.or(Some(Duration::from_secs(1)))
                && wait <= MAX_RETRY_WAIT
            {
                tokio::time::sleep(wait).await;
                continue;
            }
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let request_id = body["id"]
                .as_str()
                .map_or_else(|| response_id("req_"), str::to_owned);
            let out = json!({
                "id": response_id("batch_req_"),
                "custom_id": line.custom_id,
                "response": {
                    "status_code": status.as_u16(),
                    "request_id": request_id,
                    "body": body,
                },
                "error": null,
            });
            return (status.is_success(), out.to_string());
        }
    }

    /// A batch that cannot run: `failed`, with the reason.
    async fn fail(&self, mut batch: Running, why: &str) -> Result<(), Failure> {
        tracing::warn!(batch = %batch.row.id, why, "batch failed");
        batch.object["status"] = "failed".into();
        batch.object["failed_at"] = seconds(self.control.now_ms()).into();
        batch.object["errors"] = json!({
            "object": "list",
            "data": [{"code": "batch_failed", "message": why, "param": null, "line": null}],
        });
        self.end(batch, Vec::new()).await
    }

    /// Writes the output and error files (results in input order), ends the batch and sets
    /// the files' expiry by the project's retention.
    async fn finish(&self, mut batch: Running) -> Result<(), Failure> {
        let id = batch.row.id.clone();
        let results = {
            let id = id.clone();
            self.store(move |plane| {
                plane.list_objects(&ObjectFilter {
                    kind: ObjectKind::Result,
                    project_id: None,
                    parent: Some(id),
                    statuses: Vec::new(),
                    after_id: None,
                    newest_first: false,
                    limit: MAX_BATCH_REQUESTS + 1,
                    with_content: true,
                })
            })
            .await?
        };
        let mut ordered: Vec<(usize, bool, String)> = results
            .into_iter()
            .filter_map(|r| {
                let ok = serde_json::from_str::<Value>(&r.meta).ok()?["ok"].as_bool()?;
                Some((line_of(&r.id)?, ok, r.content?))
            })
            .collect();
        ordered.sort_by_key(|r| r.0);
        let jsonl = |ok: bool| {
            ordered
                .iter()
                .filter(|r| r.1 == ok)
                .map(|r| format!("{}\n", r.2))
                .collect::<String>()
        };
        let (output, errors) = (jsonl(true), jsonl(false));
        let now = self.control.now_ms();
        let keep = self
            .control
            .context_of_key(&batch.internal.key_id)
            .ok()
            .flatten()
            .map_or(0, |ctx| keep_ms(&ctx));
        let mut files = Vec::new();
        for (text, field, name) in [
            (output, "output_file_id", "batch_output.jsonl"),
            (errors, "error_file_id", "batch_errors.jsonl"),
        ] {
            if text.is_empty() {
                continue;
            }
            let file_id = response_id("file-");
            let expires = now + keep.max(DAY_MS);
            let meta = file_object(
                &file_id,
                text.len(),
                now,
                name,
                "batch_output",
                Some(expires),
            );
            files.push(Mutation::PutObject(StoredObject {
                kind: ObjectKind::File,
                id: file_id.clone(),
                project_id: batch.row.project_id.clone(),
                parent: Some(id.clone()),
                status: None,
                created_at_ms: now,
                expires_at_ms: Some(expires),
                meta: meta.to_string(),
                content: Some(text),
            }));
            batch.object[field] = file_id.into();
        }
        let status = batch.object["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (end, at) = match status.as_str() {
            "cancelling" => ("cancelled", "cancelled_at"),
            "finalizing" if !batch.object["errors"].is_null() => ("failed", "failed_at"),
            "finalizing" if !batch.object["expired_at"].is_null() => ("expired", "expired_at"),
            _ => ("completed", "completed_at"),
        };
        if batch.object["finalizing_at"].is_null() {
            batch.object["finalizing_at"] = seconds(now).into();
        }
        batch.object["status"] = end.into();
        batch.object[at] = seconds(now).into();
        tracing::info!(batch = %id, status = end, counts = %batch.object["request_counts"], "batch ended");
        self.end(batch, files).await
    }

    /// Ends a batch: its row (kept for the project's retention, at least a day), its files,
    /// its results deleted, its input file's expiry set.
    async fn end(&self, mut batch: Running, mut extra: Vec<Mutation>) -> Result<(), Failure> {
        let now = self.control.now_ms();
        let keep = self
            .control
            .context_of_key(&batch.internal.key_id)
            .ok()
            .flatten()
            .map_or(0, |ctx| keep_ms(&ctx));
        batch.row.expires_at_ms = Some(now + keep.max(DAY_MS));
        extra.push(Mutation::DeleteResults {
            batch_id: batch.row.id.clone(),
        });
        let input_id = batch.object["input_file_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let project = batch.row.project_id.clone();
        let this = batch.row.id.clone();
        let (input, shared) = self
            .store(move |plane| {
                let input = plane.get_object(ObjectKind::File, &input_id, Some(&project))?;
                // Another running batch of the project reading the same file keeps it.
                let others = plane.list_objects(&ObjectFilter {
                    kind: ObjectKind::Batch,
                    project_id: Some(project),
                    parent: None,
                    statuses: RUNNING.iter().map(|s| (*s).to_owned()).collect(),
                    after_id: None,
                    newest_first: false,
                    limit: 10_000,
                    with_content: false,
                })?;
                let shared = others
                    .iter()
                    .any(|b| b.id != this && batch_view(b)["input_file_id"] == input_id.as_str());
                Ok((input, shared))
            })
            .await?;
        if let Some(mut input) = input.filter(|_| !shared) {
            input.expires_at_ms = Some(now + keep);
            extra.push(Mutation::PutObject(input));
        }
        self.save(&mut batch, extra).await?;
        self.signals.forget(&batch.row.id);
        Ok(())
    }
}

/// The input line a result row is for (`{batch}:{line}`).
fn line_of(result_id: &str) -> Option<usize> {
    result_id.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, url: &str, body: &str) -> String {
        format!(r#"{{"custom_id":"{id}","method":"POST","url":"{url}","body":{body}}}"#)
    }

    #[test]
    fn batch_files_are_checked_line_by_line() {
        let chat = "/v1/chat/completions";
        let good = [
            line("a", chat, "{}"),
            String::new(),
            line("b", chat, r#"{"n":1}"#),
        ]
        .join("\n");
        assert_eq!(check_batch_file(&good), Ok(2));
        for (text, says) in [
            (String::new(), "no request"),
            ("{".to_owned(), "line 1 is not JSON"),
            ("[1]".to_owned(), "not a JSON object"),
            (line("", chat, "{}"), "custom_id"),
            (line(&"x".repeat(513), chat, "{}"), "custom_id"),
            (
                [line("a", chat, "{}"), line("a", chat, "{}")].join("\n"),
                "line 2: `custom_id` `a` is used twice",
            ),
            (line("a", "/v1/models", "{}"), "`url` must be one of"),
            (
                [line("a", chat, "{}"), line("b", "/v1/completions", "{}")].join("\n"),
                "a batch calls one endpoint",
            ),
            (line("a", chat, "[]"), "`body` must be an object"),
            (line("a", chat, r#"{"stream":true}"#), "cannot stream"),
            (line("a", chat, "{}").replace("POST", "GET"), "`method`"),
        ] {
            let err = check_batch_file(&text).unwrap_err();
            assert!(err.contains(says), "{says}: {err}");
        }
        let many: String = (0..=MAX_BATCH_REQUESTS)
            .map(|i| line(&i.to_string(), chat, "{}") + "\n")
            .collect();
        assert!(check_batch_file(&many).unwrap_err().contains("more than"));
    }

    #[test]
    fn result_rows_name_their_line() {
        assert_eq!(line_of("batch_x:00000012"), Some(12));
        assert_eq!(line_of("nope"), None);
    }
}
