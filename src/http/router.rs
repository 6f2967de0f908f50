//! `(method, path)` → handler. Every path works with and without its
//! trailing slash; unknown paths are JSON 404s and wrong methods JSON 405s
//! with `Allow`; `OPTIONS` answers preflights. `docs/openapi.json`
//! describes the same paths and methods; a test here keeps them together.

use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::Arc;

use hyper::{Method, Request, Response};

use super::error::ApiError;
use super::{chat, events, openapi, ops, poll, Body, ReqBody};
use crate::app::App;

enum Route {
    Index,
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    Events,
    Rooms,
    Room(i64),
    Typing(i64),
    Read(i64),
    Messages,
    Poll,
}

impl Route {
    fn allow(&self) -> &'static str {
        match self {
            Route::Typing(_) | Route::Read(_) | Route::Messages => "POST, OPTIONS",
            _ => "GET, HEAD, OPTIONS",
        }
    }

    fn method(&self) -> Method {
        match self {
            Route::Typing(_) | Route::Read(_) | Route::Messages => Method::POST,
            _ => Method::GET,
        }
    }
}

/// Every path [`parse`] routes, as `docs/openapi.json` spells it (with
/// the trailing slash API.md gives it; both forms route). A new route
/// belongs here, in [`Route::template`] and in the document.
#[cfg(test)]
pub(crate) const TEMPLATES: &[&str] = &[
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/events",
    "/api/chat/rooms/",
    "/api/chat/rooms/{room_id}/",
    "/api/chat/rooms/{room_id}/typing/",
    "/api/chat/rooms/{room_id}/read/",
    "/api/chat/messages/",
    "/api/chat/messages/poll/",
];

#[cfg(test)]
impl Route {
    /// The entry of [`TEMPLATES`] this route came from. Exhaustive, so a
    /// new route does not compile its tests without one.
    fn template(&self) -> &'static str {
        match self {
            Route::Index => "/",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Events => "/events",
            Route::Rooms => "/api/chat/rooms/",
            Route::Room(_) => "/api/chat/rooms/{room_id}/",
            Route::Typing(_) => "/api/chat/rooms/{room_id}/typing/",
            Route::Read(_) => "/api/chat/rooms/{room_id}/read/",
            Route::Messages => "/api/chat/messages/",
            Route::Poll => "/api/chat/messages/poll/",
        }
    }
}

fn parse(path: &str) -> Option<Route> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let id = |s: &str| -> Option<i64> {
        // Django's <int:…> converter: digits only, so `/rooms/abc/` is a 404.
        if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    Some(match segments.as_slice() {
        [] | [""] => Route::Index,
        ["healthz"] => Route::Healthz,
        ["readyz"] => Route::Readyz,
        ["metrics"] => Route::Metrics,
        ["openapi.json"] => Route::OpenApi,
        ["events"] => Route::Events,
        ["api", "chat", "rooms"] => Route::Rooms,
        ["api", "chat", "rooms", r] => Route::Room(id(r)?),
        ["api", "chat", "rooms", r, "typing"] => Route::Typing(id(r)?),
        ["api", "chat", "rooms", r, "read"] => Route::Read(id(r)?),
        ["api", "chat", "messages"] => Route::Messages,
        ["api", "chat", "messages", "poll"] => Route::Poll,
        _ => return None,
    })
}

/// A request's answer, to be awaited.
pub type Answer<'a> = Pin<Box<dyn Future<Output = Result<Response<Body>, ApiError>> + Send + 'a>>;

/// The handler's future for `req`, boxed on its own: a waiting poll or an
/// open stream then holds only its handler's state, neither the largest
/// handler's nor a routing layer's. Handlers that read no body get the
/// request without it, so one copy of each serves both connection paths.
pub fn route<B: ReqBody>(app: &Arc<App>, req: Request<B>) -> Answer<'_> {
    let Some(route) = parse(req.uri().path()) else {
        return Box::pin(ready(Err(ApiError::NotFound("Not found"))));
    };
    if req.method() == Method::OPTIONS {
        let origin = req.headers().get(hyper::header::ORIGIN);
        return Box::pin(ready(Ok(app.cors.preflight(route.allow(), origin))));
    }
    // HEAD is a GET whose body hyper leaves out: HTTP requires it wherever
    // GET works, and Django answers it so.
    let get_as_head = *req.method() == Method::HEAD && route.method() == Method::GET;
    if *req.method() != route.method() && !get_as_head {
        return Box::pin(ready(Err(ApiError::MethodNotAllowed(route.allow()))));
    }
    let bodiless = |req: Request<B>| req.map(drop);
    match route {
        Route::Index => Box::pin(ready(Ok(ops::index()))),
        Route::Healthz => Box::pin(ready(Ok(ops::healthz()))),
        Route::Readyz => Box::pin(ops::readyz(app)),
        Route::Metrics => Box::pin(ready(Ok(ops::metrics(app)))),
        Route::OpenApi => Box::pin(ready(Ok(openapi::openapi(app)))),
        Route::Events => Box::pin(events::events(app, bodiless(req))),
        Route::Rooms => Box::pin(chat::rooms(app, bodiless(req), None)),
        Route::Room(id) => Box::pin(chat::rooms(app, bodiless(req), Some(id))),
        Route::Typing(id) => Box::pin(chat::typing(app, req, id)),
        Route::Read(id) => Box::pin(chat::mark_read(app, bodiless(req), id)),
        Route::Messages => Box::pin(chat::send_message(app, req)),
        Route::Poll => Box::pin(poll::poll(app, bodiless(req))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_and_without_slash() {
        for p in ["/api/chat/rooms", "/api/chat/rooms/"] {
            assert!(matches!(parse(p), Some(Route::Rooms)));
        }
        assert!(matches!(
            parse("/api/chat/rooms/12/typing/"),
            Some(Route::Typing(12))
        ));
        assert!(matches!(
            parse("/api/chat/rooms/12/typing"),
            Some(Route::Typing(12))
        ));
        assert!(matches!(parse("/"), Some(Route::Index)));
        assert!(parse("/api/chat/rooms/abc/").is_none());
        assert!(parse("/api/chat/rooms/-1/").is_none());
        assert!(parse("/api/chat/rooms/99999999999999999999/").is_none());
        assert!(parse("/nope").is_none());
        assert!(parse("/api/chat/rooms//").is_none());
    }

    /// The router and `docs/openapi.json` name the same paths, and each
    /// path the methods its `Allow` lists. OPTIONS is left out of the
    /// document, as HTTP frameworks answer it on their own (the document's
    /// description says every path answers it); HEAD is in it.
    #[test]
    fn the_router_and_the_openapi_document_agree() {
        use std::collections::BTreeSet;
        let doc: serde_json::Value =
            serde_json::from_str(super::super::openapi::DOCUMENT).expect("docs/openapi.json");
        let paths = doc["paths"].as_object().expect("paths");
        let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
        let routed: BTreeSet<&str> = TEMPLATES.iter().copied().collect();
        assert_eq!(routed.len(), TEMPLATES.len(), "a template twice");
        assert_eq!(documented, routed, "paths: document vs router");
        for &template in TEMPLATES {
            for path in [
                template.replace("{room_id}", "7"),
                template
                    .replace("{room_id}", "7")
                    .trim_end_matches('/')
                    .to_string(),
            ] {
                let route = parse(&path).unwrap_or_else(|| panic!("{path} does not route"));
                assert_eq!(route.template(), template, "{path}");
            }
            let route = parse(&template.replace("{room_id}", "7")).expect("routes");
            let allowed: BTreeSet<String> = route
                .allow()
                .split(", ")
                .filter(|m| *m != "OPTIONS")
                .map(str::to_lowercase)
                .collect();
            let methods: BTreeSet<String> = paths[template]
                .as_object()
                .expect("a path item")
                .keys()
                .filter(|k| {
                    [
                        "get", "put", "post", "delete", "options", "head", "patch", "trace",
                    ]
                    .contains(&k.as_str())
                })
                .cloned()
                .collect();
            assert_eq!(methods, allowed, "methods of {template}: document vs Allow");
            // The one method the router dispatches on is documented.
            assert!(methods.contains(&route.method().as_str().to_lowercase()));
        }
    }

    #[test]
    fn the_lean_connection_knows_the_stream_path_as_routing_does() {
        for p in [
            "/events",
            "/events/",
            "/events//",
            "//events",
            "/events/1",
            "/eventsx",
            "/",
            "/api/chat/messages/poll/",
        ] {
            let uri: hyper::Uri = p.parse().unwrap();
            assert_eq!(
                matches!(parse(p), Some(Route::Events)),
                super::super::lean::is_events(&uri),
                "{p}"
            );
        }
    }
}
