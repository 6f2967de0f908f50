//! A small Server-Sent Events client over a raw TCP connection, for tests.
//!
//! It writes the `GET` itself, parses the status line and headers, then
//! de-chunks the body (or reads `Content-Length` bytes for an error answer)
//! and parses it per the SSE spec: `field: value` lines, a blank line
//! dispatches, `:` lines are comments. It reads only when asked to, so a
//! test can hold the socket without reading (a slow reader), and it tells
//! a clean end of the body from a dropped connection.



use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

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
    Chunked,
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
    /// Chunked: bytes left in the current chunk's data, and whether its CRLF is due.
    chunk_left: usize,
    chunk_crlf: bool,
    body_done: bool,
    eof: bool,
    /// The event being assembled.
    cur: Event,
    cur_any: bool,
    /// A `\r` ended the last line: skip a `\n` right after it.
    skip_lf: bool,
    /// Total body bytes received.
    pub body_bytes: usize,
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
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stream.write_all(b).await.expect("send request");
        let mut sse = Sse {
            stream: Some(stream),
            status: 0,
            headers: Vec::new(),
            framing: Framing::Close,
            raw: Vec::new(),
            body: Vec::new(),
            chunk_left: 0,
            chunk_crlf: false,
            body_done: false,
            eof: false,
            cur: Event::default(),
            cur_any: false,
            skip_lf: false,
            body_bytes: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(end) = find(&sse.raw, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&sse.raw[..end]).to_string();
                sse.raw.drain(..end + 4);
                sse.parse_head(&head);
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

    fn parse_head(&mut self, head: &str) {
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        assert!(
            version.starts_with("HTTP/1."),
            "not an HTTP/1 status line: {status_line:?}"
        );
        self.status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                self.headers
                    .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        self.framing = if chunked {
            Framing::Chunked
        } else if let Some(n) = self.header("content-length").and_then(|v| v.parse().ok()) {
            if n == 0 {
                self.body_done = true;
            }
            Framing::Length(n)
        } else {
            Framing::Close
        };
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
        match self.framing {
            Framing::Close => {
                self.body_bytes += self.raw.len();
                self.body.append(&mut self.raw);
            }
            Framing::Length(ref mut left) => {
                let n = (*left).min(self.raw.len());
                self.body.extend(self.raw.drain(..n));
                self.body_bytes += n;
                *left -= n;
                if *left == 0 {
                    self.body_done = true;
                }
            }
            Framing::Chunked => loop {
                if self.body_done {
                    return;
                }
                if self.chunk_left > 0 {
                    let n = self.chunk_left.min(self.raw.len());
                    if n == 0 {
                        return;
                    }
                    self.body.extend(self.raw.drain(..n));
                    self.body_bytes += n;
                    self.chunk_left -= n;
                    continue;
                }
                if self.chunk_crlf {
                    if self.raw.len() < 2 {
                        return;
                    }
                    assert_eq!(&self.raw[..2], b"\r\n", "chunk data not followed by CRLF");
                    self.raw.drain(..2);
                    self.chunk_crlf = false;
                }
                let Some(eol) = find(&self.raw, b"\r\n") else {
                    return;
                };
                let line = String::from_utf8_lossy(&self.raw[..eol]).to_string();
                let size_text = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    // The last chunk; trailers (none expected) end with a blank line.
                    let Some(end) = find(&self.raw[eol..], b"\r\n\r\n") else {
                        return;
                    };
                    self.raw.drain(..eol + end + 4);
                    self.body_done = true;
                    return;
                }
                self.raw.drain(..eol + 2);
                self.chunk_left = size;
                self.chunk_crlf = true;
            },
        }
    }

    /// Parses complete lines out of `body`; returns the first dispatched block.
    fn parse_one(&mut self) -> Option<Event> {
        loop {
            if self.skip_lf && !self.body.is_empty() {
                if self.body[0] == b'\n' {
                    self.body.remove(0);
                }
                self.skip_lf = false;
            }
            let eol = self.body.iter().position(|&b| b == b'\n' || b == b'\r')?;
            let line = String::from_utf8(self.body[..eol].to_vec()).expect("UTF-8 event stream");
            if self.body[eol] == b'\r' {
                self.skip_lf = true;
            }
            self.body.drain(..eol + 1);
            if line.is_empty() {
                if self.cur_any {
                    self.cur_any = false;
                    return Some(std::mem::take(&mut self.cur));
                }
                continue;
            }
            self.cur_any = true;
            if let Some(c) = line.strip_prefix(':') {
                let c = c.strip_prefix(' ').unwrap_or(c);
                match &mut self.cur.comment {
                    Some(prev) => {
                        prev.push('\n');
                        prev.push_str(c);
                    }
                    None => self.cur.comment = Some(c.to_string()),
                }
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "event" => self.cur.event = Some(value.to_string()),
                "id" => self.cur.id = Some(value.to_string()),
                "data" => {
                    if self.cur.data_lines > 0 {
                        self.cur.data.push('\n');
                    }
                    self.cur.data.push_str(value);
                    self.cur.data_lines += 1;
                }
                "retry" => {
                    self.cur.retry = Some(
                        value
                            .parse()
                            .unwrap_or_else(|_| panic!("retry is not a number: {line:?}")),
                    )
                }
                other => panic!("unknown SSE field {other:?} in {line:?}"),
            }
        }
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

    /// The next block that is not a `: ping` comment (bounded).
    pub async fn next_non_ping(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Next::Event(e) if e.is_ping() => continue,
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
        if let Some(end) = find(&raw, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            assert!(!head.contains("connection: close"), "{path}: {head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{path}: no content-length in {head}"));
            if raw.len() >= end + 4 + len {
                assert_eq!(raw.len(), end + 4 + len, "{path}: more than one answer");
                return;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&buf[..n]),
            other => panic!("{path}: no whole answer ({other:?})"),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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
