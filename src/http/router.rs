//! `(method, path)` → handler. Every path works with and without its
//! trailing slash; unknown paths are JSON 404s and wrong methods JSON 405s
//! with `Allow`; `OPTIONS` answers preflights. Before any of that, the
//! request must be one HTTP allows ([`conforms`]), on either connection
//! path. `docs/openapi.json` describes the same paths and methods; a test
//! here keeps them together.

use std::future::ready;
use std::sync::Arc;

use hyper::header::{EXPECT, HOST};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, Version};

use super::error::ApiError;
use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use tokio::time::Instant;

use super::h1::{Kind, Limits, Pending, Refusal, Service};
use super::log::Seen;
use super::request::ReqBody;
use super::routes::{parse, Route};
use super::shared::Shared;
use super::{chat, events, openapi, ops, poll, Body};

/// What the transport must know of a request's route: an event stream
/// ends its connection, a long poll may be answered by the listener.
pub(crate) fn kind<B>(req: &Request<B>) -> Kind {
    match (req.method(), parse(req.uri().path())) {
        (&Method::GET, Some(Route::Events)) => Kind::Stream,
        (&Method::GET, Some(Route::Poll)) => Kind::MayPark,
        _ => Kind::Answer,
    }
}

/// hark's answers behind its own HTTP/1.1 ([`super::h1`]): the router,
/// with the request log, CORS and errors as responses around it.
impl Service for Arc<Shared> {
    type Seen = Seen;
    type Error = ApiError;

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn kind(&self, req: &Request<()>) -> Kind {
        kind(req)
    }

    fn begin<B>(&self, req: &Request<B>) -> Seen {
        Seen::new(req)
    }

    fn call(&self, req: Request<Full<Bytes>>) -> Answer<'_> {
        route(self, req)
    }

    fn call_stream(&self, req: Request<()>) -> Answer<'_> {
        if let Err(e) = conforms(&req) {
            return Box::pin(ready(Err(e)));
        }
        Box::pin(events::events(self, req))
    }

    fn finish(&self, seen: Seen, result: Result<Response<Body>, ApiError>) -> Response<Body> {
        seen.finish(self, result)
    }

    fn done(&self, seen: Seen, status: StatusCode, at: Instant) {
        seen.done(status, at);
    }

    fn refuse(&self, why: Refusal) -> Response<Body> {
        match why {
            Refusal::HeadTooLarge => ApiError::HeadTooLarge,
            Refusal::Malformed(what) => {
                ApiError::bad("invalid_request", format!("Malformed request: {what}"))
            }
            Refusal::BodyTimeout => ApiError::body_timeout(),
        }
        .into_response()
    }
}

/// What RFC 9112 §3.2 and RFC 9110 §10.1.1 ask of a request before it is
/// served: one valid `Host` (an HTTP/1.1 request must send it, HTTP/1.0
/// may omit it), and no expectation but `100-continue`, which hyper
/// answers. Neither hyper nor hark's own HTTP checks these.
pub(crate) fn conforms<B>(req: &Request<B>) -> Result<(), ApiError> {
    let bad_host = |message| Err(ApiError::bad("invalid_host", message));
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == Version::HTTP_11 => {
            return bad_host("An HTTP/1.1 request must have a Host header")
        }
        (Some(_), Some(_)) => return bad_host("A request must have one Host header, not several"),
        (Some(host), None) if !valid_host(host.as_bytes()) => {
            return bad_host("The Host header is not a host and port")
        }
        _ => {}
    }
    for expect in req.headers().get_all(EXPECT) {
        let continues = expect.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .all(|e| e.eq_ignore_ascii_case("100-continue"))
        });
        if !continues {
            return Err(ApiError::ExpectationFailed);
        }
    }
    Ok(())
}

/// `uri-host [ ":" port ]`, or empty (a target without an authority).
fn valid_host(host: &[u8]) -> bool {
    if host.is_empty() {
        return true;
    }
    // An authority without userinfo starts with its host; `http` takes any
    // port text, RFC 3986 only digits.
    let Ok(a) = Authority::try_from(host) else {
        return false;
    };
    let port = a.as_str().get(a.host().len()..).unwrap_or("x");
    !host.contains(&b'@')
        && !a.host().is_empty()
        && (port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())))
}

/// A request's answer, to be awaited.
pub(crate) type Answer<'a> = Pending<'a, ApiError>;

/// The handler's future for `req`, boxed on its own: a waiting poll or an
/// open stream then holds only its handler's state, neither the largest
/// handler's nor a routing layer's. Handlers that read no body get the
/// request without it, so one copy of each serves both connection paths.
pub(crate) fn route<B: ReqBody>(app: &Arc<Shared>, req: Request<B>) -> Answer<'_> {
    if let Err(e) = conforms(&req) {
        return Box::pin(ready(Err(e)));
    }
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
        Route::HarkJs => Box::pin(ready(Ok(ops::hark_js()))),
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
    use super::super::routes::TEMPLATES;
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
        assert!(matches!(parse("/hark.js"), Some(Route::HarkJs)));
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
    fn a_request_has_one_valid_host_and_expects_only_100_continue() {
        let req = |version: Version, headers: &[(&str, &str)]| {
            let mut r = Request::builder().uri("/healthz").version(version);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.body(()).unwrap()
        };
        let v11 = Version::HTTP_11;
        for ok in [
            req(v11, &[("host", "x")]),
            req(v11, &[("host", "127.0.0.1:8080")]),
            req(v11, &[("host", "[::1]:80")]),
            req(v11, &[("host", "")]),
            req(Version::HTTP_10, &[]),
            req(v11, &[("host", "x"), ("expect", "100-Continue")]),
        ] {
            assert!(conforms(&ok).is_ok(), "{ok:?}");
        }
        for bad in [
            req(v11, &[]),
            req(v11, &[("host", "x"), ("host", "x")]),
            req(Version::HTTP_10, &[("host", "x"), ("host", "y")]),
            req(v11, &[("host", "user@x")]),
            req(v11, &[("host", "x y")]),
            req(v11, &[("host", "x:port")]),
        ] {
            assert_eq!(
                conforms(&bad).map_err(|e| e.status()),
                Err(hyper::StatusCode::BAD_REQUEST),
                "{bad:?}"
            );
        }
        for bad in [
            req(v11, &[("host", "x"), ("expect", "200-ok")]),
            req(v11, &[("host", "x"), ("expect", "100-continue, x")]),
            req(
                v11,
                &[("host", "x"), ("expect", "100-continue"), ("expect", "x")],
            ),
        ] {
            assert_eq!(
                conforms(&bad).map_err(|e| e.status()),
                Err(hyper::StatusCode::EXPECTATION_FAILED),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_get_of_the_stream_streams_and_a_get_of_the_poll_may_park() {
        let kind_of = |method: Method, p: &str| {
            let req = Request::builder().method(method).uri(p).body(()).unwrap();
            kind(&req)
        };
        for p in ["/events", "/events/", "/events?room_id=1"] {
            assert_eq!(kind_of(Method::GET, p), Kind::Stream, "{p}");
            assert_eq!(kind_of(Method::HEAD, p), Kind::Answer, "{p}");
        }
        for p in [
            "/api/chat/messages/poll/",
            "/api/chat/messages/poll?room_id=1",
        ] {
            assert_eq!(kind_of(Method::GET, p), Kind::MayPark, "{p}");
            assert_eq!(kind_of(Method::POST, p), Kind::Answer, "{p}");
        }
        for p in [
            "/events//",
            "//events",
            "/events/1",
            "/eventsx",
            "/",
            "/api/chat/rooms/",
        ] {
            assert_eq!(kind_of(Method::GET, p), Kind::Answer, "{p}");
        }
        // Deeper than any route: not routed, and no panic.
        assert!(parse("/a/b/c/d/e/f/g/h").is_none());
    }
}
