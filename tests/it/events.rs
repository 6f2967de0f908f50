//! GET /events over real HTTP against the real binary and a real
//! PostgreSQL: the stream's opening, message and typing events, resuming
//! with Last-Event-ID (also mid-batch and from poll cursors), resets, room
//! selection and membership changes, a lost LISTEN connection, errors and
//! auth, a stream ending when its token expires, CORS, pings, HEAD, the
//! slow-reader cut with a lossless resume (and no cut for a reader that
//! keeps up), shutdown, and the open-streams gauge.
//!
//! The client is the kit's `sse::Sse` (`kit/src/sse.rs`): a raw TCP SSE client that reads only when
//! asked, so a test can stop reading.

use std::time::Duration;

use crate::kit::sse::{open, Next, Opts, Sse};
use crate::kit::*;
use hark::cursor::{Cursor, Position, Snapshot};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

/// A generous bound for anything the server should do "at once".
const T: Duration = Duration::from_secs(10);

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Opens `/events{query}` as the holder of `token` (Authorization header).
async fn connect(hark: &Hark, query: &str, token: &str) -> Sse {
    let auth = bearer(token);
    Sse::connect(
        hark.addr,
        &format!("/events{query}"),
        &[("Authorization", &auth)],
    )
    .await
}

/// Opens a stream and reads `retry` and `ready`; returns it and ready's cursor.
async fn opened(hark: &Hark, query: &str, token: &str) -> (Sse, String) {
    let mut s = connect(hark, query, token).await;
    let (reset, ready) = open(&mut s).await;
    assert_eq!(reset, None, "a fresh stream is not reset");
    let cursor = ready.id.unwrap();
    (s, cursor)
}

/// The next non-ping event, which must be a message: (its id, the Message).
async fn expect_message(s: &mut Sse) -> (String, Value) {
    let ev = s.expect(T).await;
    assert_eq!(ev.kind(), "message", "expected a message event, got {ev:?}");
    assert_eq!(ev.data_lines, 1, "a Message is one line of JSON: {ev:?}");
    let id = ev
        .id
        .clone()
        .unwrap_or_else(|| panic!("message event without id: {ev:?}"));
    Cursor::decode(&id).unwrap_or_else(|e| panic!("message id {id:?} is not a cursor: {e:?}"));
    (id, ev.json())
}

/// Reads `n` message events; returns (ids, message ids).
async fn messages(s: &mut Sse, n: usize) -> (Vec<String>, Vec<i64>) {
    let mut cursors = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let (c, m) = expect_message(s).await;
        cursors.push(c);
        ids.push(m["id"].as_i64().unwrap());
    }
    (cursors, ids)
}

/// Message ids until (and including) `last`, bounded.
async fn message_ids_until(s: &mut Sse, last: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    loop {
        let (_, m) = expect_message(s).await;
        let id = m["id"].as_i64().unwrap();
        ids.push(id);
        if id == last {
            return ids;
        }
        assert!(ids.len() < 100, "{last} never arrived: {ids:?}");
    }
}

/// The next non-ping event, which must be a typing event.
async fn expect_typing(s: &mut Sse) -> Value {
    let ev = s.expect(T).await;
    assert_eq!(ev.kind(), "typing", "expected a typing event, got {ev:?}");
    assert_eq!(ev.id, None, "typing events carry no id: {ev:?}");
    assert_eq!(ev.data_lines, 1, "{ev:?}");
    ev.json()
}

fn typing_json(room: i64, user: &Value, on: bool) -> Value {
    json!({"room": room, "user": user, "is_typing": on})
}

/// The User object of a Fixture user (`initcap(name)`, `Test`).
fn user_json(id: i64, name: &str) -> Value {
    let mut first = name.to_string();
    first[..1].make_ascii_uppercase();
    json!({"id": id, "username": name, "first_name": first, "last_name": "Test"})
}

/// The `n` message ids due after `since`, by long polls that follow their
/// cursor; then a `timeout=0` poll must find nothing more.
async fn poll_ids(hark: &Hark, room: i64, since: &str, token: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut cursor = since.to_string();
    let mut polls = 0;
    loop {
        let timeout = if ids.len() < n { 5 } else { 0 };
        let (s, body) = get_json(
            &poll_url(
                hark,
                room,
                Some(&cursor),
                &format!("&timeout={timeout}&limit=1000"),
            ),
            Some(token),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let page: Vec<i64> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_i64().unwrap())
            .collect();
        if timeout == 0 && body["has_more"] != true {
            assert_eq!(page, Vec::<i64>::new(), "more than {n} due after {ids:?}");
            return ids;
        }
        ids.extend(page);
        cursor = body["cursor"].as_str().unwrap().to_string();
        polls += 1;
        assert!(polls < 20, "only {ids:?} of {n} after {polls} polls");
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// hark with alice, bob and carol in one room.
type Room3 = Chat;

async fn room_of_three(env: &[(&str, &str)]) -> Room3 {
    Chat::start(env, "r", true).await
}

// ---- opening -------------------------------------------------------------

#[tokio::test]
async fn stream_opens_with_headers_retry_then_ready_at_the_current_position() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let old = fx.insert(room, bob, "before the stream").await;
    let t = token(alice);

    let mut s = connect(&hark, &format!("?room_id={room}"), &t).await;
    assert_eq!(s.status, 200);
    let ct = s.header("content-type").expect("content-type");
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert_eq!(s.header("cache-control"), Some("no-cache"));
    assert_eq!(s.header("x-accel-buffering"), Some("no"));

    let first = s.expect_event(T).await;
    assert!(
        first.retry.is_some_and(|ms| ms > 0),
        "first a retry: {first:?}"
    );
    assert_eq!((first.event.as_deref(), first.data_lines), (None, 0));
    let ready = s.expect_event(T).await;
    assert_eq!(ready.kind(), "ready", "{ready:?}");
    let cursor = ready.id.clone().expect("ready has an id");
    assert_eq!(ready.json(), json!({ "cursor": cursor }));
    let decoded = Cursor::decode(&cursor).expect("ready's id is a cursor");
    assert!(matches!(decoded.position, Position::At(_)), "{decoded:?}");

    // A fresh stream is at the current position: history is not replayed,
    // and a poll from ready's cursor has nothing due.
    assert_eq!(
        poll_ids(&hark, room, &cursor, &t, 0).await,
        Vec::<i64>::new()
    );
    let new = fx.insert(room, bob, "after the stream").await;
    let (_, m) = expect_message(&mut s).await;
    assert_eq!(m["id"], new, "not the older {old}");
}

// ---- messages --------------------------------------------------------------

#[tokio::test]
async fn message_events_for_plain_sql_inserts_and_api_posts() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let (ta, tb) = (token(alice), token(bob));
    let (mut s, ready) = opened(&hark, &format!("?room_id={room}"), &ta).await;

    let a = fx.insert(room, bob, "plain sql").await;
    let (id_a, ma) = expect_message(&mut s).await;
    assert_eq!(ma["id"], a);
    assert_eq!(ma["room"], room);
    assert_eq!(ma["content"], "plain sql");
    assert_eq!(ma["sender"], user_json(bob, "bob"));
    let created = ma["created_at"].as_str().expect("created_at");
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok() && created.ends_with('Z'),
        "{created}"
    );

    // Through the API (content with a newline: still one data line).
    let posted = post_message(&hark, room, &tb, "via the api\nsecond line").await;
    let (id_b, mb) = expect_message(&mut s).await;
    assert_eq!(
        mb, posted,
        "the event carries the Message the POST answered"
    );

    // The reader's own messages reach the reader's stream too.
    let own = post_message(&hark, room, &ta, "from alice herself").await;
    let (id_c, mc) = expect_message(&mut s).await;
    assert_eq!(mc, own);

    // Every id differs and each one is a `since` for the long poll.
    assert!(id_a != id_b && id_b != id_c && id_a != ready);
    let (b, c) = (posted["id"].as_i64().unwrap(), own["id"].as_i64().unwrap());
    assert_eq!(poll_ids(&hark, room, &ready, &ta, 3).await, vec![a, b, c]);
    assert_eq!(poll_ids(&hark, room, &id_a, &ta, 2).await, vec![b, c]);
    assert_eq!(poll_ids(&hark, room, &id_b, &ta, 1).await, vec![c]);
    assert_eq!(
        poll_ids(&hark, room, &id_c, &ta, 0).await,
        Vec::<i64>::new()
    );
}

// ---- typing ----------------------------------------------------------------

#[tokio::test]
async fn typing_start_and_stop_reach_others_but_never_the_typist() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        carol,
        room,
    } = room_of_three(&[]).await;
    let (ta, tb) = (token(alice), token(bob));
    let q = format!("?room_id={room}");
    let (mut sa, _) = opened(&hark, &q, &ta).await;
    let (mut sb, _) = opened(&hark, &q, &tb).await;
    let bob_user = user_json(bob, "bob");

    set_typing(&hark, room, &tb, true).await;
    assert_eq!(
        expect_typing(&mut sa).await,
        typing_json(room, &bob_user, true)
    );
    // A repeated true inside the window only extends it: no event.
    set_typing(&hark, room, &tb, true).await;
    set_typing(&hark, room, &tb, false).await;
    assert_eq!(
        expect_typing(&mut sa).await,
        typing_json(room, &bob_user, false)
    );
    // A false for someone not typing says nothing either.
    set_typing(&hark, room, &tb, false).await;

    let marker = fx.insert(room, carol, "marker").await;
    let (_, m) = expect_message(&mut sa).await;
    assert_eq!(m["id"], marker, "nothing between the stop and the marker");
    // bob's own stream saw none of his typing.
    let (_, m) = expect_message(&mut sb).await;
    assert_eq!(m["id"], marker, "the typist got his own typing events");

    // Sending a message clears the sender's typing: a stop, and the message.
    set_typing(&hark, room, &tb, true).await;
    assert_eq!(
        expect_typing(&mut sa).await,
        typing_json(room, &bob_user, true)
    );
    let sent = post_message(&hark, room, &tb, "done typing").await;
    let mut got = vec![sa.expect(T).await, sa.expect(T).await];
    got.sort_by_key(|e| e.kind().to_string());
    assert_eq!(got[0].kind(), "message", "{got:?}");
    assert_eq!(got[0].json(), sent);
    assert_eq!(got[1].kind(), "typing", "{got:?}");
    assert_eq!(got[1].json(), typing_json(room, &bob_user, false));
    let (_, m) = expect_message(&mut sb).await;
    assert_eq!(m, sent, "the typist sees only the message");
}

#[tokio::test]
async fn a_new_stream_starts_with_who_is_typing_now() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        carol,
        room,
    } = room_of_three(&[("HARK_TYPING_TTL_MS", "60000")]).await;
    let dave = fx.user("dave").await;
    // A room of alice's where nobody types.
    let quiet = fx.room("quiet", &[alice, dave]).await;
    let (ta, tb, tc) = (token(alice), token(bob), token(carol));
    // A stream open before the typing starts: once it has seen both, hark
    // has heard them (see `a_typing_start_heard_late_is_not_repeated`).
    let (mut probe, _) = opened(&hark, &format!("?room_id={room}"), &ta).await;
    set_typing(&hark, room, &tb, true).await;
    set_typing(&hark, room, &tc, true).await;
    expect_typing(&mut probe).await;
    expect_typing(&mut probe).await;
    drop(probe);
    let expected_for = |me: i64| -> Vec<Value> {
        let mut v = Vec::new();
        if me != bob {
            v.push(typing_json(room, &user_json(bob, "bob"), true));
        }
        if me != carol {
            v.push(typing_json(room, &user_json(carol, "carol"), true));
        }
        v
    };

    for (me, tok, query) in [
        (alice, &ta, format!("?room_id={room}")),
        (alice, &ta, String::new()),
        (alice, &ta, format!("?room_id={quiet}&room_id={room}")),
        (bob, &tb, format!("?room_id={room}")),
        (carol, &tc, String::new()),
    ] {
        let (mut s, _) = opened(&hark, &query, tok).await;
        let expected = expected_for(me);
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(expect_typing(&mut s).await);
        }
        got.sort_by_key(|v| v["user"]["id"].as_i64());
        assert_eq!(got, expected, "user {me} {query}");
        let marker = fx.insert(room, dave, "marker").await;
        let (_, m) = expect_message(&mut s).await;
        assert_eq!(m["id"], marker, "user {me} {query}: only those typists");
    }

    // Only the quiet room: nobody is typing there.
    let (mut s, _) = opened(&hark, &format!("?room_id={quiet}"), &ta).await;
    let marker = fx.insert(quiet, dave, "quiet marker").await;
    let (_, m) = expect_message(&mut s).await;
    assert_eq!(m["id"], marker);
}

/// The start of a typist who began just before the stream opened, heard by
/// hark only after the stream took its list of who is typing now, is not
/// sent a second time. A burst of NOTIFYs ahead of it (a busy database)
/// makes hark hear it late.
#[tokio::test]
async fn a_typing_start_heard_late_is_not_repeated() {
    const NOISE: u32 = 200_000;
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        carol,
        room,
    } = room_of_three(&[("HARK_TYPING_TTL_MS", "60000")]).await;
    let (ta, tb) = (token(alice), token(bob));
    fx.db
        .execute(
            "SELECT count(pg_notify('hark', json_build_object('k', 'noise', 'n', g)::text)) \
             FROM generate_series(1, $1::int4) g",
            &[&(NOISE as i32)],
        )
        .await
        .unwrap();
    set_typing(&hark, room, &tb, true).await;
    let (mut s, _) = opened(&hark, &format!("?room_id={room}"), &ta).await;
    // Three participant rows, the noise, the typing start.
    let all_heard = f64::from(3 + NOISE + 1);
    if hark.metric("hark_notifications_total").await >= all_heard {
        eprintln!("note: hark heard the start before the stream opened; the race was not hit");
    }
    assert!(
        hark.metric_reaches(
            "hark_notifications_total",
            all_heard,
            Duration::from_secs(30)
        )
        .await
    );
    // Now the start has been heard (and any repeat of it queued): a marker
    // inserted now ends what the stream has to say about it.
    let marker = fx.insert(room, carol, "marker").await;
    let mut typing = Vec::new();
    loop {
        let ev = s.expect(T).await;
        match ev.kind() {
            "typing" => typing.push(ev.json()),
            "message" if ev.json()["id"] == marker => break,
            _ => panic!("unexpected {ev:?}"),
        }
    }
    assert_eq!(
        typing,
        vec![typing_json(room, &user_json(bob, "bob"), true)],
        "one typing event per typist"
    );
}

#[tokio::test]
async fn typing_expiry_emits_one_stop() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        carol,
        room,
    } = room_of_three(&[("HARK_TYPING_TTL_MS", "300")]).await;
    let (ta, tb) = (token(alice), token(bob));
    let q = format!("?room_id={room}");
    let (mut sa, _) = opened(&hark, &q, &ta).await;
    let (mut sb, _) = opened(&hark, &q, &tb).await;
    let bob_user = user_json(bob, "bob");

    for round in 0..2 {
        set_typing(&hark, room, &tb, true).await;
        assert_eq!(
            expect_typing(&mut sa).await,
            typing_json(room, &bob_user, true),
            "round {round}"
        );
        // Expiry: one false, bounded wait.
        assert_eq!(
            expect_typing(&mut sa).await,
            typing_json(room, &bob_user, false),
            "round {round}"
        );
        // And not a second one: give a duplicate five TTLs to show up.
        sa.expect_quiet(Duration::from_millis(1500)).await;
        let marker = fx.insert(room, carol, "marker").await;
        let (_, m) = expect_message(&mut sa).await;
        assert_eq!(m["id"], marker);
        let (_, m) = expect_message(&mut sb).await;
        assert_eq!(m["id"], marker, "the typist saw his own typing");
    }
    // After expiry the rooms list agrees: nobody is typing.
    let (s, r) = get_json(&hark.url(&format!("/api/chat/rooms/{room}/")), Some(&ta)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["typing_user"], Value::Null, "{r}");
}

// ---- resume ----------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Via {
    Header,
    Query,
}

async fn resume(hark: &Hark, query: &str, token: &str, last: &str, via: Via) -> (Sse, Opening) {
    let auth = bearer(token);
    let mut s = match via {
        Via::Header => {
            Sse::connect(
                hark.addr,
                &format!("/events{query}"),
                &[("Authorization", &auth), ("Last-Event-ID", last)],
            )
            .await
        }
        Via::Query => {
            let sep = if query.is_empty() { "?" } else { "&" };
            Sse::connect(
                hark.addr,
                &format!("/events{query}{sep}last_event_id={}", enc(last)),
                &[("Authorization", &auth)],
            )
            .await
        }
    };
    let (reset, ready) = open(&mut s).await;
    (s, Opening { reset, ready })
}

/// A stream resumed far behind writes its catch-up a budget at a time
/// (`HARK_MAX_ANSWER_BYTES`), from memory or from the database, and every
/// message arrives once, in order, the one larger than the budget too.
#[tokio::test]
async fn a_catch_up_larger_than_the_answer_budget_arrives_whole_and_once() {
    for ring in ["256", "1"] {
        let Room3 {
            hark,
            fx,
            alice,
            bob,
            room,
            ..
        } = room_of_three(&[("HARK_MAX_ANSWER_BYTES", "4096"), ("HARK_HUB_RING", ring)]).await;
        let t = token(alice);
        let (mut live, start) = opened(&hark, &format!("?room_id={room}"), &t).await;
        let mut expected = fx.insert_many(room, bob, 20, &"x".repeat(1000)).await;
        expected.push(fx.insert(room, bob, &"y".repeat(3 * 4096)).await);
        expected.push(fx.insert(room, bob, "last").await);
        let last = *expected.last().unwrap();
        assert_eq!(
            message_ids_until(&mut live, last).await,
            expected,
            "ring {ring}: live"
        );
        let (mut resumed, _) =
            resume(&hark, &format!("?room_id={room}"), &t, &start, Via::Header).await;
        assert_eq!(
            message_ids_until(&mut resumed, last).await,
            expected,
            "ring {ring}: resumed"
        );
    }
}

struct Opening {
    reset: Option<String>,
    ready: sse::Event,
}

async fn resume_case(via: Via, all_rooms: bool) {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let t = token(alice);
    let q = if all_rooms {
        String::new()
    } else {
        format!("?room_id={room}")
    };
    let (mut s, _) = opened(&hark, &q, &t).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(fx.insert(room, bob, &format!("seen {i}")).await);
    }
    let (cursors, ids) = messages(&mut s, 3).await;
    assert_eq!(ids, sent);
    drop(s);

    let mut missed = Vec::new();
    for i in 0..3 {
        missed.push(fx.insert(room, bob, &format!("missed {i}")).await);
    }
    let last = &cursors[2];

    // A disconnect right after ready of a resumed stream loses nothing:
    // ready carries the cursor that was passed in.
    let (s2, opening) = resume(&hark, &q, &t, last, via).await;
    assert_eq!(opening.reset, None, "{via:?}: a valid cursor is not reset");
    assert_eq!(opening.ready.id.as_deref(), Some(last.as_str()), "{via:?}");
    drop(s2);

    let (mut s3, opening) = resume(&hark, &q, &t, last, via).await;
    assert_eq!(opening.reset, None);
    assert_eq!(opening.ready.id.as_deref(), Some(last.as_str()));
    let (_, replayed) = messages(&mut s3, 3).await;
    assert_eq!(
        replayed, missed,
        "{via:?}: exactly the missed messages, in order"
    );
    let live = fx.insert(room, bob, "live").await;
    let (_, m) = expect_message(&mut s3).await;
    assert_eq!(
        m["id"], live,
        "{via:?}: then live, with no duplicate between"
    );
}

#[tokio::test]
async fn resume_with_last_event_id_header() {
    resume_case(Via::Header, false).await;
}

#[tokio::test]
async fn resume_with_last_event_id_query_parameter_on_an_all_rooms_stream() {
    resume_case(Via::Query, true).await;
}

#[tokio::test]
async fn resume_from_the_middle_of_a_batch() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let t = token(alice);
    let q = format!("?room_id={room}");
    let (mut s, _) = opened(&hark, &q, &t).await;
    let batch = fx.insert_many(room, bob, 5, "batch ").await;
    let (cursors, ids) = messages(&mut s, 2).await;
    assert_eq!(ids, batch[..2]);
    drop(s);
    let later = fx.insert_many(room, bob, 2, "later ").await;

    // The mid-batch id is a valid `since` for the poll as well.
    let mut rest: Vec<i64> = batch[2..].to_vec();
    rest.extend(&later);
    assert_eq!(
        poll_ids(&hark, room, &cursors[1], &t, rest.len()).await,
        rest
    );

    let (mut s2, opening) = resume(&hark, &q, &t, &cursors[1], Via::Header).await;
    assert_eq!(opening.reset, None);
    assert_eq!(opening.ready.id.as_deref(), Some(cursors[1].as_str()));
    let (c2, got) = messages(&mut s2, 5).await;
    assert_eq!(
        got, rest,
        "exactly the rest of the batch, then the later one"
    );
    let live = fx.insert(room, bob, "live").await;
    let (_, m) = expect_message(&mut s2).await;
    assert_eq!(m["id"], live);
    drop(s2);

    // Resuming inside the rest of the batch works the same way.
    let (mut s3, _) = resume(&hark, &q, &t, &c2[0], Via::Header).await;
    let (_, got) = messages(&mut s3, 5).await;
    let mut expected = rest[1..].to_vec();
    expected.push(live);
    assert_eq!(got, expected);
}

/// Any cursor hark issued resumes a stream: a poll's, and a poll's page
/// of an ISO-timestamp `since` (a batch measured by creation time).
#[tokio::test]
async fn resume_from_cursors_issued_by_the_long_poll() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let t = token(alice);
    let q = format!("?room_id={room}");
    let (s, body) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    let at = body["cursor"].as_str().unwrap().to_string();
    let since = chrono::Utc::now() - chrono::Duration::seconds(60);
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let sent = fx.insert_many(room, bob, 5, "m").await;

    let (mut s1, opening) = resume(&hark, &q, &t, &at, Via::Header).await;
    assert_eq!(opening.reset, None);
    assert_eq!(messages(&mut s1, 5).await.1, sent);
    drop(s1);

    let (s, page) = get_json(
        &poll_url(&hark, room, Some(&since), "&limit=2&timeout=0"),
        Some(&t),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let first: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        (first.as_slice(), &page["has_more"]),
        (&sent[..2], &json!(true))
    );
    let paging = page["cursor"].as_str().unwrap().to_string();
    let (mut s2, opening) = resume(&hark, &q, &t, &paging, Via::Header).await;
    assert_eq!(opening.reset, None);
    assert_eq!(opening.ready.id.as_deref(), Some(paging.as_str()));
    assert_eq!(messages(&mut s2, 3).await.1, sent[2..]);
    let live = fx.insert(room, bob, "live").await;
    assert_eq!(expect_message(&mut s2).await.1["id"], live);
}

// ---- reset -----------------------------------------------------------------

#[tokio::test]
async fn an_unusable_last_event_id_gets_reset_then_ready_then_live() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let t = token(alice);
    let q = format!("?room_id={room}");
    fx.insert(room, bob, "history").await;
    let (_, real) = opened(&hark, &q, &t).await;
    let real_cursor = Cursor::decode(&real).unwrap();

    let mut foreign = real_cursor.clone();
    foreign.origin.system_id ^= 0x5a5a;
    let Position::At(snap) = &real_cursor.position else {
        panic!("ready is At: {real_cursor:?}")
    };
    let ahead = snap.xmax + 1_000_000;
    let future = Cursor {
        origin: real_cursor.origin,
        position: Position::At(std::sync::Arc::new(
            Snapshot::new(ahead, ahead, vec![]).unwrap(),
        )),
    };
    let cases = [
        ("garbage header", Via::Header, "not-a-cursor!".to_string()),
        ("garbage query", Via::Query, "garbage!!".to_string()),
        (
            "iso timestamp",
            Via::Header,
            "2026-01-15T10:00:00Z".to_string(),
        ),
        ("another database", Via::Header, foreign.encode()),
        ("another database, query", Via::Query, foreign.encode()),
        ("the database's future", Via::Header, future.encode()),
    ];
    for (name, via, last) in cases {
        let (mut s, opening) = resume(&hark, &q, &t, &last, via).await;
        let reset = opening
            .reset
            .unwrap_or_else(|| panic!("{name}: no reset before ready"));
        let decoded = Cursor::decode(&reset).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(decoded.origin, real_cursor.origin, "{name}");
        // The stream goes on live from the current position.
        assert_eq!(opening.ready.id.as_deref(), Some(reset.as_str()), "{name}");
        assert_eq!(
            poll_ids(&hark, room, &reset, &t, 0).await,
            Vec::<i64>::new()
        );
        let live = fx.insert(room, bob, name).await;
        let (_, m) = expect_message(&mut s).await;
        assert_eq!(m["id"], live, "{name}: no history replayed, then live");
    }
}

// ---- rooms -----------------------------------------------------------------

#[tokio::test]
async fn one_room_several_rooms_all_rooms_and_membership_changes() {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let r1 = fx.room("r1", &[alice, bob]).await;
    let r2 = fx.room("r2", &[alice, bob]).await;
    let r3 = fx.room("r3", &[alice, bob]).await;
    let r4 = fx.room("r4", &[bob]).await;
    let t = token(alice);

    let (mut s1, _) = opened(&hark, &format!("?room_id={r1}"), &t).await;
    let (mut s12, _) = opened(&hark, &format!("?room_id={r1}&room_id={r2}"), &t).await;
    let (mut sall, _) = opened(&hark, "", &t).await;
    let (mut sdup, _) = opened(&hark, &format!("?room_id={r1}&room_id={r1}"), &t).await;

    // Typing in a room that is not alice's reaches none of her streams.
    let tb = token(bob);
    set_typing(&hark, r4, &tb, true).await;
    set_typing(&hark, r4, &tb, false).await;

    let m1 = fx.insert(r1, bob, "r1").await;
    let m2 = fx.insert(r2, bob, "r2").await;
    let m3 = fx.insert(r3, bob, "r3").await;
    let _m4 = fx.insert(r4, bob, "r4, not alice's").await;
    let m5 = fx.insert(r1, bob, "r1 marker").await;
    assert_eq!(message_ids_until(&mut s1, m5).await, vec![m1, m5]);
    assert_eq!(message_ids_until(&mut s12, m5).await, vec![m1, m2, m5]);
    assert_eq!(message_ids_until(&mut sall, m5).await, vec![m1, m2, m3, m5]);
    assert_eq!(message_ids_until(&mut sdup, m5).await, vec![m1, m5]);

    // alice joins r4 (plain SQL): the all-rooms stream follows.
    fx.join(r4, alice).await;
    let m6 = fx.insert(r4, bob, "r4, now alice's").await;
    let (_, m) = expect_message(&mut sall).await;
    assert_eq!(m["id"], m6);
    assert_eq!(m["room"], r4);

    // She leaves: r4's messages and typing stop (the next event of every
    // stream is the r1 marker: expect_message fails on a typing event).
    fx.db
        .execute(
            "DELETE FROM chat_chatroom_participants WHERE chatroom_id = $1 AND user_id = $2",
            &[&r4, &alice],
        )
        .await
        .unwrap();
    set_typing(&hark, r4, &tb, true).await;
    let _m7 = fx.insert(r4, bob, "r4 after she left").await;
    let m8 = fx.insert(r1, bob, "r1 marker 2").await;
    for (name, s) in [("all", &mut sall), ("r1", &mut s1), ("r1+r2", &mut s12)] {
        let (_, m) = expect_message(s).await;
        assert_eq!(m["id"], m8, "{name}");
    }

    // Removed from a room a stream names: none of its messages any more
    // (the stream may end, or go on without them).
    fx.db
        .execute(
            "DELETE FROM chat_chatroom_participants WHERE chatroom_id = $1 AND user_id = $2",
            &[&r1, &alice],
        )
        .await
        .unwrap();
    let m9 = fx.insert(r1, bob, "r1 after she left").await;
    let m10 = fx.insert(r2, bob, "r2 marker").await;
    for (name, s) in [("r1", &mut s1), ("r1+r2", &mut s12), ("all", &mut sall)] {
        match s.next_non_ping(Duration::from_secs(3)).await {
            Next::Event(ev) => {
                assert_eq!(ev.kind(), "message", "{name}: {ev:?}");
                let id = ev.json()["id"].as_i64().unwrap();
                assert_ne!(id, m9, "{name}: a message of a room she left");
                assert_eq!(id, m10, "{name}");
            }
            Next::End | Next::Eof => assert_ne!(name, "all", "the all-rooms stream ended"),
            Next::Timeout => assert_eq!(name, "r1", "{name}: m10 never arrived"),
        }
    }
}

/// Alice leaves r1 while hark hears nothing of it (the participant NOTIFY
/// trigger disabled), as when that NOTIFY arrives late: the catch-up that
/// reads bob's next message reads the loss of access in the same snapshot,
/// so that message reaches none of her streams — the one naming r1 (parked
/// on hark's own HTTP, or on hyper's path) ends, the all-rooms stream goes
/// on with her other room.
#[tokio::test]
async fn a_leave_heard_late_still_keeps_the_next_message_from_every_stream() {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let r1 = fx.room("r1", &[alice, bob]).await;
    let r2 = fx.room("r2", &[alice, bob]).await;
    let t = token(alice);
    let auth = bearer(&t);
    let mut named = Vec::new();
    for first in [None, HYPER_FIRST] {
        let opts = Opts {
            first,
            ..Opts::default()
        };
        let path = format!("/events?room_id={r1}");
        let mut s = Sse::connect_with(hark.addr, &path, &[("Authorization", &auth)], opts).await;
        open(&mut s).await;
        named.push(s);
    }
    let (mut all, _) = opened(&hark, "", &t).await;
    // Each stream is live: it gets a message of r1.
    let m0 = fx.insert(r1, bob, "before").await;
    for s in named.iter_mut().chain([&mut all]) {
        assert_eq!(expect_message(s).await.1["id"], m0);
    }

    fx.db
        .batch_execute(
            "ALTER TABLE chat_chatroom_participants DISABLE TRIGGER hark_participant_changed",
        )
        .await
        .unwrap();
    fx.db
        .execute(
            "DELETE FROM chat_chatroom_participants WHERE chatroom_id = $1 AND user_id = $2",
            &[&r1, &alice],
        )
        .await
        .unwrap();
    let m1 = fx.insert(r1, bob, "after she left").await;
    for (i, s) in named.iter_mut().enumerate() {
        let (events, end) = s.drain(T).await;
        assert!(
            matches!(end, Next::End | Next::Eof),
            "stream {i} did not end: {end:?}"
        );
        assert!(
            events.iter().all(|e| e.is_ping()),
            "stream {i} got {events:?} (message {m1})"
        );
    }
    let m2 = fx.insert(r2, bob, "r2 marker").await;
    let (_, m) = expect_message(&mut all).await;
    assert_eq!(m["id"], m2, "the all-rooms stream got {m} (message {m1})");
}

/// A user in no room yet: the all-rooms stream opens empty and follows
/// the first room they join.
#[tokio::test]
async fn an_all_rooms_stream_of_a_user_in_no_room_follows_the_first_join() {
    let Room3 {
        hark,
        fx,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let newbie = fx.user("newbie").await;
    let (mut s, _) = opened(&hark, "", &token(newbie)).await;
    fx.insert(room, bob, "before the join").await;
    fx.join(room, newbie).await;
    let id = fx.insert(room, bob, "after the join").await;
    let (_, m) = expect_message(&mut s).await;
    // The message before the join may or may not be replayed (the contract
    // does not say); the one after it must arrive.
    let m = if m["id"] != id {
        expect_message(&mut s).await.1
    } else {
        m
    };
    assert_eq!(m["id"], id);
}

/// The LISTEN connection dies while a stream is open: what commits
/// meanwhile still arrives, once, in order (the cursor is the truth).
#[tokio::test]
async fn a_stream_loses_nothing_when_the_listen_connection_dies() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let (mut s, _) = opened(&hark, "", &token(alice)).await;
    let first = fx.insert(room, bob, "before").await;
    assert_eq!(expect_message(&mut s).await.1["id"], first);
    for round in 0..3 {
        // The previous round's messages may have been caught up by the old
        // connection before it died: wait for the new one to be there.
        let killed = kill_listener(&fx.db).await;
        assert_eq!(killed, 1, "round {round}: one LISTEN connection");
        let mut sent = Vec::new();
        for i in 0..3 {
            sent.push(fx.insert(room, bob, &format!("during {round}.{i}")).await);
        }
        let (_, got) = messages(&mut s, 3).await;
        assert_eq!(got, sent, "round {round}");
    }
    let last = fx.insert(room, bob, "after").await;
    assert_eq!(expect_message(&mut s).await.1["id"], last);
    assert!(hark.metric("hark_listener_reconnects_total").await >= 3.0);
}

// ---- errors, auth, CORS --------------------------------------------------------

#[tokio::test]
async fn errors_and_query_token_auth() {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let carol = fx.user("carol").await;
    let mine = fx.room("mine", &[alice, bob]).await;
    let theirs = fx.room("theirs", &[bob, carol]).await;
    let t = token(alice);
    let missing = 987_654;

    let cases: Vec<(String, Option<&str>, u16, &str)> = vec![
        (
            format!("?room_id={theirs}"),
            Some(&t),
            403,
            "not_a_participant",
        ),
        (
            format!("?room_id={mine}&room_id={theirs}"),
            Some(&t),
            403,
            "not_a_participant",
        ),
        (format!("?room_id={missing}"), Some(&t), 404, "not_found"),
        (
            format!("?room_id={mine}&room_id={missing}"),
            Some(&t),
            404,
            "not_found",
        ),
        ("?room_id=abc".into(), Some(&t), 400, "invalid_room_id"),
        (
            format!("?room_id={mine}&room_id=abc"),
            Some(&t),
            400,
            "invalid_room_id",
        ),
        ("?room_id=1.5".into(), Some(&t), 400, "invalid_room_id"),
        (format!("?room_id={mine}"), None, 401, ""),
        (format!("?room_id={mine}"), Some("not.a.jwt"), 401, ""),
        (String::new(), None, 401, ""),
    ];
    for (query, tok, status, code) in cases {
        let auth = tok.map(bearer);
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let mut s = Sse::connect(hark.addr, &format!("/events{query}"), &headers).await;
        let body = s.body_text(T).await;
        assert_eq!(s.status, status, "{query} {tok:?}: {body}");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{query}: error body is not JSON ({e}): {body}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        if status == 401 {
            let www = s.header("www-authenticate").unwrap_or("");
            assert!(www.starts_with("Bearer"), "{query}: {www:?}");
        } else {
            assert_eq!(v["code"], code, "{query}: {v}");
        }
        if status == 403 {
            assert_eq!(v["error"], "Not a participant");
        }
    }
    // None of those opened a stream.
    assert_eq!(hark.metric("hark_open_streams").await, 0.0);

    // The token in the query string (EventSource cannot send headers).
    let mut s = Sse::connect(
        hark.addr,
        &format!("/events?room_id={mine}&access_token={}", enc(&t)),
        &[],
    )
    .await;
    open(&mut s).await;
    let id = fx.insert(mine, bob, "to a query-token stream").await;
    let (_, m) = expect_message(&mut s).await;
    assert_eq!(m["id"], id);
    // A bad query token is a 401.
    let mut s = Sse::connect(hark.addr, "/events?access_token=nope", &[]).await;
    s.body_text(T).await;
    assert_eq!(s.status, 401);
}

#[tokio::test]
async fn cors_headers_on_the_stream() {
    let (hark, fx) = setup(&[("HARK_CORS_ORIGINS", "http://app.example")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    let auth = bearer(&token(alice));
    let path = format!("/events?room_id={room}");

    let mut s = Sse::connect(
        hark.addr,
        &path,
        &[("Authorization", &auth), ("Origin", "http://app.example")],
    )
    .await;
    assert_eq!(
        s.header("access-control-allow-origin"),
        Some("http://app.example"),
        "{:?}",
        s.headers
    );
    open(&mut s).await;
    let id = fx.insert(room, bob, "cross-origin").await;
    assert_eq!(expect_message(&mut s).await.1["id"], id);

    // Another origin: served, but without permission for the browser.
    let mut other = Sse::connect(
        hark.addr,
        &path,
        &[("Authorization", &auth), ("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(other.header("access-control-allow-origin"), None);
    open(&mut other).await;

    // The preflight a browser sends for a stream with Last-Event-ID.
    let (status, h, _) = try_request(
        Method::OPTIONS,
        &hark.url(&path),
        None,
        None,
        &[
            ("Origin", "http://app.example"),
            ("Access-Control-Request-Method", "GET"),
            (
                "Access-Control-Request-Headers",
                "authorization, last-event-id",
            ),
        ],
    )
    .await
    .unwrap();
    assert!(status.is_success(), "{status}");
    assert_eq!(h["access-control-allow-origin"], "http://app.example");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("last-event-id") && allowed.contains("authorization"),
        "{allowed}"
    );

    // An error answer from the stream endpoint carries them too.
    let mut e = Sse::connect(hark.addr, &path, &[("Origin", "http://app.example")]).await;
    e.body_text(T).await;
    assert_eq!(e.status, 401);
    assert_eq!(
        e.header("access-control-allow-origin"),
        Some("http://app.example")
    );
}

// ---- streams per user ----------------------------------------------------------

/// A user gets `HARK_MAX_STREAMS_PER_USER` streams at once and no more: the
/// next is a 429 `too_many_streams` with Retry-After, on both connection
/// paths. Another user is not affected, a refused request (a 403) takes no
/// place, and a place frees when one of the user's streams ends.
#[tokio::test]
async fn a_user_gets_at_most_max_streams_per_user_open_at_once() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[("HARK_MAX_STREAMS_PER_USER", "2")]).await;
    let elsewhere = fx.room("not alice's", &[bob]).await;
    let (a, b) = (token(alice), token(bob));

    // A refused request gives its place back.
    let (s, _, _) = request(
        Method::GET,
        &hark.url(&format!("/events?room_id={elsewhere}")),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let auth = bearer(&a);
    let headers = [("Authorization", auth.as_str())];
    let path = format!("/events?room_id={room}");
    // Alice's stream, on the lean path or (after `via`) hyper's.
    let alices = |via: Option<&'static str>| {
        let opts = Opts {
            first: via,
            ..Opts::default()
        };
        Sse::connect_with(hark.addr, &path, &headers, opts)
    };
    let mut first = alices(None).await;
    open(&mut first).await;
    let mut second = alices(HYPER_FIRST).await;
    open(&mut second).await;

    for via in [None, HYPER_FIRST] {
        let mut third = alices(via).await;
        assert_eq!(third.status, 429, "a third stream (first request {via:?})");
        assert_eq!(third.header("retry-after"), Some("10"));
        let body = third.body_text(Duration::from_secs(10)).await;
        assert_eq!(json(body.as_bytes())["code"], "too_many_streams", "{body}");
    }
    assert_eq!(hark.metric("hark_streams_over_quota_total").await, 2.0);

    // Another user is not affected.
    let mut bobs = connect(&hark, &format!("?room_id={room}"), &b).await;
    open(&mut bobs).await;

    // One of alice's streams ends: she may open another.
    second.close();
    hark.wait_for_metric("hark_open_streams", 2.0).await;
    let mut third = connect(&hark, &format!("?room_id={room}"), &a).await;
    open(&mut third).await;
    let id = fx.insert(room, bob, "to all").await;
    for s in [&mut first, &mut third] {
        let ev = s.expect(Duration::from_secs(10)).await;
        assert_eq!(ev.json()["id"], id, "{ev:?}");
    }
}

// ---- heartbeat ---------------------------------------------------------------

#[tokio::test]
async fn an_idle_stream_gets_ping_comments() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[("HARK_PING_INTERVAL_MS", "200")]).await;
    let (mut s, _) = opened(&hark, &format!("?room_id={room}"), &token(alice)).await;
    for _ in 0..3 {
        let ev = s.expect_event(T).await;
        assert_eq!(ev.comment.as_deref(), Some("ping"), "{ev:?}");
        assert!(ev.is_ping(), "{ev:?}");
    }
    let id = fx.insert(room, bob, "between pings").await;
    assert_eq!(expect_message(&mut s).await.1["id"], id);
    let ev = s.expect_event(T).await;
    assert!(ev.is_ping(), "pings go on after a message: {ev:?}");
}

// ---- token expiry ------------------------------------------------------------

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    stream_ends_when_its_token_expires(None).await;
}

/// The same on hyper's path: the stream follows [`HYPER_FIRST`] on its connection.
#[tokio::test]
async fn a_stream_on_a_reused_connection_ends_when_its_token_expires() {
    stream_ends_when_its_token_expires(HYPER_FIRST).await;
}

/// A stream opened with a token that expires in 3 s is live until then
/// and ends cleanly after it, long before its first ping (15 s); the same
/// token is then refused, and a fresh one resumes from the last id with
/// nothing lost. On the lean path the idle stream is parked meanwhile.
async fn stream_ends_when_its_token_expires(first: Option<&'static str>) {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    // Its `exp` is this second + 3 (or + 4, past a second's turn).
    let exp = chrono::Utc::now().timestamp() + 3;
    let short = token_for(alice, chrono::Duration::seconds(3));
    let mut s = Sse::connect_with(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &bearer(&short))],
        Opts {
            first,
            ..Opts::default()
        },
    )
    .await;
    open(&mut s).await;
    let id = fx.insert(room, bob, "before expiry").await;
    let (last, m) = expect_message(&mut s).await;
    assert_eq!(m["id"], id);

    let (events, end) = s.drain(Duration::from_secs(20)).await;
    let ended_at = chrono::Utc::now().timestamp_millis();
    assert!(
        matches!(end, Next::End),
        "a clean end, got {end:?} after {events:?}"
    );
    assert!(events.is_empty(), "nothing after the message: {events:?}");
    assert!(
        ended_at >= exp * 1000,
        "ended at {ended_at} ms, before the token's exp {exp} s"
    );
    hark.wait_for_metric("hark_open_streams", 0.0).await;
    assert_eq!(hark.metric("hark_streams_expired_total").await, 1.0);

    let missed = fx.insert(room, bob, "after expiry").await;
    let mut again = connect(&hark, &format!("?room_id={room}"), &short).await;
    let body = again.body_text(T).await;
    assert_eq!(again.status, 401, "{body}");
    assert_eq!(json(body.as_bytes())["code"], "token_expired", "{body}");

    let query = format!("?room_id={room}");
    let (mut s, opening) = resume(&hark, &query, &token(alice), &last, Via::Header).await;
    assert_eq!(opening.reset, None);
    assert_eq!(opening.ready.id.as_deref(), Some(last.as_str()));
    let (_, m) = expect_message(&mut s).await;
    assert_eq!(m["id"], missed);
    s.expect_quiet(Duration::from_millis(500)).await;
}

// ---- slow reader -------------------------------------------------------------

#[tokio::test]
async fn a_slow_reader_is_cut_and_resumes_losslessly() {
    slow_reader_is_cut_and_resumes(None).await;
}

/// `user`'s open stream of `room` (past `ready`, whose id comes back) with a
/// small client receive buffer, so that a reader that stops reading backs
/// up into hark soon. `first`: see [`Opts::first`].
async fn small_buffer_stream(
    hark: &Hark,
    room: i64,
    user: i64,
    first: Option<&'static str>,
) -> (Sse, String) {
    let mut s = Sse::connect_with(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &bearer(&token(user)))],
        Opts {
            recv_buffer: Some(16 * 1024),
            first,
            ..Opts::default()
        },
    )
    .await;
    let (_, ready) = open(&mut s).await;
    (s, ready.id.expect("ready has an id"))
}

/// The same on hyper's path: the stream follows [`HYPER_FIRST`] on its connection.
#[tokio::test]
async fn a_slow_reader_on_a_reused_connection_is_cut_and_resumes_losslessly() {
    slow_reader_is_cut_and_resumes(HYPER_FIRST).await;
}

async fn slow_reader_is_cut_and_resumes(first: Option<&'static str>) {
    let started = std::time::Instant::now();
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[("HARK_STREAM_BACKLOG", "32")]).await;
    let auth = bearer(&token(alice));
    let path = format!("/events?room_id={room}");
    let (mut s, ready) = small_buffer_stream(&hark, room, alice, first).await;

    // Stop reading; write until the server gives up on this reader.
    let filler = "x".repeat(9000);
    let mut inserted = 0;
    let mut cut = false;
    for _ in 0..80 {
        fx.insert_many(room, bob, 50, &filler).await;
        inserted += 50;
        if hark.metric("hark_streams_cut_slow_total").await >= 1.0 {
            cut = true;
            break;
        }
    }
    if !cut {
        // The last batches may still be in the hub's catch-up.
        cut = hark
            .metric_reaches("hark_streams_cut_slow_total", 1.0, Duration::from_secs(5))
            .await;
    }
    assert!(
        cut,
        "a reader that stopped reading was not cut after {inserted} messages of 9,000 characters"
    );
    hark.wait_for_metric("hark_open_streams", 0.0).await;

    // The server closed the connection: read what the kernel still holds,
    // up to the close (an event cut short is discarded, as EventSource does).
    let (events, end) = s.drain(Duration::from_secs(20)).await;
    assert!(
        matches!(end, Next::Eof | Next::End),
        "the server did not close the slow reader's connection: {end:?}"
    );
    let mut seen: Vec<i64> = Vec::new();
    let mut last = ready.clone();
    for ev in &events {
        if ev.is_ping() {
            continue;
        }
        assert_eq!(ev.kind(), "message", "{ev:?}");
        seen.push(ev.json()["id"].as_i64().unwrap());
        last = ev.id.clone().unwrap();
    }
    let before_cut = seen.len();
    assert!(
        before_cut < inserted,
        "everything ({before_cut}) arrived before the cut"
    );

    let expected = fx.message_ids(room).await;

    // Resume with the last id actually read: the rest, exactly once.
    let mut s2 = Sse::connect(
        hark.addr,
        &path,
        &[("Authorization", &auth), ("Last-Event-ID", &last)],
    )
    .await;
    let (reset, r2) = open(&mut s2).await;
    assert_eq!(reset, None);
    assert_eq!(r2.id.as_deref(), Some(last.as_str()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < expected.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "resume stalled at {} of {}",
            seen.len(),
            expected.len()
        );
        let (_, m) = expect_message(&mut s2).await;
        seen.push(m["id"].as_i64().unwrap());
    }
    assert_eq!(seen.len(), expected.len());
    assert!(seen == expected, "not every message exactly once, in order");
    let live = fx.insert(room, bob, "live").await;
    assert_eq!(expect_message(&mut s2).await.1["id"], live);
    eprintln!(
        "slow reader: cut after {inserted} inserted, {before_cut} read before the cut, {:?}",
        started.elapsed()
    );
}

/// A reader that stops reading is closed once hark's writes to it make no
/// progress for HARK_SEND_TIMEOUT_S, even when it never falls behind by
/// HARK_STREAM_BACKLOG messages (a quiet room).
#[tokio::test]
async fn a_stalled_reader_is_closed_after_the_send_timeout() {
    stalled_reader_is_closed(None).await;
}

/// The same on hyper's path: the stream follows [`HYPER_FIRST`] on its connection.
#[tokio::test]
async fn a_stalled_reader_on_a_reused_connection_is_closed_after_the_send_timeout() {
    stalled_reader_is_closed(HYPER_FIRST).await;
}

async fn stalled_reader_is_closed(first: Option<&'static str>) {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[
        ("HARK_SEND_TIMEOUT_S", "1"),
        ("HARK_STREAM_BACKLOG", "1000000"),
    ])
    .await;
    let (mut s, _) = small_buffer_stream(&hark, room, alice, first).await;
    // Stop reading; fill both sockets' buffers, then go quiet.
    let filler = "x".repeat(9000);
    let mut closed = false;
    for _ in 0..100 {
        fx.insert_many(room, bob, 50, &filler).await;
        // Pacing: batches spread out until the send timeout closes the
        // stream (the loop stops at once when it does).
        tokio::time::sleep(Duration::from_millis(50)).await;
        if hark.metric("hark_open_streams").await == 0.0 {
            closed = true;
            break;
        }
    }
    if !closed {
        hark.wait_for_metric("hark_open_streams", 0.0).await;
    }
    assert_eq!(
        hark.metric("hark_streams_cut_slow_total").await,
        0.0,
        "closed by the send timeout, not for lag"
    );
    let (_, end) = s.drain(Duration::from_secs(20)).await;
    assert!(matches!(end, Next::Eof), "{end:?}");
}

// ---- the two connection paths --------------------------------------------------

/// A connection whose requests so far were hark's own HTTP's (GETs, POSTs
/// with a length) is served on the lean path (it closes when the stream
/// ends); /events after any other request of a keep-alive connection is
/// served by hyper. Both stream the same.
#[tokio::test]
async fn a_stream_works_as_first_or_later_request_of_a_connection() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let auth = bearer(&token(alice));
    let path = format!("/events?room_id={room}");
    const CHUNKED: Option<&str> = Some("chunked");
    // (what, options, `Connection`, `Transfer-Encoding`)
    let variants = [
        ("first request", Opts::default(), Some("close"), CHUNKED),
        (
            "after GET /healthz on the same connection",
            Opts {
                first: Some("GET /healthz"),
                ..Opts::default()
            },
            Some("close"),
            CHUNKED,
        ),
        (
            "after a POST on the same connection",
            Opts {
                first: Some("POST /api/chat/messages/"),
                ..Opts::default()
            },
            Some("close"),
            CHUNKED,
        ),
        (
            "after a PUT on the same connection",
            Opts {
                first: HYPER_FIRST,
                ..Opts::default()
            },
            None,
            CHUNKED,
        ),
        (
            "head in two writes",
            Opts {
                split_at: Some(20),
                ..Opts::default()
            },
            Some("close"),
            CHUNKED,
        ),
        // HTTP/1.0 has no chunks: the body is the rest of the connection.
        (
            "HTTP/1.0",
            Opts {
                http10: true,
                ..Opts::default()
            },
            Some("close"),
            None,
        ),
    ];
    for (what, opts, connection, encoding) in variants {
        let mut s = Sse::connect_with(hark.addr, &path, &[("Authorization", &auth)], opts).await;
        assert_eq!(s.status, 200, "{what}");
        assert_eq!(s.header("connection"), connection, "{what}");
        assert_eq!(s.header("transfer-encoding"), encoding, "{what}");
        assert!(s.header("date").is_some(), "{what}");
        assert_eq!(
            s.header("content-type"),
            Some("text/event-stream"),
            "{what}"
        );
        let (reset, _) = open(&mut s).await;
        assert_eq!(reset, None, "{what}");
        let id = fx.insert(room, bob, what).await;
        assert_eq!(expect_message(&mut s).await.1["id"], id, "{what}");
        s.close();
        hark.wait_for_metric("hark_open_streams", 0.0).await;
    }
}

/// The lean path's own limits: a clear error for a head it will not read,
/// and no stream left behind by one that never completes.
#[tokio::test]
async fn lean_stream_path_refuses_bad_heads_clearly() {
    let Room3 {
        hark, alice, room, ..
    } = room_of_three(&[]).await;
    let auth = bearer(&token(alice));
    let path = format!("/events?room_id={room}");

    let big = "x".repeat(70 * 1024);
    let s = Sse::connect(
        hark.addr,
        &path,
        &[("Authorization", &auth), ("X-Big", &big)],
    )
    .await;
    assert_eq!(s.status, 431);
    let mut s = s;
    let body: Value = serde_json::from_str(&s.body_text(T).await).expect("JSON error body");
    assert_eq!(body["code"], "headers_too_large");

    let many: Vec<(String, String)> = (0..120).map(|i| (format!("X-H{i}"), "v".into())).collect();
    let mut headers: Vec<(&str, &str)> =
        many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    headers.push(("Authorization", &auth));
    let s = Sse::connect(hark.addr, &path, &headers).await;
    assert_eq!(s.status, 431);

    // Errors from the handler come as on hyper's path, CORS and all.
    let mut s = Sse::connect(hark.addr, &path, &[("Authorization", "Bearer nope")]).await;
    assert_eq!(s.status, 401);
    assert!(s.header("www-authenticate").is_some());
    let body: Value = serde_json::from_str(&s.body_text(T).await).expect("JSON error body");
    assert_eq!(body["code"], "token_not_valid");

    // A GET with a body (ignored, as hyper does) is answered, and the
    // unread body does not reset the connection before the answer is read.
    let mut raw = tokio::net::TcpStream::connect(hark.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut raw,
        b"GET /events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        T,
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer),
    )
    .await
    .expect("answered and closed")
    .expect("no reset");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(
        answer.contains("\"code\":\"not_authenticated\""),
        "{answer}"
    );

    // A head that stops halfway, then a hang-up: nothing stays open.
    let mut raw = tokio::net::TcpStream::connect(hark.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"GET /events?room_id=1 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    wait_peer_read(&raw).await;
    drop(raw);
    hark.wait_for_metric("hark_open_connections", 1.0).await;
}

#[tokio::test]
async fn head_answers_the_stream_headers_and_holds_no_stream() {
    let Room3 {
        hark, alice, room, ..
    } = room_of_three(&[]).await;
    let auth = bearer(&token(alice));
    let mut s = Sse::connect_with(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &auth)],
        Opts {
            head: true,
            ..Opts::default()
        },
    )
    .await;
    assert_eq!(s.status, 200);
    assert!(s
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    assert!(matches!(s.next_event(T).await, Next::End));
    drop(s);
    hark.wait_for_metric("hark_open_streams", 0.0).await;
}

/// Rows a stream never had to deliver (they were history when it opened)
/// do not count as its backlog: a reader that keeps up is never cut.
#[tokio::test]
async fn a_reader_that_keeps_up_is_not_cut_for_history_before_it_opened() {
    let Room3 {
        hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[("HARK_STREAM_BACKLOG", "32")]).await;
    // History written while nobody watched the room.
    fx.insert_many(room, bob, 40, "history ").await;
    let (mut s, _) = opened(&hark, &format!("?room_id={room}"), &token(alice)).await;
    // Then a reader that reads each message as soon as it is sent.
    for i in 0..5 {
        let id = fx.insert(room, bob, &format!("live {i}")).await;
        match s.next_non_ping(T).await {
            Next::Event(ev) => {
                assert_eq!(ev.kind(), "message", "{ev:?}");
                assert_eq!(ev.json()["id"], id, "live {i}");
            }
            other => panic!(
                "live {i}: {other:?}; hark_streams_cut_slow_total = {}",
                hark.metric("hark_streams_cut_slow_total").await
            ),
        }
    }
    // A batch below the backlog bound, read at once, does not cut either.
    let batch = fx.insert_many(room, bob, 20, "batch ").await;
    let (_, got) = messages(&mut s, batch.len()).await;
    assert_eq!(got, batch);
    let id = fx.insert(room, bob, "last").await;
    assert_eq!(expect_message(&mut s).await.1["id"], id);
    assert_eq!(hark.metric("hark_streams_cut_slow_total").await, 0.0);
}

// ---- shutdown and the gauge ----------------------------------------------------

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_within_5_s() {
    let Room3 {
        mut hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[]).await;
    let t = token(alice);
    let (mut s1, _) = opened(&hark, &format!("?room_id={room}"), &t).await;
    let (mut s2, _) = opened(&hark, "", &token(bob)).await;
    let id = fx.insert(room, bob, "before shutdown").await;
    assert_eq!(expect_message(&mut s1).await.1["id"], id);
    hark.wait_for_metric("hark_open_streams", 2.0).await;

    let took = hark.stop().await;
    eprintln!("exit with two open streams took {took:?}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    for (name, s) in [("one room", &mut s1), ("all rooms", &mut s2)] {
        let (events, end) = s.drain(T).await;
        assert!(
            matches!(end, Next::End),
            "{name}: the body did not end cleanly: {end:?} after {events:?}"
        );
        // What came before the end: the undelivered message (s2), pings,
        // who is online.
        for ev in events {
            assert!(
                ev.is_ping() || matches!(ev.kind(), "message" | "presence"),
                "{name}: {ev:?}"
            );
        }
    }
}

/// A stream whose reader stopped reading (its socket full, hyper not
/// polling its body) does not hold up the exit either.
#[tokio::test]
async fn sigterm_exits_within_5_s_with_a_reader_that_stopped_reading() {
    let Room3 {
        mut hark,
        fx,
        alice,
        bob,
        room,
        ..
    } = room_of_three(&[("HARK_STREAM_BACKLOG", "1000000")]).await;
    let (s, _) = small_buffer_stream(&hark, room, alice, None).await;
    // Far more than the socket buffers hold (about 4 MB on Linux).
    let filler = "y".repeat(9000);
    for _ in 0..20 {
        fx.insert_many(room, bob, 50, &filler).await;
    }
    // The case is real once hark's writes back up: its socket holds
    // bytes the reader has not taken.
    let reader = s.local_addr().expect("open");
    let backed_up = within(Duration::from_secs(10), || async {
        procfs::tcp_queues(hark.addr, reader).is_some_and(|(unsent, _)| unsent > 0)
    })
    .await;
    assert!(backed_up, "hark's socket never backed up");
    assert_eq!(hark.metric("hark_open_streams").await, 1.0);
    let took = hark.stop().await;
    eprintln!("exit with a stuck reader took {took:?}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    drop(s);
}

#[tokio::test]
async fn open_streams_gauge_returns_to_zero_when_clients_leave() {
    let Room3 {
        hark, alice, room, ..
    } = room_of_three(&[]).await;
    let t = token(alice);
    assert_eq!(hark.metric("hark_open_streams").await, 0.0);
    let (a, _) = opened(&hark, &format!("?room_id={room}"), &t).await;
    let (b, _) = opened(&hark, "", &t).await;
    let (c, _) = opened(&hark, &format!("?room_id={room}&room_id={room}"), &t).await;
    hark.wait_for_metric("hark_open_streams", 3.0).await;
    drop(a);
    hark.wait_for_metric("hark_open_streams", 2.0).await;
    drop(b);
    drop(c);
    hark.wait_for_metric("hark_open_streams", 0.0).await;
    // Polls through the same process still work and the gauge stays put.
    let (s, _) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hark.metric("hark_open_streams").await, 0.0);
}
