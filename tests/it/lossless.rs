//! Nothing is lost: a client that passes back its cursor gets every message
//! exactly once — with writers committing out of id order, with the LISTEN
//! connection killed, and with hark restarted mid-run. Both kinds of client
//! run over the same workload: long pollers looping on their cursors, and
//! event streams that reconnect with `Last-Event-ID` as EventSource does.
//!
//! Each run also drives a naive `id > last_id` reader over the same
//! workload and checks that it *does* lose messages: the workload really
//! commits out of order, so these tests would fail if hark's cursor were
//! an id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::kit::*;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const WRITERS: usize = 8;
const MESSAGES: usize = 2000;
const POLLERS: usize = 4;

/// One writer connection: each message in its own transaction, with a
/// random pause between INSERT and COMMIT so commits land out of id order,
/// and one of up to `quiet_us` after each COMMIT (0: none).
pub(crate) async fn writer(
    conn: String,
    room: i64,
    sender: i64,
    count: usize,
    seed: u64,
    quiet_us: u64,
) {
    let db = connect(&conn).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..count {
        db.batch_execute("BEGIN").await.unwrap();
        db.execute(
            "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) VALUES ($1, $2, $3, now())",
            &[&room, &sender, &format!("w{seed}-{i}")],
        )
        .await
        .unwrap();
        // The point: commits land out of id order.
        tokio::time::sleep(Duration::from_micros(rng.u64(0..3000))).await;
        db.batch_execute("COMMIT").await.unwrap();
        if quiet_us > 0 {
            tokio::time::sleep(Duration::from_micros(rng.u64(0..quiet_us))).await;
        }
    }
}

/// A client looping on its cursor; retries the same cursor on transport
/// errors (hark restarting). Returns how often it saw each id.
async fn poller(
    base: String,
    room: i64,
    token: String,
    start: String,
    limit: usize,
    expected: usize,
) -> HashMap<i64, usize> {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut cursor = start;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "poller stalled at {} of {expected}",
            seen.len()
        );
        let url = format!(
            "{base}/api/chat/messages/poll/?room_id={room}&since={cursor}&timeout=5&limit={limit}"
        );
        match try_request(Method::GET, &url, Some(&token), None, &[]).await {
            Ok((StatusCode::OK, _, body)) => {
                let body = json(&body);
                for m in body["messages"].as_array().unwrap() {
                    *seen.entry(m["id"].as_i64().unwrap()).or_default() += 1;
                }
                cursor = body["cursor"].as_str().unwrap().to_string();
            }
            // 503 while the database or hark is coming back; transport
            // errors while restarting: retry once it is ready again.
            Ok((StatusCode::SERVICE_UNAVAILABLE, _, _)) | Err(_) => {
                ready_again(&base).await;
            }
            Ok((status, _, body)) => {
                panic!("poll answered {status}: {}", String::from_utf8_lossy(&body))
            }
        }
    }
    seen
}

/// An EventSource-like client of `/events` (one room, or all the user's
/// rooms): reads events, and after any disconnect or refused connection
/// reconnects with the last `id:` it saw as `Last-Event-ID`, as browsers
/// do. Starts from `start` (a long-poll cursor). Returns how often it saw
/// each message id, and how many connections it took. A `reset` event
/// fails the test: every cursor here is one hark issued, so none may be
/// refused.
async fn streamer(
    base: String,
    room: Option<i64>,
    token: String,
    start: String,
    expected: usize,
) -> (HashMap<i64, usize>, usize) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url = match room {
        Some(r) => format!("{base}/events?room_id={r}"),
        None => format!("{base}/events"),
    };
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut last_id = start;
    let mut connections = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream stalled at {} of {expected} after {connections} connections",
            seen.len()
        );
        let req = Request::get(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("accept", "text/event-stream")
            .header("last-event-id", &last_id)
            .body(Empty::new())
            .unwrap();
        let resp = match client.request(req).await {
            Ok(resp) if resp.status() == StatusCode::OK => resp,
            Ok(resp) if resp.status() != StatusCode::SERVICE_UNAVAILABLE => {
                panic!("/events answered {}", resp.status())
            }
            // hark restarting, or the database coming back.
            _ => {
                ready_again(&base).await;
                continue;
            }
        };
        connections += 1;
        let mut events = sse::events(resp.into_body());
        while seen.len() < expected {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = match tokio::time::timeout(left, events.next()).await {
                Ok(Some(Ok(ev))) => ev,
                // The stream ended or broke: reconnect from `last_id`.
                _ => break,
            };
            let event = ev.event.as_deref().unwrap_or("");
            assert_ne!(event, "reset", "hark refused its own cursor: {ev:?}");
            if event == "message" {
                let m = json(ev.data.as_deref().unwrap_or("").as_bytes());
                *seen.entry(m["id"].as_i64().unwrap()).or_default() += 1;
            }
            if let Some(id) = ev.id {
                last_id = id;
            }
        }
    }
    eprintln!(
        "stream on {}: {} ids over {connections} connections",
        room.map_or("all rooms".to_string(), |r| format!("room {r}")),
        seen.len()
    );
    (seen, connections)
}

/// Waits (bounded) until hark at `base` answers /readyz with 200: after
/// a restart or while the database comes back.
async fn ready_again(base: &str) {
    let url = format!("{base}/readyz");
    within(Duration::from_secs(30), || async {
        matches!(
            try_request(Method::GET, &url, None, None, &[]).await,
            Ok((StatusCode::OK, _, _))
        )
    })
    .await;
}

/// Fails the test unless `seen` holds every id of `all` exactly once.
fn assert_exactly_once(who: &str, seen: &HashMap<i64, usize>, all: &[i64]) {
    let dupes: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dupes.is_empty(), "{who} got duplicates: {dupes:?}");
    let missing: Vec<_> = all.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{who} missed {} messages: {missing:?}",
        missing.len()
    );
    assert_eq!(
        seen.len(),
        all.len(),
        "{who} saw ids that are not in the room"
    );
}

/// What a client doing `WHERE id > last_id` sees, reading until `stop`.
async fn naive_id_reader(conn: String, room: i64, stop: Arc<AtomicBool>) -> Vec<i64> {
    let db = connect(&conn).await;
    let mut last = 0i64;
    let mut got = Vec::new();
    loop {
        let done = stop.load(Ordering::SeqCst);
        let rows = db
            .query(
                "SELECT id FROM chat_chatmessage WHERE room_id = $1 AND id > $2 ORDER BY id",
                &[&room, &last],
            )
            .await
            .unwrap();
        for r in rows {
            let id: i64 = r.get(0);
            got.push(id);
            last = id;
        }
        if done {
            return got;
        }
        // Pacing: a reader polling the table in a tight loop.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

enum Disturb {
    None,
    KillListener,
    RestartHark,
}

async fn run(disturb: Disturb) {
    let (mut hark, fx) = setup(&[]).await;
    let reader = fx.user("reader").await;
    let writer_user = fx.user("writer").await;
    let room = fx.room("busy", &[reader, writer_user]).await;
    let t = token(reader);
    let (_, first) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    let start = first["cursor"].as_str().unwrap().to_string();

    let base = format!("http://{}", hark.addr);
    let pollers: Vec<_> = (0..POLLERS)
        .map(|i| {
            // Different page sizes exercise paging inside batches.
            let limit = [1000, 7, 50, 1][i % 4];
            tokio::spawn(poller(
                base.clone(),
                room,
                t.clone(),
                start.clone(),
                limit,
                MESSAGES,
            ))
        })
        .collect();
    // One stream on the room, one on all the user's rooms.
    let streamers: Vec<_> = [Some(room), None]
        .into_iter()
        .map(|r| {
            tokio::spawn(streamer(
                base.clone(),
                r,
                t.clone(),
                start.clone(),
                MESSAGES,
            ))
        })
        .collect();
    let stop_naive = Arc::new(AtomicBool::new(false));
    let naive = tokio::spawn(naive_id_reader(hark.db.clone(), room, stop_naive.clone()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                hark.db.clone(),
                room,
                writer_user,
                MESSAGES / WRITERS,
                w as u64 + 1,
                0,
            ))
        })
        .collect();

    // Each disturbance comes mid-run: once the writers have committed a
    // given part of the workload (not after a guessed time).
    let committed = |part: usize| {
        let fx = &fx;
        async move {
            let want = (MESSAGES * part / 5) as i64;
            eventually("the writers make progress", || async {
                fx.message_count(room).await >= want
            })
            .await;
        }
    };
    match disturb {
        Disturb::None => {}
        Disturb::KillListener => {
            for part in 1..=3 {
                committed(part).await;
                // Wait until the previous kill's replacement is connected.
                let killed = kill_listener(&fx.db).await;
                assert_eq!(killed, 1, "exactly one LISTEN connection per process");
            }
        }
        Disturb::RestartHark => {
            committed(1).await;
            hark.restart().await;
            committed(2).await;
            hark.restart().await;
        }
    }

    for w in writers {
        w.await.unwrap();
    }
    let all = fx.message_ids(room).await;
    assert_eq!(all.len(), MESSAGES);
    for (i, p) in pollers.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(120), p)
            .await
            .expect("poller timed out")
            .unwrap();
        assert_exactly_once(&format!("poller {i}"), &seen, &all);
    }
    for (i, s) in streamers.into_iter().enumerate() {
        let (seen, connections) = tokio::time::timeout(Duration::from_secs(120), s)
            .await
            .expect("stream timed out")
            .unwrap();
        assert_exactly_once(&format!("stream {i}"), &seen, &all);
        if let Disturb::RestartHark = disturb {
            // The restarts came while it was still reading: it resumed.
            assert!(connections >= 2, "stream {i} never reconnected");
        }
    }

    stop_naive.store(true, Ordering::SeqCst);
    let naive = naive.await.unwrap();
    let naive_missed = MESSAGES - naive.len();
    assert!(
        naive_missed > 0,
        "the workload did not commit out of id order, so it proves nothing"
    );
    eprintln!("an `id > last_id` reader missed {naive_missed} of {MESSAGES} messages");

    if let Disturb::KillListener = disturb {
        assert!(hark.metric("hark_listener_reconnects_total").await >= 3.0);
    }
    if !matches!(disturb, Disturb::RestartHark) {
        // The one-room stream was idle between catch-ups at times, so part
        // of what it counted exactly once was written while it was parked
        // (a restart resets the counter).
        let direct = hark.metric("hark_stream_direct_writes_total").await;
        assert!(direct > 0.0, "no page was written to a parked stream");
        eprintln!("{direct} pages written to the parked stream");
        // Likewise the pollers' waiting polls on their kept-alive
        // connections: part of what they counted exactly once was
        // answered by the listener.
        let answered = hark.metric("hark_poll_direct_answers_total").await;
        assert!(answered > 0.0, "no waiting poll was answered while parked");
        eprintln!("{answered} polls answered while parked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_order_commits_every_poller_gets_every_message_once() {
    run(Disturb::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listener_killed_mid_run_loses_nothing() {
    run(Disturb::KillListener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hark_restarted_mid_run_loses_nothing() {
    run(Disturb::RestartHark).await;
}

/// The textbook case, step by step: A inserts first but commits last.
/// An id cursor skips A; hark's cursor delivers B, then A.
#[tokio::test]
async fn late_commit_with_smaller_id_is_delivered_and_an_id_cursor_would_skip_it() {
    let (hark, fx) = setup(&[]).await;
    let u = fx.user("u").await;
    let v = fx.user("v").await;
    let room = fx.room("r", &[u, v]).await;
    let t = token(u);
    let (_, first) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    let cursor = first["cursor"].as_str().unwrap().to_string();

    let a = connect(&hark.db).await;
    a.batch_execute("BEGIN").await.unwrap();
    let id_a: i64 = a
        .query_one(
            "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) VALUES ($1, $2, 'A', now()) RETURNING id",
            &[&room, &v],
        )
        .await
        .unwrap()
        .get(0);
    let id_b = fx.insert(room, v, "B").await; // commits first
    assert!(id_a < id_b);

    let (_, got) = get_json(
        &poll_url(&hark, room, Some(&cursor), "&timeout=5"),
        Some(&t),
    )
    .await;
    let ids: Vec<i64> = got["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![id_b]);
    let cursor = got["cursor"].as_str().unwrap().to_string();
    // An id cursor is now at id_b.
    let last_id = *ids.last().unwrap();

    a.batch_execute("COMMIT").await.unwrap();
    let (_, got) = get_json(
        &poll_url(&hark, room, Some(&cursor), "&timeout=5"),
        Some(&t),
    )
    .await;
    let ids: Vec<i64> = got["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![id_a], "hark delivers the late commit");

    let naive: Vec<i64> = fx
        .db
        .query(
            "SELECT id FROM chat_chatmessage WHERE room_id = $1 AND id > $2",
            &[&room, &last_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(naive.is_empty(), "an id cursor never sees A again");
}
