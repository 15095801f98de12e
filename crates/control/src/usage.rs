//! Usage reports: records grouped by organisation, project, key, model, status, day or hour,
//! and CSV export of records and of groups (JSON comes from serde).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::time;
use crate::types::{EnergySource, UsageRecord};

/// A dimension to group usage by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// The organisation.
    Org,
    /// The project.
    Project,
    /// The key.
    Key,
    /// The model.
    Model,
    /// The request's status.
    Status,
    /// The UTC day (`2026-05-20`).
    Day,
    /// The UTC hour (`2026-05-20T13`).
    Hour,
}

impl GroupBy {
    /// The dimension's name, as accepted by [`GroupBy::parse_list`] and used as CSV header.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Org => "org",
            GroupBy::Project => "project",
            GroupBy::Key => "key",
            GroupBy::Model => "model",
            GroupBy::Status => "status",
            GroupBy::Day => "day",
            GroupBy::Hour => "hour",
        }
    }

    /// Parses a comma-separated list (`org,model,day`); an empty string is no grouping.
    pub fn parse_list(text: &str) -> Result<Vec<GroupBy>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| match name {
                "org" | "organization" | "organisation" => Ok(GroupBy::Org),
                "project" => Ok(GroupBy::Project),
                "key" => Ok(GroupBy::Key),
                "model" => Ok(GroupBy::Model),
                "status" => Ok(GroupBy::Status),
                "day" => Ok(GroupBy::Day),
                "hour" => Ok(GroupBy::Hour),
                other => Err(format!(
                    "unknown group `{other}`: expected org, project, key, model, status, day or hour"
                )),
            })
            .collect()
    }

    fn value(self, r: &UsageRecord) -> String {
        match self {
            GroupBy::Org => r.org_id.clone(),
            GroupBy::Project => r.project_id.clone(),
            GroupBy::Key => r.key_id.clone(),
            GroupBy::Model => r.model.clone(),
            GroupBy::Status => r.status.clone(),
            GroupBy::Day => time::format_date(r.created_at_ms),
            GroupBy::Hour => time::format_hour(r.created_at_ms),
        }
    }
}

/// The totals of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageGroup {
    /// The group's value for each dimension, by dimension name.
    pub group: BTreeMap<String, String>,
    /// Requests.
    pub requests: u64,
    /// Requests answered with an HTTP error (status 400 and above, 499 included).
    pub errors: u64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Prompt plus completion tokens.
    pub total_tokens: i64,
    /// The summed duration of the requests, microseconds.
    pub duration_us: i64,
    /// Requests that carry energy (the others were not metered: failed, cancelled, refused,
    /// embeddings).
    pub energy_requests: u64,
    /// Their summed energy, joules (summed in microjoules, so exact to the microjoule);
    /// absent when none carries energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_joules: Option<f64>,
    /// `measured` or `modelled` when every metered request says the same, `mixed` when they
    /// differ; absent when none carries energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_source: Option<String>,
    /// The exact sum behind `energy_joules`.
    #[serde(skip)]
    energy_uj: i64,
}

/// The label of energy summed from records labelled `a` and `b`.
fn merge_source(a: Option<String>, b: EnergySource) -> String {
    match a {
        None => b.as_str().to_owned(),
        Some(a) if a == b.as_str() => a,
        Some(_) => "mixed".to_owned(),
    }
}

/// Groups records by `group_by` (no dimensions: one group with everything), in the order of
/// the group values.
pub fn aggregate(records: &[UsageRecord], group_by: &[GroupBy]) -> Vec<UsageGroup> {
    let mut groups: BTreeMap<Vec<String>, UsageGroup> = BTreeMap::new();
    for r in records {
        let values: Vec<String> = group_by.iter().map(|g| g.value(r)).collect();
        let group = groups.entry(values.clone()).or_insert_with(|| UsageGroup {
            group: group_by
                .iter()
                .zip(values)
                .map(|(g, v)| (g.as_str().to_owned(), v))
                .collect(),
            ..UsageGroup::default()
        });
        group.requests += 1;
        group.errors += u64::from(r.http_status >= 400);
        group.prompt_tokens = group.prompt_tokens.saturating_add(r.prompt_tokens);
        group.completion_tokens = group.completion_tokens.saturating_add(r.completion_tokens);
        group.reasoning_tokens = group.reasoning_tokens.saturating_add(r.reasoning_tokens);
        group.total_tokens = group.total_tokens.saturating_add(r.total_tokens());
        group.duration_us = group.duration_us.saturating_add(r.duration_us);
        if let (Some(uj), Some(source)) = (r.energy_uj, r.energy_source) {
            group.energy_requests += 1;
            group.energy_uj = group.energy_uj.saturating_add(uj);
            group.energy_joules = Some(group.energy_uj as f64 / 1e6);
            group.energy_source = Some(merge_source(group.energy_source.take(), source));
        }
    }
    groups.into_values().collect()
}

/// One CSV field, quoted when it holds a comma, quote or line break (RFC 4180). A field that
/// a spreadsheet would take for a formula is prefixed with `'`.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) && value.parse::<f64>().is_err() {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

fn csv_line(fields: &[String]) -> String {
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

/// Microjoules written as joules with six decimals (exact).
fn joules(uj: i64) -> String {
    let sign = if uj < 0 { "-" } else { "" };
    let uj = uj.unsigned_abs();
    format!("{sign}{}.{:06}", uj / 1_000_000, uj % 1_000_000)
}

/// Records as CSV, one line per request, with a header line.
pub fn records_csv(records: &[UsageRecord]) -> String {
    let mut out = csv_line(
        &[
            "id",
            "time",
            "org",
            "project",
            "key",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "reasoning_tokens",
            "total_tokens",
            "ttft_us",
            "duration_us",
            "status",
            "http_status",
            "energy_joules",
            "energy_source",
        ]
        .map(str::to_owned),
    );
    for r in records {
        out.push_str(&csv_line(&[
            r.id.clone(),
            time::format_rfc3339_ms(r.created_at_ms),
            r.org_id.clone(),
            r.project_id.clone(),
            r.key_id.clone(),
            r.model.clone(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.reasoning_tokens.to_string(),
            r.total_tokens().to_string(),
            r.ttft_us.map(|t| t.to_string()).unwrap_or_default(),
            r.duration_us.to_string(),
            r.status.clone(),
            r.http_status.to_string(),
            r.energy_uj.map(joules).unwrap_or_default(),
            r.energy_source
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
        ]));
    }
    out
}

/// Groups as CSV: one column per dimension, then the totals.
pub fn groups_csv(groups: &[UsageGroup], group_by: &[GroupBy]) -> String {
    let mut header: Vec<String> = group_by.iter().map(|g| g.as_str().to_owned()).collect();
    header.extend(
        [
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "reasoning_tokens",
            "total_tokens",
            "duration_us",
            "energy_requests",
            "energy_joules",
            "energy_source",
        ]
        .map(str::to_owned),
    );
    let mut out = csv_line(&header);
    for g in groups {
        let mut fields: Vec<String> = group_by
            .iter()
            .map(|d| g.group.get(d.as_str()).cloned().unwrap_or_default())
            .collect();
        fields.extend([
            g.requests.to_string(),
            g.errors.to_string(),
            g.prompt_tokens.to_string(),
            g.completion_tokens.to_string(),
            g.reasoning_tokens.to_string(),
            g.total_tokens.to_string(),
            g.duration_us.to_string(),
            g.energy_requests.to_string(),
            if g.energy_requests > 0 {
                joules(g.energy_uj)
            } else {
                String::new()
            },
            g.energy_source.clone().unwrap_or_default(),
        ]);
        out.push_str(&csv_line(&fields));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, model: &str, at_ms: i64, prompt: i64, completion: i64) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            created_at_ms: at_ms,
            org_id: "org_a".into(),
            project_id: "proj_a".into(),
            key_id: "key".into(),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            reasoning_tokens: 0,
            ttft_us: Some(10),
            duration_us: 100,
            status: "ok".into(),
            http_status: 200,
            energy_uj: None,
            energy_source: None,
        }
    }

    #[test]
    fn groups_by_model_and_day() {
        let day = 86_400_000;
        let mut failed = record("4", "a", day + 5, 1, 0);
        failed.http_status = 500;
        failed.status = "failed".into();
        let records = [
            record("1", "a", 5, 3, 4),
            record("2", "b", 6, 1, 1),
            record("3", "a", 7, 2, 2),
            failed,
        ];
        let groups = aggregate(&records, &[GroupBy::Model, GroupBy::Day]);
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].group["model"], "a");
        assert_eq!(groups[0].group["day"], "1970-01-01");
        assert_eq!(groups[0].requests, 2);
        assert_eq!(groups[0].total_tokens, 11);
        assert_eq!(groups[1].group["day"], "1970-01-02");
        assert_eq!(groups[1].errors, 1);
        let all = aggregate(&records, &[]);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].requests, 4);
        assert!(aggregate(&[], &[GroupBy::Org]).is_empty());
    }

    #[test]
    fn energy_sums_exactly_and_keeps_its_label() {
        let metered = |id: &str, uj: i64, source| UsageRecord {
            energy_uj: Some(uj),
            energy_source: Some(source),
            ..record(id, "a", 0, 1, 1)
        };
        let records = [
            metered("1", 1_500_001, EnergySource::Modelled),
            metered("2", 2, EnergySource::Modelled),
            // Not metered (a cancelled request): counted as a request, not in the energy.
            record("3", "a", 0, 1, 0),
        ];
        let groups = aggregate(&records, &[GroupBy::Model]);
        assert_eq!(groups[0].requests, 3);
        assert_eq!(groups[0].energy_requests, 2);
        assert_eq!(groups[0].energy_joules, Some(1.500003));
        assert_eq!(groups[0].energy_source.as_deref(), Some("modelled"));
        let json = serde_json::to_value(&groups[0]).unwrap();
        assert_eq!(json["energy_joules"], 1.500003);
        assert_eq!(json["energy_source"], "modelled");
        let csv = groups_csv(&groups, &[GroupBy::Model]);
        assert!(csv.ends_with(",2,1.500003,modelled\r\n"), "{csv}");
        let lines = records_csv(&records);
        assert!(lines.contains(",200,1.500001,modelled\r\n"), "{lines}");
        assert!(
            lines.contains(",499,,\r\n") || lines.contains(",200,,\r\n"),
            "{lines}"
        );
        // Measured and modelled joules summed together are labelled as such, never measured.
        let mixed = [
            metered("1", 1, EnergySource::Measured),
            metered("2", 1, EnergySource::Modelled),
        ];
        assert_eq!(
            aggregate(&mixed, &[])[0].energy_source.as_deref(),
            Some("mixed")
        );
        assert!(
            aggregate(&[record("1", "a", 0, 1, 1)], &[])[0]
                .energy_joules
                .is_none()
        );
    }

    #[test]
    fn csv_quotes_and_defuses() {
        let mut r = record("1", "model, \"quoted\"", 0, 1, 2);
        r.key_id = "=HYPERLINK(1)".into();
        let csv = records_csv(&[r]);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines.len(), 3, "{csv}");
        assert!(lines[0].starts_with("id,time,org"));
        assert!(
            lines[1].contains("\"model, \"\"quoted\"\"\""),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains(",'=HYPERLINK(1),"), "{}", lines[1]);
        assert!(lines[1].contains("1970-01-01T00:00:00.000Z"));
        let groups = aggregate(&[record("1", "m", 0, 1, 2)], &[GroupBy::Model]);
        let csv = groups_csv(&groups, &[GroupBy::Model]);
        assert_eq!(
            csv,
            "model,requests,errors,prompt_tokens,completion_tokens,reasoning_tokens,total_tokens,duration_us,energy_requests,energy_joules,energy_source\r\nm,1,0,1,2,0,3,100,0,,\r\n"
        );
    }

    #[test]
    fn group_lists_parse() {
        assert_eq!(
            GroupBy::parse_list("org, model,day").unwrap(),
            vec![GroupBy::Org, GroupBy::Model, GroupBy::Day]
        );
        assert_eq!(GroupBy::parse_list("").unwrap(), vec![]);
        assert!(
            GroupBy::parse_list("org,week")
                .unwrap_err()
                .contains("week")
        );
    }
}
