//! The foundation of API.md over real HTTP against the real binary and a
//! real PostgreSQL: typing, rooms, the read marker, sending, auth, request
//! bodies, routing, operations endpoints, CORS, error bodies and the request
//! log. (The long poll's waiting and `/events` have their own files.)

use std::time::{Duration, Instant};

use crate::kit::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------- helpers

/// A hark with three users: `alice` and `bob` share `room`; `carol` exists
/// but is in no room.
async fn chat(env: &[(&str, &str)]) -> Chat {
    Chat::start(env, "general", false).await
}

async fn get(h: &Hark, path: &str, user: i64) -> (StatusCode, Value) {
    get_json(&h.url(path), Some(&token(user))).await
}

async fn post(h: &Hark, path: &str, user: i64, body: Value) -> (StatusCode, Value) {
    post_json(&h.url(path), Some(&token(user)), &body.to_string()).await
}

async fn set_typing(h: &Hark, room: i64, user: i64, on: bool) {
    let (s, body) = post(
        h,
        &format!("/api/chat/rooms/{room}/typing/"),
        user,
        json!({ "is_typing": on }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

async fn send(h: &Hark, room: i64, user: i64, content: &str) -> Value {
    let (s, body) = post(
        h,
        "/api/chat/messages/",
        user,
        json!({ "room_id": room, "content": content }),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    body
}

/// `user`'s view of one room (through the detail endpoint).
async fn room_as(h: &Hark, room: i64, user: i64) -> Value {
    let (s, body) = get(h, &format!("/api/chat/rooms/{room}/"), user).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

/// `user`'s rooms list.
async fn rooms_as(h: &Hark, user: i64) -> Vec<Value> {
    let (s, body) = get(h, "/api/chat/rooms/", user).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body.as_array().expect("the rooms list is an array").clone()
}

fn ids(values: &[Value]) -> Vec<i64> {
    values.iter().map(|v| v["id"].as_i64().unwrap()).collect()
}

/// The ids of `typing_users` in order, after checking `typing_user` is its
/// first entry.
fn typists(room: &Value) -> Vec<i64> {
    let users = room["typing_users"].as_array().expect("typing_users");
    assert_eq!(
        room["typing_user"],
        users.first().cloned().unwrap_or(Value::Null),
        "typing_user is the most recent of typing_users: {room}"
    );
    ids(users)
}

/// Asserts an API.md error: the status, and a JSON body
/// `{"error": "<non-empty sentence>", "code": "<code>"}`.
fn assert_error(status: StatusCode, body: &[u8], want: StatusCode, code: &str) -> Value {
    let v = json(body);
    assert_eq!(status, want, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "no error sentence: {v}"
    );
    assert_eq!(v["code"], code, "{v}");
    v
}

/// Any client error: a 4xx with the JSON error shape.
fn assert_client_error(what: &str, status: StatusCode, body: &[u8]) {
    assert!(status.is_client_error(), "{what}: {status}");
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("{what}: not JSON: {}", String::from_utf8_lossy(body)));
    assert!(
        v["error"].is_string() && v["code"].is_string(),
        "{what}: {v}"
    );
}

/// RFC 3339 in UTC with microseconds and `Z`: `2026-01-15T10:00:00.123456Z`.
fn assert_ts(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(s).is_ok(),
        "not RFC 3339: {s}"
    );
    let b = s.as_bytes();
    assert!(
        s.len() == 27 && b[19] == b'.' && b[26] == b'Z' && b[20..26].iter().all(u8::is_ascii_digit),
        "not UTC with microseconds: {s}"
    );
}

fn assert_user(v: &Value, id: i64, username: &str) {
    assert_eq!(v["id"], id, "{v}");
    assert_eq!(v["username"], username, "{v}");
    assert!(v["first_name"].is_string(), "{v}");
    assert!(v["last_name"].is_string(), "{v}");
}

/// A JWT signed by hand, so tests can forge what a library would refuse.
fn jwt(alg: jsonwebtoken::Algorithm, header: Value, claims: Value, secret: &[u8]) -> String {
    let msg = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, alg).expect("sign");
    format!("{msg}.{sig}")
}

fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

/// One raw HTTP/1.1 exchange (for what the client library will not send);
/// returns the response as text.
async fn raw_http(h: &Hark, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(h.addr)
        .await
        .expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ----------------------------------------------------------------- typing

#[tokio::test]
async fn typing_true_answers_success() {
    let c = chat(&[]).await;
    let (s, body) = post(
        &c.hark,
        &format!("/api/chat/rooms/{}/typing/", c.room),
        c.alice,
        json!({"is_typing": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body,
        json!({"success": true, "message": "Typing status updated"})
    );
    assert_eq!(typists(&room_as(&c.hark, c.room, c.bob).await), [c.alice]);
}

#[tokio::test]
async fn typing_without_is_typing_means_false() {
    let c = chat(&[]).await;
    set_typing(&c.hark, c.room, c.alice, true).await;
    assert_eq!(typists(&room_as(&c.hark, c.room, c.bob).await), [c.alice]);
    let (s, body) = post(
        &c.hark,
        &format!("/api/chat/rooms/{}/typing/", c.room),
        c.alice,
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert!(typists(&room_as(&c.hark, c.room, c.bob).await).is_empty());
}

#[tokio::test]
async fn typing_with_a_non_boolean_is_400() {
    let c = chat(&[]).await;
    let url = c.hark.url(&format!("/api/chat/rooms/{}/typing/", c.room));
    for bad in [
        json!({"is_typing": "true"}),
        json!({"is_typing": 1}),
        json!({"is_typing": 0}),
        json!({"is_typing": null}),
        json!({"is_typing": []}),
        json!({"is_typing": {"on": true}}),
    ] {
        let (s, _, b) = request(
            Method::POST,
            &url,
            Some(&token(c.alice)),
            Some(&bad.to_string()),
        )
        .await;
        assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_is_typing");
    }
    // Nothing was recorded by the refused requests.
    assert!(typists(&room_as(&c.hark, c.room, c.bob).await).is_empty());
}

#[tokio::test]
async fn typing_in_an_unknown_room_is_404() {
    let c = chat(&[]).await;
    let url = c.hark.url("/api/chat/rooms/987654/typing/");
    let (s, _, b) = request(
        Method::POST,
        &url,
        Some(&token(c.alice)),
        Some(r#"{"is_typing":true}"#),
    )
    .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn typing_by_a_non_participant_is_403() {
    let c = chat(&[]).await;
    let url = c.hark.url(&format!("/api/chat/rooms/{}/typing/", c.room));
    let (s, _, b) = request(
        Method::POST,
        &url,
        Some(&token(c.carol)),
        Some(r#"{"is_typing":true}"#),
    )
    .await;
    let v = assert_error(s, &b, StatusCode::FORBIDDEN, "not_a_participant");
    assert_eq!(v["error"], "Not a participant");
    assert!(typists(&room_as(&c.hark, c.room, c.bob).await).is_empty());
}

#[tokio::test]
async fn the_typist_never_sees_themself() {
    let c = chat(&[]).await;
    set_typing(&c.hark, c.room, c.alice, true).await;

    let mine = room_as(&c.hark, c.room, c.alice).await;
    assert_eq!(mine["typing_user"], Value::Null, "{mine}");
    assert_eq!(mine["typing_users"], json!([]), "{mine}");
    let listed = rooms_as(&c.hark, c.alice).await;
    assert_eq!(listed[0]["typing_user"], Value::Null);
    assert_eq!(listed[0]["typing_users"], json!([]));

    let theirs = room_as(&c.hark, c.room, c.bob).await;
    assert_user(&theirs["typing_user"], c.alice, "alice");
    assert_eq!(typists(&theirs), [c.alice]);
    let listed = rooms_as(&c.hark, c.bob).await;
    assert_eq!(typists(&listed[0]), [c.alice]);
}

#[tokio::test]
async fn typing_users_lists_every_typist_most_recent_first() {
    let c = chat(&[]).await;
    let dave = c.fx.user("dave").await;
    c.fx.join(c.room, c.carol).await;
    c.fx.join(c.room, dave).await;

    set_typing(&c.hark, c.room, c.bob, true).await;
    set_typing(&c.hark, c.room, c.carol, true).await;
    set_typing(&c.hark, c.room, dave, true).await;
    assert_eq!(
        typists(&room_as(&c.hark, c.room, c.alice).await),
        [dave, c.carol, c.bob]
    );
    // Each typist sees the others, in the same order.
    assert_eq!(
        typists(&room_as(&c.hark, c.room, c.carol).await),
        [dave, c.bob]
    );

    // Typing again makes bob the most recent.
    set_typing(&c.hark, c.room, c.bob, true).await;
    let room = room_as(&c.hark, c.room, c.alice).await;
    assert_eq!(typists(&room), [c.bob, dave, c.carol]);
    assert_user(&room["typing_user"], c.bob, "bob");
}

#[tokio::test]
async fn typing_is_per_room() {
    let c = chat(&[]).await;
    let other = c.fx.room("other", &[c.alice, c.bob]).await;
    set_typing(&c.hark, c.room, c.alice, true).await;
    assert_eq!(typists(&room_as(&c.hark, c.room, c.bob).await), [c.alice]);
    assert!(typists(&room_as(&c.hark, other, c.bob).await).is_empty());
    let list = rooms_as(&c.hark, c.bob).await;
    for room in &list {
        let want: &[i64] = if room["id"] == c.room {
            &[c.alice]
        } else {
            &[]
        };
        assert_eq!(typists(room), want, "{room}");
    }
}

#[tokio::test]
async fn typing_false_clears_it() {
    let c = chat(&[]).await;
    set_typing(&c.hark, c.room, c.alice, true).await;
    assert_eq!(typists(&room_as(&c.hark, c.room, c.bob).await), [c.alice]);
    set_typing(&c.hark, c.room, c.alice, false).await;
    assert!(typists(&room_as(&c.hark, c.room, c.bob).await).is_empty());
    // A false when not typing is fine too.
    set_typing(&c.hark, c.room, c.alice, false).await;
}

#[tokio::test]
async fn typing_expires_after_the_window() {
    let c = chat(&[("HARK_TYPING_TTL_MS", "1000")]).await;
    set_typing(&c.hark, c.room, c.alice, true).await;
    assert_eq!(typists(&room_as(&c.hark, c.room, c.bob).await), [c.alice]);
    eventually("the typing state lapses", || async {
        typists(&room_as(&c.hark, c.room, c.bob).await).is_empty()
    })
    .await;
    // And the sweeper removes the row (the stop goes out once).
    eventually("the lapsed row is swept", || async {
        let n = c.fx.count("hark_typing").await;
        n == 0
    })
    .await;
}

#[tokio::test]
async fn a_repeated_true_extends_the_window() {
    let c = chat(&[("HARK_TYPING_TTL_MS", "2000")]).await;
    let expiry = || async {
        c.fx.db
            .query_one(
                "SELECT expires_at FROM hark_typing WHERE room_id = $1 AND user_id = $2",
                &[&c.room, &c.alice],
            )
            .await
            .expect("a typing row")
            .get::<_, chrono::DateTime<chrono::Utc>>(0)
    };
    let first_true = Instant::now();
    set_typing(&c.hark, c.room, c.alice, true).await;
    let first = expiry().await;
    // The point: time passes between two starts (the window is 2 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second_true = Instant::now();
    set_typing(&c.hark, c.room, c.alice, true).await;
    let second = expiry().await;
    assert!(
        second - first >= chrono::Duration::milliseconds(1000),
        "the expiry moved from {first} to {second}"
    );
    // Past the first window and inside the second, still typing. (Only
    // asserted when this machine kept to the schedule: no tight timing.)
    // The point again: time passes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let room = room_as(&c.hark, c.room, c.bob).await;
    if first_true.elapsed() > Duration::from_millis(2100)
        && second_true.elapsed() < Duration::from_millis(1900)
    {
        assert_eq!(typists(&room), [c.alice], "{room}");
    }
}

#[tokio::test]
async fn sending_a_message_clears_the_senders_typing() {
    let c = chat(&[]).await;
    set_typing(&c.hark, c.room, c.alice, true).await;
    set_typing(&c.hark, c.room, c.bob, true).await;
    let dave = c.fx.user("dave").await;
    c.fx.join(c.room, dave).await;
    assert_eq!(
        typists(&room_as(&c.hark, c.room, dave).await),
        [c.bob, c.alice]
    );
    send(&c.hark, c.room, c.alice, "done typing").await;
    // Only the sender's state is cleared.
    assert_eq!(typists(&room_as(&c.hark, c.room, dave).await), [c.bob]);
}

// ------------------------------------------------------------------ rooms

#[tokio::test]
async fn rooms_carry_every_field_of_the_contract() {
    let c = chat(&[]).await;
    let sent = send(&c.hark, c.room, c.bob, "hello alice").await;
    set_typing(&c.hark, c.room, c.bob, true).await;

    let list = rooms_as(&c.hark, c.alice).await;
    assert_eq!(list.len(), 1);
    let room = &list[0];
    for field in [
        "id",
        "type",
        "name",
        "participants",
        "last_message",
        "unread_count",
        "updated_at",
        "created_at",
        "typing_user",
        "typing_users",
    ] {
        assert!(room.get(field).is_some(), "Room has no {field}: {room}");
    }
    assert_eq!(room["id"], c.room);
    assert_eq!(room["type"], "group");
    assert_eq!(room["name"], "general");
    assert_eq!(room["unread_count"], 1);
    assert_ts(&room["created_at"]);
    assert_ts(&room["updated_at"]);

    let mut participants = room["participants"].as_array().unwrap().clone();
    participants.sort_by_key(|u| u["id"].as_i64());
    assert_eq!(
        participants,
        [
            json!({"id": c.alice, "username": "alice", "first_name": "Alice", "last_name": "Test"}),
            json!({"id": c.bob, "username": "bob", "first_name": "Bob", "last_name": "Test"}),
        ]
    );

    let last = &room["last_message"];
    assert_eq!(last["id"], sent["id"]);
    assert_eq!(last["room"], c.room);
    assert_eq!(last["content"], "hello alice");
    assert_eq!(last["created_at"], sent["created_at"]);
    assert_eq!(
        last["sender"],
        json!({"id": c.bob, "username": "bob", "first_name": "Bob", "last_name": "Test"})
    );
    assert_ts(&last["created_at"]);

    assert_eq!(
        room["typing_user"],
        json!({"id": c.bob, "username": "bob", "first_name": "Bob", "last_name": "Test"})
    );
    assert_eq!(room["typing_users"], json!([room["typing_user"]]));

    // The detail is the same object.
    assert_eq!(&room_as(&c.hark, c.room, c.alice).await, room);
}

#[tokio::test]
async fn a_room_without_messages_has_a_null_last_message() {
    let c = chat(&[]).await;
    let room = room_as(&c.hark, c.room, c.alice).await;
    assert_eq!(room["last_message"], Value::Null);
    assert_eq!(room["unread_count"], 0);
    assert_eq!(room["typing_user"], Value::Null);
    assert_eq!(room["typing_users"], json!([]));
}

#[tokio::test]
async fn rooms_are_listed_newest_updated_at_first() {
    let c = chat(&[]).await;
    let b = c.fx.room("b", &[c.alice]).await;
    let d = c.fx.room("d", &[c.alice, c.carol]).await;
    for (room, at) in [
        (c.room, "2026-01-01T00:00:00Z"),
        (b, "2026-03-01T00:00:00Z"),
        (d, "2026-02-01T00:00:00Z"),
    ] {
        c.fx.db
            .execute(
                "UPDATE chat_chatroom SET updated_at = $2::text::timestamptz WHERE id = $1",
                &[&room, &at],
            )
            .await
            .unwrap();
    }
    let list = rooms_as(&c.hark, c.alice).await;
    assert_eq!(ids(&list), [b, d, c.room]);
    assert_eq!(list[0]["updated_at"], "2026-03-01T00:00:00.000000Z");
    // Each requester sees only their own rooms.
    assert_eq!(ids(&rooms_as(&c.hark, c.bob).await), [c.room]);
    assert_eq!(ids(&rooms_as(&c.hark, c.carol).await), [d]);
    let loner = c.fx.user("loner").await;
    assert!(rooms_as(&c.hark, loner).await.is_empty());
}

#[tokio::test]
async fn sending_moves_the_room_to_the_top() {
    let c = chat(&[]).await;
    let newer = c.fx.room("newer", &[c.alice, c.bob]).await;
    c.fx.db
        .execute(
            "UPDATE chat_chatroom SET updated_at = now() - interval '1 hour' WHERE id = $1",
            &[&c.room],
        )
        .await
        .unwrap();
    assert_eq!(ids(&rooms_as(&c.hark, c.alice).await), [newer, c.room]);
    let before = room_as(&c.hark, c.room, c.alice).await["updated_at"].clone();

    let msg = send(&c.hark, c.room, c.bob, "bump").await;
    let list = rooms_as(&c.hark, c.alice).await;
    assert_eq!(ids(&list), [c.room, newer]);
    assert_ne!(list[0]["updated_at"], before);
    assert_eq!(list[0]["updated_at"], msg["created_at"]);
}

#[tokio::test]
async fn last_message_is_the_newest() {
    let c = chat(&[]).await;
    c.fx.insert(c.room, c.alice, "first").await;
    let m2 = c.fx.insert(c.room, c.bob, "second").await;
    let room = room_as(&c.hark, c.room, c.alice).await;
    assert_eq!(room["last_message"]["id"], m2);
    assert_eq!(room["last_message"]["content"], "second");
    assert_eq!(room["last_message"]["sender"]["id"], c.bob);
    let m3 = send(&c.hark, c.room, c.alice, "third").await;
    assert_eq!(room_as(&c.hark, c.room, c.bob).await["last_message"], m3);
}

#[tokio::test]
async fn unread_count_counts_others_messages_and_all_without_a_marker() {
    let c = chat(&[]).await;
    for i in 0..3 {
        c.fx.insert(c.room, c.bob, &format!("from bob {i}")).await;
    }
    c.fx.insert(c.room, c.alice, "from alice").await;
    assert_eq!(room_as(&c.hark, c.room, c.alice).await["unread_count"], 3);
    assert_eq!(room_as(&c.hark, c.room, c.bob).await["unread_count"], 1);
}

#[tokio::test]
async fn own_messages_never_count_as_unread() {
    let c = chat(&[]).await;
    send(&c.hark, c.room, c.alice, "one").await;
    c.fx.insert(c.room, c.alice, "two").await;
    assert_eq!(room_as(&c.hark, c.room, c.alice).await["unread_count"], 0);
    assert_eq!(room_as(&c.hark, c.room, c.bob).await["unread_count"], 2);
}

#[tokio::test]
async fn marking_read_zeroes_unread_until_the_next_message() {
    let c = chat(&[]).await;
    c.fx.insert(c.room, c.bob, "a").await;
    c.fx.insert(c.room, c.bob, "b").await;
    assert_eq!(rooms_as(&c.hark, c.alice).await[0]["unread_count"], 2);

    let (s, body) = post(
        &c.hark,
        &format!("/api/chat/rooms/{}/read/", c.room),
        c.alice,
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, json!({"success": true}));
    assert_eq!(rooms_as(&c.hark, c.alice).await[0]["unread_count"], 0);
    // Bob's marker is his own.
    c.fx.insert(c.room, c.alice, "c").await;
    assert_eq!(room_as(&c.hark, c.room, c.bob).await["unread_count"], 1);

    send(&c.hark, c.room, c.bob, "after the marker").await;
    assert_eq!(room_as(&c.hark, c.room, c.alice).await["unread_count"], 1);
}

#[tokio::test]
async fn mark_read_needs_no_body() {
    let c = chat(&[]).await;
    c.fx.insert(c.room, c.bob, "a").await;
    let url = c.hark.url(&format!("/api/chat/rooms/{}/read", c.room));
    let (s, _, b) = try_request(Method::POST, &url, Some(&token(c.alice)), None, &[])
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b), json!({"success": true}));
    assert_eq!(room_as(&c.hark, c.room, c.alice).await["unread_count"], 0);
}

#[tokio::test]
async fn room_detail_and_read_are_404_for_unknown_rooms_and_403_for_outsiders() {
    let c = chat(&[]).await;
    for path in ["/api/chat/rooms/424242/", "/api/chat/rooms/0/"] {
        let (s, _, b) = request(Method::GET, &c.hark.url(path), Some(&token(c.alice)), None).await;
        assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    }
    let (s, _, b) = request(
        Method::POST,
        &c.hark.url("/api/chat/rooms/424242/read/"),
        Some(&token(c.alice)),
        Some("{}"),
    )
    .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");

    let detail = c.hark.url(&format!("/api/chat/rooms/{}/", c.room));
    let (s, _, b) = request(Method::GET, &detail, Some(&token(c.carol)), None).await;
    let v = assert_error(s, &b, StatusCode::FORBIDDEN, "not_a_participant");
    assert_eq!(v["error"], "Not a participant");
    let read = c.hark.url(&format!("/api/chat/rooms/{}/read/", c.room));
    let (s, _, b) = request(Method::POST, &read, Some(&token(c.carol)), Some("{}")).await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "not_a_participant");
    let n = c.fx.count("hark_read_marker").await;
    assert_eq!(n, 0, "an outsider's read left a marker");
}

#[tokio::test]
async fn a_new_participant_is_admitted_at_once_and_a_leaver_refused_soon() {
    let c = chat(&[]).await;
    let detail = c.hark.url(&format!("/api/chat/rooms/{}/", c.room));
    let (s, _) = get_json(&detail, Some(&token(c.carol))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // At once, without waiting for the join's notification: a client that
    // Django just added to a room uses it next.
    for n in 0..5 {
        let newcomer = c.fx.user(&format!("newcomer{n}")).await;
        assert_eq!(
            get_json(&detail, Some(&token(newcomer))).await.0,
            StatusCode::FORBIDDEN
        );
        c.fx.join(c.room, newcomer).await;
        let (s, body) = get_json(&detail, Some(&token(newcomer))).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    c.fx.join(c.room, c.carol).await;
    assert_eq!(
        get_json(&detail, Some(&token(c.carol))).await.0,
        StatusCode::OK
    );
    c.fx.db
        .execute(
            "DELETE FROM chat_chatroom_participants WHERE chatroom_id = $1 AND user_id = $2",
            &[&c.room, &c.carol],
        )
        .await
        .unwrap();
    eventually("carol's leaving is seen", || async {
        get_json(&detail, Some(&token(c.carol))).await.0 == StatusCode::FORBIDDEN
    })
    .await;
}

#[tokio::test]
async fn a_room_created_after_a_404_is_found() {
    let c = chat(&[]).await;
    let later = 5_000_i64;
    let detail = c.hark.url(&format!("/api/chat/rooms/{later}/"));
    for _ in 0..3 {
        assert_eq!(
            get_json(&detail, Some(&token(c.alice))).await.0,
            StatusCode::NOT_FOUND
        );
    }
    c.fx.db
        .execute(
            "INSERT INTO chat_chatroom (id, type, name) VALUES ($1, 'direct', 'late')",
            &[&later],
        )
        .await
        .unwrap();
    c.fx.join(later, c.alice).await;
    // At once: a client told by Django that the room exists uses it next.
    let (s, room) = get_json(&detail, Some(&token(c.alice))).await;
    assert_eq!(s, StatusCode::OK, "{room}");
}

#[tokio::test]
async fn a_renamed_user_is_seen_in_new_messages() {
    let c = chat(&[]).await;
    assert_eq!(
        send(&c.hark, c.room, c.alice, "before").await["sender"]["first_name"],
        "Alice"
    );
    c.fx.db
        .execute(
            "UPDATE users_user SET first_name = 'Alicia' WHERE id = $1",
            &[&c.alice],
        )
        .await
        .unwrap();
    eventually("the new name is used", || async {
        send(&c.hark, c.room, c.alice, "after").await["sender"]["first_name"] == "Alicia"
    })
    .await;
    let room = room_as(&c.hark, c.room, c.bob).await;
    assert!(room["participants"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["first_name"] == "Alicia"));
}

// --------------------------------------------------------------- messages

#[tokio::test]
async fn sending_answers_201_with_the_message() {
    let c = chat(&[]).await;
    let content = "  hi bob, ça va? 👋  ";
    let (s, msg) = post(
        &c.hark,
        "/api/chat/messages/",
        c.alice,
        json!({"room_id": c.room, "content": content}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{msg}");
    assert!(msg["id"].as_i64().is_some_and(|id| id > 0), "{msg}");
    assert_eq!(msg["room"], c.room);
    assert_eq!(msg["content"], content, "stored as sent, not trimmed");
    assert_eq!(
        msg["sender"],
        json!({"id": c.alice, "username": "alice", "first_name": "Alice", "last_name": "Test"})
    );
    assert_ts(&msg["created_at"]);

    let row =
        c.fx.db
            .query_one(
                "SELECT room_id, sender_id, content FROM chat_chatmessage WHERE id = $1",
                &[&msg["id"].as_i64().unwrap()],
            )
            .await
            .unwrap();
    assert_eq!(row.get::<_, i64>(0), c.room);
    assert_eq!(row.get::<_, i64>(1), c.alice);
    assert_eq!(row.get::<_, String>(2), content);
    // The other participant sees it.
    assert_eq!(room_as(&c.hark, c.room, c.bob).await["last_message"], msg);
}

#[tokio::test]
async fn sending_accepts_room_for_room_id() {
    let c = chat(&[]).await;
    let (s, msg) = post(
        &c.hark,
        "/api/chat/messages",
        c.bob,
        json!({"room": c.room, "content": "via room"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{msg}");
    assert_eq!(msg["room"], c.room);
    assert_eq!(msg["content"], "via room");
}

#[tokio::test]
async fn sending_to_an_unknown_room_is_404_and_to_a_strangers_room_403() {
    let c = chat(&[]).await;
    let url = c.hark.url("/api/chat/messages/");
    let (s, _, b) = request(
        Method::POST,
        &url,
        Some(&token(c.alice)),
        Some(r#"{"room_id": 777777, "content": "x"}"#),
    )
    .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    let body = json!({"room_id": c.room, "content": "let me in"}).to_string();
    let (s, _, b) = request(Method::POST, &url, Some(&token(c.carol)), Some(&body)).await;
    let v = assert_error(s, &b, StatusCode::FORBIDDEN, "not_a_participant");
    assert_eq!(v["error"], "Not a participant");
    let n = c.fx.count("chat_chatmessage").await;
    assert_eq!(n, 0);
}

#[tokio::test]
async fn invalid_content_is_400() {
    let c = chat(&[]).await;
    let url = c.hark.url("/api/chat/messages/");
    let too_long = "x".repeat(10_001);
    for content in [
        json!(null),
        json!(42),
        json!(true),
        json!(["hi"]),
        json!({"text": "hi"}),
        json!(""),
        json!("   "),
        json!(" \n\t\r "),
        json!("nul \u{0} inside"),
        json!(too_long),
    ] {
        let body = json!({"room_id": c.room, "content": content}).to_string();
        let (s, _, b) = request(Method::POST, &url, Some(&token(c.alice)), Some(&body)).await;
        assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_content");
    }
    let (s, _, b) = request(
        Method::POST,
        &url,
        Some(&token(c.alice)),
        Some(&json!({"room_id": c.room}).to_string()),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_content");
    let n = c.fx.count("chat_chatmessage").await;
    assert_eq!(n, 0, "a refused message was stored");
}

#[tokio::test]
async fn content_of_exactly_the_limit_is_accepted() {
    let c = chat(&[]).await;
    // Characters, not bytes: 10,000 two-byte characters are fine.
    for content in ["x".repeat(10_000), "é".repeat(10_000)] {
        let msg = send(&c.hark, c.room, c.alice, &content).await;
        assert_eq!(msg["content"].as_str().unwrap().chars().count(), 10_000);
    }
    let body = json!({"room_id": c.room, "content": "é".repeat(10_001)}).to_string();
    let (s, _, b) = request(
        Method::POST,
        &c.hark.url("/api/chat/messages/"),
        Some(&token(c.alice)),
        Some(&body),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_content");
}

#[tokio::test]
async fn the_content_limit_is_configurable() {
    let c = chat(&[("HARK_MAX_CONTENT_CHARS", "5")]).await;
    send(&c.hark, c.room, c.alice, "12345").await;
    let body = json!({"room_id": c.room, "content": "123456"}).to_string();
    let (s, _, b) = request(
        Method::POST,
        &c.hark.url("/api/chat/messages/"),
        Some(&token(c.alice)),
        Some(&body),
    )
    .await;
    let v = assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_content");
    assert!(
        v["error"].as_str().unwrap().contains('5'),
        "the limit is said: {v}"
    );
}

#[tokio::test]
async fn a_missing_or_invalid_room_id_is_400() {
    let c = chat(&[]).await;
    let url = c.hark.url("/api/chat/messages/");
    for body in [
        json!({"content": "hi"}),
        json!({"room_id": null, "content": "hi"}),
        json!({"room_id": "abc", "content": "hi"}),
        json!({"room_id": 1.5, "content": "hi"}),
        json!({"room_id": -1, "content": "hi"}),
        json!({"room_id": 0, "content": "hi"}),
        json!({"room_id": [1], "content": "hi"}),
        json!({"room_id": 1e300, "content": "hi"}),
        json!({"room_id": u64::MAX, "content": "hi"}),
        json!({"room_id": "", "content": "hi"}),
        json!({"room_id": "0", "content": "hi"}),
        json!({"room_id": "12a", "content": "hi"}),
        json!({"room_id": " 1", "content": "hi"}),
        json!({"room_id": "99999999999999999999", "content": "hi"}),
    ] {
        let (s, _, b) = request(
            Method::POST,
            &url,
            Some(&token(c.alice)),
            Some(&body.to_string()),
        )
        .await;
        assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_room_id");
    }
}

#[tokio::test]
async fn a_room_id_given_as_a_string_of_digits_is_accepted() {
    // DRF's IntegerField and PrimaryKeyRelatedField accept "12" for 12
    // (form posts and some JS clients send ids as strings).
    let c = chat(&[]).await;
    let (s, msg) = post(
        &c.hark,
        "/api/chat/messages/",
        c.alice,
        json!({"room_id": c.room.to_string(), "content": "string id"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{msg}");
    assert_eq!(msg["room"], c.room);
}

// ------------------------------------------------------------------- auth

#[tokio::test]
async fn no_token_is_401_with_www_authenticate() {
    let c = chat(&[]).await;
    for (method, path) in [
        (Method::GET, "/api/chat/rooms/".to_string()),
        (Method::GET, format!("/api/chat/rooms/{}/", c.room)),
        (Method::POST, format!("/api/chat/rooms/{}/typing/", c.room)),
        (Method::POST, format!("/api/chat/rooms/{}/read/", c.room)),
        (Method::POST, "/api/chat/messages/".to_string()),
        (
            Method::GET,
            format!("/api/chat/messages/poll/?room_id={}&timeout=0", c.room),
        ),
        (Method::GET, "/events".to_string()),
    ] {
        let (s, h, b) = request(method.clone(), &c.hark.url(&path), None, Some("{}")).await;
        assert_error(s, &b, StatusCode::UNAUTHORIZED, "not_authenticated");
        let www = h
            .get("www-authenticate")
            .unwrap_or_else(|| panic!("{method} {path}: no WWW-Authenticate"));
        assert!(www.to_str().unwrap().starts_with("Bearer"), "{www:?}");
    }
}

#[tokio::test]
async fn the_access_token_query_parameter_authenticates() {
    let c = chat(&[]).await;
    let url = c
        .hark
        .url(&format!("/api/chat/rooms/?access_token={}", token(c.alice)));
    let (s, body) = get_json(&url, None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(ids(body.as_array().unwrap()), [c.room]);

    let url = c.hark.url(&format!(
        "/api/chat/rooms/{}/typing/?access_token={}",
        c.room,
        token(c.bob)
    ));
    let (s, body) = post_json(&url, None, r#"{"is_typing": true}"#).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(typists(&room_as(&c.hark, c.room, c.alice).await), [c.bob]);

    let url = c.hark.url("/api/chat/rooms/?access_token=not-a-token");
    let (s, _, b) = request(Method::GET, &url, None, None).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "token_not_valid");
}

#[tokio::test]
async fn bad_tokens_are_401() {
    use jsonwebtoken::Algorithm::{HS256, HS512};
    let c = chat(&[]).await;
    let secret = SECRET.as_bytes();
    let claims = |extra: Value| {
        let mut v =
            json!({"token_type": "access", "exp": in_an_hour(), "jti": "x", "user_id": c.alice});
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v
    };
    let hs256 = |claims: Value| jwt(HS256, json!({"alg": "HS256", "typ": "JWT"}), claims, secret);
    // The control: the same construction is accepted when nothing is wrong.
    let good = hs256(claims(json!({})));
    let (s, _) = get_json(&c.hark.url("/api/chat/rooms/"), Some(&good)).await;
    assert_eq!(s, StatusCode::OK);

    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
    );
    let hs512 = jwt(
        HS512,
        json!({"alg": "HS512", "typ": "JWT"}),
        claims(json!({})),
        secret,
    );
    let wrong_secret = jwt(
        HS256,
        json!({"alg": "HS256"}),
        claims(json!({})),
        b"another-secret",
    );
    // Alice's signature on claims that name bob.
    let parts: Vec<&str> = good.split('.').collect();
    let bobs_claims = URL_SAFE_NO_PAD.encode(claims(json!({"user_id": c.bob})).to_string());
    let tampered = format!("{}.{bobs_claims}.{}", parts[0], parts[2]);
    let expired = hs256(claims(json!({"exp": chrono::Utc::now().timestamp() - 10})));
    let now = chrono::Utc::now().timestamp();
    // Already valid: accepted, like the control.
    let (s, _) = get_json(
        &c.hark.url("/api/chat/rooms/"),
        Some(&hs256(claims(json!({"nbf": now - 10})))),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let crit = |header: Value| jwt(HS256, header, claims(json!({})), secret);
    let cases = [
        (
            "nbf in the future",
            hs256(claims(json!({"nbf": now + 600}))),
            "token_not_valid",
        ),
        (
            "crit",
            crit(json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"]})),
            "token_not_valid",
        ),
        (
            "crit naming an extension it defines",
            crit(json!({"alg": "HS256", "crit": ["b64"], "b64": false})),
            "token_not_valid",
        ),
        ("expired", expired, "token_expired"),
        ("wrong secret", wrong_secret, "token_not_valid"),
        ("alg none", alg_none, "token_not_valid"),
        ("HS512", hs512, "token_not_valid"),
        (
            "refresh",
            hs256(claims(json!({"token_type": "refresh"}))),
            "token_not_valid",
        ),
        (
            "no exp",
            hs256(claims(json!({"exp": null}))),
            "token_not_valid",
        ),
        (
            "no user_id",
            hs256(claims(json!({"user_id": null}))),
            "token_not_valid",
        ),
        (
            "user_id not digits",
            hs256(claims(json!({"user_id": "1; DROP"}))),
            "token_not_valid",
        ),
        ("garbage", "abc.def.ghi".to_string(), "token_not_valid"),
        ("tampered", tampered, "token_not_valid"),
    ];
    for (what, t, code) in cases {
        let (s, h, b) = request(Method::GET, &c.hark.url("/api/chat/rooms/"), Some(&t), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}");
        assert_error(s, &b, StatusCode::UNAUTHORIZED, code);
        assert!(h.contains_key("www-authenticate"), "{what}");
    }
    // Another scheme than Bearer.
    let (s, _, b) = try_request(
        Method::GET,
        &c.hark.url("/api/chat/rooms/"),
        None,
        None,
        &[("authorization", &format!("Token {good}"))],
    )
    .await
    .unwrap();
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "token_not_valid");
}

#[tokio::test]
async fn a_token_for_a_user_that_does_not_exist_is_401() {
    let c = chat(&[]).await;
    let (s, h, b) = request(
        Method::GET,
        &c.hark.url("/api/chat/rooms/"),
        Some(&token(999_999)),
        None,
    )
    .await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "user_not_found");
    assert!(h.contains_key("www-authenticate"));
    // A user deleted after being seen is refused too.
    let gone = c.fx.user("gone").await;
    assert_eq!(
        get(&c.hark, "/api/chat/rooms/", gone).await.0,
        StatusCode::OK
    );
    c.fx.db
        .execute("DELETE FROM users_user WHERE id = $1", &[&gone])
        .await
        .unwrap();
    eventually("the deleted user is refused", || async {
        get(&c.hark, "/api/chat/rooms/", gone).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
}

#[tokio::test]
async fn a_token_works_once_its_user_is_created() {
    let c = chat(&[]).await;
    let later = 424_242;
    // Asked for a few times, so a cache would have it as unknown.
    for _ in 0..3 {
        let (s, _) = get(&c.hark, "/api/chat/rooms/", later).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        // Pacing: asked again later, as a client retrying would.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.fx.db
        .execute(
            "INSERT INTO users_user (id, username) VALUES ($1, 'latecomer')",
            &[&later],
        )
        .await
        .unwrap();
    eventually("the new user is accepted", || async {
        get(&c.hark, "/api/chat/rooms/", later).await.0 == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn user_id_as_a_string_of_digits_is_accepted() {
    let c = chat(&[]).await;
    let t = jwt(
        jsonwebtoken::Algorithm::HS256,
        json!({"alg": "HS256", "typ": "JWT"}),
        json!({"token_type": "access", "exp": in_an_hour(), "user_id": c.bob.to_string()}),
        SECRET.as_bytes(),
    );
    let (s, body) = get_json(&c.hark.url("/api/chat/rooms/"), Some(&t)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(ids(body.as_array().unwrap()), [c.room]);
}

// ----------------------------------------------------------------- bodies

#[tokio::test]
async fn a_body_without_content_type_is_read_as_json() {
    let c = chat(&[]).await;
    let body = json!({"room_id": c.room, "content": "no content type"}).to_string();
    let (s, _, b) = try_request(
        Method::POST,
        &c.hark.url("/api/chat/messages/"),
        Some(&token(c.alice)),
        Some(&body),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["content"], "no content type");
    // And with parameters or a +json type.
    for ct in [
        "application/json; charset=utf-8",
        "application/vnd.api+json",
    ] {
        let (s, _, b) = try_request(
            Method::POST,
            &c.hark.url("/api/chat/messages/"),
            Some(&token(c.alice)),
            Some(&body),
            &[("content-type", ct)],
        )
        .await
        .unwrap();
        assert_eq!(
            s,
            StatusCode::CREATED,
            "{ct}: {}",
            String::from_utf8_lossy(&b)
        );
    }
}

#[tokio::test]
async fn a_non_json_content_type_is_415() {
    let c = chat(&[]).await;
    let body = json!({"room_id": c.room, "content": "hi"}).to_string();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let (s, _, b) = try_request(
            Method::POST,
            &c.hark.url("/api/chat/messages/"),
            Some(&token(c.alice)),
            Some(&body),
            &[("content-type", ct)],
        )
        .await
        .unwrap();
        assert_error(
            s,
            &b,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
    }
}

#[tokio::test]
async fn malformed_json_and_non_objects_are_400() {
    let c = chat(&[]).await;
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    for body in [
        "{",
        "{\"content\": }",
        "[1, 2]",
        "\"a string\"",
        "42",
        "null",
        "   ",
        "{\"room_id\": 1} trailing",
        &nested,
    ] {
        for path in [
            "/api/chat/messages/".to_string(),
            format!("/api/chat/rooms/{}/typing/", c.room),
        ] {
            let (s, _, b) = request(
                Method::POST,
                &c.hark.url(&path),
                Some(&token(c.alice)),
                Some(body),
            )
            .await;
            assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_json");
        }
    }
    // Bytes that are not UTF-8.
    let body: &[u8] = b"{\"room_id\": 1, \"content\": \"\xff\xfe\"}";
    let mut req = format!(
        "POST /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        token(c.alice),
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let resp = raw_http(&c.hark, &req).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("\"code\":\"invalid_json\""), "{resp}");
}

#[tokio::test]
async fn an_empty_body_is_an_empty_object() {
    // As DRF reads it: no body is `{}`, not a parse error.
    let c = chat(&[]).await;
    set_typing(&c.hark, c.room, c.alice, true).await;
    let url = c.hark.url(&format!("/api/chat/rooms/{}/typing/", c.room));
    let (s, _, b) = try_request(Method::POST, &url, Some(&token(c.alice)), None, &[])
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert!(
        typists(&room_as(&c.hark, c.room, c.bob).await).is_empty(),
        "a bare POST means false"
    );
    let (s, _, b) = request(
        Method::POST,
        &c.hark.url("/api/chat/messages/"),
        Some(&token(c.alice)),
        Some(""),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_room_id");
}

#[tokio::test]
async fn a_two_megabyte_body_is_413() {
    let c = chat(&[]).await;
    let body = json!({"room_id": c.room, "content": "x".repeat(2 << 20)}).to_string();
    let (s, _, b) = try_request(
        Method::POST,
        &c.hark.url("/api/chat/messages/"),
        Some(&token(c.alice)),
        Some(&body),
        &[("content-type", "application/json")],
    )
    .await
    .expect("the 413 reaches the client");
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // The server is fine afterwards.
    send(&c.hark, c.room, c.alice, "still here").await;
}

#[tokio::test]
async fn the_body_limit_is_configurable_and_holds_without_content_length() {
    let c = chat(&[("HARK_MAX_BODY_BYTES", "100")]).await;
    let small = json!({"room_id": c.room, "content": "fits"}).to_string();
    assert!(small.len() < 100);
    let (s, _) = post_json(
        &c.hark.url("/api/chat/messages/"),
        Some(&token(c.alice)),
        &small,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);

    let big = json!({"room_id": c.room, "content": "y".repeat(200)}).to_string();
    let (s, _, b) = request(
        Method::POST,
        &c.hark.url("/api/chat/messages/"),
        Some(&token(c.alice)),
        Some(&big),
    )
    .await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // Chunked: no Content-Length to refuse early, the reader stops at the limit.
    let mut req = format!(
        "POST /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        token(c.alice)
    );
    for chunk in big.as_bytes().chunks(50) {
        req.push_str(&format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            std::str::from_utf8(chunk).unwrap()
        ));
    }
    req.push_str("0\r\n\r\n");
    let resp = raw_http(&c.hark, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let n = c.fx.count("chat_chatmessage").await;
    assert_eq!(n, 1);
}

// ------------------------------------------------------- routing and ops

#[tokio::test]
async fn an_unknown_path_is_a_json_404() {
    let c = chat(&[]).await;
    for path in [
        "/nope",
        "/api/chat/",
        "/api/chat/rooms/abc/",
        "/api/chat/rooms/-1/",
        "/api/chat/rooms/1/typing/extra/",
        "/api/chat/rooms/99999999999999999999999/",
        "/api/chat/rooms//",
        "/api/chat/rooms/%00/",
        "/api/chat/messages/poll/now/",
        "/healthz/x",
    ] {
        for method in [Method::GET, Method::POST, Method::OPTIONS] {
            let (s, _, b) = request(
                method.clone(),
                &c.hark.url(path),
                Some(&token(c.alice)),
                None,
            )
            .await;
            assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
        }
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_with_allow() {
    let c = chat(&[]).await;
    let room = c.room;
    let cases = [
        (
            Method::GET,
            format!("/api/chat/rooms/{room}/typing/"),
            "POST",
        ),
        (
            Method::HEAD,
            format!("/api/chat/rooms/{room}/read/"),
            "POST",
        ),
        (Method::GET, format!("/api/chat/rooms/{room}/read/"), "POST"),
        (Method::GET, "/api/chat/messages/".to_string(), "POST"),
        (Method::PUT, "/api/chat/messages/".to_string(), "POST"),
        (Method::POST, "/api/chat/rooms/".to_string(), "GET"),
        (Method::DELETE, format!("/api/chat/rooms/{room}/"), "GET"),
        (Method::PATCH, format!("/api/chat/rooms/{room}/"), "GET"),
        (Method::POST, "/api/chat/messages/poll/".to_string(), "GET"),
        (Method::POST, "/events".to_string(), "GET"),
        (Method::POST, "/healthz".to_string(), "GET"),
        (Method::DELETE, "/metrics".to_string(), "GET"),
    ];
    for (method, path, allowed) in cases {
        let (s, h, b) = request(
            method.clone(),
            &c.hark.url(&path),
            Some(&token(c.alice)),
            Some("{}"),
        )
        .await;
        if method == Method::HEAD {
            assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "HEAD {path}");
        } else {
            assert_error(s, &b, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        }
        let allow = h
            .get("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow"))
            .to_str()
            .unwrap();
        assert!(
            allow.split(',').any(|m| m.trim() == allowed),
            "{method} {path}: Allow: {allow}"
        );
        assert!(
            !allow.split(',').any(|m| m.trim() == method.as_str()),
            "{method} {path}: Allow: {allow}"
        );
    }
}

#[tokio::test]
async fn head_answers_wherever_get_does() {
    let c = chat(&[]).await;
    for (path, user) in [
        ("/healthz", None),
        ("/api/chat/rooms/", Some(token(c.alice))),
        ("/", None),
    ] {
        let (s, h, b) = request(Method::HEAD, &c.hark.url(path), user.as_deref(), None).await;
        assert_eq!(s, StatusCode::OK, "HEAD {path}");
        assert!(b.is_empty(), "HEAD {path} has a body");
        assert!(h.contains_key("content-type"), "HEAD {path}");
    }
    let (s, h, _) = request(Method::POST, &c.hark.url("/healthz"), None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h["allow"], "GET, HEAD, OPTIONS");
}

#[tokio::test]
async fn every_path_works_with_and_without_its_trailing_slash() {
    let c = chat(&[]).await;
    let room = c.room;
    let t = token(c.alice);
    for (method, path, body, want) in [
        (
            Method::GET,
            "/api/chat/rooms".to_string(),
            None,
            StatusCode::OK,
        ),
        (
            Method::GET,
            format!("/api/chat/rooms/{room}"),
            None,
            StatusCode::OK,
        ),
        (
            Method::POST,
            format!("/api/chat/rooms/{room}/typing"),
            Some(r#"{"is_typing":true}"#.to_string()),
            StatusCode::OK,
        ),
        (
            Method::POST,
            format!("/api/chat/rooms/{room}/read"),
            Some("{}".to_string()),
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/chat/messages".to_string(),
            Some(json!({"room_id": room, "content": "x"}).to_string()),
            StatusCode::CREATED,
        ),
        (
            Method::GET,
            "/api/chat/messages/poll".to_string(),
            None,
            StatusCode::OK,
        ),
        (Method::GET, "/healthz".to_string(), None, StatusCode::OK),
        (Method::GET, "/readyz".to_string(), None, StatusCode::OK),
        (Method::GET, "/metrics".to_string(), None, StatusCode::OK),
    ] {
        for slash in ["", "/"] {
            let query = if path.contains("poll") {
                format!("?room_id={room}&timeout=0")
            } else {
                String::new()
            };
            let url = c.hark.url(&format!("{path}{slash}{query}"));
            let (s, _, b) = request(method.clone(), &url, Some(&t), body.as_deref()).await;
            assert_eq!(
                s,
                want,
                "{method} {path}{slash}: {}",
                String::from_utf8_lossy(&b)
            );
        }
    }
    // The stream too (without a token: only the routing is looked at here).
    for path in ["/events", "/events/"] {
        let (s, _, b) = request(Method::GET, &c.hark.url(path), None, None).await;
        assert_error(s, &b, StatusCode::UNAUTHORIZED, "not_authenticated");
    }
}

#[tokio::test]
async fn healthz_readyz_and_the_index_page_answer() {
    let c = chat(&[]).await;
    let (s, h, b) = request(Method::GET, &c.hark.url("/healthz"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(json(&b)["status"], "ok");
    let (s, b) = get_json(&c.hark.url("/readyz"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["database"], true);
    assert_eq!(b["listener"], true);
    let (s, h, b) = request(Method::GET, &c.hark.url("/"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    let page = String::from_utf8_lossy(&b);
    assert!(
        page.contains("./hark.js"),
        "the page does not load /hark.js"
    );
    // The page is built on the client module, which holds the protocol.
    let (s, h, b) = request(Method::GET, &c.hark.url("/hark.js"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let module = String::from_utf8_lossy(&b);
    for used in [
        "EventSource",
        "events",
        "api/chat/rooms/",
        "api/chat/messages/poll/",
        "api/chat/messages/",
    ] {
        assert!(module.contains(used), "/hark.js does not use {used}");
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let c = chat(&[]).await;
    send(&c.hark, c.room, c.alice, "count me").await;
    let (s, h, b) = request(Method::GET, &c.hark.url("/metrics"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        h["content-type"]
    );
    let text = String::from_utf8(b.to_vec()).unwrap();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name: {line}"
        );
        assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.contains(*f))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample without # TYPE: {line}");
    }
    for name in [
        "hark_open_streams",
        "hark_waiting_polls",
        "hark_notifications_total",
        "hark_delivery_latency_seconds",
    ] {
        assert!(typed.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("hark_") && l.contains("queries")),
        "a database query count:\n{text}"
    );
    assert!(text.contains("hark_delivery_latency_seconds_bucket{le=\"+Inf\"}"));
}

// ------------------------------------------------------------------- CORS

const ORIGIN: &str = "https://app.example";

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let c = chat(&[("HARK_CORS_ORIGINS", ORIGIN)]).await;
    let rooms = c.hark.url("/api/chat/rooms/");
    let t = token(c.alice);
    let (s, h, _) = try_request(Method::GET, &rooms, Some(&t), None, &[("origin", ORIGIN)])
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    assert!(h
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap().contains("Origin")));
    // On errors too, so the page can read them.
    let (s, h, _) = try_request(Method::GET, &rooms, None, None, &[("origin", ORIGIN)])
        .await
        .unwrap();
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    // Another origin gets nothing.
    for other in [
        "https://evil.example",
        "http://app.example",
        "https://app.example:8443",
    ] {
        let (s, h, _) = try_request(Method::GET, &rooms, Some(&t), None, &[("origin", other)])
            .await
            .unwrap();
        assert_eq!(s, StatusCode::OK);
        assert!(h.get("access-control-allow-origin").is_none(), "{other}");
    }
}

#[tokio::test]
async fn cors_preflight_is_answered() {
    let c = chat(&[(
        "HARK_CORS_ORIGINS",
        "http://localhost:3000, https://app.example",
    )])
    .await;
    let preflight = [
        ("origin", ORIGIN),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization, content-type",
        ),
    ];
    let (s, h, _) = try_request(
        Method::OPTIONS,
        &c.hark.url("/api/chat/messages/"),
        None,
        None,
        &preflight,
    )
    .await
    .unwrap();
    assert!(s.is_success(), "{s}");
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{headers}"
    );

    // A preflight for the stream and a GET path.
    let stream_preflight = [
        ("origin", "http://localhost:3000"),
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "last-event-id"),
    ];
    let (s, h, _) = try_request(
        Method::OPTIONS,
        &c.hark.url("/events"),
        None,
        None,
        &stream_preflight,
    )
    .await
    .unwrap();
    assert!(s.is_success(), "{s}");
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("GET"));
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("last-event-id"));

    // A foreign origin's preflight grants nothing.
    let (_, h, _) = try_request(
        Method::OPTIONS,
        &c.hark.url("/api/chat/messages/"),
        None,
        None,
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
    )
    .await
    .unwrap();
    assert!(h.get("access-control-allow-origin").is_none());
    assert!(h.get("access-control-allow-methods").is_none());
}

#[tokio::test]
async fn cors_star_allows_any_origin() {
    let c = chat(&[("HARK_CORS_ORIGINS", "*")]).await;
    let (s, h, _) = try_request(
        Method::GET,
        &c.hark.url("/api/chat/rooms/"),
        Some(&token(c.alice)),
        None,
        &[("origin", "https://anywhere.example")],
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], "*");
    let (s, h, _) = try_request(
        Method::OPTIONS,
        &c.hark.url("/api/chat/rooms/1/typing/"),
        None,
        None,
        &[
            ("origin", "https://anywhere.example"),
            ("access-control-request-method", "POST"),
        ],
    )
    .await
    .unwrap();
    assert!(s.is_success());
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
}

#[tokio::test]
async fn without_cors_configured_no_origin_is_allowed() {
    let c = chat(&[]).await;
    let (s, h, _) = try_request(
        Method::GET,
        &c.hark.url("/api/chat/rooms/"),
        Some(&token(c.alice)),
        None,
        &[("origin", ORIGIN)],
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert!(h.get("access-control-allow-origin").is_none());
}

// ------------------------------------------------------- one connection

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or any request with
/// two, is a 400 (HTTP/1.0 may omit it); RFC 9110 §10.1.1: an expectation
/// other than `100-continue` is a 417 — on both connection paths (each
/// request the first on its connection, then after a request that hands
/// the connection to hyper), the stream's opening included. JSON errors.
#[tokio::test]
async fn one_host_and_no_expectation_but_100_continue_on_both_paths() {
    let c = chat(&[]).await;
    let a = token(c.alice);
    let room = c.room;
    let send = format!(r#"{{"room_id": {room}, "content": "expected"}}"#);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (
            "no Host",
            "GET /healthz HTTP/1.1\r\n\r\n".into(),
            400,
            Some("invalid_host"),
        ),
        (
            "two Hosts",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".into(),
            400,
            Some("invalid_host"),
        ),
        (
            "two Hosts, HTTP/1.0",
            "GET /healthz HTTP/1.0\r\nHost: x\r\nHost: x\r\n\r\n".into(),
            400,
            Some("invalid_host"),
        ),
        (
            "a Host that is no host",
            "GET /healthz HTTP/1.1\r\nHost: a@b\r\n\r\n".into(),
            400,
            Some("invalid_host"),
        ),
        (
            "a stream without Host",
            format!("GET /events?room_id={room} HTTP/1.1\r\nAuthorization: Bearer {a}\r\n\r\n"),
            400,
            Some("invalid_host"),
        ),
        (
            "a post without Host",
            format!(
                "POST /api/chat/messages/ HTTP/1.1\r\nAuthorization: Bearer {a}\r\n\
                 Content-Length: {}\r\n\r\n{send}",
                send.len()
            ),
            400,
            Some("invalid_host"),
        ),
        (
            "Expect: 200-ok",
            format!(
                "POST /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a}\r\n\
                 Expect: 200-ok\r\nContent-Length: {}\r\n\r\n{send}",
                send.len()
            ),
            417,
            Some("expectation_failed"),
        ),
        (
            "Expect: 100-continue and more",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue, x\r\n\r\n".into(),
            417,
            Some("expectation_failed"),
        ),
        // What stays allowed.
        (
            "HTTP/1.0 without Host",
            "GET /healthz HTTP/1.0\r\n\r\n".into(),
            200,
            None,
        ),
        (
            "Expect: 100-continue",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n".into(),
            200,
            None,
        ),
        (
            "an empty Host",
            "GET /healthz HTTP/1.1\r\nHost:\r\n\r\n".into(),
            200,
            None,
        ),
    ];
    for (what, request, want, code) in &cases {
        for first in [None, Some("PUT /api/chat/messages/")] {
            let mut raw = Raw::connect(c.hark.addr).await;
            if let Some(first) = first {
                raw.send(format!("{first} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                    .await;
                raw.answer().await;
            }
            raw.send(request.as_bytes()).await;
            let (head, body) = raw.answer().await;
            assert_eq!(status_of(&head), *want, "{what}, after {first:?}: {head}");
            if let Some(code) = code {
                assert_client_error(what, StatusCode::from_u16(*want).unwrap(), &body);
                assert_eq!(json(&body)["code"], *code, "{what}, after {first:?}");
            }
        }
    }
    // None of the refused posts was sent.
    let sent = c.fx.count("chat_chatmessage").await;
    assert_eq!(sent, 0);
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status")
}

/// Several GETs on one connection, the first three pipelined in one write:
/// answered in order, and the connection stays open for more.
#[tokio::test]
async fn gets_on_one_connection_are_answered_in_order_and_kept_alive() {
    let c = chat(&[]).await;
    let (a, b) = (token(c.alice), token(c.bob));
    let mut raw = Raw::connect(c.hark.addr).await;
    raw.send(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
             GET /api/chat/rooms/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a}\r\n\r\n\
             GET /api/chat/rooms/{room}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b}\r\n\r\n",
            room = c.room
        )
        .as_bytes(),
    )
    .await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let (head, body) = raw.answer().await;
        assert_eq!(status_of(&head), 200, "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        answers.push(json(&body));
    }
    assert_eq!(answers[0]["status"], "ok");
    assert_eq!(
        answers[1].as_array().map(Vec::len),
        Some(1),
        "{}",
        answers[1]
    );
    assert_eq!(answers[1][0]["id"], c.room);
    assert_eq!(answers[2]["id"], c.room);
    // An error answer keeps the connection too.
    raw.send(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = raw.answer().await;
    assert_eq!(status_of(&head), 404, "{head}");
    assert_eq!(json(&body)["code"], "not_found");
    raw.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, _) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(c.hark.metric("hark_open_connections").await, 2.0);
}

/// The same requests answered by hark's own HTTP (each the first request
/// of a fresh connection) and by hyper (each after a `PUT`, which hands
/// the connection to hyper) get the same status, error code, headers (but
/// `date` and the length of bodies that differ by id and time) and the
/// same fate of the connection.
#[tokio::test]
async fn hark_s_own_http_answers_as_hyper_does() {
    let c = chat(&[
        ("HARK_CORS_ORIGINS", ORIGIN),
        ("HARK_MAX_BODY_BYTES", "200"),
    ])
    .await;
    let a = token(c.alice);
    let room = c.room;
    let post = |path: &str, extra: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let auth = format!("Authorization: Bearer {a}\r\n");
    let json_auth = format!("{auth}Content-Type: application/json\r\n");
    let cors = format!("Origin: {ORIGIN}\r\n");
    let send = format!(r#"{{"room_id": {room}, "content": "same"}}"#);
    let cases: Vec<(&str, String)> = vec![
        ("send", post("/api/chat/messages/", &json_auth, &send)),
        (
            "send with CORS",
            post("/api/chat/messages/", &format!("{json_auth}{cors}"), &send),
        ),
        (
            "send, then close",
            post(
                "/api/chat/messages/",
                &format!("{json_auth}Connection: close\r\n"),
                &send,
            ),
        ),
        (
            "typing",
            post(
                &format!("/api/chat/rooms/{room}/typing/"),
                &json_auth,
                r#"{"is_typing": true}"#,
            ),
        ),
        (
            "typing not a boolean",
            post(
                &format!("/api/chat/rooms/{room}/typing/"),
                &json_auth,
                r#"{"is_typing": "yes"}"#,
            ),
        ),
        (
            "read, no body",
            post(&format!("/api/chat/rooms/{room}/read/"), &auth, ""),
        ),
        (
            "malformed JSON",
            post("/api/chat/messages/", &json_auth, "{nope"),
        ),
        (
            "not JSON",
            post(
                "/api/chat/messages/",
                &format!("{auth}Content-Type: text/plain\r\n"),
                "hi",
            ),
        ),
        ("empty body", post("/api/chat/messages/", &json_auth, "")),
        ("no token", post("/api/chat/messages/", &cors, &send)),
        (
            "unknown path",
            post("/api/chat/nothing/", &json_auth, &send),
        ),
        (
            "wrong method",
            post("/api/chat/messages/poll/", &json_auth, ""),
        ),
        (
            "over the body limit",
            post(
                "/api/chat/messages/",
                &json_auth,
                &format!(r#"{{"room_id": {room}, "content": "{}"}}"#, "x".repeat(300)),
            ),
        ),
        (
            "HTTP/1.0",
            post("/api/chat/messages/", &json_auth, &send).replacen("HTTP/1.1", "HTTP/1.0", 1),
        ),
        (
            "HTTP/1.0 keep-alive",
            post(
                "/api/chat/messages/",
                &format!("{json_auth}Connection: keep-alive\r\n"),
                &send,
            )
            .replacen("HTTP/1.1", "HTTP/1.0", 1),
        ),
        (
            "HTTP/1.0 keep-alive, rooms",
            format!(
                "GET /api/chat/rooms/ HTTP/1.0\r\nHost: x\r\n{auth}Connection: keep-alive\r\n\r\n"
            ),
        ),
        (
            "HTTP/1.0 keep-alive, HEAD stream",
            format!(
                "HEAD /events?room_id={room} HTTP/1.0\r\nHost: x\r\n{auth}\
                 Connection: keep-alive\r\n\r\n"
            ),
        ),
        (
            "preflight",
            format!(
                "OPTIONS /api/chat/messages/ HTTP/1.1\r\nHost: x\r\n{cors}\
                 Access-Control-Request-Method: POST\r\n\r\n"
            ),
        ),
        (
            "preflight, unknown path",
            "OPTIONS /nothing HTTP/1.1\r\nHost: x\r\n\r\n".into(),
        ),
        (
            "rooms",
            format!("GET /api/chat/rooms/ HTTP/1.1\r\nHost: x\r\n{auth}{cors}\r\n"),
        ),
        (
            "HEAD rooms",
            format!("HEAD /api/chat/rooms/ HTTP/1.1\r\nHost: x\r\n{auth}{cors}\r\n"),
        ),
        (
            "HEAD stream",
            format!("HEAD /events?room_id={room} HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
        ),
        (
            "HEAD health",
            "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n".into(),
        ),
        (
            "HEAD unknown path",
            "HEAD /nothing HTTP/1.1\r\nHost: x\r\n\r\n".into(),
        ),
        (
            "HEAD, POST only",
            "HEAD /api/chat/messages/ HTTP/1.1\r\nHost: x\r\n\r\n".into(),
        ),
    ];
    // The head's lines that must agree; and whether the connection stayed open.
    let shape = |head: &str, body: &[u8], same_length: bool| {
        let mut lines: Vec<String> = head
            .lines()
            .skip(1)
            .filter(|l| !l.starts_with("date:"))
            .filter(|l| same_length || !l.starts_with("content-length:"))
            .map(str::to_string)
            .collect();
        lines.sort();
        let status = head.split(' ').nth(1).unwrap_or("").to_string();
        let code = serde_json::from_slice::<Value>(body)
            .ok()
            .map(|v| v["code"].clone());
        (status, lines, code)
    };
    for (what, request) in cases {
        let mut answers = Vec::new();
        for hyper in [false, true] {
            let mut raw = Raw::connect(c.hark.addr).await;
            if hyper {
                raw.send(
                    b"PUT /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
                let (head, _) = raw.answer().await;
                assert_eq!(status_of(&head), 405, "{head}");
            }
            raw.send(request.as_bytes()).await;
            let (head, body) = if request.starts_with("HEAD") {
                (raw.answer_to_head().await, Vec::new())
            } else {
                raw.answer_within(Duration::from_secs(15)).await
            };
            let same_length = !head.contains(" 201 ");
            // HTTP/1.0 closes unless asked not to.
            let ten_closes =
                request.contains(" HTTP/1.0\r\n") && !request.contains("Connection: keep-alive");
            let open = if head.contains("connection: close") || ten_closes {
                !raw.closed_within(Duration::from_secs(10)).await
            } else {
                raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
                status_of(&raw.answer().await.0) == 200
            };
            let mut shape = shape(&head, &body, same_length);
            if ten_closes {
                // Closing is HTTP/1.0's default: hark says so, hyper does not.
                shape.1.retain(|l| l != "connection: close");
            }
            answers.push((shape, open));
        }
        assert_eq!(
            answers[0], answers[1],
            "{what}: hark's own HTTP, then hyper's"
        );
    }
}

/// While a poll waits, a client may send its next request ahead, body and
/// all, up to the largest request hark takes (a head of 64 KiB and
/// `HARK_MAX_BODY_BYTES`): both are answered, in order.
#[tokio::test]
async fn a_whole_request_may_be_sent_ahead_of_a_waiting_poll() {
    let c = chat(&[("HARK_MAX_BODY_BYTES", "100000")]).await;
    let a = token(c.alice);
    let (s, body) = get_json(&poll_url(&c.hark, c.room, None, ""), Some(&a)).await;
    assert_eq!(s, StatusCode::OK);
    let cursor: String =
        form_urlencoded::byte_serialize(body["cursor"].as_str().unwrap().as_bytes()).collect();
    let typing = json!({"is_typing": true, "padding": "x".repeat(90_000)}).to_string();
    let mut raw = Raw::connect(c.hark.addr).await;
    raw.send(
        format!(
            "GET /api/chat/messages/poll/?room_id={room}&since={cursor}&timeout=1 HTTP/1.1\r\n\
             Host: x\r\nAuthorization: Bearer {a}\r\n\r\n\
             POST /api/chat/rooms/{room}/typing/ HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {a}\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\n\r\n{typing}",
            room = c.room,
            len = typing.len(),
        )
        .as_bytes(),
    )
    .await;
    let (head, poll) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(json(&poll)["messages"], json!([]));
    let (head, answer) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(json(&answer)["success"], true);
}

/// hark's own HTTP reads a POST's body by its Content-Length: a body that
/// arrives in pieces is read whole and not taken for the next request; one
/// that stops arriving is a 400 `body_timeout` after 10 s, then the
/// connection closes; a client that leaves mid-body sends nothing. None of
/// the unfinished ones inserts a row.
#[tokio::test]
async fn a_post_body_is_read_by_its_length_and_an_unfinished_one_sends_nothing() {
    let c = chat(&[]).await;
    let a = token(c.alice);
    let post = |content: &str| {
        let body = json!({"room_id": c.room, "content": content}).to_string();
        let head = format!(
            "POST /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        (head, body)
    };
    let count = || c.fx.count("chat_chatmessage");

    // In pieces, with a GET right behind the body.
    let (head, body) = post("in pieces");
    let mut raw = Raw::connect(c.hark.addr).await;
    raw.send(head.as_bytes()).await;
    raw.wait_read().await;
    let (first, rest) = body.split_at(10);
    raw.send(first.as_bytes()).await;
    raw.wait_read().await;
    raw.send(format!("{rest}GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let (h, created) = raw.answer().await;
    assert_eq!(status_of(&h), 201, "{h}");
    assert!(!h.contains("connection: close"), "{h}");
    assert_eq!(json(&created)["content"], "in pieces");
    let (h, ok) = raw.answer().await;
    assert_eq!(status_of(&h), 200, "{h}");
    assert_eq!(json(&ok)["status"], "ok");
    assert_eq!(count().await, 1);

    // A body that stops arriving.
    let (head, body) = post("never finished");
    let mut slow = Raw::connect(c.hark.addr).await;
    slow.send(format!("{head}{}", &body[..10]).as_bytes()).await;
    let started = Instant::now();
    // And one whose client leaves mid-body.
    let mut gone = tokio::net::TcpStream::connect(c.hark.addr).await.unwrap();
    gone.write_all(format!("{head}{}", &body[..10]).as_bytes())
        .await
        .unwrap();
    drop(gone);

    let (h, err) = slow.answer_within(Duration::from_secs(30)).await;
    assert_eq!(status_of(&h), 400, "{h}");
    assert!(h.contains("connection: close"), "{h}");
    assert_eq!(json(&err)["code"], "body_timeout");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    assert!(slow.closed_within(Duration::from_secs(10)).await);
    assert_eq!(count().await, 1);
    // Only this test's own connection to ask with is left.
    eventually("the unfinished connections are closed", || async {
        c.hark.metric("hark_open_connections").await <= 1.0
    })
    .await;
}

/// A request with a body (or another method) after bodiless GETs: the
/// connection goes on, served as a whole, the body read as such.
#[tokio::test]
async fn a_request_with_a_body_after_gets_is_answered_on_the_same_connection() {
    let c = chat(&[]).await;
    let a = token(c.alice);
    let body = r#"{"is_typing": true}"#;
    let mut raw = Raw::connect(c.hark.addr).await;
    raw.send(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
             POST /api/chat/rooms/{room}/typing/ HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {a}\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\n\r\n{body}\
             GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}\
             GET /api/chat/rooms/{room}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b}\r\n\r\n",
            room = c.room,
            len = body.len(),
            b = token(c.bob),
        )
        .as_bytes(),
    )
    .await;
    let (head, _) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (head, answer) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(json(&answer)["success"], true);
    // A GET's body is not taken for the next request.
    let (head, answer) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(json(&answer)["status"], "ok");
    let (head, answer) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(typists(&json(&answer)), vec![c.alice]);
    raw.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let head = raw.answer_to_head().await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (head, answer) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(json(&answer)["status"], "ok", "the HEAD answer had no body");
}

/// `Connection: close`, and HTTP/1.0 unless it asks for keep-alive: one
/// answer, saying so, then the end. HTTP/1.0 with `Connection: keep-alive`
/// (`ab -k`): the answer says keep-alive and the next request is served.
#[tokio::test]
async fn connection_close_and_http_1_0_end_the_connection_after_the_answer() {
    let c = chat(&[]).await;
    for (req, kept) in [
        (
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
            false,
        ),
        (b"GET /healthz HTTP/1.0\r\n\r\n", false),
        (
            b"GET /healthz HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
            false,
        ),
        (
            b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            true,
        ),
    ] {
        let what = String::from_utf8_lossy(req);
        let mut raw = Raw::connect(c.hark.addr).await;
        for _ in 0..2 {
            raw.send(req).await;
            let (head, body) = raw.answer().await;
            assert_eq!(status_of(&head), 200, "{what}: {head}");
            let says = if kept { "keep-alive" } else { "close" };
            assert!(
                head.lines().any(|l| l == format!("connection: {says}")),
                "{what}: {head}"
            );
            assert_eq!(json(&body)["status"], "ok");
            if !kept {
                assert!(raw.closed_within(Duration::from_secs(5)).await, "{what}");
                break;
            }
        }
    }
}

/// Shutdown does not wait for a connection that is between requests.
#[tokio::test]
async fn an_idle_connection_does_not_hold_up_shutdown() {
    let mut c = chat(&[]).await;
    let mut raw = Raw::connect(c.hark.addr).await;
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, _) = raw.answer().await;
    assert_eq!(status_of(&head), 200, "{head}");
    let took = c.hark.stop().await;
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    assert!(raw.closed_within(Duration::from_secs(1)).await);
}

// ------------------------------------------------------------------ limits

/// A kept-alive connection that has been served once (so it holds its slot).
async fn held_connection(
    h: &Hark,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    // The slot of an earlier connection may not be free yet, and /metrics
    // would need a slot of its own to say so: try until one is served.
    wait_for(Duration::from_secs(10), || async {
        let stream = tokio::net::TcpStream::connect(h.addr)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::get("/healthz")
            .header("host", "hark")
            .body(http_body_util::Full::default())
            .unwrap();
        match sender.send_request(req).await {
            Ok(resp) if resp.status() == StatusCode::OK => Some(sender),
            _ => None,
        }
    })
    .await
    .expect("never got a connection slot")
}

/// An idle keep-alive connection gives its slot back: once a response is
/// written, hark waits for the next request head for 10 s (the header
/// timeout), then closes it. It stays open well past the response first.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = chat(&[]).await;
    let mut s = tokio::net::TcpStream::connect(c.hark.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("an idle connection was still open after 30 s"),
        }
    }
    assert!(got.starts_with(b"HTTP/1.1 200 "), "{got:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed after {:?}: keep-alive should hold it open",
        started.elapsed()
    );
}

/// A client silent for 9 s that then sends its head a byte a second is
/// cut 10 s after it connected, on either path: the wait for its first
/// byte counts towards the head's 10 s (it used to add to them: 19 s).
#[tokio::test]
async fn the_first_head_must_arrive_within_10_s_of_connecting_on_both_paths() {
    let c = chat(&[]).await;
    let trickle = |start: &'static str| {
        let addr = c.hark.addr;
        async move {
            let connected = Instant::now();
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = stream.into_split();
            let closed = tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = rd.read_to_end(&mut got).await;
                (connected.elapsed(), got)
            });
            // The point: a client silent for 9 s.
            tokio::time::sleep(Duration::from_secs(9)).await;
            // Enough for the path to be chosen, then a byte a second of
            // a head that never ends.
            let _ = wr.write_all(start.as_bytes()).await;
            while !closed.is_finished() && connected.elapsed() < Duration::from_secs(30) {
                // The point: a byte a second.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = wr.write_all(b"x").await;
            }
            let (after, got) = closed.await.unwrap();
            (start, after, got)
        }
    };
    let (lean, hyper) = tokio::join!(
        trickle("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "),
        trickle("PUT /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "),
    );
    for (start, after, got) in [lean, hyper] {
        assert!(
            got.is_empty(),
            "{start:?}: {}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            after >= Duration::from_secs(9) && after < Duration::from_secs(15),
            "{start:?}: closed {after:?} after connecting"
        );
    }
}

/// One head limit on every path: a head of exactly 64 KiB is served, one
/// byte more is a 431 — as the first request (hark's own HTTP), behind a
/// body that grew its read buffer (a read may then bring a whole head
/// over the limit at once), after a request that handed the connection to
/// hyper, and as the first request of a connection that is hyper's from
/// the start.
#[tokio::test]
async fn a_head_over_64_kib_is_431_on_every_path() {
    let c = chat(&[]).await;
    let head = |method: &str, size: usize| {
        let start = format!("{method} /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ");
        let pad = size - start.len() - "\r\n\r\n".len();
        format!("{start}{}\r\n\r\n", "a".repeat(pad))
    };
    const MAX: usize = 64 * 1024;
    for size in [MAX - 1, MAX, MAX + 1, MAX + 2048, MAX + 40_000] {
        for (path, first, method, ok) in [
            ("lean", None, "GET", 200),
            // Behind a body that grew the read buffer past the limit.
            ("lean, behind a POST's body", Some("POST"), "GET", 200),
            ("hyper after a PUT", Some("PUT"), "GET", 200),
            ("hyper from the start", None, "PUT", 405),
        ] {
            let request = head(method, size);
            assert_eq!(request.len(), size);
            let mut raw = Raw::connect(c.hark.addr).await;
            match first {
                Some("POST") => {
                    let body = "x".repeat(60_000);
                    let post = format!(
                        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    raw.send(format!("{post}{request}").as_bytes()).await;
                    let (answer, _) = raw.answer().await;
                    assert_eq!(status_of(&answer), 405, "{answer}");
                }
                Some(first) => {
                    let first = format!("{first} /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
                    raw.send(first.as_bytes()).await;
                    raw.answer().await;
                    raw.send(request.as_bytes()).await;
                }
                None => raw.send(request.as_bytes()).await,
            }
            let (answer, _) = raw.answer().await;
            let want = if size <= MAX { ok } else { 431 };
            assert_eq!(status_of(&answer), want, "{size} bytes, {path}: {answer}");
        }
    }
}

#[tokio::test]
async fn over_the_connection_limit_is_503_with_retry_after() {
    let c = chat(&[("HARK_MAX_CONNECTIONS", "1"), ("HARK_CORS_ORIGINS", ORIGIN)]).await;
    let held = held_connection(&c.hark).await;
    let (s, h, b) = try_request(
        Method::GET,
        &c.hark.url("/healthz"),
        None,
        None,
        &[("Origin", ORIGIN)],
    )
    .await
    .expect("answered");
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(h.contains_key("retry-after"));
    // A browser can read it: the 503 carries CORS like any other answer.
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    drop(held);
    eventually("the slot is free again", || async {
        request(Method::GET, &c.hark.url("/healthz"), None, None)
            .await
            .0
            == StatusCode::OK
    })
    .await;
}

// ------------------------------------------------------- hostile requests

#[tokio::test]
async fn bad_input_is_never_a_server_error() {
    let c = chat(&[]).await;
    let t = token(c.alice);
    let room = c.room;
    let deep = format!("{}1{}", "{\"a\":".repeat(2000), "}".repeat(2000));
    let posts: Vec<(String, String)> = vec![
        (
            "/api/chat/messages/".into(),
            json!({"room_id": i64::MAX, "content": "x"}).to_string(),
        ),
        (
            "/api/chat/messages/".into(),
            json!({"room_id": room, "content": "\u{202e}\u{fffd}".repeat(100)}).to_string(),
        ),
        (
            "/api/chat/messages/".into(),
            r#"{"room_id": 1, "content": "\ud800"}"#.into(),
        ),
        ("/api/chat/messages/".into(), deep.clone()),
        (
            "/api/chat/messages/".into(),
            r#"{"room_id": 1, "room_id": "x", "content": "dup"}"#.into(),
        ),
        (format!("/api/chat/rooms/{room}/typing/"), deep),
        (
            "/api/chat/rooms/999999999999999999/typing/".into(),
            r#"{"is_typing": true}"#.into(),
        ),
        (
            "/api/chat/rooms/999999999999999999/read/".into(),
            "{}".into(),
        ),
    ];
    for (path, body) in &posts {
        let (s, _, b) = request(Method::POST, &c.hark.url(path), Some(&t), Some(body)).await;
        assert!(
            s.is_success() || s.is_client_error(),
            "POST {path} {body:.80}: {s}"
        );
        if !s.is_success() {
            assert_client_error(path, s, &b);
        }
    }
    for path in [
        "/api/chat/rooms/999999999999999999/".to_string(),
        "/api/chat/messages/poll/".to_string(),
        "/api/chat/messages/poll/?room_id=abc".to_string(),
        format!("/api/chat/messages/poll/?room_id={room}&since=%zz&timeout=0"),
        format!("/api/chat/messages/poll/?room_id={room}&since=not-a-cursor"),
        format!("/api/chat/messages/poll/?room_id={room}&limit=-1"),
        format!("/api/chat/messages/poll/?room_id={room}&timeout=1e9"),
    ] {
        let (s, _, b) = request(Method::GET, &c.hark.url(&path), Some(&t), None).await;
        assert_client_error(&path, s, &b);
    }
    // Headers that are not valid text.
    let resp = raw_http(
        &c.hark,
        b"GET /api/chat/rooms/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    // And the server is still healthy.
    assert_eq!(
        get(&c.hark, "/api/chat/rooms/", c.alice).await.0,
        StatusCode::OK
    );
}

// -------------------------------------------------------------------- logs

#[tokio::test]
async fn tokens_never_appear_in_the_logs() {
    let c = chat(&[]).await;
    let t = token(c.alice);
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(parts.len(), 3);
    let (s, _) = get_json(&c.hark.url("/api/chat/rooms/"), Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get_json(
        &c.hark
            .url(&format!("/api/chat/rooms/{}/?access_token={t}&x=1", c.room)),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let poll = format!(
        "/api/chat/messages/poll/?room_id={}&timeout=0&access_token={t}",
        c.room
    );
    let (s, _) = get_json(&c.hark.url(&poll), None).await;
    assert_eq!(s, StatusCode::OK);
    // Nor a token under a name hark does not read.
    for key in ["accessToken", "auth", "Access_Token"] {
        let url = c.hark.url(&format!("/healthz?{key}=Bearer%20{t}"));
        assert_eq!(
            request(Method::GET, &url, None, None).await.0,
            StatusCode::OK
        );
    }
    // A refused token is not logged either.
    let refused = format!("{}.{}.{}", parts[0], parts[1], "forgedsignature");
    let (s, _) = get_json(
        &c.hark
            .url(&format!("/api/chat/rooms/?access_token={refused}")),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    eventually("the request lines are logged", || async {
        c.hark.logs().contains("status=401")
    })
    .await;
    let logs = c.hark.logs();
    for secret in [t.as_str(), parts[1], parts[2], "forgedsignature"] {
        assert!(
            !logs.contains(secret),
            "a token part is in the log:\n{logs}"
        );
    }
    let line = |path: &str, status: &str| {
        logs.lines()
            .any(|l| l.contains("method=GET") && l.contains(path) && l.contains(status))
    };
    assert!(line("path=/api/chat/rooms/ ", "status=200"), "{logs}");
    assert!(
        line(&format!("path=/api/chat/rooms/{}/?", c.room), "status=200"),
        "{logs}"
    );
    assert!(
        line("path=/api/chat/messages/poll/?", "status=200"),
        "{logs}"
    );
    assert!(line("path=/api/chat/rooms/?", "status=401"), "{logs}");
    // A key hark does not read is left out, value and all.
    assert!(line("path=/healthz ", "status=200"), "{logs}");
}

/// A token put where hark does not look for it — after a `;`, inside an
/// encoded key, behind another key, in the path, as the method, as the
/// value of a key hark reads — is kept out of the log too, in both log
/// formats and on both connection paths (each request the first on its
/// connection, then after a `PUT`, which hands the connection to hyper).
#[tokio::test]
async fn tokens_in_any_encoding_stay_out_of_the_logs_on_both_paths() {
    let t = token(1);
    let parts: Vec<&str> = t.split('.').collect();
    let targets = [
        (
            format!("/api/chat/rooms/?x=1;access_token={t}"),
            "/api/chat/rooms/",
        ),
        (
            format!("/api/chat/rooms/?access_token%3D{t}"),
            "/api/chat/rooms/",
        ),
        (format!("/api/chat/rooms/?x=Bearer:{t}"), "/api/chat/rooms/"),
        (format!("/api/chat/rooms/{t}/"), "/api/chat/rooms/REDACTED/"),
        (
            format!("/api/chat/messages/poll/?room_id=1&since={t}&access_token={t}"),
            "/api/chat/messages/poll/?room_id=1&since=REDACTED&access_token=REDACTED",
        ),
    ];
    for format in ["text", "json"] {
        let (hark, _fx) = setup(&[("HARK_LOG_FORMAT", format)]).await;
        let mut sent = 0;
        for first in [None, Some("PUT /api/chat/messages/")] {
            let mut requests: Vec<String> = targets
                .iter()
                .map(|(target, _)| format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"))
                .collect();
            // hyper takes any token for a method.
            requests.push(format!("{t} /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
            for request in requests {
                let mut raw = Raw::connect(hark.addr).await;
                if let Some(first) = first {
                    raw.send(format!("{first} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                        .await;
                    raw.answer().await;
                }
                raw.send(request.as_bytes()).await;
                let (head, _) = raw.answer().await;
                assert!(
                    [" 400 ", " 401 ", " 404 ", " 405 "]
                        .iter()
                        .any(|s| head.contains(s)),
                    "{request}: {head}"
                );
                sent += 1;
            }
        }
        eventually("every request is logged", || async {
            hark.logs().matches("hark::request").count() >= sent
        })
        .await;
        let logs = hark.logs();
        for secret in [t.as_str(), parts[1], parts[2]] {
            assert!(
                !logs.contains(secret),
                "{format}: a token part is logged:\n{logs}"
            );
        }
        for (_, logged) in &targets {
            let lines = logs
                .lines()
                .filter(|l| {
                    l.contains(&format!("path={logged} "))
                        || l.contains(&format!("\"path\":\"{logged}\""))
                })
                .count();
            let sent = targets.iter().filter(|(_, l)| l == logged).count();
            assert_eq!(lines, 2 * sent, "{format}: {logged} on both paths:\n{logs}");
        }
        assert!(logs.contains("OTHER"), "{format}: the odd method:\n{logs}");
    }
}

/// `HARK_LOG_FORMAT=json`: every line hark logs is one JSON object, a
/// request's line carries its fields at the top level, and tokens stay out.
#[tokio::test]
async fn json_logs_are_one_object_per_line_without_tokens() {
    let c = chat(&[("HARK_LOG_FORMAT", "json")]).await;
    let t = token(c.alice);
    let poll = format!(
        "/api/chat/messages/poll/?room_id={}&timeout=0&access_token={t}",
        c.room
    );
    let (s, _) = get_json(&c.hark.url(&poll), None).await;
    assert_eq!(s, StatusCode::OK);
    eventually("the request line is logged", || async {
        c.hark.logs().contains("\"hark::request\"")
    })
    .await;
    let logs = c.hark.logs();
    assert!(!logs.contains(&t), "the token is in the log:\n{logs}");
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["message"] == "listening"), "{logs}");
    let is_poll = |l: &&Value| {
        l["target"] == "hark::request"
            && l["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/api/chat/messages/poll/?"))
    };
    let req = lines
        .iter()
        .find(is_poll)
        .unwrap_or_else(|| panic!("no line for the poll:\n{logs}"));
    assert_eq!(req["level"], "INFO", "{req}");
    assert_eq!(req["method"], "GET", "{req}");
    assert_eq!(req["status"], 200, "{req}");
    assert!(req["ms"].is_f64(), "{req}");
    assert!(
        req["path"]
            .as_str()
            .unwrap()
            .contains("access_token=REDACTED"),
        "{req}"
    );
}

/// A log filter or format that does not parse stops hark at start with
/// clap's message, rather than logging at some other level.
#[test]
fn a_bad_log_setting_is_refused_at_start() {
    for (var, value) in [
        ("HARK_LOG", "info,hark=nonsense"),
        ("HARK_LOG", "[{"),
        ("HARK_LOG_FORMAT", "xml"),
    ] {
        assert_refused_at_start(var, value);
    }
}

// ------------------------------------------------------------------ --help

#[test]
fn help_lists_every_setting_with_its_default() {
    let out = std::process::Command::new(HARK)
        .arg("--help")
        .env_clear()
        .output()
        .expect("run hark --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // One block per option: its flag line and its description.
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        if line.trim_start().starts_with('-') {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    let block = |var: &str| {
        blocks
            .iter()
            .find(|b| b.contains(&format!("[env: {var}")))
            .unwrap_or_else(|| panic!("{var} is not in --help:\n{help}"))
            .clone()
    };
    for (var, default) in [
        ("HARK_BIND", Some("127.0.0.1:8080")),
        ("HARK_TYPING_TTL_MS", Some("5000")),
        ("HARK_PING_INTERVAL_MS", Some("15000")),
        ("HARK_POLL_TIMEOUT_DEFAULT_S", Some("25")),
        ("HARK_POLL_TIMEOUT_MAX_S", Some("60")),
        ("HARK_POLL_LIMIT_MAX", Some("1000")),
        ("HARK_MAX_CONTENT_CHARS", Some("10000")),
        ("HARK_MAX_BODY_BYTES", Some("65536")),
        ("HARK_WRITE_RATE", Some("10")),
        ("HARK_WRITE_BURST", Some("30")),
        ("HARK_MAX_STREAMS_PER_USER", Some("100")),
        ("HARK_LOG", Some("info")),
        ("HARK_LOG_FORMAT", Some("text")),
        ("HARK_STREAM_BACKLOG", None),
        ("HARK_MAX_CONNECTIONS", None),
        ("HARK_DATA_DIR", None),
    ] {
        let b = block(var);
        match default {
            Some(d) => assert!(b.contains(&format!("[default: {d}]")), "{var}:\n{b}"),
            None => assert!(b.contains("[default: "), "{var} has no default:\n{b}"),
        }
    }
    // The settings whose default is "unset" say what unset means.
    for (var, unset) in [
        ("DATABASE_URL", "embedded"),
        ("HARK_JWT_SECRET", "Unset"),
        ("HARK_CORS_ORIGINS", "Unset"),
    ] {
        let b = block(var);
        assert!(b.contains(unset), "{var}:\n{b}");
    }
    // Each is a flag as well.
    for flag in [
        "--database-url",
        "--bind",
        "--jwt-secret",
        "--typing-ttl-ms",
        "--max-body-bytes",
        "--cors-origins",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
}

/// Under an open-file limit lower than HARK_MAX_CONNECTIONS hark caps the
/// connections below it (and says so), so a client past the cap gets the
/// 503 rather than waiting unanswered while accept() fails with EMFILE.
#[tokio::test]
async fn the_connection_limit_is_capped_by_the_open_file_limit() {
    let dir = std::env::temp_dir().join(format!("hark-nofile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("hark-256-files");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nexec prlimit --nofile=256:256 {HARK} \"$@\"\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = fresh_db().await;
    let hark = Hark::launch(
        Launch::new(&script, &db).env(&[("HARK_LOG", "info"), ("HARK_MAX_CONNECTIONS", "10000")]),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    hark.wait_ready().await;
    assert!(
        hark.logs().contains("more than the open-file limit allows"),
        "{}",
        hark.logs()
    );
    // More kept-alive clients than 256 descriptors could carry: those
    // within the cap are answered and kept, the rest get a 503 and closed.
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut c = tokio::net::TcpStream::connect(hark.addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: hark\r\n\r\n")
            .await
            .unwrap();
        idle.push(c);
    }
    // Past the cap: answered at once with a 503, not left in the queue.
    let (s, h, b) = tokio::time::timeout(
        Duration::from_secs(5),
        request(Method::GET, &hark.url("/healthz"), None, None),
    )
    .await
    .expect("a client past the cap was left waiting");
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(h.contains_key("retry-after"));
    drop(idle);
    let _ = std::fs::remove_dir_all(&dir);
}
