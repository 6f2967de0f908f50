//! Operations endpoints, the demo page and its client module: `/healthz`,
//! `/readyz`, `/metrics`, `/`, `/hark.js`.

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::error::ApiError;
use super::response::{full, json_response};
use super::shared::Shared;
use super::Body;

/// The page at `/`, compiled into the binary (no build step).
const INDEX_HTML: &str = include_str!("../../static/index.html");

pub(crate) fn index() -> Response<Body> {
    let mut resp = Response::new(full(INDEX_HTML));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The browser client (an ES module the page at `/` imports), compiled in
/// like the page.
const HARK_JS: &str = include_str!("../../static/hark.js");

pub(crate) fn hark_js() -> Response<Body> {
    let mut resp = Response::new(full(HARK_JS));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// 200 while the process runs.
pub(crate) fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// 200 when the pool can reach the database and the LISTEN connection is
/// up; 503 otherwise (with what is down).
pub(crate) async fn readyz(app: &Shared) -> Result<Response<Body>, ApiError> {
    let db = match tokio::time::timeout(std::time::Duration::from_secs(2), app.pool.get()).await {
        Ok(Ok(client)) => client.simple_query("SELECT 1").await.is_ok(),
        _ => false,
    };
    let listener = app.hub.listener_up();
    let ready = db && listener && !app.shutdown.is_fired();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "database": db,
        "listener": listener,
    });
    let mut resp = json_response(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body.to_string(),
    );
    if !ready {
        resp.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

pub(crate) fn metrics(app: &Shared) -> Response<Body> {
    let mut resp = Response::new(full(app.metrics.render()));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
