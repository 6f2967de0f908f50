//! The lean connection for event streams.
//!
//! hyper keeps two 8 KiB buffers per HTTP/1 connection for the
//! connection's whole life (one to read requests into, one for response
//! heads). That is most of what an idle `/events` stream costs, and a
//! stream needs neither once its request head is read: from then on it
//! only writes. So a connection whose *first* request is `GET /events` is
//! served here instead: the head is read into a bounded buffer that is
//! freed once parsed, answered by the same handler as on hyper's path
//! ([`super::events::events`] through [`Seen`]), the body written chunk by
//! chunk, and the connection closed when the stream ends (the response
//! says `Connection: close`).
//!
//! Every other connection, including one that asks for /events after
//! other requests, is hyper's. Deciding costs one `peek` per new
//! connection and consumes nothing, so hyper sees its connections exactly
//! as they arrived.

use std::io::{ErrorKind, Write as _};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, Uri, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::timeout;

use super::error::ApiError;
use super::park::{frame_chunk, Park};
use super::{events, Body, ConnectionKill, Seen};
use crate::app::App;

/// Longest request head, and most header fields: hyper's limits on the
/// other path (`max_buf_size` in [`super::serve`], hyper's default count),
/// so a request is not refused here that hyper would take. The buffer
/// grows only as the head needs and is freed once it is parsed.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// What a client may send after its request head (a body, pipelined
/// requests: read and dropped, the connection closes after this answer)
/// before it is cut.
const MAX_TRAILING: usize = 64 * 1024;

/// Whether the first bytes of a connection are a request for `/events`
/// (`GET /events?…`, `GET /events HTTP/1.1`, or the same with `/events/`).
/// Too few bytes to tell is a no: hyper's path serves /events too.
pub fn wants_stream(first: &[u8]) -> bool {
    matches!(
        first.strip_prefix(b"GET /events"),
        Some([b' ' | b'?', ..]) | Some([b'/', b' ' | b'?', ..])
    )
}

/// Bytes [`wants_stream`] needs to see.
pub const PEEK_LEN: usize = 13;

/// Serves one connection whose first bytes passed [`wants_stream`].
pub async fn serve(app: Arc<App>, mut stream: TcpStream, header_timeout: Duration) {
    let head = tokio::time::timeout(header_timeout, read_head(&mut stream)).await;
    let mut req = match head {
        // Silence, as hyper does when a head does not arrive in time.
        Err(_) | Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::Bad(e))) => {
            let resp = prepare(e.into_response(), Version::HTTP_11);
            respond(Arc::new(stream), None, resp, &Notify::new(), header_timeout).await;
            return;
        }
        Ok(Ok(req)) => req,
    };
    let kill = Arc::new(Notify::new());
    req.extensions_mut().insert(ConnectionKill(kill.clone()));
    let version = req.version();
    let stream = Arc::new(stream);
    let park = (version == Version::HTTP_11).then(|| Park::new(stream.clone()));
    if let Some(park) = &park {
        req.extensions_mut().insert(park.clone());
    }
    let seen = Seen::new(&req);
    let result = Box::pin(events::events(&app, req)).await;
    let resp = seen.finish(&app, result);
    let stall = Duration::from_secs(app.config.send_timeout_s);
    respond(stream, park, prepare(resp, version), &kill, stall).await;
}

enum HeadError {
    /// The client went away (or the read failed) before a whole head.
    Closed,
    /// Answered with this error, then closed.
    Bad(ApiError),
}

async fn read_head(stream: &mut TcpStream) -> Result<Request<()>, HeadError> {
    let mut buf = vec![0u8; 1024];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if filled >= MAX_HEAD {
                return Err(HeadError::Bad(ApiError::HeadTooLarge));
            }
            buf.resize((filled * 2).min(MAX_HEAD), 0);
        }
        let n = match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(n) => n,
        };
        filled += n;
        if let Some(req) = parse_head(&buf[..filled])? {
            return Ok(req);
        }
    }
}

/// The request in `buf`, or None when its head is not complete yet.
fn parse_head(buf: &[u8]) -> Result<Option<Request<()>>, HeadError> {
    let bad = |what: &str| {
        HeadError::Bad(ApiError::bad(
            "invalid_request",
            format!("Malformed request: {what}"),
        ))
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::Bad(ApiError::HeadTooLarge)),
        Err(e) => return Err(bad(&e.to_string())),
    }
    if parsed.method != Some("GET") {
        return Err(bad("not a GET"));
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let uri: Uri = parsed
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("request target"))?;
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    let map = req.headers_mut();
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("header value"))?;
        map.append(name, value);
    }
    // A body (rare on a GET, and ignored as on hyper's path) is read and
    // dropped with anything else that follows the head, within
    // MAX_TRAILING; the connection does not outlive this one answer, so
    // nothing in it can pass for a second request.
    Ok(Some(req))
}

/// The status line and headers, ending with the framing this module uses.
fn head_bytes(resp: &Response<Body>, framing: Framing) -> Vec<u8> {
    let status = resp.status();
    let mut out = Vec::with_capacity(512);
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
        let date = Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
        let _ = write!(out, "date: {date}\r\n");
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
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
fn prepare(resp: Response<Body>, version: Version) -> Prepared {
    let framing = match hyper::body::Body::size_hint(resp.body()).exact() {
        Some(n) => Framing::Length(n),
        None if version == Version::HTTP_10 => Framing::UntilClose,
        None => Framing::Chunked,
    };
    Prepared {
        head: head_bytes(&resp, framing),
        body: resp.into_body(),
        framing,
    }
}

struct Prepared {
    head: Vec<u8>,
    body: Body,
    framing: Framing,
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
    fn recognises_only_event_stream_requests() {
        for yes in [
            &b"GET /events?access_token=x HTTP/1.1\r\n"[..],
            b"GET /events HTTP/1.1\r\n",
            b"GET /events/ HTTP/1.1\r\n",
            b"GET /events/?room_id=1 ",
        ] {
            assert!(wants_stream(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"GET /events"[..],
            b"GET /eventsx HTTP/1.1",
            b"GET /events/1 HTTP/1.1",
            b"HEAD /events HTTP/1.1",
            b"POST /events HTTP/1.1",
            b"GET / HTTP/1.1\r\n",
            b"GET http://h/events HTTP/1.1",
            b"",
        ] {
            assert!(!wants_stream(no), "{}", String::from_utf8_lossy(no));
        }
    }

    fn parsed(raw: &str) -> Result<Option<Request<()>>, HeadError> {
        parse_head(raw.as_bytes())
    }

    #[test]
    fn parses_a_head_and_refuses_malformed_ones() {
        let req = parsed("GET /events?room_id=3 HTTP/1.1\r\nHost: h\r\nLast-Event-ID: abc\r\n\r\n")
            .ok()
            .flatten()
            .expect("complete");
        assert_eq!(req.uri().path(), "/events");
        assert_eq!(req.uri().query(), Some("room_id=3"));
        assert_eq!(req.headers()["last-event-id"], "abc");
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(matches!(
            parsed("GET /events HTTP/1.1\r\nHost: h\r\n"),
            Ok(None)
        ));
        assert!(matches!(
            parsed("GET /events HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(Some(_))
        ));
        assert!(matches!(
            parsed("GET /events HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
            Ok(Some(_))
        ));
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
}
