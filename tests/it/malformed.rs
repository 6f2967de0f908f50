//! Malformed requests over real TCP: valid requests of every kind, mutated
//! at random (bytes flipped, inserted, cut; numbers made extreme; header
//! lines repeated; methods and escapes garbled), sent to a running hark.
//! Whatever arrives, hark answers below 500 or closes the connection, within
//! a bounded time, and keeps serving; nothing panics.
//!
//! The cases come from a fixed seed, so a run is repeatable; set
//! `HARK_FUZZ_SEED` and `HARK_FUZZ_CASES` to explore further.

use std::time::Duration;

use crate::kit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one case may take: hark's own limits (a 10 s head and body
/// time) are far inside it, and the client ends its input at once anyway.
const CASE_TIME: Duration = Duration::from_secs(30);

fn corpus(room: i64, token: &str, cursor: &str) -> Vec<Vec<u8>> {
    let cursor: String = form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    [
        format!(
            "GET /api/chat/messages/poll/?room_id={room}&since={cursor}&timeout=0&limit=5 HTTP/1.1\r\n\
             Host: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        ),
        format!(
            "GET /api/chat/messages/poll/?room_id={room}&since=2026-01-15T10%3A00%3A00.123456Z&timeout=1&access_token={token} HTTP/1.1\r\n\
             Host: x\r\n\r\n"
        ),
        format!("GET /api/chat/rooms/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
        format!("GET /api/chat/rooms/{room}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
        format!("HEAD /api/chat/rooms/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
        post(
            "/api/chat/messages/",
            &format!(r#"{{"room_id": {room}, "content": "héllo ✓"}}"#),
        ),
        post(&format!("/api/chat/rooms/{room}/typing/"), r#"{"is_typing": true}"#),
        post(&format!("/api/chat/rooms/{room}/read/"), ""),
        format!(
            "GET /events?room_id={room}&last_event_id={cursor} HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        ),
        "OPTIONS /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:3000\r\n\
         Access-Control-Request-Method: POST\r\n\r\n"
            .to_string(),
        format!(
            "POST /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"roo\r\n0\r\n\r\n"
        ),
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

/// Values that stress a parser where a number or a token stands.
const EXTREMES: &[&str] = &[
    "0",
    "-1",
    "",
    "99999999999999999999999",
    "18446744073709551616",
    "1e9",
    "0x10",
    " 7",
    "%00",
    "%zz",
    "%ff%fe",
    "\u{0}",
    "é",
    "null",
    "[]",
    "{}",
    "\"",
];

fn mutate(rng: &mut fastrand::Rng, mut r: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.usize(1..=3) {
        let at = rng.usize(..=r.len());
        match rng.u8(..9) {
            // A byte flipped to anything.
            0 if !r.is_empty() => {
                let i = rng.usize(..r.len());
                r[i] = rng.u8(..);
            }
            // Bytes inserted: line ends, NULs, high bytes, spaces, colons.
            1 => {
                let pick = [
                    &b"\r\n"[..],
                    b"\n",
                    b"\r",
                    b"\0",
                    b"\xff\xfe",
                    b" ",
                    b":",
                    b"%",
                    b"\r\n\r\n",
                ];
                let ins = pick[rng.usize(..pick.len())];
                r.splice(at..at, ins.iter().copied());
            }
            // A stretch cut out.
            2 if !r.is_empty() => {
                let end = (at + rng.usize(1..40)).min(r.len());
                r.drain(at.min(end)..end);
            }
            // Cut short.
            3 => r.truncate(at),
            // A run of digits replaced by an extreme.
            4 => {
                let digits: Vec<usize> = (0..r.len()).filter(|&i| r[i].is_ascii_digit()).collect();
                if let Some(&i) = digits.get(rng.usize(..digits.len().max(1))) {
                    let end = (i..r.len())
                        .find(|&j| !r[j].is_ascii_digit())
                        .unwrap_or(r.len());
                    let x = EXTREMES[rng.usize(..EXTREMES.len())].as_bytes();
                    r.splice(i..end, x.iter().copied());
                }
            }
            // A header line repeated (Content-Length, Transfer-Encoding, …).
            5 => {
                let lines: Vec<usize> = r
                    .windows(2)
                    .enumerate()
                    .filter(|(_, w)| w == b"\r\n")
                    .map(|(i, _)| i + 2)
                    .collect();
                if lines.len() >= 2 {
                    let k = rng.usize(..lines.len() - 1);
                    let line = r[lines[k]..lines[k + 1]].to_vec();
                    r.splice(lines[k]..lines[k], line);
                }
            }
            // The method replaced.
            6 => {
                let methods = [
                    "GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "get", "CONNECT",
                    "TRACE", "G\0T", "",
                ];
                if let Some(sp) = r.iter().position(|&b| b == b' ') {
                    let m = methods[rng.usize(..methods.len())].as_bytes();
                    r.splice(0..sp, m.iter().copied());
                }
            }
            // A header of a framing or connection meaning added.
            7 => {
                let headers = [
                    "Content-Length: 5\r\n",
                    "Content-Length: -1\r\n",
                    "Content-Length: 1, 2\r\n",
                    "Transfer-Encoding: chunked\r\n",
                    "Transfer-Encoding: gzip, chunked\r\n",
                    "Expect: 100-continue\r\n",
                    "Connection: close\r\n",
                    "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n",
                    "Last-Event-ID: \u{ff}garbage\r\n",
                    "Authorization: Bearer a.b.c\r\n",
                    "Authorization: Basic Zm9vOmJhcg==\r\n",
                    "Content-Type: text/plain\r\n",
                    "Origin: null\r\n",
                    "X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
                ];
                if let Some(i) = r.windows(2).position(|w| w == b"\r\n") {
                    let h = headers[rng.usize(..headers.len())].as_bytes();
                    r.splice(i + 2..i + 2, h.iter().copied());
                }
            }
            // The HTTP version garbled.
            _ => {
                if let Some(i) = find(&r, b"HTTP/1.1") {
                    let v = [
                        "HTTP/1.0",
                        "HTTP/2.0",
                        "HTTP/1.",
                        "HTTP/9.9",
                        "http/1.1",
                        "HTTP/1.1 x",
                    ];
                    let v = v[rng.usize(..v.len())].as_bytes();
                    r.splice(i..i + 8, v.iter().copied());
                }
            }
        }
    }
    r
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The status codes of the answers in what hark wrote back.
fn statuses(out: &[u8]) -> Vec<u16> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = find(&out[at..], b"HTTP/1.") {
        let line = &out[at + i..];
        if let Some(code) = line
            .get(9..12)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse().ok())
        {
            found.push(code);
        }
        at += i + 7;
    }
    found
}

/// Sends one case and, behind it, a `GET /healthz` that asks to close, so
/// that a request hark reads whole is answered and the connection then
/// ends by itself. A case hark is still waiting on after a second of
/// silence (a body or head cut short) gets the end of the input. Returns
/// what came back, stopping at an event stream's head (a stream stays open
/// however its input ends).
async fn exchange(hark: &Hark, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(hark.addr).await.expect("connect");
    let mut input = request.to_vec();
    input.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // hark may answer and close before all of it is written.
    let _ = s.write_all(&input).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut ended = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Err(_) if !ended => {
                let _ = s.shutdown().await;
                ended = true;
            }
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
        if find(&out, b"text/event-stream").is_some() && find(&out, b"\r\n\r\n").is_some() {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_an_answer_below_500_or_a_close_and_hark_keeps_serving() {
    let seed: u64 = std::env::var("HARK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261203);
    let cases: usize = std::env::var("HARK_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    // No write limit: refusals would hide the write paths.
    let (hark, fx) = setup(&[("HARK_WRITE_RATE", "0")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("general", &[alice, bob]).await;
    fx.insert(room, bob, "so far").await;
    let t = token(alice);
    let (s, body) = get_json(&poll_url(&hark, room, None, "&limit=1"), Some(&t)).await;
    assert_eq!(s, hyper::StatusCode::OK, "{body}");
    let corpus = corpus(room, &t, body["cursor"].as_str().unwrap());

    let mut rng = fastrand::Rng::with_seed(seed);
    let requests: Vec<Vec<u8>> = (0..cases)
        .map(|i| {
            let base = corpus[i % corpus.len()].clone();
            // Every tenth round of the corpus goes as it is: the corpus
            // itself must pass.
            if (i / corpus.len()) % 10 == 0 {
                base
            } else {
                mutate(&mut rng, base)
            }
        })
        .collect();

    use futures::stream::{self, StreamExt};
    let results: Vec<(usize, Result<Vec<u8>, tokio::time::error::Elapsed>)> =
        stream::iter(requests.iter().enumerate())
            .map(|(i, r)| {
                let hark = &hark;
                async move { (i, tokio::time::timeout(CASE_TIME, exchange(hark, r)).await) }
            })
            .buffer_unordered(16)
            .collect()
            .await;

    let mut answered = 0;
    for (i, result) in results {
        let request = String::from_utf8_lossy(&requests[i]);
        let out = result.unwrap_or_else(|_| {
            panic!("seed {seed}, case {i}: no end within {CASE_TIME:?}: {request:?}")
        });
        let codes = statuses(&out);
        if !codes.is_empty() {
            answered += 1;
        }
        assert!(
            codes.iter().all(|&c| (100..500).contains(&c)),
            "seed {seed}, case {i}: answered {codes:?} to {request:?}:\n{}",
            String::from_utf8_lossy(&out)
        );
    }
    // Most cases are answered, not just dropped.
    assert!(answered * 2 > cases, "only {answered} of {cases} answered");

    let (s, _) = get_json(&hark.url("/healthz"), None).await;
    assert_eq!(s, hyper::StatusCode::OK);
    let (s, _) = get_json(&poll_url(&hark, room, None, "&limit=1"), Some(&t)).await;
    assert_eq!(s, hyper::StatusCode::OK);
    let logs = hark.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        !logs.contains(" ERROR "),
        "an internal error was logged:\n{logs}"
    );
}
