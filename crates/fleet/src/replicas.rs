//! `GET /admin/v1/replicas` on `souverain route`: what the router knows of each replica
//! (region, health, scraped load, its own requests in flight, and its prefix-cache hit rate
//! as the router's prefix index sees it), for the console and for operators' scripts.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

use crate::picker::Picker;
use crate::upstream::Upstream;

/// The route `/replicas`, to nest under `/admin/v1` behind the admin key
/// ([`edge::admin::router`]'s `extra`).
pub fn router(picker: Arc<Picker>) -> Router {
    Router::new()
        .route("/replicas", get(replicas))
        .with_state(picker)
}

async fn replicas(State(picker): State<Arc<Picker>>) -> axum::Json<Value> {
    let members = picker.pool().snapshot();
    let data: Vec<Value> = members.iter().map(|u| describe(&picker, u)).collect();
    axum::Json(json!({"object": "list", "data": data}))
}

/// One replica as the router sees it now.
fn describe(picker: &Picker, u: &Upstream) -> Value {
    let spec = u.spec();
    let load = u.load();
    json!({
        "name": u.name(),
        "address": u.authority(),
        "engine": spec.engine.as_str(),
        "region": spec.region,
        "models": spec.models,
        "healthy": u.is_healthy(),
        "saturated": picker.saturated(u),
        "load": {
            "waiting": load.waiting,
            "running": load.running,
            "kv_cache_usage": load.kv_usage,
            "scraped_ms_ago": u.scraped_at().map(|at| at.elapsed().as_millis() as u64),
        },
        "in_flight": u.in_flight(),
        "in_flight_tokens": u.in_flight_tokens(),
        "routed": u.routed(),
        "failures": u.failures(),
        "prefix_cache_hit_rate": picker.prefix_index().hit_rate(u.name()),
    })
}
