//! The request log: one line per request, with the method, a target that
//! tokens never reach, the status and the time taken; and what the log
//! and CORS keep of a request before its handler consumes it.

use hyper::header::HeaderValue;
use hyper::{Request, Response};
use tokio::time::Instant;

use super::error::ApiError;
use super::shared::Shared;
use super::{routes, Body};

/// Query keys whose values the request log keeps: those hark reads
/// (`access_token` is logged as present, its value never).
const LOGGED_KEYS: &[&str] = &[
    "room_id",
    "since",
    "timeout",
    "limit",
    "last_event_id",
    "access_token",
];

/// Longest segment of a path hark does not route that the log keeps.
/// Shorter than any signed JWT (an HS256 signature alone is 43 characters).
const MAX_LOGGED_SEGMENT: usize = 32;

const REDACTED: &str = "REDACTED";

/// The request target for the log, which tokens never reach, however a
/// client puts one in (under another query key, in a key, after a `;`, in
/// the path). A path hark routes is kept whole: its segments are fixed
/// words and ids. Another keeps only its short plain segments. The query
/// keeps only the keys hark reads, each value only when it has the shape
/// hark reads there — which no token has.
pub(crate) fn loggable_target(uri: &hyper::Uri) -> String {
    let path = uri.path();
    let mut out = if routes::is_route(path) {
        path.to_string()
    } else {
        path.split('/')
            .map(|seg| {
                let plain = seg.len() <= MAX_LOGGED_SEGMENT
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
                if plain {
                    seg
                } else {
                    REDACTED
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    };
    let Some(q) = uri.query() else {
        return out;
    };
    let mut kept = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        let Some(&key) = LOGGED_KEYS.iter().find(|&&key| key == k) else {
            continue;
        };
        let shaped = match key {
            "room_id" | "timeout" | "limit" => {
                !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit())
            }
            "since" | "last_event_id" => cursor_shaped(&v) || timestamp_shaped(&v),
            _ => false,
        };
        kept.append_pair(key, if shaped { &v } else { REDACTED });
        any = true;
    }
    if any {
        out.push('?');
        out.push_str(&kept.finish());
    }
    out
}

/// A cursor's alphabet (URL-safe base64): no `.`, so no JWT.
fn cursor_shaped(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= crate::cursor::MAX_CURSOR_CHARS
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An ISO-8601 timestamp's characters: digits, separators, `T` and `Z`.
fn timestamp_shaped(v: &str) -> bool {
    !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b"0123456789-:.+ TtZz".contains(&b))
}

/// The method for the log: hyper takes any token as a method, a JWT too.
fn loggable_method(method: &hyper::Method) -> &str {
    use hyper::Method as M;
    let known = [
        M::GET,
        M::HEAD,
        M::POST,
        M::PUT,
        M::DELETE,
        M::OPTIONS,
        M::PATCH,
        M::TRACE,
        M::CONNECT,
    ];
    if known.contains(method) {
        method.as_str()
    } else {
        "OTHER"
    }
}

/// What the request log and CORS need from a request, taken before the
/// handler consumes it.
pub(crate) struct Seen {
    started: Instant,
    method: hyper::Method,
    /// The target as [`loggable_target`] gives it, when the request log
    /// is on.
    target: Option<String>,
    origin: Option<HeaderValue>,
}

impl Seen {
    pub(crate) fn new<B>(req: &Request<B>) -> Seen {
        // Redacting costs a parse of the query: skip it when the line is off.
        let log = tracing::enabled!(target: "hark::request", tracing::Level::INFO);
        Seen {
            started: Instant::now(),
            method: req.method().clone(),
            target: log.then(|| loggable_target(req.uri())),
            origin: req.headers().get(hyper::header::ORIGIN).cloned(),
        }
    }

    /// Errors become responses here; CORS is added and the line logged.
    pub(crate) fn finish(
        self,
        app: &Shared,
        result: Result<Response<Body>, ApiError>,
    ) -> Response<Body> {
        let mut resp = result.unwrap_or_else(ApiError::into_response);
        app.cors.apply(self.origin.as_ref(), resp.headers_mut());
        self.done(resp.status(), Instant::now());
        resp
    }

    /// Logs the line of a request answered with `status` at `end`.
    pub(crate) fn done(self, status: hyper::StatusCode, end: Instant) {
        if let Some(target) = self.target {
            tracing::info!(
                target: "hark::request",
                method = %loggable_method(&self.method),
                path = %target,
                status = status.as_u16(),
                ms = end.saturating_duration_since(self.started).as_secs_f64() * 1000.0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{loggable_method, loggable_target};

    #[test]
    fn the_logged_target_keeps_what_hark_reads_and_no_token() {
        let jwt =
            "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoxfQ.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2k";
        let cases = [
            (
                "/api/chat/messages/poll/?room_id=3&since=AcZ1BLVELBFrAQAAAADcBQAA&timeout=0&limit=5"
                    .to_string(),
                "/api/chat/messages/poll/?room_id=3&since=AcZ1BLVELBFrAQAAAADcBQAA&timeout=0&limit=5",
            ),
            (
                "/api/chat/messages/poll/?room_id=3&since=2026-01-15T10:00:00.5%2B02:00".into(),
                "/api/chat/messages/poll/?room_id=3&since=2026-01-15T10%3A00%3A00.5%2B02%3A00",
            ),
            (
                format!("/events?room_id=1&room_id=2&access_token={jwt}&last_event_id=abc"),
                "/events?room_id=1&room_id=2&access_token=REDACTED&last_event_id=abc",
            ),
            (format!("/api/chat/rooms/?x=1;access_token={jwt}"), "/api/chat/rooms/"),
            (format!("/api/chat/rooms/?access_token%3D{jwt}"), "/api/chat/rooms/"),
            (format!("/api/chat/rooms/?x=Bearer:{jwt}"), "/api/chat/rooms/"),
            (format!("/healthz?accessToken=Bearer%20{jwt}"), "/healthz"),
            (
                format!("/api/chat/messages/poll/?room_id={jwt}&since={jwt}&limit=1;{jwt}"),
                "/api/chat/messages/poll/?room_id=REDACTED&since=REDACTED&limit=REDACTED",
            ),
            (
                format!("/api/chat/rooms/{jwt}/"),
                "/api/chat/rooms/REDACTED/",
            ),
            (
                format!("/wp-login.php/{}/x%2Fy/.env", &jwt[..40]),
                "/wp-login.php/REDACTED/REDACTED/.env",
            ),
        ];
        for (target, want) in cases {
            let uri: hyper::Uri = target.parse().unwrap();
            assert_eq!(loggable_target(&uri), want, "{target}");
        }
        assert_eq!(loggable_method(&hyper::Method::PATCH), "PATCH");
        let odd = hyper::Method::from_bytes(jwt.as_bytes()).unwrap();
        assert_eq!(loggable_method(&odd), "OTHER");
    }
}
