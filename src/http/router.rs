//! `(method, path)` → handler. Every path works with and without its
//! trailing slash; unknown paths are JSON 404s and wrong methods JSON 405s
//! with `Allow`; `OPTIONS` answers preflights.

use std::sync::Arc;

use hyper::{Method, Request, Response};

use super::error::ApiError;
use super::{chat, events, ops, poll, Body, ReqBody};
use crate::app::App;

enum Route {
    Index,
    Healthz,
    Readyz,
    Metrics,
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

pub async fn route<B: ReqBody>(
    app: &Arc<App>,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let Some(route) = parse(req.uri().path()) else {
        return Err(ApiError::NotFound("Not found"));
    };
    if req.method() == Method::OPTIONS {
        return Ok(app
            .cors
            .preflight(route.allow(), req.headers().get(hyper::header::ORIGIN)));
    }
    // HEAD is a GET whose body hyper leaves out: HTTP requires it wherever
    // GET works, and Django answers it so.
    let get_as_head = *req.method() == Method::HEAD && route.method() == Method::GET;
    if *req.method() != route.method() && !get_as_head {
        return Err(ApiError::MethodNotAllowed(route.allow()));
    }
    // Each handler's future is boxed: a waiting poll or an open stream then
    // holds only its own state, not the size of the largest handler.
    match route {
        Route::Index => Ok(ops::index()),
        Route::Healthz => Ok(ops::healthz()),
        Route::Readyz => Box::pin(ops::readyz(app)).await,
        Route::Metrics => Ok(ops::metrics(app)),
        Route::Events => Box::pin(events::events(app, req)).await,
        Route::Rooms => Box::pin(chat::rooms(app, req, None)).await,
        Route::Room(id) => Box::pin(chat::rooms(app, req, Some(id))).await,
        Route::Typing(id) => Box::pin(chat::typing(app, req, id)).await,
        Route::Read(id) => Box::pin(chat::mark_read(app, req, id)).await,
        Route::Messages => Box::pin(chat::send_message(app, req)).await,
        Route::Poll => Box::pin(poll::poll(app, req)).await,
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
