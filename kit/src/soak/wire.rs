//! The soak's raw HTTP/1.1 connection: one request at a time, the
//! answer's head with its headers (status, `Retry-After`, `Connection`),
//! a `Content-Length` or chunked body; and an event-stream decoder that
//! keeps each event's name, id and data.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::http::{parse_head, Head};
use crate::sse::{Dechunk, Line, Lines};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    /// Connects (bounded: 10 s); `recv_buffer` sets SO_RCVBUF (a small one
    /// makes a reader that stops reading back up into hark sooner).
    pub(crate) async fn connect(addr: SocketAddr, recv_buffer: Option<u32>) -> io::Result<Wire> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n)?;
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Wire {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    pub(crate) async fn send(&mut self, req: &[u8]) -> io::Result<()> {
        self.stream.write_all(req).await
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by hark",
            ));
        }
        Ok(())
    }

    /// The next answer's head (its bytes are consumed).
    pub(crate) async fn head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(head) = parse_head(&self.buf)? {
                self.buf.drain(..head.len);
                return Ok(head);
            }
            self.fill().await?;
        }
    }

    /// The body of the answer whose head was just read.
    pub(crate) async fn body(&mut self, head: &Head) -> io::Result<Vec<u8>> {
        if head.chunked() {
            let mut body = Vec::new();
            let mut dechunk = Dechunk::default();
            loop {
                let used = dechunk.feed(&self.buf, &mut |d| body.extend_from_slice(d))?;
                self.buf.drain(..used);
                if dechunk.ended() {
                    return Ok(body);
                }
                self.fill().await?;
            }
        }
        let n = head.content_length()?.unwrap_or(0);
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Sends a request and reads its whole answer.
    pub(crate) async fn exchange(&mut self, req: &[u8]) -> io::Result<(Head, Vec<u8>)> {
        self.send(req).await?;
        let head = self.head().await?;
        let body = self.body(&head).await?;
        Ok((head, body))
    }

    /// What was read past the head so far (a stream's first bytes).
    pub(crate) fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// One read from the socket (cancel-safe); 0 at its end.
    pub(crate) async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.stream.read(out).await
    }
}

/// Whether hark said it closes the connection after this answer.
pub(crate) fn closes(head: &Head) -> bool {
    head.header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
}

/// `Retry-After` in seconds, if sent.
pub(crate) fn retry_after(head: &Head) -> Option<Duration> {
    head.header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The `code` of an error answer's JSON body (or a short description).
pub(crate) fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
            format!("(body {text:?})")
        })
}

/// One dispatched event.
#[derive(Debug, Default)]
pub(crate) struct Event {
    pub(crate) name: String,
    pub(crate) id: Option<String>,
    pub(crate) data: String,
}

/// A chunked `text/event-stream` body, decoded as it arrives: events with
/// their name, id and data; comments (`: ping`) dropped; `retry:` kept.
#[derive(Default)]
pub(crate) struct Events {
    chunks: Dechunk,
    lines: Lines,
    cur: Event,
    any: bool,
    /// The last `retry:` (ms), the reconnection delay EventSource uses.
    pub(crate) retry: Option<u64>,
}

impl Events {
    pub(crate) fn ended(&self) -> bool {
        self.chunks.ended()
    }

    /// Feeds raw (chunked) bytes; complete events go to `out`.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> io::Result<()> {
        let Events {
            chunks,
            lines,
            cur,
            any,
            retry,
        } = self;
        chunks.feed(bytes, &mut |body| {
            lines.feed(body, &mut |l| match l {
                Line::Blank => {
                    if std::mem::take(any) {
                        out.push(std::mem::take(cur));
                    }
                }
                Line::Comment(_) => {}
                Line::Field(b"event", v) => {
                    cur.name = String::from_utf8_lossy(v).into_owned();
                    *any = true;
                }
                Line::Field(b"id", v) => {
                    cur.id = Some(String::from_utf8_lossy(v).into_owned());
                    *any = true;
                }
                Line::Field(b"data", v) => {
                    if !cur.data.is_empty() {
                        cur.data.push('\n');
                    }
                    cur.data.push_str(&String::from_utf8_lossy(v));
                    *any = true;
                }
                Line::Field(b"retry", v) => {
                    if let Some(ms) = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                        *retry = Some(ms);
                    }
                }
                Line::Field(..) => {}
            })
        })?;
        Ok(())
    }
}
