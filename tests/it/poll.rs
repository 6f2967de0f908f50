//! The long poll over real HTTP against a real PostgreSQL: waiting,
//! waking on a plain SQL insert, timeouts, parameters, disconnects,
//! shutdown, and the database cost of a wake-up.

use std::time::{Duration, Instant};

use crate::kit::*;
use hark::cursor::{Cursor, Position};
use hyper::{Method, StatusCode};

#[tokio::test]
async fn poll_blocks_then_returns_a_plain_sql_insert() {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    let t = token(alice);

    let (s, first) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(first["messages"].as_array().unwrap().len(), 0);
    assert_eq!(first["has_more"], false);
    let cursor = first["cursor"].as_str().unwrap().to_string();

    let url = poll_url(&hark, room, Some(&cursor), "&timeout=30");
    let started = Instant::now();
    let waiter = tokio::spawn(async move { get_json(&url, Some(&t)).await });
    // The poll is waiting: the gauge says so (no sleep-and-hope).
    hark.wait_for_metric("hark_waiting_polls", 1.0).await;
    assert!(!waiter.is_finished());
    let id = fx.insert(room, bob, "hello").await;
    let (s, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the poll was not woken by the insert")
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["id"], id);
    assert_eq!(msgs[0]["content"], "hello");
    assert_eq!(msgs[0]["room"], room);
    assert_eq!(msgs[0]["sender"]["id"], bob);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "woken well before the timeout"
    );
    assert_ne!(body["cursor"].as_str().unwrap(), cursor);
}

#[allow(dead_code)]
async fn unused(h: &Hark) {
    let _ = request(Method::GET, &h.url("/"), None, None).await;
}

async fn room_with_two() -> (Hark, Fixture, i64, i64, i64) {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    (hark, fx, alice, bob, room)
}

async fn cursor_now(hark: &Hark, room: i64, t: &str) -> String {
    let (s, body) = get_json(&poll_url(hark, room, None, "&limit=1"), Some(t)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["cursor"].as_str().unwrap().to_string()
}

/// A raw long-poll request, for tests that drive the connection by hand.
fn poll_request(room: i64, cursor: &str, token: &str, timeout_s: u64) -> String {
    format!(
        "GET /api/chat/messages/poll/?room_id={room}&since={cursor}&timeout={timeout_s} HTTP/1.1\r\n\
         Host: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
}

fn ids(body: &serde_json::Value) -> Vec<i64> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect()
}

/// Sends `request` on `raw` (a poll with nothing due), commits one message
/// from `sender` once the poll waits, and returns the answer's head and
/// body, checked to be a 200 carrying exactly that message.
async fn answer_to_a_commit(
    hark: &Hark,
    fx: &Fixture,
    raw: &mut Raw,
    request: &str,
    (room, sender): (i64, i64),
) -> (String, serde_json::Value) {
    raw.send(request.as_bytes()).await;
    hark.wait_for_metric("hark_waiting_polls", 1.0).await;
    let id = fx.insert(room, sender, "committed while waiting").await;
    let (head, body) = raw.answer_within(Duration::from_secs(20)).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    let body = json(&body);
    assert_eq!(ids(&body), vec![id], "{body}");
    (head, body)
}

#[tokio::test]
async fn timeout_zero_and_timeout_expiry_answer_empty_with_a_cursor() {
    let (hark, _fx, alice, _bob, room) = room_with_two().await;
    let t = token(alice);
    let c = cursor_now(&hark, room, &t).await;
    let (s, h, b) = request(
        Method::GET,
        &poll_url(&hark, room, Some(&c), "&timeout=0"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["cache-control"], "no-store");
    let body = json(&b);
    assert_eq!(ids(&body), Vec::<i64>::new());
    assert_eq!(body["has_more"], false);
    assert!(body["cursor"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));

    let started = Instant::now();
    let (s, body) = get_json(&poll_url(&hark, room, Some(&c), "&timeout=1"), Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ids(&body), Vec::<i64>::new());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for the timeout"
    );
}

#[tokio::test]
async fn without_since_the_latest_limit_oldest_first() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let mut all = Vec::new();
    for i in 0..7 {
        all.push(
            fx.insert(room, if i % 2 == 0 { alice } else { bob }, &format!("m{i}"))
                .await,
        );
    }
    let t = token(alice);
    let (_, body) = get_json(&poll_url(&hark, room, None, "&limit=5"), Some(&t)).await;
    assert_eq!(ids(&body), all[2..].to_vec());
    assert_eq!(body["has_more"], false);
    // Empty since is the same as none.
    let (_, body) = get_json(&poll_url(&hark, room, Some(""), "&limit=5"), Some(&t)).await;
    assert_eq!(ids(&body), all[2..].to_vec());
    // That cursor is current: nothing more is due.
    let c = body["cursor"].as_str().unwrap();
    let (_, body) = get_json(&poll_url(&hark, room, Some(c), "&timeout=0"), Some(&t)).await;
    assert!(ids(&body).is_empty());
}

#[tokio::test]
async fn paging_with_limit_delivers_everything_once_in_order() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let mut cursor = cursor_now(&hark, room, &t).await;
    // One commit, and a first poll that may wait for it: the hub knows all
    // of them or none (then the database answers), so the first page is
    // full whatever the listener's timing.
    let expected = fx.insert_many(room, bob, 25, "m").await;
    let mut got = Vec::new();
    let mut pages = Vec::new();
    loop {
        let (s, body) = get_json(
            &poll_url(&hark, room, Some(&cursor), "&limit=10&timeout=5"),
            Some(&t),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let page = ids(&body);
        let has_more = body["has_more"].as_bool().unwrap();
        assert!(page.len() <= 10, "a page holds at most `limit`");
        pages.push((page.len(), has_more));
        got.extend(page);
        cursor = body["cursor"].as_str().unwrap().to_string();
        if got.len() >= expected.len() && !has_more {
            break;
        }
        assert!(pages.len() < 20, "paging does not end: {pages:?}");
    }
    assert_eq!(got, expected, "every message once, in id order: {pages:?}");
    assert_eq!(pages[0], (10, true), "a full first page says more is due");
    // A message after the last page arrives with the last cursor.
    let late = fx.insert(room, bob, "late").await;
    let (_, body) = get_json(
        &poll_url(&hark, room, Some(&cursor), "&timeout=5"),
        Some(&t),
    )
    .await;
    assert_eq!(ids(&body), vec![late]);
}

#[tokio::test]
async fn iso_since_returns_messages_created_later_and_then_waits() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    fx.db
        .execute(
            "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) VALUES ($1, $2, 'old', '2026-01-15T10:00:00Z')",
            &[&room, &bob],
        )
        .await
        .unwrap();
    let newer = fx.insert(room, bob, "new").await;
    for since in [
        "2026-01-15T10:00:00Z",
        "2026-01-15T12:00:00+02:00",
        "2026-01-15T10:00:00.000000 00:00",
    ] {
        let (s, body) = get_json(&poll_url(&hark, room, Some(since), "&timeout=0"), Some(&t)).await;
        assert_eq!(s, StatusCode::OK, "{since}: {body}");
        assert_eq!(ids(&body), vec![newer], "{since}");
    }
    // Nothing after now: the poll waits, then a new message wakes it.
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let url = poll_url(&hark, room, Some(&now), "&timeout=20");
    let t2 = t.clone();
    let waiter = tokio::spawn(async move { get_json(&url, Some(&t2)).await });
    hark.wait_for_metric("hark_waiting_polls", 1.0).await;
    let id = fx.insert(room, bob, "wake").await;
    let (_, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&body), vec![id]);
}

#[tokio::test]
async fn bad_parameters_are_400s_never_clamped() {
    let (hark, _fx, alice, _bob, room) = room_with_two().await;
    let t = token(alice);
    let c = cursor_now(&hark, room, &t).await;
    let cases: Vec<(String, &str)> = vec![
        ("/api/chat/messages/poll/".into(), "invalid_room_id"),
        (
            "/api/chat/messages/poll/?room_id=abc".into(),
            "invalid_room_id",
        ),
        (
            "/api/chat/messages/poll/?room_id=1.5".into(),
            "invalid_room_id",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&since=yesterday"),
            "invalid_since",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&since=AAAA"),
            "invalid_since",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&since={c}&timeout=61"),
            "invalid_timeout",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&since={c}&timeout=1.5"),
            "invalid_timeout",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&since={c}&timeout=-1"),
            "invalid_timeout",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&since={c}&timeout=abc"),
            "invalid_timeout",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&limit=0"),
            "invalid_limit",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&limit=1001"),
            "invalid_limit",
        ),
        (
            format!("/api/chat/messages/poll/?room_id={room}&limit=ten"),
            "invalid_limit",
        ),
    ];
    for (path, code) in cases {
        let (s, body) = get_json(&hark.url(&path), Some(&t)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["code"], code, "{path}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Unknown room, somebody else's room.
    let (s, _) = get_json(&poll_url(&hark, 999_999, None, ""), Some(&t)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn other_rooms_are_403_whatever_the_cursor() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let carol = fx.user("carol").await;
    let theirs = fx.room("theirs", &[bob, carol]).await;
    let t = token(alice);
    let c = cursor_now(&hark, room, &t).await;
    let (s, body) = get_json(&poll_url(&hark, theirs, None, ""), Some(&t)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "Not a participant");
    // A valid cursor carries no authority.
    let (s, _) = get_json(&poll_url(&hark, theirs, Some(&c), "&timeout=0"), Some(&t)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn cursors_from_another_database_or_the_future_are_409_cursor_reset() {
    use hark::cursor::Snapshot;
    use std::sync::Arc;
    let (hark, _fx, alice, _bob, room) = room_with_two().await;
    let t = token(alice);
    let real = Cursor::decode(&cursor_now(&hark, room, &t).await).unwrap();

    let mut foreign = real.clone();
    foreign.origin.system_id ^= 0xdead_beef;
    let mut other_timeline = real.clone();
    other_timeline.origin.timeline += 1;
    let Position::At(s) = &real.position else {
        panic!("fresh cursor is At")
    };
    let future = Cursor {
        origin: real.origin,
        position: Position::At(Arc::new(
            Snapshot::new(s.xmax + 1_000_000, s.xmax + 1_000_000, vec![]).unwrap(),
        )),
    };
    for c in [foreign, other_timeline, future] {
        let (st, body) = get_json(
            &poll_url(&hark, room, Some(&c.encode()), "&timeout=0"),
            Some(&t),
        )
        .await;
        assert_eq!(st, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["code"], "cursor_reset");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_waiting_polls_cost_one_catchup_per_insert() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let c = cursor_now(&hark, room, &t).await;
    let url = poll_url(&hark, room, Some(&c), "&timeout=60");
    let polls: Vec<_> = (0..1000)
        .map(|_| {
            let (url, t) = (url.clone(), t.clone());
            tokio::spawn(async move { get_json(&url, Some(&t)).await })
        })
        .collect();
    hark.wait_for_metric("hark_waiting_polls", 1000.0).await;
    let catchups = hark.metric("hark_catchup_queries_total").await;
    let cold = hark.metric("hark_cold_queries_total").await;
    let id = fx.insert(room, bob, "to everyone").await;
    for p in polls {
        let (s, body) = tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(s, StatusCode::OK);
        assert_eq!(ids(&body), vec![id]);
    }
    let catchups_after = hark.metric("hark_catchup_queries_total").await;
    assert!(
        catchups_after - catchups <= 2.0,
        "{catchups} -> {catchups_after} catch-up queries"
    );
    assert_eq!(
        hark.metric("hark_cold_queries_total").await,
        cold,
        "no poll read the database"
    );
    assert_eq!(hark.metric("hark_waiting_polls").await, 0.0);
}

/// A fetch loop's polls on one kept-alive connection: each waits, is
/// answered by the next commit, and the next goes on the same connection.
#[tokio::test]
async fn polls_on_one_connection_wait_and_follow_each_other() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let mut cursor = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    for _ in 0..3 {
        let request = poll_request(room, &cursor, &t, 30);
        let (_, body) = answer_to_a_commit(&hark, &fx, &mut raw, &request, (room, bob)).await;
        cursor = body["cursor"].as_str().unwrap().to_string();
    }
}

/// What a client sends while its poll waits is kept for its next request,
/// within a bound: past one whole request (a 64 KiB head and the default
/// 64 KiB body limit) the client is cut and its waiter freed.
#[tokio::test]
async fn a_client_that_floods_a_waiting_poll_is_cut() {
    let (hark, _fx, alice, _bob, room) = room_with_two().await;
    let t = token(alice);
    let cursor = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    raw.send(poll_request(room, &cursor, &t, 60).as_bytes())
        .await;
    hark.wait_for_metric("hark_waiting_polls", 1.0).await;
    // Under the bound: the poll keeps waiting.
    raw.send(&vec![b'x'; 100 * 1024]).await;
    raw.wait_read().await;
    assert_eq!(hark.metric("hark_waiting_polls").await, 1.0);
    // Over it: cut, without an answer.
    raw.send(&vec![b'x'; 40 * 1024]).await;
    hark.wait_for_metric("hark_waiting_polls", 0.0).await;
    assert!(raw.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_hang_up_free_their_waiters() {
    use tokio::io::AsyncWriteExt;
    let (hark, _fx, alice, _bob, room) = room_with_two().await;
    let t = token(alice);
    let c = cursor_now(&hark, room, &t).await;
    let req = poll_request(room, &c, &t, 60);
    let mut sockets = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(hark.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        sockets.push(s);
    }
    hark.wait_for_metric("hark_waiting_polls", 1000.0).await;
    drop(sockets);
    hark.wait_for_metric("hark_waiting_polls", 0.0).await;
    // The connection reading /metrics is the only one left.
    hark.wait_for_metric("hark_open_connections", 1.0).await;
}

/// After many connections close, hark hands the freed heap back to the OS
/// (src/trim.rs): not while they are open, once after they are gone.
#[tokio::test]
async fn freed_memory_is_returned_after_connections_close() {
    let (hark, _fx) = setup(&[("HARK_TRIM_AFTER_CONNECTIONS", "100")]).await;
    let mut sockets = Vec::new();
    for _ in 0..300 {
        sockets.push(tokio::net::TcpStream::connect(hark.addr).await.unwrap());
    }
    hark.wait_for_metric("hark_open_connections", 301.0).await;
    // A window for a wrong trim to show: nothing announces that none came.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hark.metric("hark_memory_trims_total").await, 0.0);
    drop(sockets);
    hark.wait_for_metric("hark_open_connections", 1.0).await;
    hark.wait_for_metric("hark_memory_trims_total", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_every_waiting_poll_with_its_cursor_and_exits() {
    let (mut hark, _fx, alice, _bob, room) = room_with_two().await;
    let t = token(alice);
    let c = cursor_now(&hark, room, &t).await;
    let url = poll_url(&hark, room, Some(&c), "&timeout=60");
    let polls: Vec<_> = (0..50)
        .map(|_| {
            let (url, t) = (url.clone(), t.clone());
            tokio::spawn(async move { get_json(&url, Some(&t)).await })
        })
        .collect();
    hark.wait_for_metric("hark_waiting_polls", 50.0).await;
    let start = Cursor::decode(&c).unwrap();
    let took = hark.stop().await;
    for p in polls {
        let (s, body) = p.await.unwrap();
        assert_eq!(s, StatusCode::OK);
        assert!(ids(&body).is_empty());
        // Its cursor, or a fresher equivalent (the poll may have verified
        // with the database that nothing was due up to a newer snapshot).
        let got = Cursor::decode(body["cursor"].as_str().unwrap()).unwrap();
        let (Position::At(old), Position::At(new)) = (&start.position, &got.position) else {
            panic!("a waiting poll's cursor is a plain snapshot");
        };
        assert_eq!(got.origin, start.origin);
        assert!(new.contains(old), "the cursor never moves backwards");
    }
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

/// While the LISTEN connection cannot come back, /readyz says 503 and a
/// waiting poll keeps waiting; once it is back, the poll gets what
/// committed meanwhile.
#[tokio::test]
async fn listener_outage_readyz_503_and_waiting_polls_get_what_committed() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let c = cursor_now(&hark, room, &t).await;
    let url = poll_url(&hark, room, Some(&c), "&timeout=60");
    let t2 = t.clone();
    let waiter = tokio::spawn(async move { get_json(&url, Some(&t2)).await });
    hark.wait_for_metric("hark_waiting_polls", 1.0).await;

    // Refuse new connections to this database, then cut the listener.
    let dbname: String = fx
        .db
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let admin = connect(
        &hark
            .db
            .replace(&format!("dbname={dbname}"), "dbname=postgres"),
    )
    .await;
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    assert_eq!(kill_listener(&fx.db).await, 1);
    let down = within(Duration::from_secs(5), || async {
        let (s, _, _) = request(Method::GET, &hark.url("/readyz"), None, None).await;
        s == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(down, "/readyz stayed 200 with the listener down");
    let id = fx.insert(room, bob, "while the listener was down").await;
    assert!(!waiter.is_finished(), "the poll keeps waiting");

    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let (s, body) = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("answered after the listener came back")
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ids(&body), vec![id]);
    hark.wait_ready().await;
}

/// The head's fields but `date` and `content-length`, in order.
fn fields(head: &str) -> Vec<String> {
    head.lines()
        .filter(|l| !l.starts_with("date:") && !l.starts_with("content-length:"))
        .map(str::to_string)
        .collect()
}

/// A waiting poll on a kept-alive connection is answered by the listener
/// (it parks, DESIGN §8) with the answer it would have written itself:
/// the same head, CORS included, the same messages, cursor and
/// `has_more`. The connection then carries the next poll, which parks too.
#[tokio::test]
async fn a_parked_poll_is_answered_as_it_would_answer_itself() {
    const ORIGIN: &str = "http://app.example";
    let (hark, fx) = setup(&[("HARK_CORS_ORIGINS", ORIGIN)]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    let t = token(alice);
    let request = |cursor: &str| {
        poll_request(room, cursor, &t, 30)
            .replace("\r\n\r\n", &format!("\r\nOrigin: {ORIGIN}\r\n\r\n"))
    };
    let start = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    let (direct_head, direct) =
        answer_to_a_commit(&hark, &fx, &mut raw, &request(&start), (room, bob)).await;
    assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 1.0);
    assert_eq!(hark.metric("hark_waiting_polls").await, 0.0);

    // The same request again: the message is due at once, so the poll's
    // own task answers it, on the same connection.
    raw.send(request(&start).as_bytes()).await;
    let (own_head, own) = raw.answer().await;
    let own = json(&own);
    assert_eq!(fields(&direct_head), fields(&own_head));
    assert!(
        direct_head.contains(&format!("access-control-allow-origin: {ORIGIN}")),
        "{direct_head}"
    );
    for k in ["messages", "cursor", "has_more"] {
        assert_eq!(direct[k], own[k], "{k}");
    }
    assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 1.0);

    // And the next poll, from the new cursor, waits and is answered by the
    // listener again.
    let cursor = direct["cursor"].as_str().unwrap().to_string();
    answer_to_a_commit(&hark, &fx, &mut raw, &request(&cursor), (room, bob)).await;
    assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 2.0);
}

/// A request pipelined behind a waiting poll — read with it, or sent while
/// it waits — keeps the poll from being answered where the connection
/// would not notice: the poll answers itself, then the next request is
/// answered at once, in order.
#[tokio::test]
async fn input_behind_a_waiting_poll_keeps_it_from_parking() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let mut cursor = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    let next = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    for together in [true, false] {
        let poll = poll_request(room, &cursor, &t, 60);
        if together {
            raw.send(format!("{poll}{next}").as_bytes()).await;
            hark.wait_for_metric("hark_waiting_polls", 1.0).await;
        } else {
            raw.send(poll.as_bytes()).await;
            hark.wait_for_metric("hark_waiting_polls", 1.0).await;
            raw.send(next.as_bytes()).await;
            // The connection has read it before the commit; it takes the
            // poll back right after that read returns, a step hark does not
            // announce: a moment more, so that the commit cannot race it.
            raw.wait_read().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let id = fx.insert(room, bob, &format!("together={together}")).await;
        let (head, body) = raw.answer_within(Duration::from_secs(20)).await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        let body = json(&body);
        assert_eq!(ids(&body), vec![id], "{body}");
        cursor = body["cursor"].as_str().unwrap().to_string();
        // Well before the poll's 60 s timeout.
        let (head, _) = raw.answer_within(Duration::from_secs(20)).await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 0.0);
    }
}

/// An answer larger than the socket takes at once: the listener writes
/// what it can, the connection writes the rest, and the connection then
/// carries the next poll as usual.
#[tokio::test]
async fn a_parked_poll_answer_the_socket_takes_in_part_arrives_whole() {
    // An answer budget the 20 MB answer below fits: the listener writes
    // to a parked poll only what the poll would answer itself.
    let (hark, fx) = setup(&[("HARK_MAX_ANSWER_BYTES", "33554432")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    let t = token(alice);
    let cursor = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    let req = |cursor: &str| {
        poll_request(room, cursor, &t, 30).replace("&timeout", "&limit=1000&timeout")
    };
    raw.send(req(&cursor).as_bytes()).await;
    hark.wait_for_metric("hark_waiting_polls", 1.0).await;
    // About 20 MB in one commit: far more than a loopback socket buffers.
    let big = "x".repeat(20_000);
    let ids_in = fx.insert_many(room, bob, 1000, &big).await;
    let (head, body) = raw.answer_within(Duration::from_secs(60)).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    let body = json(&body);
    assert_eq!(ids(&body), ids_in);
    assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 1.0);

    let cursor = body["cursor"].as_str().unwrap().to_string();
    answer_to_a_commit(&hark, &fx, &mut raw, &req(&cursor), (room, bob)).await;
}

/// A parked poll's request line is logged when the connection notices the
/// answer, with the time the answer took, not the time until it noticed.
#[tokio::test]
async fn a_parked_polls_log_line_has_the_time_of_its_answer() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let cursor = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    let request = poll_request(room, &cursor, &t, 30);
    let (_, body) = answer_to_a_commit(&hark, &fx, &mut raw, &request, (room, bob)).await;
    assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 1.0);
    // The connection notices only with the next request, seconds later
    // (the point: the time logged must not include this pause).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let next = body["cursor"].as_str().unwrap().to_string();
    raw.send(poll_request(room, &next, &t, 0).as_bytes()).await;
    raw.answer().await;
    let logged_ms = |logs: &str| -> Vec<f64> {
        logs.lines()
            .filter(|l| l.contains("hark::request") && l.contains("timeout=30"))
            .filter_map(|l| {
                l.split("ms=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    eventually("the parked poll's line is logged", || async {
        !logged_ms(&hark.logs()).is_empty()
    })
    .await;
    let ms = logged_ms(&hark.logs());
    assert_eq!(ms.len(), 1, "{ms:?}");
    // Well under the 6 s until it was noticed (a generous bound: the
    // answer itself takes milliseconds).
    assert!(ms[0] < 5000.0, "logged {} ms", ms[0]);
}

/// After a poll answered while parked, a POST with a Content-Length (a
/// browser sending on its pooled connection) is served on the same lean
/// connection, body split from the request behind it, and the next poll
/// there parks again and is answered by the listener.
#[tokio::test]
async fn a_post_after_a_parked_polls_answer_keeps_the_connection_parking() {
    post_after_a_parked_answer(false).await;
}

/// After a poll answered while parked, the connection still hands a
/// request its own HTTP does not serve (a chunked body) to hyper: its
/// socket, split for the park, is whole again, and hyper keeps serving it
/// (its polls no longer park).
#[tokio::test]
async fn a_chunked_post_after_a_parked_polls_answer_goes_to_hyper() {
    post_after_a_parked_answer(true).await;
}

/// An HTTP/1.0 client that asks for keep-alive (as `ab -k` does) keeps its
/// connection, also when a commit answers its waiting poll: that answer,
/// like hyper's, says `connection: keep-alive` and has a length, and the
/// next request on the connection is served.
#[tokio::test]
async fn an_http_1_0_keep_alive_poll_answered_by_a_commit_keeps_its_connection() {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let cursor = cursor_now(&hark, room, &t).await;
    let ten = |request: String| {
        request.replacen(
            " HTTP/1.1\r\n",
            " HTTP/1.0\r\nConnection: keep-alive\r\n",
            1,
        )
    };
    let mut raw = Raw::connect(hark.addr).await;
    let request = ten(poll_request(room, &cursor, &t, 30));
    let (head, body) = answer_to_a_commit(&hark, &fx, &mut raw, &request, (room, bob)).await;
    let kept = |head: &str| head.lines().any(|l| l == "connection: keep-alive");
    assert!(kept(&head), "{head}");
    assert!(head.contains("\r\ncontent-length: "), "{head}");

    raw.send(ten(poll_request(room, body["cursor"].as_str().unwrap(), &t, 0)).as_bytes())
        .await;
    let (head, body) = raw.answer().await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert!(kept(&head), "{head}");
    assert_eq!(ids(&json(&body)), Vec::<i64>::new());
}

/// A poll answered while parked; then, in one write, a POST (`chunked`, or
/// with a Content-Length) and a poll that gets what it sent; then a poll
/// that waits for a commit, parked only if the connection stayed lean.
async fn post_after_a_parked_answer(chunked: bool) {
    let (hark, fx, alice, bob, room) = room_with_two().await;
    let t = token(alice);
    let cursor = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    let request = poll_request(room, &cursor, &t, 30);
    let (_, body) = answer_to_a_commit(&hark, &fx, &mut raw, &request, (room, bob)).await;
    assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 1.0);

    // The POST's framing is what separates it from the poll behind it.
    let msg = format!("{{\"room_id\": {room}, \"content\": \"posted\"}}");
    let framed = if chunked {
        format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{msg}\r\n0\r\n\r\n",
            msg.len()
        )
    } else {
        format!("Content-Length: {}\r\n\r\n{msg}", msg.len())
    };
    let cursor = body["cursor"].as_str().unwrap().to_string();
    let both = format!(
        "POST /api/chat/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
         Content-Type: application/json\r\n{framed}{}",
        poll_request(room, &cursor, &t, 0)
    );
    raw.send(both.as_bytes()).await;
    let (head, created) = raw.answer().await;
    assert!(head.starts_with("http/1.1 201 "), "{head}");
    let created = json(&created);
    assert_eq!(created["content"], "posted");
    let (_, after) = raw.answer().await;
    let after = json(&after);
    assert_eq!(ids(&after), vec![created["id"].as_i64().unwrap()]);

    let request = poll_request(room, after["cursor"].as_str().unwrap(), &t, 30);
    answer_to_a_commit(&hark, &fx, &mut raw, &request, (room, bob)).await;
    assert_eq!(
        hark.metric("hark_poll_direct_answers_total").await,
        if chunked { 1.0 } else { 2.0 },
        "the poll after the POST parked (and was answered by the listener) only on the lean path"
    );
}

/// How a waiting poll may lose access to its room.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Its participant row is deleted.
    Leaves,
    /// Its user row is deleted (which deletes the participant rows too).
    IsDeleted,
    /// It leaves while hark hears nothing of it (the participant NOTIFY
    /// trigger disabled): hark learns it only from the catch-up that reads
    /// the next message, as when that NOTIFY arrives late.
    LeavesUnheard,
}

/// Dave waits on a raw connection — hark's own HTTP (`first` None: the
/// poll may park, and the listener write its answer) or hyper's (after
/// `first`) — and loses access; then alice posts. The poll must end with
/// 403 (401 for a deleted user) and never carry alice's message.
async fn a_waiting_poll_that_loses_access(first: Option<&str>, loss: Loss) {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let dave = fx.user("dave").await;
    let room = fx.room("r", &[alice, dave]).await;
    let t = token(dave);
    let c = cursor_now(&hark, room, &t).await;
    let mut raw = Raw::connect(hark.addr).await;
    if let Some(first) = first {
        raw.send(format!("{first} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes())
            .await;
        let (head, _) = raw.answer().await;
        assert!(!head.contains("connection: close"), "{head}");
    }
    raw.send(poll_request(room, &c, &t, 30).as_bytes()).await;
    hark.wait_for_metric("hark_waiting_polls", 1.0).await;

    let remove = "DELETE FROM chat_chatroom_participants WHERE chatroom_id = $1 AND user_id = $2";
    match loss {
        Loss::Leaves => {
            fx.db.execute(remove, &[&room, &dave]).await.unwrap();
        }
        Loss::IsDeleted => {
            fx.db
                .execute("DELETE FROM users_user WHERE id = $1", &[&dave])
                .await
                .unwrap();
        }
        Loss::LeavesUnheard => {
            fx.db
                .batch_execute(
                    "ALTER TABLE chat_chatroom_participants DISABLE TRIGGER hark_participant_changed",
                )
                .await
                .unwrap();
            fx.db.execute(remove, &[&room, &dave]).await.unwrap();
        }
    }
    if let Loss::Leaves | Loss::IsDeleted = loss {
        // hark hears of it: the poll ends at once, with nothing posted.
        let (head, body) = raw.answer_within(Duration::from_secs(10)).await;
        let want = match loss {
            Loss::IsDeleted => "http/1.1 401 ",
            _ => "http/1.1 403 ",
        };
        assert!(head.starts_with(want), "{loss:?}: {head}");
        let code = json(&body)["code"].as_str().unwrap().to_string();
        let want = match loss {
            Loss::IsDeleted => "user_not_found",
            _ => "not_a_participant",
        };
        assert_eq!(code, want, "{loss:?}");
    }
    let posted = fx.insert(room, alice, "after dave lost access").await;
    if let Loss::LeavesUnheard = loss {
        let (head, body) = raw.answer_within(Duration::from_secs(10)).await;
        assert!(
            head.starts_with("http/1.1 403 "),
            "{loss:?}: {head} {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(json(&body)["code"], "not_a_participant");
    }
    // The next answer on the connection is the next request's: none
    // carried the message.
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = raw.answer().await;
    assert!(
        head.starts_with("http/1.1 200 ") && !String::from_utf8_lossy(&body).contains("messages"),
        "{loss:?}: {head} {} (message {posted})",
        String::from_utf8_lossy(&body)
    );
    // A poll from before the loss never gets it either.
    let (s, body) = get_json(&poll_url(&hark, room, Some(&c), "&timeout=0"), Some(&t)).await;
    assert!(
        s == StatusCode::FORBIDDEN || s == StatusCode::UNAUTHORIZED,
        "{loss:?}: {s} {body}"
    );
}

#[tokio::test]
async fn a_waiting_poll_ends_403_when_its_user_leaves_the_room() {
    a_waiting_poll_that_loses_access(None, Loss::Leaves).await;
    a_waiting_poll_that_loses_access(HYPER_FIRST, Loss::Leaves).await;
}

#[tokio::test]
async fn a_waiting_poll_ends_401_when_its_user_is_deleted() {
    a_waiting_poll_that_loses_access(None, Loss::IsDeleted).await;
    a_waiting_poll_that_loses_access(HYPER_FIRST, Loss::IsDeleted).await;
}

#[tokio::test]
async fn a_waiting_poll_is_refused_the_next_message_when_the_leave_is_heard_late() {
    a_waiting_poll_that_loses_access(None, Loss::LeavesUnheard).await;
    a_waiting_poll_that_loses_access(HYPER_FIRST, Loss::LeavesUnheard).await;
}

/// `HARK_MAX_ANSWER_BYTES` for the answer-budget tests: a few of the
/// 1,000-character messages below fit, not all.
const BUDGET: usize = 4096;

/// Follows a cursor until `n` messages came and nothing more is due;
/// returns the message ids in order and each answer's body size. Every
/// page's messages must fit in [`BUDGET`] unless the page is one message.
async fn follow(
    hark: &Hark,
    room: i64,
    mut cursor: String,
    t: &str,
    n: usize,
) -> (Vec<i64>, Vec<usize>) {
    let (mut got, mut sizes) = (Vec::new(), Vec::new());
    loop {
        // Polls wait while the hub has not heard of the commits yet (a
        // `timeout=0` poll at the head is answered as of the last catch-up).
        let timeout = if got.len() < n { 5 } else { 0 };
        let url = poll_url(
            hark,
            room,
            Some(&cursor),
            &format!("&timeout={timeout}&limit=1000"),
        );
        let (s, _, b) = request(Method::GET, &url, Some(t), None).await;
        assert_eq!(s, StatusCode::OK);
        let body = json(&b);
        let msgs = body["messages"].as_array().unwrap();
        let bytes: usize = msgs.iter().map(|m| m.to_string().len() + 1).sum();
        assert!(
            msgs.len() <= 1 || bytes <= BUDGET,
            "{} messages, {bytes} bytes",
            msgs.len()
        );
        sizes.push(b.len());
        got.extend(ids(&body));
        cursor = body["cursor"].as_str().unwrap().to_string();
        if got.len() >= n && !body["has_more"].as_bool().unwrap() {
            return (got, sizes);
        }
        assert!(sizes.len() < 100, "paging does not end");
    }
}

/// A client that asks for 1,000 messages of 1,000 characters gets them a
/// budget at a time, each exactly once, whether the hub's memory answers
/// (one commit the hub read) or the database does (a cursor older than the
/// hub's ring of one batch); a message larger than the budget comes alone.
#[tokio::test]
async fn an_answer_holds_at_most_the_byte_budget_and_paging_loses_nothing() {
    let budget = BUDGET.to_string();
    for ring in ["256", "1"] {
        let (hark, fx) = setup(&[
            ("HARK_MAX_ANSWER_BYTES", budget.as_str()),
            ("HARK_HUB_RING", ring),
        ])
        .await;
        let alice = fx.user("alice").await;
        let bob = fx.user("bob").await;
        let room = fx.room("r", &[alice, bob]).await;
        let t = token(alice);
        let cursor = cursor_now(&hark, room, &t).await;
        let mut expected = fx.insert_many(room, bob, 20, &"x".repeat(1000)).await;
        expected.push(fx.insert(room, bob, &"y".repeat(3 * BUDGET)).await);
        if ring == "1" {
            // Later batches push the first out of the ring: the database
            // answers the old cursor.
            expected.push(fx.insert(room, bob, "z").await);
        }
        let (got, sizes) = follow(&hark, room, cursor, &t, expected.len()).await;
        assert_eq!(got, expected, "ring {ring}: every message once, in order");
        assert!(sizes.len() >= 6, "ring {ring}: pages {sizes:?}");
        assert!(
            sizes.iter().any(|&n| n > 3 * BUDGET),
            "ring {ring}: the large message went out"
        );
        if ring == "1" {
            assert!(hark.metric("hark_cold_queries_total").await > 0.0);
        }
    }
}

/// The latest page (no `since`) is the newest messages that fit.
#[tokio::test]
async fn the_latest_page_is_the_newest_messages_that_fit_the_budget() {
    let budget = BUDGET.to_string();
    let (hark, fx) = setup(&[("HARK_MAX_ANSWER_BYTES", budget.as_str())]).await;
    let alice = fx.user("alice").await;
    let room = fx.room("r", &[alice]).await;
    let all = fx.insert_many(room, alice, 20, &"x".repeat(1000)).await;
    let t = token(alice);
    let (s, body) = get_json(&poll_url(&hark, room, None, "&limit=1000"), Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    let got = ids(&body);
    assert!(!got.is_empty() && got.len() < all.len(), "{got:?}");
    assert_eq!(
        got,
        all[all.len() - got.len()..],
        "the newest, oldest first"
    );
    assert_eq!(body["has_more"], false);
}

/// One read of the database stops at its byte budget: the rows past it are
/// not fetched (one marker row says the budget cut the read), and a first
/// row larger than the budget still comes, alone. The reader's
/// participation is answered in the same statement.
#[tokio::test]
async fn a_database_read_stops_at_its_byte_budget() {
    use hark::cursor::Snapshot;
    use hark::db::messages::{read, Budget, Read};
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice]).await;
    let all = fx.insert_many(room, alice, 50, &"x".repeat(1000)).await;
    let client = hark::db::CachingClient::new(connect(&hark.db).await);
    let start = Snapshot::parse_pg("3:3:").unwrap();
    let after = || Read::After {
        lower: &start,
        limit: 1000,
    };
    let budget = |bytes, member| Budget { bytes, member };

    let f = read(&client, &[room], after(), budget(4096, Some(alice)))
        .await
        .unwrap();
    assert!(f.cut, "the budget cut the read");
    assert!((2..=4).contains(&f.rows.len()), "{} rows", f.rows.len());
    assert_eq!(f.member_of, 1);
    let got: Vec<i64> = f.rows.iter().map(|m| m.id).collect();
    assert_eq!(got, all[..got.len()]);

    let f = read(&client, &[room], after(), budget(10, Some(bob)))
        .await
        .unwrap();
    assert_eq!(f.rows.len(), 1, "a first row over the budget comes alone");
    assert!(f.cut);
    assert_eq!(f.member_of, 0, "bob is not in the room");

    let f = read(&client, &[room], after(), budget(1 << 30, None))
        .await
        .unwrap();
    assert!(!f.cut);
    assert_eq!(f.rows.len(), all.len());

    let latest = Read::Latest { limit: 1000 };
    let f = read(&client, &[room], latest, budget(4096, Some(alice)))
        .await
        .unwrap();
    let got: Vec<i64> = f.rows.iter().map(|m| m.id).collect();
    assert!(f.cut && !got.is_empty());
    assert_eq!(got, all[all.len() - got.len()..], "the newest that fit");
}

/// `HARK_DIRECT_WRITES=false`: no stream or poll parks, so the listener
/// writes to none of them; each is woken and answers itself, and every
/// message still arrives.
#[tokio::test]
async fn without_direct_writes_every_poll_and_stream_answers_itself() {
    let (hark, fx) = setup(&[("HARK_DIRECT_WRITES", "false")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    let t = token(alice);
    let auth = format!("Bearer {t}");
    let mut stream = sse::Sse::connect(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &auth)],
    )
    .await;
    sse::open(&mut stream).await;
    for round in 0..2 {
        let cursor = cursor_now(&hark, room, &t).await;
        let mut raw = Raw::connect(hark.addr).await;
        let request = poll_request(room, &cursor, &t, 30);
        let (_, body) = answer_to_a_commit(&hark, &fx, &mut raw, &request, (room, bob)).await;
        let ev = stream.expect(Duration::from_secs(10)).await;
        assert_eq!(ev.kind(), "message", "round {round}: {ev:?}");
        assert_eq!(ev.json()["id"], ids(&body)[0], "round {round}");
    }
    assert_eq!(hark.metric("hark_poll_direct_answers_total").await, 0.0);
    assert_eq!(hark.metric("hark_stream_direct_writes_total").await, 0.0);
}
