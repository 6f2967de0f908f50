//! The per-user write limit (`HARK_WRITE_RATE`, `HARK_WRITE_BURST`) over
//! real HTTP against the real binary and a real PostgreSQL: typing,
//! sending and the read marker share one bucket per user; a write over it
//! is a 429 `rate_limited` with `Retry-After`, touches no table, is
//! counted, and leaves the connection serving the next request (on hark's
//! own HTTP and on hyper's); waiting `Retry-After` is enough; other users
//! and reads are not limited; a rate of 0 turns it off.

use std::time::{Duration, Instant};

use crate::kit::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

const ORIGIN: &str = "https://app.example";

/// A hark with `env`, and `alice`, `bob` in `room`.
async fn room_of_two(env: &[(&str, &str)]) -> (Hark, Fixture, i64, i64, i64) {
    let (hark, fx) = setup(env).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("general", &[alice, bob]).await;
    (hark, fx, alice, bob, room)
}

async fn post(h: &Hark, path: &str, user: i64, body: Value) -> (StatusCode, Headers, Value) {
    let (s, headers, b) = request(
        Method::POST,
        &h.url(path),
        Some(&token(user)),
        Some(&body.to_string()),
    )
    .await;
    (s, headers, json(&b))
}

async fn typing(h: &Hark, room: i64, user: i64) -> (StatusCode, Headers, Value) {
    let path = format!("/api/chat/rooms/{room}/typing/");
    post(h, &path, user, json!({"is_typing": true})).await
}

/// Checks a 429 of the write limit and returns its `Retry-After`.
fn assert_limited(what: &str, s: StatusCode, h: &Headers, body: &Value) -> u64 {
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{what}: {body}");
    assert_eq!(body["code"], "rate_limited", "{what}: {body}");
    let message = body["error"].as_str().unwrap_or("");
    assert!(message.contains("try again"), "{what}: {body}");
    assert_eq!(h["cache-control"], "no-store", "{what}");
    let retry: u64 = h
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{what}: Retry-After is not whole seconds: {e}"));
    assert!(retry >= 1, "{what}: Retry-After {retry}");
    retry
}

async fn count(fx: &Fixture, sql: &str, user: i64) -> i64 {
    fx.db.query_one(sql, &[&user]).await.unwrap().get(0)
}

#[tokio::test]
async fn writes_over_the_burst_are_refused_until_the_bucket_refills() {
    let (hark, fx, alice, bob, room) = room_of_two(&[
        ("HARK_WRITE_BURST", "3"),
        ("HARK_WRITE_RATE", "1"),
        ("HARK_CORS_ORIGINS", ORIGIN),
    ])
    .await;

    // Rapid typing: the burst of 3 passes, then 429. (At 1 write per
    // second, a stalled machine may let one more through per second it
    // took; on a normal run the fourth is refused.)
    let started = Instant::now();
    let mut passed = 0u64;
    let (s, h, body) = loop {
        let (s, h, body) = typing(&hark, room, alice).await;
        if s != StatusCode::OK {
            break (s, h, body);
        }
        passed += 1;
        assert!(passed < 20, "20 rapid writes and no 429");
    };
    let took = started.elapsed();
    let retry = assert_limited("typing over the burst", s, &h, &body);
    assert!(passed >= 3, "the burst of 3 was refused after {passed}");
    assert!(
        passed <= 3 + took.as_secs() + 1,
        "{passed} writes passed in {took:?} with a burst of 3 at 1/s"
    );
    // At 1 write per second the wait is at most a second.
    assert_eq!(retry, 1);

    // The bucket is shared: sending and the read marker are refused too,
    // and write nothing.
    let (s, h, body) = post(
        &hark,
        "/api/chat/messages/",
        alice,
        json!({"room_id": room, "content": "too fast"}),
    )
    .await;
    assert_limited("a message after typing", s, &h, &body);
    // (From a browser on another origin, which may read Retry-After.)
    let (s, h, body) = try_request(
        Method::POST,
        &hark.url(&format!("/api/chat/rooms/{room}/read/")),
        Some(&token(alice)),
        None,
        &[("origin", ORIGIN)],
    )
    .await
    .unwrap();
    assert_limited("the read marker after typing", s, &h, &json(&body));
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("Retry-After"), "{exposed}");
    let messages = "SELECT count(*) FROM chat_chatmessage WHERE sender_id = $1";
    let markers = "SELECT count(*) FROM hark_read_marker WHERE user_id = $1";
    assert_eq!(count(&fx, messages, alice).await, 0, "a refused send wrote");
    assert_eq!(count(&fx, markers, alice).await, 0, "a refused read wrote");
    assert_eq!(hark.metric("hark_rate_limited_total").await, 3.0);

    // Reads are not limited; nor is another user.
    let (s, _) = get_json(&hark.url("/api/chat/rooms/"), Some(&token(alice))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get_json(
        &poll_url(&hark, room, None, "&timeout=0"),
        Some(&token(alice)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = typing(&hark, room, bob).await;
    assert_eq!(s, StatusCode::OK, "bob has a bucket of his own: {body}");
    let (s, _, body) = post(
        &hark,
        "/api/chat/messages/",
        bob,
        json!({"room_id": room, "content": "from bob"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    // Waiting what Retry-After said is enough (the point: waiting it).
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (s, _, body) = post(
        &hark,
        "/api/chat/messages/",
        alice,
        json!({"room_id": room, "content": "patient"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "after Retry-After: {body}");
    assert_eq!(count(&fx, messages, alice).await, 1);
    assert_eq!(hark.metric("hark_rate_limited_total").await, 3.0);
}

/// The answer's status, from a lower-cased head.
fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// On hark's own HTTP (which read the body before the handler ran) and
/// on hyper's (where the refusal comes before the body is read, and the
/// body may still be on its way), a 429 keeps the connection: the next
/// request on it is answered.
#[tokio::test]
async fn a_refused_write_leaves_the_connection_serving() {
    let (hark, fx) = setup(&[("HARK_WRITE_BURST", "2"), ("HARK_WRITE_RATE", "1")]).await;
    let users = [
        fx.user("alice").await,
        fx.user("bob").await,
        fx.user("carol").await,
    ];
    let room = fx.room("general", &users).await;
    let body = json!({"room_id": room, "content": "x".repeat(2000)}).to_string();
    for (case, user) in ["lean", "hyper", "hyper, chunked body sent late"]
        .into_iter()
        .zip(users)
    {
        let head = format!(
            "POST /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\n",
            token(user)
        );
        // One request, in the pieces it is sent in.
        let parts: Vec<String> = if case.contains("chunked") {
            // The head and half the body, then (later) the rest: the
            // refusal comes before hyper has all of it.
            let (a, b) = body.split_at(body.len() / 2);
            vec![
                format!(
                    "{head}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n",
                    a.len()
                ),
                format!("{:x}\r\n{b}\r\n0\r\n\r\n", b.len()),
            ]
        } else {
            vec![format!(
                "{head}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )]
        };
        let mut raw = Raw::connect(hark.addr).await;
        if case == "hyper" {
            // A method hark's own HTTP does not serve hands the
            // connection to hyper for good (a chunked body does too).
            raw.send(b"PUT /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                .await;
            assert_eq!(status(&raw.answer().await.0), 405, "{case}");
        }
        let mut statuses = Vec::new();
        let mut limited = None;
        for _ in 0..10 {
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    // The server has read the part before alone.
                    raw.wait_read().await;
                }
                raw.send(part.as_bytes()).await;
            }
            let (head, body) = raw.answer().await;
            statuses.push(status(&head));
            if status(&head) == 429 {
                limited = Some((head, body));
                break;
            }
        }
        let (head, body) = limited.unwrap_or_else(|| panic!("{case}: no 429 in {statuses:?}"));
        let sent = &statuses[..statuses.len() - 1];
        assert!(sent.len() >= 2, "{case}: {statuses:?}");
        assert!(sent.iter().all(|&s| s == 201), "{case}: {statuses:?}");
        assert!(head.contains("\r\nretry-after: "), "{case}: {head}");
        assert!(!head.contains("connection: close"), "{case}: {head}");
        assert_eq!(json(&body)["code"], "rate_limited", "{case}");
        // The connection goes on: the next request on it is answered.
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status(&raw.answer().await.0), 200, "{case}: after the 429");
        let messages = "SELECT count(*) FROM chat_chatmessage WHERE sender_id = $1";
        assert_eq!(
            count(&fx, messages, user).await as usize,
            sent.len(),
            "{case}"
        );
    }
}

#[tokio::test]
async fn a_rate_of_zero_turns_the_limit_off() {
    let (hark, fx, alice, _bob, room) =
        room_of_two(&[("HARK_WRITE_RATE", "0"), ("HARK_WRITE_BURST", "1")]).await;
    for i in 0..100 {
        let (s, _, body) = if i % 2 == 0 {
            typing(&hark, room, alice).await
        } else {
            post(
                &hark,
                "/api/chat/messages/",
                alice,
                json!({"room_id": room, "content": format!("m{i}")}),
            )
            .await
        };
        assert!(s.is_success(), "write {i}: {s} {body}");
    }
    let sent: i64 = fx
        .db
        .query_one(
            "SELECT count(*) FROM chat_chatmessage WHERE sender_id = $1",
            &[&alice],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sent, 50);
    assert_eq!(hark.metric("hark_rate_limited_total").await, 0.0);
}

/// Out-of-range settings stop hark at start with clap's message, never a
/// limit that cannot work (a burst of 0 would refuse every write).
#[test]
fn out_of_range_settings_are_refused_at_start() {
    for (var, value) in [
        ("HARK_WRITE_BURST", "0"),
        ("HARK_WRITE_BURST", "1000001"),
        ("HARK_WRITE_RATE", "100001"),
        ("HARK_WRITE_RATE", "-1"),
        ("HARK_WRITE_RATE", "1.5"),
    ] {
        assert_refused_at_start(var, value);
    }
}
