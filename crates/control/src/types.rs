//! The control plane's records: organisations, projects, keys and their policies, usage
//! records, retained content. Times are Unix milliseconds (`_ms`), durations microseconds
//! (`_us`).

use serde::{Deserialize, Serialize};

use crate::time;

/// A tenant: it owns projects and decides where its requests may be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organisation {
    /// `org_` and 16 base62 characters.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// The deployment regions (e.g. `eu-west-paris`) its requests may be served in. A
    /// deployment whose region is not listed refuses its requests; an empty list refuses
    /// them everywhere.
    pub allowed_regions: Vec<String>,
    /// When it was created.
    pub created_at_ms: i64,
}

/// A project inside an organisation: it owns keys and decides whether content is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// `proj_` and 16 base62 characters.
    pub id: String,
    /// The organisation it belongs to.
    pub org_id: String,
    /// A name for people.
    pub name: String,
    /// `None` (the default): prompts and outputs are never stored. `Some(s)`: they are kept
    /// for `s` seconds, then a background task deletes them.
    pub retention_secs: Option<i64>,
    /// When it was created.
    pub created_at_ms: i64,
}

/// How often a token budget renews. Periods follow the UTC calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    /// Each clock hour.
    Hour,
    /// Each UTC day.
    Day,
    /// Each calendar month.
    Month,
    /// Never: the budget is for the key's whole life.
    Total,
}

impl BudgetPeriod {
    /// The name stored and accepted on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Hour => "hour",
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Total => "total",
        }
    }

    /// Parses [`BudgetPeriod::as_str`]'s names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "hour" => Some(BudgetPeriod::Hour),
            "day" => Some(BudgetPeriod::Day),
            "month" => Some(BudgetPeriod::Month),
            "total" => Some(BudgetPeriod::Total),
            _ => None,
        }
    }

    /// The start of the period holding `now_ms` (0 for `Total`).
    pub fn start_ms(self, now_ms: i64) -> i64 {
        match self {
            BudgetPeriod::Hour => time::hour_start(now_ms),
            BudgetPeriod::Day => time::day_start(now_ms),
            BudgetPeriod::Month => time::month_start(now_ms),
            BudgetPeriod::Total => 0,
        }
    }

    /// The start of the next period, `None` for `Total`.
    pub fn next_start_ms(self, now_ms: i64) -> Option<i64> {
        match self {
            BudgetPeriod::Hour => Some(time::hour_start(now_ms) + time::HOUR_MS),
            BudgetPeriod::Day => Some(time::day_start(now_ms) + time::DAY_MS),
            BudgetPeriod::Month => Some(time::next_month_start(now_ms)),
            BudgetPeriod::Total => None,
        }
    }
}

/// A token budget: prompt and completion tokens together, per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Tokens per period.
    pub tokens: u64,
    /// How often it renews.
    pub period: BudgetPeriod,
}

/// What a key may do. `None` limits are unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyPolicy {
    /// Models the key may use; empty means all.
    pub allowed_models: Vec<String>,
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt plus completion) per minute.
    pub tokens_per_minute: Option<u64>,
    /// The token budget.
    pub budget: Option<Budget>,
    /// When the key stops working.
    pub expires_at_ms: Option<i64>,
}

impl KeyPolicy {
    /// Whether the policy lets the key use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|m| m == model)
    }
}

/// A key as stored: its policy and its salted hash, never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The public id (12 base62 characters, also inside the key).
    pub id: String,
    /// The project it belongs to.
    pub project_id: String,
    /// A name for people.
    pub name: String,
    /// What it may do.
    pub policy: KeyPolicy,
    /// The salt of the hash, hex.
    #[serde(skip_serializing)]
    pub salt_hex: String,
    /// The keyed hash of the key's secret, hex.
    #[serde(skip_serializing)]
    pub hash_hex: String,
    /// When it was created.
    pub created_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
}

/// A key with the organisation and project it belongs to: everything a request check needs,
/// read in one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyContext {
    /// The key.
    pub key: KeyRecord,
    /// Its project.
    pub project: Project,
    /// Its organisation.
    pub org: Organisation,
}

/// One metered request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The request's id (the response id clients see).
    pub id: String,
    /// When the request finished.
    pub created_at_ms: i64,
    /// The organisation.
    pub org_id: String,
    /// The project.
    pub project_id: String,
    /// The key.
    pub key_id: String,
    /// The model asked for.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Reasoning tokens (0 until the engine reports them separately).
    pub reasoning_tokens: i64,
    /// Time from admission to the first text, if any text came.
    pub ttft_us: Option<i64>,
    /// Time from admission to the end.
    pub duration_us: i64,
    /// `ok`, `cancelled` (client went away), `failed` (server fault) or `rejected` (refused
    /// or invalid before generation).
    pub status: String,
    /// The HTTP status answered (499 for a client that went away).
    pub http_status: i64,
    /// Energy the engine attributed to the request, microjoules; absent where nothing
    /// metered it (failed, cancelled or refused requests, embeddings, older records).
    #[serde(default)]
    pub energy_uj: Option<i64>,
    /// Whether that energy was measured or modelled.
    #[serde(default)]
    pub energy_source: Option<EnergySource>,
}

/// Where a request's joules came from: a hardware counter or a power model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnergySource {
    /// Read from a hardware energy counter (RAPL, NVML).
    Measured,
    /// Computed from a power model.
    Modelled,
}

impl EnergySource {
    /// `measured` or `modelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            EnergySource::Measured => "measured",
            EnergySource::Modelled => "modelled",
        }
    }

    /// The inverse of [`EnergySource::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "measured" => Some(EnergySource::Measured),
            "modelled" => Some(EnergySource::Modelled),
            _ => None,
        }
    }
}

/// Energy attributed to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnergyUse {
    /// Microjoules.
    pub microjoules: u64,
    /// Measured or modelled.
    pub source: EnergySource,
}

impl UsageRecord {
    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> i64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// A prompt and its output, kept only for projects that opted in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedContent {
    /// The request's id.
    pub request_id: String,
    /// The project.
    pub project_id: String,
    /// The key.
    pub key_id: String,
    /// When it was stored.
    pub created_at_ms: i64,
    /// When the retention task deletes it.
    pub expires_at_ms: i64,
    /// The request body as received.
    pub prompt: String,
    /// The generated text.
    pub output: String,
}

/// A response of OpenAI's Responses API kept for `GET /v1/responses/{id}` and
/// `previous_response_id`: only for projects whose retention allows keeping content, owned by
/// the project that made it, deleted when its retention ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The response's id (`resp_...`).
    pub id: String,
    /// The organisation that made it.
    pub org_id: String,
    /// The project that made it (the only one that may read or delete it).
    pub project_id: String,
    /// The key it was made with.
    pub key_id: String,
    /// When it was stored.
    pub created_at_ms: i64,
    /// When the retention task deletes it.
    pub expires_at_ms: i64,
    /// The conversation's input items up to this response (earlier responses' included), a
    /// JSON array.
    pub input: String,
    /// The response object as answered, JSON.
    pub response: String,
}

/// One object of the Batch API kept in the store: an uploaded or produced file, a batch, or
/// one finished request of a running batch. Owned by a project; deleted by the retention
/// task once `expires_at_ms` passes (`None`: kept until its batch sets a time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    /// `file`, `batch` or `result`.
    pub kind: ObjectKind,
    /// Its id (`file-...`, `batch_...`; a result: its batch's id and line number).
    pub id: String,
    /// The project that owns it (the only one that may read or delete it).
    pub project_id: String,
    /// A result's batch; `None` for the others.
    pub parent: Option<String>,
    /// A batch's status; `None` for the others.
    pub status: Option<String>,
    /// When it was made.
    pub created_at_ms: i64,
    /// When the retention task deletes it; `None`: not before its batch decides.
    pub expires_at_ms: Option<i64>,
    /// The object as the API shows it, JSON.
    pub meta: String,
    /// A file's bytes, a result's line; `None` for a batch.
    pub content: Option<String>,
}

/// What a [`StoredObject`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// A file (`/v1/files`).
    File,
    /// A batch (`/v1/batches`).
    Batch,
    /// One finished request of a batch that is still running.
    Result,
}

impl ObjectKind {
    /// Its name in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::File => "file",
            ObjectKind::Batch => "batch",
            ObjectKind::Result => "result",
        }
    }
}

/// Which stored objects to list: one kind, optionally of one project, one parent, one of
/// some statuses; oldest first, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectFilter {
    /// The kind.
    pub kind: ObjectKind,
    /// Only this project's.
    pub project_id: Option<String>,
    /// Only this batch's results.
    pub parent: Option<String>,
    /// Only objects in one of these statuses (empty: any).
    pub statuses: Vec<String>,
    /// Only objects whose id sorts after this one.
    pub after_id: Option<String>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// At most this many.
    pub limit: usize,
    /// Read each object's `content` too (a listing of files leaves their bytes out).
    pub with_content: bool,
}

/// Which usage records to read. `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageFilter {
    /// Records from this time on (inclusive).
    pub from_ms: Option<i64>,
    /// Records before this time (exclusive).
    pub to_ms: Option<i64>,
    /// Only this organisation's.
    pub org_id: Option<String>,
    /// Only this project's.
    pub project_id: Option<String>,
    /// Only this key's.
    pub key_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_and_bound() {
        for p in [
            BudgetPeriod::Hour,
            BudgetPeriod::Day,
            BudgetPeriod::Month,
            BudgetPeriod::Total,
        ] {
            assert_eq!(BudgetPeriod::parse(p.as_str()), Some(p));
        }
        assert_eq!(BudgetPeriod::parse("week"), None);
        let now = time::parse_time_ms("2026-02-14T10:30:00Z").unwrap();
        assert_eq!(
            BudgetPeriod::Month.next_start_ms(now),
            Some(time::parse_time_ms("2026-03-01").unwrap())
        );
        assert_eq!(
            BudgetPeriod::Hour.start_ms(now),
            time::parse_time_ms("2026-02-14T10:00:00Z").unwrap()
        );
        assert_eq!(BudgetPeriod::Total.next_start_ms(now), None);
        assert_eq!(BudgetPeriod::Total.start_ms(now), 0);
    }

    #[test]
    fn empty_model_list_allows_all() {
        let mut policy = KeyPolicy::default();
        assert!(policy.allows_model("anything"));
        policy.allowed_models = vec!["a".into()];
        assert!(policy.allows_model("a"));
        assert!(!policy.allows_model("b"));
    }
}
