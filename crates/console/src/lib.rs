//! The browser console, served by `souverain serve` and `souverain route` under `/console`:
//! a playground (chat with streaming, parameters, JSON mode and schemas, tools, reasoning and
//! tool calls shown apart, time to first token and tokens per second) and, with the admin
//! key, the administration of the control plane (organisations, projects, keys, usage charts,
//! the audit log and its verification; the replicas behind `route`).
//!
//! Sovereign by construction: every asset is embedded in the binary at build time
//! (`include_str!`), hand-written HTML, CSS and JavaScript modules with no build step, and
//! every answer carries a Content-Security-Policy that lets the page load and connect to its
//! own origin only, with no inline script or style. The page keeps credentials in memory
//! only (a JavaScript variable: never storage, never a URL), and builds every piece of text
//! that came from the server with `textContent`, so nothing a model or a tenant wrote can run.
//!
//! ```
//! let app: axum::Router = souverain_console::router();
//! # let _ = app;
//! ```

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The Content-Security-Policy of every console answer: the page's own origin only, no inline
/// script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    /// Its name under `/console/assets/` (the page itself is `index.html`, served at
    /// `/console/`).
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";

/// An asset of `assets/`, embedded at build time.
macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_str!(concat!("../assets/", $name)),
        }
    };
}

/// Every file of the console; the page first.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("main.js", JS),
    asset!("dom.js", JS),
    asset!("http.js", JS),
    asset!("markdown.js", JS),
    asset!("sse.js", JS),
    asset!("playground.js", JS),
    asset!("admin.js", JS),
    asset!("charts.js", JS),
];

/// The console's routes: `/console` (redirected to `/console/`, so that the page's relative
/// asset paths hold behind a path prefix too), `/console/` and `/console/assets/{name}`.
/// Merge it into a front's router; it needs no state.
pub fn router() -> Router {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route("/console/", get(page))
        .route("/console/assets/{name}", get(asset))
}

async fn page(headers: HeaderMap) -> Response {
    serve_named("index.html", &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    serve_named(&name, &headers)
}

/// The asset called `name`, or a 404; `304 Not Modified` when the browser's copy is current.
fn serve_named(name: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        let mut response = (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such console asset",
        )
            .into_response();
        secure(response.headers_mut());
        return response;
    };
    let etag = etag(asset.body);
    let current = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let mut response = if current {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let headers = response.headers_mut();
    // The names are not versioned: the browser asks again each time and gets a 304 while the
    // binary is the same, so an upgraded server never mixes old and new modules.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    secure(headers);
    response
}

/// The headers every console answer carries.
fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// A strong validator for an embedded file: FNV-1a over its bytes, quoted.
fn etag(body: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{hash:016x}\"")
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(uri: &str, etag: Option<&str>) -> Response {
        let mut request = Request::get(uri);
        if let Some(tag) = etag {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        router()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn assert_secured(response: &Response) {
        let h = response.headers();
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
    }

    #[tokio::test]
    async fn every_asset_is_served_with_its_type_and_the_headers() {
        let page = get("/console/", None).await;
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_secured(&page);
        for asset in ASSETS {
            let response = get(&format!("/console/assets/{}", asset.name), None).await;
            assert_eq!(response.status(), StatusCode::OK, "{}", asset.name);
            assert_eq!(response.headers()[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
            assert_secured(&response);
            let tag = response.headers()[header::ETAG]
                .to_str()
                .unwrap()
                .to_owned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, asset.body.as_bytes());
            let again = get(&format!("/console/assets/{}", asset.name), Some(&tag)).await;
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{}", asset.name);
            assert_secured(&again);
        }
        let stale = get("/console/assets/main.js", Some("\"0\"")).await;
        assert_eq!(stale.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn the_bare_path_redirects_and_unknown_assets_are_404() {
        let bare = get("/console", None).await;
        assert_eq!(bare.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(bare.headers()[header::LOCATION], "/console/");
        for uri in [
            "/console/assets/nope.js",
            "/console/assets/..%2Fsrc%2Flib.rs",
        ] {
            let missing = get(uri, None).await;
            assert_eq!(missing.status(), StatusCode::NOT_FOUND, "{uri}");
            assert_secured(&missing);
        }
    }

    /// What the page loads and imports names only files that exist, on its own origin.
    #[test]
    fn assets_reference_only_embedded_files() {
        let names: Vec<&str> = ASSETS.iter().map(|a| a.name).collect();
        let mut seen = 0;
        for asset in ASSETS {
            for marker in ["\"assets/", "from \"./"] {
                let mut rest = asset.body;
                while let Some(at) = rest.find(marker) {
                    rest = &rest[at + marker.len()..];
                    let name = &rest[..rest.find('"').unwrap()];
                    assert!(names.contains(&name), "{} names {name}", asset.name);
                    seen += 1;
                }
            }
        }
        // The page's stylesheet, icon and entry module, and the modules' imports.
        assert!(seen >= 10, "only {seen} references read");
    }

    /// Sovereign and script-safe by construction: no other origin, no inline script or
    /// style, no HTML parsing of strings, no credentials in storage.
    #[test]
    fn assets_load_nothing_from_elsewhere_and_parse_no_html() {
        for asset in ASSETS {
            let body = asset.body;
            let outside = body
                .replace("http://www.w3.org/2000/svg", "")
                .replace("\"http:\"", "")
                .replace("\"https:\"", "");
            for needle in ["http://", "https://", "//cdn", "url(", "@import"] {
                assert!(
                    !outside.contains(needle),
                    "{} contains {needle}",
                    asset.name
                );
            }
            for needle in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "localStorage",
                "sessionStorage",
                "document.cookie",
                "setAttribute(\"style\"",
            ] {
                assert!(!body.contains(needle), "{} uses {needle}", asset.name);
            }
        }
        let page = ASSETS[0].body;
        assert!(!page.contains(" style="), "inline style in the page");
        assert!(!page.contains("<style"), "inline style in the page");
        let handler = page.split(" on").skip(1).find(|after| {
            let name_len = after.chars().take_while(char::is_ascii_lowercase).count();
            name_len > 0 && after[name_len..].starts_with('=')
        });
        assert_eq!(handler, None, "an inline handler in the page");
        let scripts = page.matches("<script").count();
        assert_eq!(
            scripts,
            page.matches("<script type=\"module\" src=").count()
        );
        assert_eq!(scripts, page.matches("></script>").count());
    }
}
