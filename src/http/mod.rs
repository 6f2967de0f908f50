//! The HTTP edge: the accept loop and its limits, the per-request wrapper
//! (CORS, request log, errors → responses) and the helpers handlers share.
//! Routing is in [`router`]; each endpoint family has its own module.

pub mod chat;
pub mod cors;
pub mod error;
pub mod events;
pub mod lean;
pub mod openapi;
pub mod ops;
pub(crate) mod parked;

pub mod poll;
pub mod replay;
pub mod router;
pub mod send_timeout;
pub(crate) mod sse;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::app::App;
use crate::auth::AuthError;
use crate::message::User;
use crate::shutdown::Shutdown;
use error::ApiError;
use replay::Replay;

/// Every response body: small JSON in one frame, or an event stream.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// A request body as the handlers that read one take it: hyper's
/// `Incoming`, or the lean connection's `Full` (the body read whole).
pub trait ReqBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + Sync
    + 'static
{
}

impl<T> ReqBody for T where
    T: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Sync
        + 'static
{
}

/// Time a client has to send its request head (slowloris guard): the
/// first from when its connection is accepted, each later one from when
/// the connection waits for it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request body once its head arrived.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections that are not polls or streams.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(2500);

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The query string as decoded pairs (`+` is a space, as forms encode it).
pub fn query_pairs<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.uri().query().map(decode_query).unwrap_or_default()
}

/// `form_urlencoded::parse`, owned, with a fast path for a query with
/// nothing to decode: ids, cursors and tokens are URL-safe, and decoding
/// a poll's query (a JWT among it) through `form_urlencoded` was 7% of
/// hark's CPU on the hot path (0.8% this way).
fn decode_query(q: &str) -> Vec<(String, String)> {
    if memchr::memchr2(b'%', b'+', q.as_bytes()).is_some() {
        return form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    }
    q.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

pub fn query_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The requester: a valid token naming an existing user.
pub async fn authenticate<B>(
    app: &App,
    req: &Request<B>,
    pairs: &[(String, String)],
) -> Result<Arc<User>, ApiError> {
    authenticate_until(app, req, pairs)
        .await
        .map(|(user, _)| user)
}

/// [`authenticate`], with the last second (Unix time) in which the token
/// is accepted: an event stream ends when it passes.
pub async fn authenticate_until<B>(
    app: &App,
    req: &Request<B>,
    pairs: &[(String, String)],
) -> Result<(Arc<User>, i64), ApiError> {
    let token = match req.headers().get(AUTHORIZATION) {
        Some(h) => {
            let h = h.to_str().map_err(|_| AuthError::Invalid)?;
            let (scheme, token) = h.split_once(' ').ok_or(AuthError::Invalid)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Invalid.into());
            }
            token.trim()
        }
        None => query_get(pairs, "access_token")
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?,
    };
    let (id, exp) = app.auth.verify_until(token)?;
    let user = app.directory.user(id).await?.ok_or(ApiError::UnknownUser)?;
    Ok((user, exp))
}

/// The body length a request's Content-Length declares, when it is a
/// plain number.
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a JSON object body within the size limit. A missing Content-Type
/// is read as JSON; another explicit type is a 415; an empty body is `{}`.
pub async fn read_json<B: ReqBody>(
    app: &App,
    req: Request<B>,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let max = app.config.max_body_bytes;
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        let json = mime.eq_ignore_ascii_case("application/json")
            || (mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    if declared_length(&req).is_some_and(|n| n > max) {
        return Err(ApiError::PayloadTooLarge(max));
    }
    let limited = Limited::new(req.into_body(), max as usize);
    let bytes = match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Err(_) => return Err(ApiError::body_timeout()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::PayloadTooLarge(max))
        }
        Ok(Err(_)) => {
            return Err(ApiError::bad(
                "invalid_body",
                "The request body could not be read",
            ))
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    // No body at all is an empty object, as DRF reads it: a bare
    // `POST …/typing/` means `is_typing` missing, i.e. false.
    if bytes.is_empty() {
        return Ok(serde_json::Map::new());
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "invalid_json",
            "The request body must be a JSON object",
        ));
    }
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad(
            "invalid_json",
            "The request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad(
            "invalid_json",
            format!("Malformed JSON: {e}"),
        )),
    }
}

/// Reads a request body and drops it, within `read_json`'s limits, for a
/// request refused before its body was needed: hyper closes a connection
/// whose request body was left unread unless all of it had already
/// arrived, and without saying so, so a client's next request on it would
/// fail. A body over the limit or too slow is left: then the connection
/// closes, as it does after a 413.
pub async fn discard_body<B: ReqBody>(app: &App, req: Request<B>) {
    let mut left = app.config.max_body_bytes;
    if declared_length(&req).is_some_and(|n| n > left) {
        return;
    }
    let mut body = std::pin::pin!(req.into_body());
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            let len = frame.data_ref().map_or(0, |d| d.len() as u64);
            match left.checked_sub(len) {
                Some(l) => left = l,
                None => return,
            }
        }
    };
    let _ = tokio::time::timeout(BODY_READ_TIMEOUT, drain).await;
}

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
pub fn loggable_target(uri: &hyper::Uri) -> String {
    let path = uri.path();
    let mut out = if router::is_route(path) {
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

/// Closes the connection a request arrived on (an event stream whose
/// reader fell too far behind). Handlers find it in the request extensions.
#[derive(Clone)]
pub struct ConnectionKill(pub Arc<tokio::sync::Notify>);

/// One request: route, turn errors into responses, add CORS, log a line.
async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let seen = Seen::new(&req);
    let result = router::route(&app, req).await;
    Ok(seen.finish(&app, result))
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
        app: &App,
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

/// Accepts connections until shutdown, then drains. Long polls and event
/// streams finish themselves on the same signal; everything else gets
/// DRAIN_TIMEOUT.
pub async fn serve(app: Arc<App>, listener: TcpListener, mut shutdown: Shutdown) {
    let limit = Arc::new(Semaphore::new(app.config.max_connections as usize));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        // `max_buf_size` alone is no head limit: a read fills the buffer's
        // spare room, and heads of up to 128 KiB got through.
        .max_header_size(lean::MAX_HEAD)
        .max_buf_size(lean::MAX_HEAD);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => { backoff = Duration::from_millis(5); a }
                Err(e) => {
                    // EMFILE and friends: keep serving those already here.
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let first_deadline = Instant::now() + HEADER_READ_TIMEOUT;
        let _ = stream.set_nodelay(true);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let app = app.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    app.metrics.connection_opened();
                    serve_connection(&app, stream, first_deadline, &builder, watcher).await;
                    app.metrics.connection_closed();
                    drop(permit);
                });
            }
            Err(_) => {
                app.metrics.rejected_connections.fetch_add(1, Relaxed);
                let conn = builder.serve_connection(
                    TokioIo::new(stream),
                    // Through Seen like any answer: a browser must be
                    // able to read the 503 (CORS), and it is logged.
                    service_fn({
                        let app = app.clone();
                        move |req| {
                            let seen = Seen::new(&req);
                            let mut resp = seen.finish(
                                &app,
                                Err(ApiError::Unavailable {
                                    message: "Too many connections; try again shortly",
                                    retry_after_s: 1,
                                }),
                            );
                            resp.headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                            std::future::ready(Ok::<_, Infallible>(resp))
                        }
                    }),
                );
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
                });
            }
        }
    }
    drop(listener);
    // Streams on the lean path are not hyper's to watch; they end
    // themselves on the same signal and return their permits.
    let all_closed = async {
        graceful.shutdown().await;
        let _ = limit.acquire_many(app.config.max_connections).await;
    };
    tokio::select! {
        _ = all_closed => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("connections still open after the drain timeout; closing them");
        }
    }
}

/// One accepted connection, to the end: on the lean path while its
/// requests are ones [`lean`] serves (GET, HEAD, OPTIONS, and POSTs with
/// one Content-Length), hyper's otherwise. Its first request head must
/// arrive by `first_deadline` on either path: the wait for the first byte
/// counts towards it.
async fn serve_connection(
    app: &Arc<App>,
    mut stream: tokio::net::TcpStream,
    first_deadline: Instant,
    builder: &http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let mut first = [0u8; lean::PEEK_LEN];
    let peeked = tokio::time::timeout_at(first_deadline, stream.peek(&mut first)).await;
    let n = match peeked {
        Ok(Ok(n)) if n > 0 => n,
        // Silence, a reset or end of stream before a byte: nothing to answer.
        _ => return,
    };
    // The request loop is boxed and freed before a stream starts, and
    // hyper's connection is boxed: an open stream's task holds only what
    // the stream needs. (Boxed by plain functions: a future built in an
    // async fn and then moved into a box keeps its size in the caller's
    // state too.)
    if !lean::wants_lean(&first[..n]) {
        // hyper's header timer starts when hyper first reads: the first
        // head is read here, by the deadline, and handed over whole.
        let Ok(Some(head)) =
            tokio::time::timeout_at(first_deadline, read_first_head(&mut stream)).await
        else {
            // As hyper does when a head does not arrive: close, silently.
            return;
        };
        return boxed_hyper(app, Replay::new(stream, head), builder, watcher).await;
    }
    let (stream, req) = match boxed_lean(app, stream, first_deadline).await {
        lean::Served::Closed => return,
        lean::Served::Hyper(stream, read) => {
            return boxed_hyper(app, Replay::new(stream, read), builder, watcher).await
        }
        lean::Served::Stream(stream, req) => (stream, req),
    };
    lean::serve_stream(app, stream, req).await
}

fn boxed_lean(
    app: &Arc<App>,
    stream: tokio::net::TcpStream,
    first_deadline: Instant,
) -> std::pin::Pin<Box<impl std::future::Future<Output = lean::Served> + '_>> {
    Box::pin(lean::serve(
        app,
        stream,
        HEADER_READ_TIMEOUT,
        first_deadline,
    ))
}

/// What a connection sent up to the end of its first request head (or up
/// to what hyper refuses: a malformed head, one over the size limit); None
/// when it ended first. Whatever arrived with it is kept for hyper too.
async fn read_first_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    loop {
        buf.reserve(2048);
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) if head_read(&buf) => return Some(buf),
            Ok(_) => {}
        }
    }
}

/// Whether `buf` holds a whole request head, or enough for hyper to refuse
/// it.
fn head_read(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; lean::MAX_HEADERS];
    buf.len() >= lean::MAX_HEAD
        || !matches!(
            httparse::Request::new(&mut headers).parse(buf),
            Ok(httparse::Status::Partial)
        )
}

fn boxed_hyper<'a>(
    app: &'a Arc<App>,
    io: Replay,
    builder: &'a http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
) -> std::pin::Pin<Box<impl std::future::Future<Output = ()> + 'a>> {
    Box::pin(serve_hyper(app, io, builder, watcher))
}

/// hyper's HTTP/1.1 for the rest of a connection.
async fn serve_hyper(
    app: &Arc<App>,
    io: Replay,
    builder: &http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let kill = Arc::new(tokio::sync::Notify::new());
    let kill2 = kill.clone();
    let app2 = app.clone();
    let send_timeout = Duration::from_secs(app.config.send_timeout_s);
    let io = send_timeout::SendTimeout::new(TokioIo::new(io), send_timeout);
    let conn = builder.serve_connection(
        io,
        service_fn(move |mut req| {
            req.extensions_mut().insert(ConnectionKill(kill2.clone()));
            handle(app2.clone(), req)
        }),
    );
    tokio::select! {
        r = watcher.watch(conn) => if let Err(e) = r {
            tracing::debug!(error = %e, "connection ended with an error");
        },
        // Dropping the connection closes the socket, even one whose
        // reader stopped reading.
        _ = kill.notified() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{decode_query, loggable_method, loggable_target};

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

    #[test]
    fn the_query_fast_path_decodes_as_form_urlencoded_does() {
        for q in [
            "",
            "room_id=1&since=AcZ1BLVELBFrAQAAAADcBQAA&access_token=eyJ.a-b_c.d",
            "a=1&&b=2&",
            "flag&x=&=y&k==v=",
            "since=2026-01-15T10:00:00%2B02:00&room_id=3",
            "q=a+b&r=%E2%9C%93&bad=%ZZ&lossy=%FF",
        ] {
            let want: Vec<(String, String)> =
                form_urlencoded::parse(q.as_bytes()).into_owned().collect();
            assert_eq!(decode_query(q), want, "{q:?}");
        }
    }
}
