//! The admin API under `/admin/v1`, guarded by the admin key (`Authorization: Bearer ...`).
//!
//! - `POST /organizations` `{name, allowed_regions?}`, `GET /organizations`,
//!   `PATCH /organizations/{org}` `{allowed_regions}`
//! - `POST /organizations/{org}/projects` `{name, retention_secs?}`,
//!   `GET /organizations/{org}/projects`
//! - `POST /projects/{project}/keys` `{name, allowed_models?, requests_per_minute?,
//!   tokens_per_minute?, budget_tokens?, budget_period?, expires_at?}` (answers the key once),
//!   `GET /projects/{project}/keys`, `POST /keys/{key}/revoke`
//! - `GET /usage?from=&to=&org=&project=&key=&group_by=org,model,day&format=json|csv`
//! - `GET /audit`, `GET /audit/verify`
//! - what the front adds (`souverain route`: `GET /replicas`)
//!
//! Every change is made by the control plane together with its audit entry; bad payloads
//! get the same OpenAI-shaped 400 as the public API, unknown ids 404.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use control::usage::{self, GroupBy};
use control::{Budget, BudgetPeriod, ControlPlane, KeyPolicy, UsageFilter};
use serde::Deserialize;
use serde_json::json;

use crate::bearer;
use crate::error::ApiError;
use crate::json::Json;

/// Who admin actions are recorded as.
const ACTOR: &str = "admin";

/// The admin routes, to nest under `/admin/v1`, with `extra`: routes of the front's own (the
/// router's `/replicas`) behind the same admin key.
pub fn router(control: Arc<ControlPlane>, extra: Router) -> Router {
    Router::new()
        .route("/organizations", post(create_org).get(list_orgs))
        .route("/organizations/{org}", patch(update_org))
        .route(
            "/organizations/{org}/projects",
            post(create_project).get(list_projects),
        )
        .route("/projects/{project}/keys", post(create_key).get(list_keys))
        .route("/keys/{key}/revoke", post(revoke_key))
        .route("/usage", get(usage_report))
        .route("/audit", get(audit_log))
        .route("/audit/verify", get(audit_verify))
        .with_state(Arc::clone(&control))
        .merge(extra)
        .route_layer(middleware::from_fn_with_state(control, admin_only))
}

/// Lets through requests that carry the admin key.
async fn admin_only(
    State(control): State<Arc<ControlPlane>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = bearer(req.headers()).ok();
    match control
        .run(move |c| c.check_admin_key(presented.as_deref()))
        .await
    {
        Ok(()) => next.run(req).await,
        Err(err) => ApiError::from(err).into_response(),
    }
}

/// Runs a blocking control-plane call and answers its result as JSON with `status`.
async fn answer<T, F>(control: &Arc<ControlPlane>, status: StatusCode, f: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(&ControlPlane) -> Result<T, control::ControlError> + Send + 'static,
{
    match control.run(f).await {
        Ok(value) => (status, axum::Json(value)).into_response(),
        Err(err) => ApiError::from(err).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrg {
    name: String,
    allowed_regions: Option<Vec<String>>,
}

async fn create_org(
    State(control): State<Arc<ControlPlane>>,
    Json(body): Json<NewOrg>,
) -> Response {
    answer(&control, StatusCode::CREATED, move |c| {
        c.create_org(ACTOR, &body.name, body.allowed_regions)
    })
    .await
}

async fn list_orgs(State(control): State<Arc<ControlPlane>>) -> Response {
    answer(&control, StatusCode::OK, |c| {
        c.list_orgs()
            .map(|data| json!({"object": "list", "data": data}))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgUpdate {
    allowed_regions: Vec<String>,
}

async fn update_org(
    State(control): State<Arc<ControlPlane>>,
    Path(org): Path<String>,
    Json(body): Json<OrgUpdate>,
) -> Response {
    answer(&control, StatusCode::OK, move |c| {
        c.set_org_regions(ACTOR, &org, body.allowed_regions)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProject {
    name: String,
    retention_secs: Option<i64>,
}

async fn create_project(
    State(control): State<Arc<ControlPlane>>,
    Path(org): Path<String>,
    Json(body): Json<NewProject>,
) -> Response {
    answer(&control, StatusCode::CREATED, move |c| {
        c.create_project(ACTOR, &org, &body.name, body.retention_secs)
    })
    .await
}

async fn list_projects(
    State(control): State<Arc<ControlPlane>>,
    Path(org): Path<String>,
) -> Response {
    answer(&control, StatusCode::OK, move |c| {
        c.list_projects(&org)
            .map(|data| json!({"object": "list", "data": data}))
    })
    .await
}

/// A key as an admin asks for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    allowed_models: Vec<String>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    budget_tokens: Option<u64>,
    budget_period: Option<String>,
    /// A date, a UTC time or Unix milliseconds.
    expires_at: Option<String>,
}

impl NewKey {
    fn policy(self) -> Result<(String, KeyPolicy), ApiError> {
        let budget = match (self.budget_tokens, self.budget_period.as_deref()) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ApiError::invalid(
                    "budget_period",
                    "`budget_period` needs `budget_tokens`",
                ));
            }
            (Some(tokens), period) => Some(Budget {
                tokens,
                period: match period {
                    None => BudgetPeriod::Month,
                    Some(p) => BudgetPeriod::parse(p).ok_or_else(|| {
                        ApiError::invalid(
                            "budget_period",
                            format!("`{p}` is not a period: expected hour, day, month or total"),
                        )
                    })?,
                },
            }),
        };
        let expires_at_ms = self
            .expires_at
            .as_deref()
            .map(control::time::parse_time_ms)
            .transpose()
            .map_err(|message| ApiError::invalid("expires_at", message))?;
        Ok((
            self.name,
            KeyPolicy {
                allowed_models: self.allowed_models,
                requests_per_minute: self.requests_per_minute,
                tokens_per_minute: self.tokens_per_minute,
                budget,
                expires_at_ms,
            },
        ))
    }
}

async fn create_key(
    State(control): State<Arc<ControlPlane>>,
    Path(project): Path<String>,
    Json(body): Json<NewKey>,
) -> Response {
    let (name, policy) = match body.policy() {
        Ok(parts) => parts,
        Err(err) => return err.into_response(),
    };
    answer(&control, StatusCode::CREATED, move |c| {
        let created = c.create_key(ACTOR, &project, &name, policy)?;
        Ok(json!({
            "key": created.plaintext,
            "note": "This is the only time the key is shown; store it now.",
            "record": created.record,
        }))
    })
    .await
}

async fn list_keys(
    State(control): State<Arc<ControlPlane>>,
    Path(project): Path<String>,
) -> Response {
    answer(&control, StatusCode::OK, move |c| {
        c.list_keys(&project)
            .map(|data| json!({"object": "list", "data": data}))
    })
    .await
}

async fn revoke_key(State(control): State<Arc<ControlPlane>>, Path(key): Path<String>) -> Response {
    answer(&control, StatusCode::OK, move |c| {
        c.revoke_key(ACTOR, &key)
            .map(|()| json!({"id": key, "revoked": true}))
    })
    .await
}

/// The usage query of `GET /usage`, parsed from its parameters.
fn usage_query(
    params: &HashMap<String, String>,
) -> Result<(UsageFilter, Option<Vec<GroupBy>>, bool), ApiError> {
    const KNOWN: [&str; 7] = ["from", "to", "org", "project", "key", "group_by", "format"];
    if let Some(unknown) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            unknown.clone(),
            format!("unknown parameter `{unknown}`; known: {}", KNOWN.join(", ")),
        ));
    }
    let time = |name: &str| {
        params
            .get(name)
            .map(|v| control::time::parse_time_ms(v))
            .transpose()
            .map_err(|message| ApiError::invalid(name, message))
    };
    let filter = UsageFilter {
        from_ms: time("from")?,
        to_ms: time("to")?,
        org_id: params.get("org").cloned(),
        project_id: params.get("project").cloned(),
        key_id: params.get("key").cloned(),
    };
    let group_by = params
        .get("group_by")
        .map(|g| GroupBy::parse_list(g))
        .transpose()
        .map_err(|message| ApiError::invalid("group_by", message))?;
    let csv = match params.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "format",
                format!("`{other}` is not a format: expected json or csv"),
            ));
        }
    };
    Ok((filter, group_by, csv))
}

async fn usage_report(
    State(control): State<Arc<ControlPlane>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let params = match query {
        Ok(Query(params)) => params,
        Err(rejection) => {
            return ApiError::invalid_body(format!("Invalid query string: {rejection}"))
                .into_response();
        }
    };
    let (filter, group_by, csv) = match usage_query(&params) {
        Ok(parsed) => parsed,
        Err(err) => return err.into_response(),
    };
    let records = match control.run(move |c| c.usage(&filter)).await {
        Ok(records) => records,
        Err(err) => return ApiError::from(err).into_response(),
    };
    let csv_response =
        |body: String| ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response();
    match (group_by, csv) {
        (None, false) => axum::Json(json!({"object": "list", "data": records})).into_response(),
        (None, true) => csv_response(usage::records_csv(&records)),
        (Some(group_by), false) => axum::Json(json!({
            "object": "list",
            "group_by": group_by,
            "data": usage::aggregate(&records, &group_by),
        }))
        .into_response(),
        (Some(group_by), true) => csv_response(usage::groups_csv(
            &usage::aggregate(&records, &group_by),
            &group_by,
        )),
    }
}

async fn audit_log(State(control): State<Arc<ControlPlane>>) -> Response {
    answer(&control, StatusCode::OK, |c| {
        c.audit_entries()
            .map(|data| json!({"object": "list", "data": data}))
    })
    .await
}

async fn audit_verify(State(control): State<Arc<ControlPlane>>) -> Response {
    answer(&control, StatusCode::OK, |c| {
        let report = c.verify_audit()?;
        let messages: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        Ok(json!({
            "intact": report.is_intact(),
            "entries": report.entries,
            "head_seq": report.head_seq,
            "head_hash": report.head_hash,
            "problems": report.problems,
            "messages": messages,
        }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_payloads_become_policies() {
        let key: NewKey = serde_json::from_str(
            r#"{"name":"k","budget_tokens":100,"budget_period":"day","expires_at":"2100-01-01"}"#,
        )
        .unwrap();
        let (name, policy) = key.policy().unwrap();
        assert_eq!(name, "k");
        assert_eq!(
            policy.budget,
            Some(Budget {
                tokens: 100,
                period: BudgetPeriod::Day
            })
        );
        assert!(policy.expires_at_ms.is_some());
        for bad in [
            r#"{"name":"k","budget_period":"day"}"#,
            r#"{"name":"k","budget_tokens":1,"budget_period":"week"}"#,
            r#"{"name":"k","expires_at":"tomorrow"}"#,
        ] {
            let key: NewKey = serde_json::from_str(bad).unwrap();
            assert_eq!(
                key.policy().unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
        assert!(serde_json::from_str::<NewKey>(r#"{"name":"k","rpm":3}"#).is_err());
    }

    #[test]
    fn usage_queries_are_checked() {
        let params = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let (filter, group_by, csv) = usage_query(&params(&[
            ("from", "2026-01-01"),
            ("group_by", "model"),
            ("format", "csv"),
        ]))
        .unwrap();
        assert!(filter.from_ms.is_some());
        assert_eq!(group_by, Some(vec![GroupBy::Model]));
        assert!(csv);
        for bad in [
            params(&[("from", "soon")]),
            params(&[("group_by", "planet")]),
            params(&[("format", "xml")]),
            params(&[("colour", "red")]),
        ] {
            assert_eq!(
                usage_query(&bad).unwrap_err().status(),
                StatusCode::BAD_REQUEST
            );
        }
    }
}
