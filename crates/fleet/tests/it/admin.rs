//! `souverain route --auth` serves the admin API (with `/replicas`) and the browser console,
//! in front of stand-in engines; the router is called without a socket (`oneshot`), while it
//! reaches its replicas over loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use control::{ControlConfig, ControlPlane, SqliteStore, Store};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use souverain_fleet::standin::{Standin, serve_standin};
use souverain_fleet::{EngineKind, Fleet, FleetRouter, RouterConfig};
use tower::ServiceExt;

const ADMIN_KEY: &str = "admin-key-for-the-router-tests";

async fn standin(name: &str) -> (Arc<Standin>, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let standin = Arc::new(Standin::new(name, EngineKind::Vllm, "m"));
    tokio::spawn(serve_standin(listener, Arc::clone(&standin)));
    (standin, port)
}

fn control_plane() -> Arc<ControlPlane> {
    let dir = std::env::temp_dir().join(format!("souverain_fleet_admin_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.db");
    let _ = std::fs::remove_file(&path);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let mut config = ControlConfig::new("paris", b"hash secret".to_vec());
    config.admin_key = Some(ADMIN_KEY.to_owned());
    Arc::new(ControlPlane::new(store, config))
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"));
    let body = match body {
        Some(json) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(json.to_string())
        }
        None => Body::empty(),
    };
    let response = app
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_serves_the_admin_api_with_its_replicas_and_the_console() {
    let (_paris, paris_port) = standin("paris-1").await;
    let (stockholm, stockholm_port) = standin("stockholm-1").await;
    stockholm
        .kv_millionths
        .store(250_000, std::sync::atomic::Ordering::Relaxed);
    let config = RouterConfig::parse(&format!(
        "[scrape]\ninterval_ms = 50\n\
         [[upstream]]\nname = \"paris-1\"\nurl = \"http://127.0.0.1:{paris_port}\"\n\
         engine = \"vllm\"\nregion = \"eu-paris\"\n\
         [[upstream]]\nname = \"stockholm-1\"\nurl = \"http://127.0.0.1:{stockholm_port}\"\n\
         engine = \"vllm\"\nregion = \"eu-stockholm\"\n"
    ))
    .unwrap();
    let fleet = Fleet::start(&config, None).unwrap();
    let control = control_plane();
    let router = Arc::new(FleetRouter::new(
        Arc::clone(&fleet.picker),
        fleet.client.clone(),
        Some(Arc::clone(&control)),
        config.proxy.clone(),
    ));
    let app = souverain_fleet::app(router);

    // The admin API, as `serve --auth` has it: an organisation served in Stockholm only.
    let (status, org) = call(
        &app,
        "POST",
        "/admin/v1/organizations",
        ADMIN_KEY,
        Some(json!({"name": "Nordic", "allowed_regions": ["eu-stockholm"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{org}");
    let org_id = org["id"].as_str().unwrap();
    let (_, project) = call(
        &app,
        "POST",
        &format!("/admin/v1/organizations/{org_id}/projects"),
        ADMIN_KEY,
        Some(json!({"name": "p"})),
    )
    .await;
    let (status, key) = call(
        &app,
        "POST",
        &format!(
            "/admin/v1/projects/{}/keys",
            project["id"].as_str().unwrap()
        ),
        ADMIN_KEY,
        Some(json!({"name": "k"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let secret = key["key"].as_str().unwrap();

    // Wait for the first scrape, then send one long prompt twice: the second is a prefix hit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet
        .picker
        .pool()
        .snapshot()
        .iter()
        .any(|u| u.scraped_at().is_none())
    {
        assert!(Instant::now() < deadline, "no scrape");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let chat = json!({"model": "m", "max_tokens": 4,
        "messages": [{"role": "user", "content": "a long shared prompt ".repeat(64)}]});
    for _ in 0..2 {
        let (status, body) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            secret,
            Some(chat.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    let (status, replicas) = call(&app, "GET", "/admin/v1/replicas", ADMIN_KEY, None).await;
    assert_eq!(status, StatusCode::OK, "{replicas}");
    let data = replicas["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let by_name = |name: &str| data.iter().find(|r| r["name"] == name).unwrap().clone();
    let (paris, stockholm) = (by_name("paris-1"), by_name("stockholm-1"));
    assert_eq!(paris["region"], "eu-paris");
    assert_eq!(stockholm["region"], "eu-stockholm");
    assert_eq!(paris["healthy"], true);
    assert_eq!(paris["engine"], "vllm");
    assert_eq!(stockholm["load"]["kv_cache_usage"], 0.25);
    // Both requests went to Stockholm, the organisation's only region; the second one's
    // blocks were all held there already, so half the blocks routed were hits.
    assert_eq!(stockholm["routed"], 2);
    assert_eq!(paris["routed"], 0);
    assert_eq!(stockholm["prefix_cache_hit_rate"], 0.5);
    assert_eq!(paris["prefix_cache_hit_rate"], Value::Null);
    assert_eq!(stockholm["in_flight"], 0);

    // The admin key guards it; an API key does not open it.
    let (status, _) = call(&app, "GET", "/admin/v1/replicas", secret, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The console is served with its policy.
    let page = app
        .clone()
        .oneshot(Request::get("/console/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(
        page.headers()[header::CONTENT_SECURITY_POLICY],
        console::CONTENT_SECURITY_POLICY
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_control_plane_the_router_has_no_admin_api_but_the_console() {
    let (_s, port) = standin("solo").await;
    let config = RouterConfig::parse(&format!(
        "[[upstream]]\nname = \"solo\"\nurl = \"http://127.0.0.1:{port}\"\nengine = \"vllm\"\nregion = \"local\"\n"
    ))
    .unwrap();
    let fleet = Fleet::start(&config, None).unwrap();
    let router = Arc::new(FleetRouter::new(
        Arc::clone(&fleet.picker),
        fleet.client.clone(),
        None,
        config.proxy.clone(),
    ));
    let app = souverain_fleet::app(router);
    let (status, body) = call(&app, "GET", "/admin/v1/replicas", ADMIN_KEY, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = call(&app, "GET", "/console/assets/main.js", "", None).await;
    assert_eq!(status, StatusCode::OK);
}
