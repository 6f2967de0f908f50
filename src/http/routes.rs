//! The paths hark serves, as data: a path to its [`Route`], each route's
//! method and `Allow`. Routing ([`super::router`]) and the request log
//! ([`super::log`]) both read them.

use hyper::Method;

pub(crate) enum Route {
    Index,
    HarkJs,
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
    pub(crate) fn allow(&self) -> &'static str {
        match self {
            Route::Typing(_) | Route::Read(_) | Route::Messages => "POST, OPTIONS",
            _ => "GET, HEAD, OPTIONS",
        }
    }

    pub(crate) fn method(&self) -> Method {
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
    "/hark.js",
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
    pub(crate) fn template(&self) -> &'static str {
        match self {
            Route::Index => "/",
            Route::HarkJs => "/hark.js",
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

pub(crate) fn parse(path: &str) -> Option<Route> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    // No route has more than five segments; parsing them into an array
    // keeps routing, which runs twice per request on hark's own HTTP (the
    // transport asks for the route's kind), free of allocations.
    let mut segments = [""; 6];
    let mut n = 0;
    for seg in trimmed.split('/').skip(1) {
        *segments.get_mut(n)? = seg;
        n += 1;
    }
    let segments = &segments[..n];
    let id = |s: &str| -> Option<i64> {
        // Django's <int:…> converter: digits only, so `/rooms/abc/` is a 404.
        if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    Some(match segments {
        [] | [""] => Route::Index,
        ["hark.js"] => Route::HarkJs,
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

/// Whether `path` is one hark routes (the request log keeps such paths).
pub(crate) fn is_route(path: &str) -> bool {
    parse(path).is_some()
}
