//! The lean HTTP/1.1 connection: hark's own server for connections whose
//! first request is a `GET`, `HEAD`, `POST` or `OPTIONS`.
//!
//! hyper keeps two 8 KiB buffers per HTTP/1 connection for the
//! connection's whole life (one to read requests into, one for response
//! heads). The connections that stay open in numbers — event streams, and
//! long polls that wait and then come back on the same connection — carry
//! bodiless `GET`s, which need little of HTTP/1.1. A browser's connections
//! also carry its `POST`s (sending, typing) and CORS preflights, and any
//! of them may carry its next poll or stream. So a connection whose first
//! bytes are `GET /`, `HEAD /`, `POST /` or `OPTIONS /` is served here:
//!
//! - each request head (and body, when it has one Content-Length within
//!   `HARK_MAX_BODY_BYTES`) is read into a buffer that grows only as the
//!   request needs and is freed once parsed, then answered by the router,
//!   as on hyper's path (through [`Seen`]), and the connection is kept
//!   alive for the next one (pipelined requests are answered in order);
//! - `GET /events` is answered chunk by chunk and ends the connection (the
//!   response says `Connection: close`); its idle stream may park
//!   ([`super::park`]);
//! - a waiting long poll may park too: the listener then writes its answer,
//!   and the loop notices when the client sends its next request (the
//!   socket is split so that the park can hold the write half);
//! - the first request this module does not serve — another method, a
//!   chunked or oversized body, several or malformed Content-Lengths,
//!   `Expect`, a body on anything but a `POST` (or /events) — hands the
//!   connection to hyper with the bytes already read, that request's head
//!   first ([`Served::Hyper`]). hyper, which has the rules for those, keeps
//!   it to the end.
//!
//! Every other connection is hyper's from the start. Deciding costs one
//! `peek` per new connection and consumes nothing.
//!
//! Limits are hyper's on the other path: the head size and header count,
//! the header-read timeout (which also closes a connection idle between
//! requests; the first head's counts from the connection's accept, on both
//! paths), the body-read timeout, the send timeout, and an end of input
//! while a request is in flight closing the connection (hyper's default, no
//! half-close).

use std::io::{ErrorKind, Write as _};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{timeout, timeout_at, Instant};

use super::error::ApiError;
use super::{events, router, Body, ConnectionKill, Seen};
use crate::app::App;
use crate::delivery::park::Park;

/// Longest request head (request line, fields and the empty line), and
/// most header fields: the same on hyper's path (`max_header_size` in
/// [`super::serve`], hyper's default count), so a head gets the same
/// answer on either path.
pub(super) const MAX_HEAD: usize = 64 * 1024;
pub(super) const MAX_HEADERS: usize = 100;
/// What a client may send after its request head on a stream (a body,
/// pipelined requests: read and dropped, the connection closes after the
/// stream) before it is cut. While a request is in flight, what it may
/// send ahead (pipelined requests, kept) is one whole request instead: the
/// longest head and body.
const MAX_TRAILING: usize = 64 * 1024;
/// Most bytes one read takes: a request head with a token is well under
/// it, and the buffer is freed between requests.
const READ_CHUNK: usize = 2048;

/// Whether a connection that starts with these bytes is this module's:
/// a `GET`, `HEAD`, `POST` or `OPTIONS` of an origin-form target. Too few bytes to
/// tell is a no: hyper serves everything.
pub fn wants_lean(first: &[u8]) -> bool {
    [&b"GET /"[..], b"HEAD /", b"POST /", b"OPTIONS /"]
        .iter()
        .any(|m| first.starts_with(m))
}

/// Bytes [`wants_lean`] needs to see.
pub const PEEK_LEN: usize = "OPTIONS /".len();

/// How [`serve`] left a connection.
pub enum Served {
    /// Closed, or to be closed: nothing more to do.
    Closed,
    /// A request for hyper: the connection, and what was read from it and
    /// not answered (that request's head first).
    Hyper(TcpStream, Vec<u8>),
    /// `GET /events`, for [`serve_stream`]. Returned rather than served
    /// from within the request loop so that an open stream's task holds
    /// only the stream's state, not the loop's. (Boxed: an async fn keeps
    /// room for its arguments for its whole life.)
    Stream(TcpStream, Box<Request<()>>),
}

/// Serves a connection whose first bytes passed [`wants_lean`] until it
/// ends, asks for an event stream, or has a request for hyper. The first
/// request must arrive by `first_deadline`, each later one within
/// `header_timeout` of the loop's waiting for it.
pub async fn serve(
    app: &Arc<App>,
    stream: TcpStream,
    header_timeout: Duration,
    first_deadline: Instant,
) -> Served {
    let mut first_deadline = Some(first_deadline);
    let stall = Duration::from_secs(app.config.send_timeout_s);
    let mut shutdown = app.shutdown.clone();
    let mut buf = Vec::new();
    let (rd, wr) = stream.into_split();
    let mut conn = Conn {
        rd,
        wr: Arc::new(wr),
        park: ConnPark(None),
    };
    loop {
        // Each step below is a block: a local that was ever borrowed keeps
        // its room in the task until its scope ends, and the task is what
        // a waiting poll costs.
        let (version, mut keep_alive, head_only, seen, answer) = {
            let max_body = app.config.max_body_bytes;
            let (req, head_len, body_len) = match tokio::select! {
                r = timeout_at(
                    first_deadline.take().unwrap_or_else(|| Instant::now() + header_timeout),
                    read_head(&mut conn.rd, &mut buf, max_body),
                ) => {
                    r.unwrap_or_else(|_| late(&buf, max_body))
                }
                // Between requests nothing is lost by closing; a request half
                // read is a request not yet made.
                _ = shutdown.wait() => return Served::Closed,
            } {
                Err(HeadError::Closed) => return Served::Closed,
                Err(HeadError::Bad(e)) => {
                    let resp = prepare(e.into_response(), Version::HTTP_11, false, false);
                    if let Some(stream) = conn.into_stream() {
                        close_with(stream, resp, stall).await;
                    }
                    return Served::Closed;
                }
                Ok(Head::Hyper) => {
                    return conn
                        .into_stream()
                        .map_or(Served::Closed, |s| Served::Hyper(s, buf))
                }
                Ok(Head::Lean(req, head_len, body_len)) => (req, head_len, body_len),
            };
            if req.method() == Method::GET && is_events(req.uri()) {
                // What followed the head is dropped: the stream ends the
                // connection, so none of it can pass for a request.
                return conn
                    .into_stream()
                    .map_or(Served::Closed, |s| Served::Stream(s, Box::new(req)));
            }
            let len = head_len + body_len;
            let body = Bytes::copy_from_slice(&buf[head_len..len]);
            buf.drain(..len);
            if buf.is_empty() {
                // A connection between requests (or a waiting poll) holds no buffer.
                buf = Vec::new();
            }
            let version = req.version();
            let keep_alive = wants_keep_alive(version, req.headers());
            let mut req = req.map(|()| Full::new(body));
            // A parked answer is written as HTTP/1.1 keep-alive answers are.
            if keep_alive
                && version == Version::HTTP_11
                && buf.is_empty()
                && req.method() == Method::GET
                && req.uri().path().starts_with("/api/chat/messages/poll")
            {
                // Its answer may be written by the listener (a parked poll),
                // which a keep-alive answer of known length allows. Not with
                // a request already read behind it: the loop notices an
                // answer written for it only when more input arrives.
                let park = conn
                    .park
                    .0
                    .get_or_insert_with(|| Park::new(conn.wr.clone()));
                req.extensions_mut().insert(park.clone());
            }
            let head_only = req.method() == Method::HEAD;
            let seen = Seen::new(&req);
            (
                version,
                keep_alive,
                head_only,
                seen,
                router::route(app, req),
            )
        };
        let result = tokio::select! {
            r = answer => r,
            ahead = read_ahead(
                &mut conn.rd,
                &mut buf,
                conn.park.0.as_deref(),
                max_request(app.config.max_body_bytes),
            ) => match ahead {
                // The client went away (or sent too much) while its
                // request was in flight: a waiting poll is dropped with it.
                Ahead::Gone => return Served::Closed,
                // The listener answered it: what the client sent is its
                // next request. The poll is dropped unread.
                Ahead::Answered => Ok(Response::new(Body::default())),
            },
        };
        if let Some((at, rest)) = conn.park.0.as_ref().and_then(|p| p.finish_request()) {
            // The listener wrote the answer at `at`, all of it but `rest`.
            drop(result);
            seen.done(StatusCode::OK, at);
            if !write_all_within(conn.sock(), &rest, stall).await || shutdown.is_fired() {
                return Served::Closed;
            }
            continue;
        }
        let resp = {
            let resp = seen.finish(app, result);
            keep_alive &= !shutdown.is_fired() && !has_option(resp.headers(), "close");
            prepare(resp, version, keep_alive, head_only)
        };
        if !resp.keep_alive {
            if let Some(stream) = conn.into_stream() {
                close_with(stream, resp, stall).await;
            }
            return Served::Closed;
        }
        if !write_whole(conn.sock(), resp, stall).await {
            return Served::Closed;
        }
    }
}

/// A last answer, then the end of the connection. Boxed: the writing's
/// state is large and rarely needed, and would otherwise be part of every
/// request loop's task.
fn close_with(
    stream: TcpStream,
    resp: Prepared,
    stall: Duration,
) -> std::pin::Pin<Box<impl std::future::Future<Output = ()>>> {
    Box::pin(async move { respond(Arc::new(stream), None, resp, &Notify::new(), stall).await })
}

/// A connection while the request loop serves it: split, so that the
/// listener can write a parked poll's answer while the loop reads on.
struct Conn {
    rd: OwnedReadHalf,
    wr: Arc<OwnedWriteHalf>,
    /// Made for the first poll that may park.
    park: ConnPark,
}

/// Closes the connection's park when the loop ends, however it ends: the
/// write half must not outlive the connection inside it.
struct ConnPark(Option<Arc<Park>>);

impl Drop for ConnPark {
    fn drop(&mut self) {
        if let Some(park) = &self.0 {
            park.close();
        }
    }
}

impl Conn {
    fn sock(&self) -> &TcpStream {
        (*self.wr).as_ref()
    }

    /// The socket whole again, for hyper, a stream or a last answer.
    fn into_stream(self) -> Option<TcpStream> {
        let Conn { rd, wr, park } = self;
        drop(park);
        rd.reunite(Arc::try_unwrap(wr).ok()?).ok()
    }
}

/// `GET /events`: a stream, then the end. The router's test of the same
/// path, without its allocation; a router test checks they agree.
pub(crate) fn is_events(uri: &Uri) -> bool {
    matches!(uri.path(), "/events" | "/events/")
}

/// Whether the `Connection` header has `option` (`close`, `keep-alive`).
fn has_option(headers: &HeaderMap, option: &str) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|o| o.trim().eq_ignore_ascii_case(option)))
    })
}

/// HTTP/1.1 keeps a connection unless told to close; HTTP/1.0 closes it
/// unless asked to keep it (`ab -k`, for one, asks), as hyper does. A
/// `close` wins over a `keep-alive` beside it.
fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    !has_option(headers, "close")
        && (version == Version::HTTP_11 || has_option(headers, "keep-alive"))
}

/// An event stream: the same handler as on hyper's path, then the body
/// chunk by chunk until the stream ends; then the connection closes.
pub async fn serve_stream(app: &Arc<App>, stream: TcpStream, req: Box<Request<()>>) {
    let mut req = *req;
    let stall = Duration::from_secs(app.config.send_timeout_s);
    let kill = Arc::new(Notify::new());
    req.extensions_mut().insert(ConnectionKill(kill.clone()));
    let version = req.version();
    let stream = Arc::new(stream);
    let park = (version == Version::HTTP_11).then(|| Park::new(stream.clone()));
    if let Some(park) = &park {
        req.extensions_mut().insert(park.clone());
    }
    let seen = Seen::new(&req);
    let result = match router::conforms(&req) {
        Ok(()) => Box::pin(events::events(app, req)).await,
        Err(e) => Err(e),
    };
    let resp = seen.finish(app, result);
    respond(
        stream,
        park,
        prepare(resp, version, false, false),
        &kill,
        stall,
    )
    .await;
}

enum Ahead {
    /// End of input, an error, or more than a whole request not yet
    /// answered.
    Gone,
    /// The listener answered the request in flight (a parked poll).
    Answered,
}

/// The largest request served here: a head of [`MAX_HEAD`] and a body of
/// `max_body`.
fn max_request(max_body: u64) -> usize {
    MAX_HEAD.saturating_add(usize::try_from(max_body).unwrap_or(usize::MAX))
}

/// Reads (and keeps, for the next request) what the client sends while a
/// request is in flight, until the client is gone, or sends something
/// after the listener answered the request. Input while a poll is parked
/// takes the poll back: the loop would not notice an answer behind it.
async fn read_ahead(
    sock: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    park: Option<&Park>,
    max: usize,
) -> Ahead {
    loop {
        match read_some(sock, buf, max).await {
            Ok(0) | Err(_) => return Ahead::Gone,
            Ok(_) if buf.len() > max => return Ahead::Gone,
            Ok(_) if park.is_some_and(Park::input_arrived) => return Ahead::Answered,
            Ok(_) => {}
        }
    }
}

/// One read into `buf`, which grows by at least one byte and by about
/// `max - buf.len()` at most. Memory is taken only once the socket is
/// readable: a connection between requests, or a waiting poll, holds
/// none. The read goes through tokio's `AsyncRead`, which takes a short
/// read to mean the socket is drained: the next wait then goes straight
/// to the poller, without a read that would only say "would block" (one
/// system call per request fewer). Readiness is awaited in the socket's
/// own slot, as [`write_all_within`] does, so a waiting connection's task
/// holds no waiter node.
async fn read_some(
    sock: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| sock.as_ref().poll_read_ready(cx)).await?;
    buf.reserve(max.saturating_sub(buf.len()).clamp(1, READ_CHUNK));
    sock.read_buf(buf).await
}

enum HeadError {
    /// The client went away (or the read failed) before a whole request.
    Closed,
    /// Answered with this error, then closed.
    Bad(ApiError),
}

/// What a complete request head asks of this module.
// Only ever returned, once per request: boxing the request would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
enum Head {
    /// A request served here, and the lengths of its head and body in the
    /// buffer (the body may not be there yet).
    Lean(Request<()>, usize, usize),
    /// A request for hyper; the buffer holds it from its first byte.
    Hyper,
}

/// Reads until `buf` starts with a whole request: its head, and the body
/// of one served here. (One time limit covers both, so that no request
/// is held across a wait: it would add to every connection's task.)
async fn read_head(
    sock: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    max_body: u64,
) -> Result<Head, HeadError> {
    // The length of the head and body once the head is known.
    let mut whole = 0;
    loop {
        if !buf.is_empty() && buf.len() >= whole {
            match parse_head(buf, max_body)? {
                Some(Head::Lean(_, head, body)) if buf.len() < head + body => whole = head + body,
                Some(head) => return Ok(head),
                None if buf.len() >= MAX_HEAD => {
                    return Err(HeadError::Bad(ApiError::HeadTooLarge))
                }
                None => {}
            }
        }
        match read_some(sock, buf, whole.max(MAX_HEAD)).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

/// A request that did not arrive in time: silence when its head did not
/// (as hyper does), a 400 when its body did not.
fn late(buf: &[u8], max_body: u64) -> Result<Head, HeadError> {
    match parse_head(buf, max_body) {
        Ok(Some(Head::Lean(..))) => Err(HeadError::Bad(ApiError::body_timeout())),
        _ => Err(HeadError::Closed),
    }
}

/// The request at the start of `buf`, or None when its head is not
/// complete yet. A body is served here only when one Content-Length of at
/// most `max_body` frames it, on a `POST`.
fn parse_head(buf: &[u8], max_body: u64) -> Result<Option<Head>, HeadError> {
    let bad = |what: &str| {
        HeadError::Bad(ApiError::bad(
            "invalid_request",
            format!("Malformed request: {what}"),
        ))
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        // A read may bring more than the limit at once: the head's own
        // length decides, as hyper's `max_header_size` does.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(HeadError::Bad(ApiError::HeadTooLarge))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::Bad(ApiError::HeadTooLarge)),
        Err(e) => return Err(bad(&e.to_string())),
    };
    let method = match parsed.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("POST") => Method::POST,
        Some("OPTIONS") => Method::OPTIONS,
        _ => return Ok(Some(Head::Hyper)),
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let uri: Uri = parsed
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("request target"))?;
    let body_len = match body_length(parsed.headers) {
        // A GET's body is dropped on /events, with whatever follows, since
        // the stream ends the connection.
        _ if method == Method::GET && is_events(&uri) => 0,
        Some(0) => 0,
        Some(n) if method == Method::POST && n <= max_body => n as usize,
        // Anything else has rules hyper knows: a chunked body, a length
        // that is bad, repeated or too large (413), `Expect`, a body on a
        // GET (rare and ignored, but it must be read past).
        _ => return Ok(Some(Head::Hyper)),
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    let map = req.headers_mut();
    map.reserve(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("header value"))?;
        map.append(name, value);
    }
    Ok(Some(Head::Lean(req, len, body_len)))
}

/// The body's length when one plain Content-Length gives it (none: 0);
/// None for any other framing, or `Expect`, which waits for an interim
/// answer.
fn body_length(headers: &[httparse::Header<'_>]) -> Option<u64> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let digits = !h.value.is_empty()
                && h.value.len() <= 18
                && h.value.iter().all(u8::is_ascii_digit);
            if length.is_some() || !digits {
                return None;
            }
            length = std::str::from_utf8(h.value).ok()?.parse().ok();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("expect")
        {
            return None;
        }
    }
    Some(length.unwrap_or(0))
}

/// The status line and headers, ending with the framing this module uses.
fn head_bytes(
    resp: &Response<Body>,
    framing: Framing,
    version: Version,
    keep_alive: bool,
) -> Vec<u8> {
    let status = resp.status();
    // Room for a small body too: an answer of known length is sent in one
    // write, its body appended here.
    let body = match framing {
        Framing::Length(n) => n.min(64 * 1024) as usize,
        _ => 0,
    };
    let mut out = Vec::with_capacity(512 + body);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        if name == CONNECTION || name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !resp.headers().contains_key(DATE) {
        out.extend_from_slice(b"date: ");
        push_date(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        // RFC 9110 §8.6: never on a 1xx or a 204 (a preflight's answer).
        Framing::Length(_) if status.is_informational() || status == StatusCode::NO_CONTENT => {}
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A keep-alive answer on the wire, head and body, with the CORS headers
/// for `origin`: what this module would write for `resp` (a parked poll's
/// answer, written by the listener). None unless the body is whole
/// already.
pub(crate) fn answer_bytes(
    mut resp: Response<Body>,
    cors: &super::cors::Cors,
    origin: Option<&HeaderValue>,
) -> Option<Vec<u8>> {
    use futures::FutureExt as _;
    cors.apply(origin, resp.headers_mut());
    let Ok(body) = resp.body_mut().collect().now_or_never()?;
    let body = body.to_bytes();
    let mut out = head_bytes(
        &resp,
        Framing::Length(body.len() as u64),
        Version::HTTP_11,
        true,
    );
    out.extend_from_slice(&body);
    Some(out)
}

/// `data` as one HTTP/1.1 chunk.
pub(crate) fn frame_chunk(data: &[u8]) -> Bytes {
    let mut c = Vec::with_capacity(data.len() + 12);
    let _ = write!(c, "{:x}\r\n", data.len());
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    c.into()
}

/// The `Date` value for now (IMF-fixdate), formatted once a second per
/// thread, as hyper does: formatting it for every answer was over 2% of
/// the CPU of a poll answered from memory.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> = const {
            std::cell::RefCell::new((i64::MIN, String::new()))
        };
    }
    let now = Utc::now();
    LAST.with_borrow_mut(|(second, text)| {
        if *second != now.timestamp() {
            *second = now.timestamp();
            text.clear();
            let _ = std::fmt::Write::write_fmt(
                text,
                format_args!("{}", now.format("%a, %d %b %Y %H:%M:%S GMT")),
            );
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[derive(Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    /// HTTP/1.0 has no chunks: the body ends where the connection does.
    UntilClose,
}

/// The head bytes, body and framing of `resp`, taken apart before any
/// await: an async fn keeps its arguments for its whole life, and the
/// writing's state is part of every idle stream's memory.
/// `keep_alive` holds only for a body of known length, or none at all:
/// the answer to a `HEAD` (`head_only`) is the head a `GET` would get,
/// but for the framing of a body of unknown length, as hyper answers it.
fn prepare(resp: Response<Body>, version: Version, keep_alive: bool, head_only: bool) -> Prepared {
    let framing = match hyper::body::Body::size_hint(resp.body()).exact() {
        Some(n) => Framing::Length(n),
        // No framing header.
        None if version == Version::HTTP_10 || head_only => Framing::UntilClose,
        None => Framing::Chunked,
    };
    let keep_alive = keep_alive && (head_only || matches!(framing, Framing::Length(_)));
    let head = head_bytes(&resp, framing, version, keep_alive);
    if head_only {
        // An event stream's body is dropped here, and never opens.
        return Prepared {
            head,
            body: Body::default(),
            framing: Framing::Length(0),
            keep_alive,
        };
    }
    Prepared {
        head,
        body: resp.into_body(),
        framing,
        keep_alive,
    }
}

struct Prepared {
    head: Vec<u8>,
    body: Body,
    framing: Framing,
    keep_alive: bool,
}

/// Writes a response of known length in one write, the connection staying
/// open for the next request. False when the client is gone.
async fn write_whole(sock: &TcpStream, resp: Prepared, stall: Duration) -> bool {
    let Prepared { mut head, body, .. } = resp;
    let Ok(body) = body.collect().await;
    head.extend_from_slice(&body.to_bytes());
    write_all_within(sock, &head, stall).await
}

/// Writes the response and closes the connection. The socket is shared
/// with `park` while the stream is parked; once the response is over it
/// is this connection's alone again.
async fn respond(
    stream: Arc<TcpStream>,
    park: Option<Arc<Park>>,
    resp: Prepared,
    kill: &Notify,
    stall: Duration,
) {
    write_response(&stream, park.as_deref(), resp, kill, stall).await;
    if let Some(park) = &park {
        park.close();
    }
    drop(park);
    if let Ok(mut stream) = Arc::try_unwrap(stream) {
        let _ = timeout(stall, stream.shutdown()).await;
    }
}

/// Writes the response; the caller closes. Returns early when the client
/// goes away, sends more than MAX_TRAILING after its head, or the hub cuts
/// the stream (`kill`): a reader that stopped reading blocks the write, so
/// the write too gives way to `kill`. A write that makes no progress for
/// `stall` ends it too: a reader that stopped reading in a quiet room is
/// never cut for lag, and would otherwise hold its connection for good.
async fn write_response(
    sock: &TcpStream,
    park: Option<&Park>,
    resp: Prepared,
    kill: &Notify,
    stall: Duration,
) {
    let Prepared {
        head,
        mut body,
        framing,
        ..
    } = resp;
    // One waiter on `kill` for the whole response, not one per frame.
    let killed = kill.notified();
    tokio::pin!(killed);
    tokio::select! {
        ok = write_all_within(sock, &head, stall) => if !ok { return },
        _ = &mut killed => return,
    }
    drop(head);
    let mut trailing = 0usize;
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut killed => return,
            f = body.frame() => f,
            r = sock.readable() => {
                if r.is_err() || !discard_input(sock, &mut trailing) {
                    return;
                }
                continue;
            }
        };
        let is_end = frame.is_none();
        let mut out = match (frame, framing) {
            (None, Framing::Chunked) => Bytes::from_static(b"0\r\n\r\n"),
            (None, _) => Bytes::new(),
            (Some(frame), framing) => {
                let data = frame
                    .unwrap_or_else(|never| match never {})
                    .into_data()
                    .unwrap_or_default();
                match framing {
                    Framing::Chunked if !data.is_empty() => frame_chunk(&data),
                    _ => data,
                }
            }
        };
        // The stream is not parked while its body yields a frame or ends:
        // what a direct write left unwritten goes first. One write either
        // way, so that an idle connection's task is no larger for it.
        if let Some(rest) = park.map(Park::take_rest).filter(|r| !r.is_empty()) {
            out = [&rest[..], &out[..]].concat().into();
        }
        if !out.is_empty() {
            tokio::select! {
                ok = write_all_within(sock, &out, stall) => if !ok { return },
                _ = &mut killed => return,
            }
        }
        if is_end {
            break;
        }
    }
    // Closing with unread input makes the kernel send a reset, which can
    // destroy the answer before the client reads it: read what is there.
    discard_input(sock, &mut trailing);
}

/// Writes all of `buf`; false when the client is gone or no byte could be
/// written for `stall`.
async fn write_all_within(sock: &TcpStream, mut buf: &[u8], stall: Duration) -> bool {
    while !buf.is_empty() {
        // `poll_write_ready` keeps its waker in the socket's own slot,
        // where `writable()` would add a waiter node to this (long-lived)
        // task's state. Only this connection ever waits to write; a
        // catch-up writing to a parked stream never waits.
        let wrote = timeout(
            stall,
            std::future::poll_fn(|cx| loop {
                std::task::ready!(sock.poll_write_ready(cx))?;
                match sock.try_write(buf) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    r => return std::task::Poll::Ready(r),
                }
            }),
        )
        .await;
        match wrote {
            Ok(Ok(n)) if n > 0 => buf = &buf[n..],
            _ => return false,
        }
    }
    true
}

/// Reads and drops what the client sent after its head, as far as it can
/// without waiting. False when the client is gone (EOF, error) or has sent
/// more than MAX_TRAILING in all.
fn discard_input(sock: &TcpStream, total: &mut usize) -> bool {
    let mut scratch = [0u8; 512];
    loop {
        match sock.try_read(&mut scratch) {
            Ok(0) => return false,
            Ok(n) => {
                *total += n;
                if *total > MAX_TRAILING {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_connections_that_start_with_the_methods_it_serves() {
        for yes in [
            &b"GET /events?access_token=x HTTP/1.1\r\n"[..],
            b"GET /api/chat/messages/poll/?room_id=1 HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\n",
            b"GET /",
            b"POST /api/chat/messages/ HTTP/1.1\r\n",
            b"OPTIONS /api/chat/messages/poll/ HTTP/1.1\r\n",
            b"HEAD /events HTTP/1.1",
        ] {
            assert!(wants_lean(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"GET "[..],
            b"PUT /api/chat/messages/ HTTP/1.1",
            b"POST *",
            b"OPTIONS * HTTP/1.1",
            b"GET http://h/events HTTP/1.1",
            b"",
        ] {
            assert!(!wants_lean(no), "{}", String::from_utf8_lossy(no));
        }
    }

    const MAX_BODY: u64 = 100;

    fn parsed(raw: &str) -> Result<Option<Head>, HeadError> {
        parse_head(raw.as_bytes(), MAX_BODY)
    }

    /// The request, its head's length and its body's.
    fn lean_body(raw: &str) -> (Request<()>, usize, usize) {
        match parsed(raw) {
            Ok(Some(Head::Lean(req, len, body))) => (req, len, body),
            _ => panic!("not served here: {raw:?}"),
        }
    }

    fn lean(raw: &str) -> (Request<()>, usize) {
        let (req, len, body) = lean_body(raw);
        assert_eq!(body, 0, "{raw:?}");
        (req, len)
    }

    #[test]
    fn parses_a_head_and_refuses_malformed_ones() {
        let raw = "GET /events?room_id=3 HTTP/1.1\r\nHost: h\r\nLast-Event-ID: abc\r\n\r\n";
        let (req, len) = lean(raw);
        assert_eq!(len, raw.len());
        assert_eq!(req.uri().path(), "/events");
        assert_eq!(req.uri().query(), Some("room_id=3"));
        assert_eq!(req.headers()["last-event-id"], "abc");
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(matches!(
            parsed("GET /events HTTP/1.1\r\nHost: h\r\n"),
            Ok(None)
        ));
        // The head's length leaves a pipelined request in the buffer.
        let first = "GET /healthz HTTP/1.1\r\n\r\n";
        assert_eq!(
            lean(&format!("{first}GET /readyz HTTP/1.1\r\n\r\n")).1,
            first.len()
        );
        assert_eq!(lean("GET / HTTP/1.0\r\n\r\n").0.version(), Version::HTTP_10);
        for bad in [
            "GET /events HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET /events HTTP/9.9\r\n\r\n",
        ] {
            assert!(matches!(parsed(bad), Err(HeadError::Bad(_))), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(matches!(
            parsed(&format!("GET /events HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::Bad(ApiError::HeadTooLarge))
        ));
    }

    #[test]
    fn a_post_with_one_length_within_the_limit_is_served_here() {
        let head = "POST /api/chat/messages/ HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n";
        let (req, len, body) = lean_body(&format!("{head}{{}}"));
        assert_eq!((req.method(), len, body), (&Method::POST, head.len(), 2));
        // The head is enough: the body may still be on its way.
        assert_eq!(lean_body(head).2, 2);
        let at_limit = format!("POST / HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n");
        assert_eq!(lean_body(&at_limit).2, MAX_BODY as usize);
        lean("POST /api/chat/rooms/1/read/ HTTP/1.1\r\n\r\n");
        lean("POST /api/chat/rooms/1/read/ HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        let (req, _) = lean("OPTIONS /api/chat/messages/ HTTP/1.1\r\nOrigin: o\r\n\r\n");
        assert_eq!(req.method(), Method::OPTIONS);
        assert_eq!(
            lean("HEAD /healthz HTTP/1.1\r\n\r\n").0.method(),
            Method::HEAD
        );
    }

    #[test]
    fn other_bodies_and_methods_are_for_hyper() {
        let over = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        for raw in [
            over.as_str(),
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
            "HEAD /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            "PUT /api/chat/messages/ HTTP/1.1\r\n\r\n",
            "OPTIONS / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            "GET /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            "GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            assert!(matches!(parsed(raw), Ok(Some(Head::Hyper))), "{raw:?}");
        }
        // No body, or one on a stream (dropped: the stream ends the connection).
        lean("GET /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        lean("GET /events HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        lean("GET /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    }

    #[test]
    fn close_is_an_option_of_the_connection_header() {
        let of = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, HeaderValue::from_static(v));
            has_option(&h, "close")
        };
        assert!(of("close"));
        assert!(of("keep-alive, Close"));
        assert!(!of("keep-alive"));
        assert!(!of("closed"));
        assert!(!has_option(&HeaderMap::new(), "close"));
    }

    #[test]
    fn http_1_0_keeps_a_connection_only_when_asked() {
        let with = |v: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(CONNECTION, HeaderValue::from_static(v));
            }
            h
        };
        assert!(wants_keep_alive(Version::HTTP_11, &with(None)));
        assert!(wants_keep_alive(
            Version::HTTP_11,
            &with(Some("keep-alive"))
        ));
        assert!(!wants_keep_alive(Version::HTTP_11, &with(Some("close"))));
        assert!(!wants_keep_alive(Version::HTTP_10, &with(None)));
        assert!(wants_keep_alive(
            Version::HTTP_10,
            &with(Some("Keep-Alive"))
        ));
        assert!(!wants_keep_alive(Version::HTTP_10, &with(Some("close"))));
        assert!(!wants_keep_alive(
            Version::HTTP_10,
            &with(Some("keep-alive, close"))
        ));
    }
}
