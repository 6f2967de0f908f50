//! HTTP clients: hyper's for ordinary requests; [`Raw`] and [`Conn`] on
//! raw sockets where a client library would hide what is tested or cost
//! what is measured. One response-head parser ([`parse_head`], httparse)
//! serves every raw client here, [`crate::sse::Sse`] included.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub type Headers = hyper::HeaderMap;

/// A hyper client for plain HTTP.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request; panics on a transport error.
pub async fn request(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Headers, Bytes) {
    let ct: &[(&str, &str)] = if body.is_some() {
        &[("content-type", "application/json")]
    } else {
        &[]
    };
    try_request(method, url, token, body, ct)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// One request with explicit extra headers.
pub async fn try_request(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Headers, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

pub async fn get_json(url: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    let (s, _, b) = request(Method::GET, url, token, None).await;
    (s, json(&b))
}

pub async fn post_json(
    url: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let (s, _, b) = request(Method::POST, url, token, Some(body)).await;
    (s, json(&b))
}

// ---- response heads ------------------------------------------------------

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    /// Names lower-cased, values as sent, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Bytes the head took, its blank line included.
    pub len: usize,
}

impl Head {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, if sent (an error if it is not a number).
    pub fn content_length(&self) -> io::Result<Option<usize>> {
        self.header("content-length")
            .map(|v| v.trim().parse().map_err(|_| bad("bad content-length")))
            .transpose()
    }

    /// Whether the body is chunked.
    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
}

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

/// Parses a response head at the start of `buf`: `Ok(None)` while it is
/// incomplete.
pub fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => Ok(Some(Head {
            status: resp.code.unwrap_or(0),
            headers: resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            len,
        })),
        Err(e) => Err(bad(&format!(
            "bad response head ({e}): {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(300)])
        ))),
    }
}

/// Waits (bounded: 10 s) until the server has read everything sent on
/// `stream` so far: its socket has no unread bytes (the kernel tells, in
/// `/proc/net/tcp`). What a test waits for before it sends the next piece
/// of a request, so that the server surely had the piece alone.
pub async fn wait_peer_read(stream: &TcpStream) {
    let (local, peer) = (
        stream.local_addr().expect("local address"),
        stream.peer_addr().expect("peer address"),
    );
    let read = crate::within(Duration::from_secs(10), || async move {
        crate::procfs::tcp_queues(peer, local).is_some_and(|(_, unread)| unread == 0)
    })
    .await;
    assert!(
        read,
        "the server did not read what {local} sent within 10 s: {:?}",
        crate::procfs::tcp_queues(peer, local)
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

// ---- Raw: exact bytes ----------------------------------------------------

/// A raw HTTP/1.1 connection, for what a client library hides: several
/// requests on one connection, pipelining, exact bytes. Reads answers that
/// have a `Content-Length` body (or are a 204 or 304).
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Waits (bounded) until the server has read all that was sent.
    pub async fn wait_read(&self) {
        wait_peer_read(&self.stream).await;
    }

    /// This end's address (the server's peer).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    /// The next answer: its head (lower-cased) and body. Panics if the
    /// connection ends first or nothing comes within `wait`.
    pub async fn answer_within(&mut self, wait: Duration) -> (String, Vec<u8>) {
        self.next_answer(wait, true).await
    }

    /// The next answer to a `HEAD`: its head, which gives the length of a
    /// body that is not sent.
    pub async fn answer_to_head(&mut self) -> String {
        self.next_answer(Duration::from_secs(10), false).await.0
    }

    async fn next_answer(&mut self, wait: Duration, with_body: bool) -> (String, Vec<u8>) {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                let parsed = parse_head(&self.buf)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .expect("a whole head");
                // 204 and 304 have no body, and no length to say so; nor
                // need an answer to a HEAD have one.
                let bodiless = !with_body || [204, 304].contains(&parsed.status);
                let len: usize = parsed
                    .content_length()
                    .unwrap_or_else(|e| panic!("{e}: {head}"))
                    .or(bodiless.then_some(0))
                    .unwrap_or_else(|| panic!("no content-length: {head}"));
                let start = parsed.len;
                let len = if with_body { len } else { 0 };
                if self.buf.len() >= start + len {
                    let body = self.buf[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return (head, body);
                }
            }
            let n = self.read_some(wait).await;
            assert!(
                n > 0,
                "the connection ended before a whole answer: {}",
                self.shown()
            );
        }
    }

    /// What is buffered, cut short for a panic message.
    fn shown(&self) -> String {
        let text = String::from_utf8_lossy(&self.buf[..self.buf.len().min(600)]);
        format!("{text:?} ({} bytes)", self.buf.len())
    }

    pub async fn answer(&mut self) -> (String, Vec<u8>) {
        self.answer_within(Duration::from_secs(10)).await
    }

    /// Whether the server ends the connection within `wait`, sending
    /// nothing more first.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        self.read_some(wait).await == 0 && self.buf.is_empty()
    }

    async fn read_some(&mut self, wait: Duration) -> usize {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "nothing from the server within {wait:?}; have {}",
                self.shown()
            ),
            Ok(Err(_)) => 0,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
        }
    }
}

// ---- Conn: the benchmarks' low-overhead client ----------------------------

/// A response read by [`Conn`].
pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> crate::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            crate::err(format!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            ))
        })
    }
}

/// One keep-alive connection, one request at a time, a small buffer: so
/// that 10,000 of them cost a load generator little memory and CPU.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Writes a whole pre-formatted request.
    pub async fn send_raw(&mut self, req: &[u8]) -> io::Result<()> {
        self.stream.write_all(req).await
    }

    pub async fn send_get(&mut self, target: &str) -> io::Result<()> {
        let req = format!("GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
        self.stream.write_all(req.as_bytes()).await
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(8192);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by hark",
            ));
        }
        Ok(())
    }

    async fn head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(head) = parse_head(&self.buf)? {
                return Ok(head);
            }
            self.fill().await?;
        }
    }

    /// Reads one whole response (Content-Length or chunked body).
    pub async fn read_response(&mut self) -> io::Result<Resp> {
        let head = self.head().await?;
        let status = head.status;
        if head.chunked() {
            let mut body = Vec::new();
            let mut dechunk = crate::sse::Dechunk::default();
            let mut at = head.len;
            loop {
                let used = dechunk.feed(&self.buf[at..], &mut |d| body.extend_from_slice(d))?;
                at += used;
                if dechunk.ended() {
                    break;
                }
                self.fill().await?;
            }
            self.buf.drain(..at);
            return Ok(Resp { status, body });
        }
        let need = head.len + head.content_length()?.unwrap_or(0);
        while self.buf.len() < need {
            self.fill().await?;
        }
        let body = self.buf[head.len..need].to_vec();
        self.buf.drain(..need);
        Ok(Resp { status, body })
    }

    pub async fn get(&mut self, target: &str) -> io::Result<Resp> {
        self.send_get(target).await?;
        self.read_response().await
    }

    /// Reads a response head only (for a stream); returns its status.
    pub async fn read_head(&mut self) -> io::Result<u16> {
        let head = self.head().await?;
        self.buf.drain(..head.len);
        Ok(head.status)
    }

    /// Reads raw bytes until `needle` has been seen (for event streams).
    pub async fn read_until(&mut self, needle: &[u8]) -> io::Result<()> {
        loop {
            if find(&self.buf, needle).is_some() {
                self.buf.clear();
                return Ok(());
            }
            self.fill().await?;
        }
    }

    /// Reads and discards until the connection ends.
    pub async fn drain(mut self) {
        loop {
            self.buf.clear();
            if self.fill().await.is_err() {
                return;
            }
        }
    }
}
