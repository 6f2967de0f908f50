//! Server-Sent Events on the client side.
//!
//! One incremental parser, in two layers, fed bytes as they arrive in
//! pieces of any size: [`Dechunk`] takes HTTP/1.1 chunked framing off (and
//! checks it), [`Lines`] splits `text/event-stream` into field, comment
//! and blank lines (per the SSE spec: LF, CRLF or CR end a line). On them:
//!
//! - [`Sse`], the tests' raw-socket client: it writes the `GET` itself and
//!   reads only when asked, so a test can hold the socket without reading
//!   (a slow reader), send the request in pieces, reuse a connection, see
//!   `retry:` and `: ping` comments, and tell a clean end of the body from
//!   a dropped connection.
//! - [`SseDecoder`], the benchmarks' low-overhead decoder for thousands of
//!   streams: no allocation per event, a callback per event or comment.
//! - [`events`]: where a client only reads events from a hyper body, the
//!   maintained `sse-stream` crate parses them.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

// ---- the parser ------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum ChunkState {
    /// Reading a chunk-size line.
    Size {
        size: usize,
        ext: bool,
        digits: usize,
    },
    /// Inside a chunk: bytes left.
    Data(usize),
    /// The CRLF after a chunk's data: bytes left.
    Crlf(u8),
    /// After the last (zero-size) chunk: trailer lines until a blank one;
    /// whether the current line has anything.
    Trailer(bool),
    /// The body is complete.
    End,
}

/// Incremental decoder of a chunked body.
#[derive(Debug)]
pub struct Dechunk {
    state: ChunkState,
}

impl Default for Dechunk {
    fn default() -> Self {
        Dechunk {
            state: ChunkState::Size {
                size: 0,
                ext: false,
                digits: 0,
            },
        }
    }
}

impl Dechunk {
    /// True once the last chunk and the trailers' blank line are in.
    pub fn ended(&self) -> bool {
        matches!(self.state, ChunkState::End)
    }

    /// Feeds raw bytes; hands each piece of body to `data`. Returns how
    /// many bytes it took: all of them, unless the body ended before.
    pub fn feed(&mut self, bytes: &[u8], data: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let mut at = 0;
        while at < bytes.len() {
            match self.state {
                ChunkState::Size { size, ext, digits } => {
                    let b = bytes[at];
                    at += 1;
                    self.state = match b {
                        b'\n' if digits == 0 => return Err(bad("empty chunk size")),
                        b'\n' if size == 0 => ChunkState::Trailer(false),
                        b'\n' => ChunkState::Data(size),
                        b'\r' => ChunkState::Size { size, ext, digits },
                        _ if ext => ChunkState::Size { size, ext, digits },
                        b';' => ChunkState::Size {
                            size,
                            ext: true,
                            digits,
                        },
                        _ => {
                            let v = (b as char)
                                .to_digit(16)
                                .ok_or_else(|| bad("bad chunk size"))?;
                            ChunkState::Size {
                                size: size
                                    .checked_mul(16)
                                    .ok_or_else(|| bad("chunk size overflows"))?
                                    + v as usize,
                                ext,
                                digits: digits + 1,
                            }
                        }
                    };
                }
                ChunkState::Data(left) => {
                    let k = left.min(bytes.len() - at);
                    data(&bytes[at..at + k]);
                    at += k;
                    self.state = if k == left {
                        ChunkState::Crlf(2)
                    } else {
                        ChunkState::Data(left - k)
                    };
                }
                ChunkState::Crlf(left) => {
                    let want = if left == 2 { b'\r' } else { b'\n' };
                    if bytes[at] != want {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    at += 1;
                    self.state = if left == 1 {
                        ChunkState::Size {
                            size: 0,
                            ext: false,
                            digits: 0,
                        }
                    } else {
                        ChunkState::Crlf(left - 1)
                    };
                }
                ChunkState::Trailer(any) => {
                    let b = bytes[at];
                    at += 1;
                    self.state = match b {
                        b'\n' if !any => ChunkState::End,
                        b'\n' => ChunkState::Trailer(false),
                        b'\r' => ChunkState::Trailer(any),
                        _ => ChunkState::Trailer(true),
                    };
                }
                ChunkState::End => return Ok(at),
            }
        }
        Ok(at)
    }
}

/// One line of an event stream.
#[derive(Debug)]
pub enum Line<'a> {
    /// `name: value` (one space after the colon dropped; a line without a
    /// colon is a name with an empty value).
    Field(&'a [u8], &'a [u8]),
    /// `:text` (the text as sent, after the colon).
    Comment(&'a [u8]),
    /// An empty line: it dispatches the event.
    Blank,
}

/// Splits an event stream into [`Line`]s, fed in pieces of any size.
#[derive(Default, Debug)]
pub struct Lines {
    partial: Vec<u8>,
    /// A CR ended the last line: a LF right after it belongs to it.
    skip_lf: bool,
}

impl Lines {
    pub fn feed(&mut self, mut bytes: &[u8], f: &mut dyn FnMut(Line<'_>)) {
        if self.skip_lf && !bytes.is_empty() {
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
            self.skip_lf = false;
        }
        while let Some(i) = memchr::memchr2(b'\n', b'\r', bytes) {
            if self.partial.is_empty() {
                line(&bytes[..i], f);
            } else {
                let mut l = std::mem::take(&mut self.partial);
                l.extend_from_slice(&bytes[..i]);
                line(&l, f);
                l.clear();
                self.partial = l;
            }
            let cr = bytes[i] == b'\r';
            bytes = &bytes[i + 1..];
            if cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        self.partial.extend_from_slice(bytes);
    }
}

fn line(l: &[u8], f: &mut dyn FnMut(Line<'_>)) {
    if l.is_empty() {
        f(Line::Blank);
    } else if l[0] == b':' {
        f(Line::Comment(&l[1..]));
    } else {
        match memchr::memchr(b':', l) {
            Some(i) => {
                let v = &l[i + 1..];
                f(Line::Field(&l[..i], v.strip_prefix(b" ").unwrap_or(v)))
            }
            None => f(Line::Field(l, b"")),
        }
    }
}

// ---- the benchmarks' decoder -------------------------------------------------

/// The `event:` of an SSE event, as far as the benchmarks care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SseKind {
    Ready,
    Message,
    Typing,
    Reset,
    Other,
}

/// One complete event (its terminating blank line has been received).
pub struct SseEvent<'a> {
    pub kind: SseKind,
    pub id: &'a str,
    pub data: &'a [u8],
}

/// What the decoder hands out: an event, or a comment line (`: ping`).
pub enum SseItem<'a> {
    Event(SseEvent<'a>),
    Comment(&'a [u8]),
}

/// Incremental decoder of a chunked `text/event-stream` body: feed it the
/// bytes as they arrive; it calls back once per complete event or comment.
#[derive(Default)]
pub struct SseDecoder {
    chunks: Dechunk,
    lines: Lines,
    kind: Option<SseKind>,
    id: String,
    data: Vec<u8>,
    fields: bool,
    /// Body bytes (de-chunked), events and comments seen so far.
    pub body_bytes: u64,
    pub events: u64,
    pub comments: u64,
}

impl SseDecoder {
    /// True once the body's last chunk has been received.
    pub fn ended(&self) -> bool {
        self.chunks.ended()
    }

    /// Feeds raw (chunked) body bytes.
    pub fn feed(&mut self, bytes: &[u8], f: &mut dyn FnMut(SseItem<'_>)) -> io::Result<()> {
        let SseDecoder {
            chunks,
            lines,
            kind,
            id,
            data,
            fields,
            body_bytes,
            events,
            comments,
        } = self;
        chunks.feed(bytes, &mut |body| {
            *body_bytes += body.len() as u64;
            lines.feed(body, &mut |l| match l {
                Line::Blank => {
                    if *fields {
                        *events += 1;
                        f(SseItem::Event(SseEvent {
                            kind: kind.unwrap_or(SseKind::Other),
                            id,
                            data,
                        }));
                    }
                    *kind = None;
                    id.clear();
                    data.clear();
                    *fields = false;
                }
                Line::Comment(c) => {
                    *comments += 1;
                    f(SseItem::Comment(c));
                }
                Line::Field(b"event", v) => {
                    *kind = Some(match v {
                        b"ready" => SseKind::Ready,
                        b"message" => SseKind::Message,
                        b"typing" => SseKind::Typing,
                        b"reset" => SseKind::Reset,
                        _ => SseKind::Other,
                    });
                    *fields = true;
                }
                Line::Field(b"data", v) => {
                    if *fields && !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(v);
                    *fields = true;
                }
                Line::Field(b"id", v) => {
                    id.clear();
                    id.push_str(&String::from_utf8_lossy(v));
                    *fields = true;
                }
                Line::Field(..) => {} // retry and unknown fields
            })
        })?;
        Ok(())
    }
}

// ---- events from a hyper body ------------------------------------------------

/// The events of an HTTP body, parsed by the `sse-stream` crate (which
/// skips comments and does not inherit ids): for a client that only reads
/// events.
pub fn events<B>(body: B) -> sse_stream::SseStream<B>
where
    B: hyper::body::Body,
{
    sse_stream::SseStream::new(body)
}

// ---- the tests' raw-socket client ------------------------------------------

/// One dispatched block of an event stream: the fields seen between two
/// blank lines. A `retry:`-only block and a `: ping` comment are reported
/// too (the SSE spec would not dispatch them as events).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// How many `data:` lines the block had.
    pub data_lines: usize,
    /// The text of the comment lines (after the `:` and one space), joined with `\n`.
    pub comment: Option<String>,
    /// The `retry:` field, if any.
    pub retry: Option<u64>,
}

impl Event {
    pub fn is_ping(&self) -> bool {
        self.comment.is_some() && self.event.is_none() && self.data_lines == 0
    }

    /// `data` as JSON (panics with the event when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }

    pub fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or("")
    }

    /// Adds a line to the block; a blank line after any dispatches it
    /// into `out`.
    fn add(&mut self, any: &mut bool, l: Line<'_>, out: &mut VecDeque<Event>) {
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("UTF-8 event stream");
        match l {
            Line::Blank => {
                if *any {
                    *any = false;
                    out.push_back(std::mem::take(self));
                }
            }
            Line::Comment(c) => {
                *any = true;
                let c = text(c.strip_prefix(b" ").unwrap_or(c));
                match &mut self.comment {
                    Some(prev) => {
                        prev.push('\n');
                        prev.push_str(&c);
                    }
                    None => self.comment = Some(c),
                }
            }
            Line::Field(field, value) => {
                *any = true;
                let value = text(value);
                match field {
                    b"event" => self.event = Some(value),
                    b"id" => self.id = Some(value),
                    b"data" => {
                        if self.data_lines > 0 {
                            self.data.push('\n');
                        }
                        self.data.push_str(&value);
                        self.data_lines += 1;
                    }
                    b"retry" => {
                        self.retry = Some(
                            value
                                .parse()
                                .unwrap_or_else(|_| panic!("retry is not a number: {value:?}")),
                        )
                    }
                    other => panic!(
                        "unknown SSE field {:?} ({value:?})",
                        String::from_utf8_lossy(other)
                    ),
                }
            }
        }
    }
}

/// What [`Sse::next_event`] found.
#[derive(Debug)]
pub enum Next {
    Event(Event),
    /// The body ended cleanly (the terminating chunk, or Content-Length reached).
    End,
    /// The connection closed (or was reset) without a clean end of the body.
    Eof,
    /// Nothing complete arrived within the timeout.
    Timeout,
}

enum Framing {
    Chunked(Dechunk),
    Length(usize),
    /// Until the connection closes.
    Close,
}

pub struct Sse {
    stream: Option<TcpStream>,
    pub status: u16,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    framing: Framing,
    /// Bytes read from the socket, not yet de-framed.
    raw: Vec<u8>,
    /// De-framed body bytes not yet parsed into lines.
    body: Vec<u8>,
    body_done: bool,
    eof: bool,
    lines: Lines,
    /// The block being assembled, and whether it has any line yet.
    cur: Event,
    cur_any: bool,
    /// Dispatched blocks not yet handed out.
    ready: VecDeque<Event>,
    /// Total body bytes received.
    pub body_bytes: usize,
    /// Hand out `presence` and `read` events (see [`Opts::signals`]).
    signals: bool,
}

/// Options for [`Sse::connect_with`].
#[derive(Default, Clone, Copy)]
pub struct Opts {
    /// SO_RCVBUF for the client socket (a small one makes a slow reader
    /// back up into the server sooner).
    pub recv_buffer: Option<u32>,
    /// Send `HEAD` instead of `GET` (the answer has no body).
    pub head: bool,
    /// A request first (`"<METHOD> <path>"`, with an empty body), on the
    /// same connection, its answer read and dropped: the stream then is a
    /// keep-alive connection's second request. After a `GET` or `POST` hark
    /// serves it on its lean path; after a method its own HTTP does not
    /// serve (say `PUT`) through hyper.
    pub first: Option<&'static str>,
    /// Send the request head in two writes, this many bytes first, with a
    /// pause between.
    pub split_at: Option<usize>,
    /// Ask as HTTP/1.0 (no chunked encoding: the body ends at close).
    pub http10: bool,
    /// Hand out `presence` and `read` events from [`Sse::next_non_ping`]
    /// and the readers built on it. Off by default: every stream of a test
    /// user says who else is online, and only the presence tests are about
    /// that.
    pub signals: bool,
}

impl Sse {
    /// `GET path` with `headers`; waits (bounded) for the status line and headers.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        Sse::connect_with(addr, path, headers, Opts::default()).await
    }

    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        opts: Opts,
    ) -> Sse {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .expect("socket");
        if let Some(n) = opts.recv_buffer {
            socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let mut stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        if let Some(first) = opts.first {
            read_one_answer(&mut stream, addr, first).await;
        }
        let method = if opts.head { "HEAD" } else { "GET" };
        let version = if opts.http10 { "1.0" } else { "1.1" };
        let mut req = format!(
            "{method} {path} HTTP/{version}\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let (a, b) = req
            .as_bytes()
            .split_at(opts.split_at.unwrap_or(0).min(req.len()));
        if !a.is_empty() {
            stream.write_all(a).await.expect("send request");
            // The point of a split request: the server has read the first
            // part alone, as from a slow client.
            crate::http::wait_peer_read(&stream).await;
        }
        stream.write_all(b).await.expect("send request");
        let mut sse = Sse {
            stream: Some(stream),
            status: 0,
            headers: Vec::new(),
            framing: Framing::Close,
            raw: Vec::new(),
            body: Vec::new(),
            body_done: false,
            eof: false,
            lines: Lines::default(),
            cur: Event::default(),
            cur_any: false,
            ready: VecDeque::new(),
            body_bytes: 0,
            signals: opts.signals,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let head = crate::http::parse_head(&sse.raw).unwrap_or_else(|e| panic!("{path}: {e}"));
            if let Some(head) = head {
                sse.raw.drain(..head.len);
                sse.status = head.status;
                sse.framing = if head.chunked() {
                    Framing::Chunked(Dechunk::default())
                } else if let Some(n) = head.content_length().unwrap_or(None) {
                    if n == 0 {
                        sse.body_done = true;
                    }
                    Framing::Length(n)
                } else {
                    Framing::Close
                };
                sse.headers = head.headers;
                if opts.head {
                    sse.body_done = true;
                }
                break;
            }
            match sse.read_some(deadline).await {
                Some(true) => {}
                Some(false) => panic!(
                    "{path}: connection closed before the response head: {:?}",
                    String::from_utf8_lossy(&sse.raw)
                ),
                None => panic!("{path}: no response head within 15 s"),
            }
        }
        sse
    }

    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads once into `raw`. Some(true): got bytes; Some(false): EOF or
    /// error; None: the deadline passed.
    async fn read_some(&mut self, deadline: Instant) -> Option<bool> {
        let Some(stream) = self.stream.as_mut() else {
            return Some(false);
        };
        let mut buf = [0u8; 16 * 1024];
        // `read` is cancel-safe: on timeout no bytes are lost.
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                self.stream = None;
                Some(false)
            }
            Ok(Ok(n)) => {
                self.raw.extend_from_slice(&buf[..n]);
                Some(true)
            }
        }
    }

    /// Moves what can be de-framed from `raw` into `body`.
    fn deframe(&mut self) {
        match &mut self.framing {
            Framing::Close => {
                self.body_bytes += self.raw.len();
                self.body.append(&mut self.raw);
            }
            Framing::Length(left) => {
                let n = (*left).min(self.raw.len());
                self.body.extend(self.raw.drain(..n));
                self.body_bytes += n;
                *left -= n;
                if *left == 0 {
                    self.body_done = true;
                }
            }
            Framing::Chunked(dechunk) => {
                let (body, count) = (&mut self.body, &mut self.body_bytes);
                let used = dechunk
                    .feed(&self.raw, &mut |d| {
                        *count += d.len();
                        body.extend_from_slice(d)
                    })
                    .unwrap_or_else(|e| panic!("{e}"));
                self.raw.drain(..used);
                if dechunk.ended() {
                    self.body_done = true;
                }
            }
        }
    }

    /// Parses the de-framed body into blocks; returns the first one.
    fn parse_one(&mut self) -> Option<Event> {
        if !self.body.is_empty() {
            let body = std::mem::take(&mut self.body);
            let (cur, any, ready) = (&mut self.cur, &mut self.cur_any, &mut self.ready);
            self.lines.feed(&body, &mut |l| cur.add(any, l, ready));
        }
        self.ready.pop_front()
    }

    /// The next block, the end of the stream, or Timeout after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            self.deframe();
            if let Some(ev) = self.parse_one() {
                return Next::Event(ev);
            }
            if self.body_done {
                // An incomplete block at the end is discarded, as the spec says.
                return Next::End;
            }
            if self.eof {
                return Next::Eof;
            }
            if self.read_some(deadline).await.is_none() {
                return Next::Timeout;
            }
        }
    }

    /// The next block; panics on the end of the stream or a timeout.
    pub async fn expect_event(&mut self, timeout: Duration) -> Event {
        match self.next_event(timeout).await {
            Next::Event(e) => e,
            other => panic!("expected an event within {timeout:?}, got {other:?}"),
        }
    }

    /// The next block that is not a `: ping` comment (nor, unless asked
    /// for, a `presence` or `read` event), bounded.
    pub async fn next_non_ping(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Next::Event(e) if e.is_ping() => continue,
                Next::Event(e) if !self.signals && matches!(e.kind(), "presence" | "read") => {
                    continue
                }
                other => return other,
            }
        }
    }

    /// The next non-ping event; panics on end or timeout.
    pub async fn expect(&mut self, timeout: Duration) -> Event {
        match self.next_non_ping(timeout).await {
            Next::Event(e) => e,
            other => panic!("expected an event within {timeout:?}, got {other:?}"),
        }
    }

    /// Asserts that no non-ping event arrives within `window`.
    pub async fn expect_quiet(&mut self, window: Duration) {
        match self.next_non_ping(window).await {
            Next::Timeout => {}
            other => panic!("expected nothing for {window:?}, got {other:?}"),
        }
    }

    /// Reads (and keeps) everything until the stream ends, bounded.
    /// Returns the blocks and whether the body ended cleanly.
    pub async fn drain(&mut self, timeout: Duration) -> (Vec<Event>, Next) {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Next::Event(e) => out.push(e),
                other => return (out, other),
            }
        }
    }

    /// The whole body as text (for error answers with a length), bounded.
    pub async fn body_text(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.deframe();
            if self.body_done || self.eof {
                return String::from_utf8_lossy(&std::mem::take(&mut self.body)).to_string();
            }
            if self.read_some(deadline).await.is_none() {
                panic!("the body did not end within {timeout:?}");
            }
        }
    }

    /// True once the server's end (clean or not) has been read.
    pub fn closed(&self) -> bool {
        self.eof || self.body_done
    }

    /// This end's address while the connection is open.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Closes the connection from this side.
    pub fn close(&mut self) {
        self.stream = None;
    }
}

/// `first` (method and path) on `stream`; reads its answer (which must
/// have a Content-Length and keep the connection open) and drops it.
async fn read_one_answer(stream: &mut TcpStream, addr: SocketAddr, path: &str) {
    let req = format!("{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .expect("send first request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let head = crate::http::parse_head(&raw).unwrap_or_else(|e| panic!("{path}: {e}"));
        if let Some(head) = head {
            let text = format!("{} {:?}", head.status, head.headers);
            assert!(
                !head
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close")),
                "{path}: {text}"
            );
            let len = head
                .content_length()
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("{path}: no content-length in {text}"));
            if raw.len() >= head.len + len {
                assert_eq!(raw.len(), head.len + len, "{path}: more than one answer");
                return;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&buf[..n]),
            other => panic!("{path}: no whole answer ({other:?})"),
        }
    }
}

/// The standard opening of a stream: `retry:`, then (after an optional
/// `reset`) `ready`. Returns (reset cursor if any, ready event).
pub async fn open(sse: &mut Sse) -> (Option<String>, Event) {
    assert_eq!(sse.status, 200, "stream status; headers {:?}", sse.headers);
    let t = Duration::from_secs(10);
    let first = sse.expect_event(t).await;
    assert!(
        first.retry.is_some() && first.event.is_none() && first.data_lines == 0,
        "the stream must open with `retry:`, got {first:?}"
    );
    let mut ev = sse.expect_event(t).await;
    let mut reset = None;
    if ev.kind() == "reset" {
        let c = ev.json()["cursor"]
            .as_str()
            .unwrap_or_else(|| panic!("reset without a cursor: {ev:?}"))
            .to_string();
        reset = Some(c);
        ev = sse.expect_event(t).await;
    }
    assert_eq!(ev.kind(), "ready", "expected `ready`, got {ev:?}");
    let id = ev
        .id
        .clone()
        .unwrap_or_else(|| panic!("ready without id: {ev:?}"));
    assert_eq!(
        ev.json(),
        serde_json::json!({ "cursor": id }),
        "ready data must be {{\"cursor\": id}}"
    );
    (reset, ev)
}
