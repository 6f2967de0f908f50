//! The connection loop of hark's own HTTP/1.1, on top of [`super::codec`]:
//! reading request heads (and bodies) into a buffer that grows only as a
//! request needs, answering them through the [`Service`] in order, keeping
//! the connection alive, writing an endless answer chunk by chunk, and the
//! limits of each step. It knows no route: the service says which requests
//! stream and which may park (DESIGN §7, §8).

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{timeout, timeout_at, Instant};

use super::codec::{
    frame_chunk, has_option, parse_head, prepare, wants_keep_alive, Framing, Head, Prepared,
    MAX_HEAD,
};
use super::{Body, ConnectionKill, Kind, Refusal, Service};
use crate::delivery::park::Park;

/// What a client may send after its request head on a stream (a body,
/// pipelined requests: read and dropped, the connection closes after the
/// stream) before it is cut. While a request is in flight, what it may
/// send ahead (pipelined requests, kept) is one whole request instead: the
/// longest head and body.
const MAX_TRAILING: usize = 64 * 1024;

/// Most bytes one read takes: a request head with a token is well under
/// it, and the buffer is freed between requests.
const READ_CHUNK: usize = 2048;

/// How [`serve`] left a connection.
pub(crate) enum Served {
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
/// `limits.header` of the loop's waiting for it.
pub(crate) async fn serve<S: Service>(
    svc: &S,
    stream: TcpStream,
    first_deadline: Instant,
) -> Served {
    let limits = svc.limits();
    let mut first_deadline = Some(first_deadline);
    let stall = limits.stall;
    let mut shutdown = limits.shutdown.clone();
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
            let max_body = limits.max_body;
            let (req, head_len, body_len) = match tokio::select! {
                r = timeout_at(
                    first_deadline.take().unwrap_or_else(|| Instant::now() + limits.header),
                    read_head(&mut conn.rd, &mut buf, max_body),
                ) => {
                    r.unwrap_or_else(|_| late(&buf, max_body))
                }
                // Between requests nothing is lost by closing; a request half
                // read is a request not yet made.
                _ = shutdown.wait() => return Served::Closed,
            } {
                Err(HeadError::Closed) => return Served::Closed,
                Err(HeadError::Refused(why)) => {
                    let resp = prepare(svc.refuse(why), Version::HTTP_11, false, false);
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
            let kind = svc.kind(&req);
            if kind == Kind::Stream {
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
                && kind == Kind::MayPark
                && limits.parking
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
            let seen = svc.begin(&req);
            (version, keep_alive, head_only, seen, svc.call(req))
        };
        let result = tokio::select! {
            r = answer => r,
            ahead = read_ahead(
                &mut conn.rd,
                &mut buf,
                conn.park.0.as_deref(),
                max_request(limits.max_body),
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
            svc.done(seen, StatusCode::OK, at);
            if !write_all_within(conn.sock(), &rest, stall).await || shutdown.is_fired() {
                return Served::Closed;
            }
            continue;
        }
        let resp = {
            let resp = svc.finish(seen, result);
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

/// An event stream: the same handler as on hyper's path, then the body
/// chunk by chunk until the stream ends; then the connection closes.
pub(crate) async fn serve_stream<S: Service>(svc: &S, stream: TcpStream, req: Box<Request<()>>) {
    let stall = svc.limits().stall;
    let mut req = *req;
    let kill = Arc::new(Notify::new());
    req.extensions_mut().insert(ConnectionKill(kill.clone()));
    let version = req.version();
    let stream = Arc::new(stream);
    let parks = version == Version::HTTP_11 && svc.limits().parking;
    let park = parks.then(|| Park::new(stream.clone()));
    if let Some(park) = &park {
        req.extensions_mut().insert(park.clone());
    }
    let seen = svc.begin(&req);
    let result = svc.call_stream(req).await;
    let resp = svc.finish(seen, result);
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

/// Why no request came.
enum HeadError {
    /// The client went away (or the read failed) before a whole request.
    Closed,
    /// Answered with this refusal, then closed.
    Refused(Refusal),
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
            match parse_head(buf, max_body).map_err(HeadError::Refused)? {
                Some(Head::Lean(_, head, body)) if buf.len() < head + body => whole = head + body,
                Some(head) => return Ok(head),
                None if buf.len() >= MAX_HEAD => {
                    return Err(HeadError::Refused(Refusal::HeadTooLarge))
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
        Ok(Some(Head::Lean(..))) => Err(HeadError::Refused(Refusal::BodyTimeout)),
        _ => Err(HeadError::Closed),
    }
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
