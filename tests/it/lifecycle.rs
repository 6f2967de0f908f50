//! The whole life of a message (API.md): edits and deletes from any writer
//! reach every client exactly as inserts do.
//!
//! The oracle test: 8 writers insert, edit, rewrite unchanged, delete and
//! move messages between three rooms, each change in its own transaction
//! committed after a random pause (so commits land out of id order), while
//! long pollers, streams of one room, of two rooms and of all the user's
//! rooms follow their cursors; the LISTEN backend is killed and hark
//! restarted in the middle. At the end each client's view — messages
//! applied as upserts by id, deletes applied — equals the table, room by
//! room, and no client ever saw the room its user is not in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::kit::*;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::Mutex;

const WRITERS: u64 = 8;
const CHANGES: usize = 150;

/// A room's messages as a client (or the table) sees them: id →
/// (content, edited).
type View = BTreeMap<i64, (String, bool)>;

/// What the table holds now, per room.
async fn table(db: &tokio_postgres::Client, rooms: &[i64]) -> HashMap<i64, View> {
    let mut out: HashMap<i64, View> = rooms.iter().map(|r| (*r, View::new())).collect();
    for row in db
        .query(
            "SELECT room_id, id, content, hark_edited FROM chat_chatmessage WHERE room_id = ANY($1)",
            &[&rooms],
        )
        .await
        .unwrap()
    {
        let room: i64 = row.get(0);
        out.entry(room)
            .or_default()
            .insert(row.get(1), (row.get(2), row.get(3)));
    }
    out
}

/// One writer: `CHANGES` changes, each in its own transaction, committed
/// after a random pause. Contents are unique, so a client's view says
/// which version it has.
async fn writer(conn: String, rooms: [i64; 3], sender: i64, seed: u64) {
    let db = connect(&conn).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..CHANGES {
        let content = format!("w{seed}-{i}");
        let room = rooms[rng.usize(0..3)];
        db.batch_execute("BEGIN").await.unwrap();
        let pick = "(SELECT id FROM chat_chatmessage WHERE room_id = ANY($2) \
                     ORDER BY random() LIMIT 1)";
        let all = rooms.to_vec();
        let result = match rng.u8(0..10) {
            0..=3 => db
                .execute(
                    "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                     VALUES ($1, $2, $3, now())",
                    &[&room, &sender, &content],
                )
                .await
                .map(|_| ()),
            4 | 5 => db
                .execute(
                    &format!("UPDATE chat_chatmessage SET content = $1 WHERE id = {pick}"),
                    &[&content, &all],
                )
                .await
                .map(|_| ()),
            // Django's save(): every column rewritten with what it holds.
            6 => db
                .execute(
                    &format!(
                        "UPDATE chat_chatmessage SET content = content, room_id = room_id, \
                         sender_id = sender_id, created_at = created_at \
                         WHERE id = {pick} AND $1::text IS NOT NULL"
                    ),
                    &[&content, &all],
                )
                .await
                .map(|_| ()),
            7 | 8 => db
                .execute(
                    &format!("DELETE FROM chat_chatmessage WHERE id = {pick} AND $1::int8 > 0"),
                    &[&room, &all],
                )
                .await
                .map(|_| ()),
            _ => db
                .execute(
                    &format!("UPDATE chat_chatmessage SET room_id = $1 WHERE id = {pick}"),
                    &[&room, &all],
                )
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                tokio::time::sleep(Duration::from_micros(rng.u64(0..3000))).await;
                db.batch_execute("COMMIT").await.unwrap();
            }
            // Two writers picked the same row and one deleted it under the
            // other's lock: nothing to do for this change.
            Err(_) => db.batch_execute("ROLLBACK").await.unwrap(),
        }
    }
}

/// What a client received: its views, and each message version it holds
/// per room (contents are unique per version: the same version in the
/// same room twice, with no delete from that room between, is a
/// duplicate; a message moved out and back comes back after a delete).
#[derive(Default)]
struct Client {
    views: HashMap<i64, View>,
    versions: HashSet<(i64, i64, String)>,
}

/// Applies one change a client received to its views; the room must be
/// one of `allowed`, and a version must not come twice.
fn apply(client: &mut Client, allowed: &[i64], who: &str, deleted: bool, v: &Value) {
    let views = &mut client.views;
    let room = v["room"].as_i64().unwrap();
    assert!(
        allowed.contains(&room),
        "{who} saw room {room}, not one of {allowed:?}: {v}"
    );
    let id = v["id"].as_i64().unwrap();
    let view = views.entry(room).or_default();
    if deleted {
        view.remove(&id);
        client.versions.retain(|(i, r, _)| (*i, *r) != (id, room));
    } else {
        // A message is in one room at a time: an upsert by id.
        for other in views.values_mut() {
            other.remove(&id);
        }
        let content = v["content"].as_str().unwrap().to_string();
        let fresh = client.versions.insert((id, room, content.clone()));
        assert!(fresh, "{who} got a version twice: {v}");
        views
            .entry(room)
            .or_default()
            .insert(id, (content, v["edited"].as_bool().unwrap()));
    }
}

/// Waits (bounded) until hark at `base` is ready again.
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

/// The final state the clients converge to, once the writers are done.
type Goal = Arc<Mutex<Option<HashMap<i64, View>>>>;

/// Whether `views` holds `rooms` of the goal exactly.
async fn reached(goal: &Goal, views: &HashMap<i64, View>, rooms: &[i64]) -> bool {
    let goal = goal.lock().await;
    let Some(goal) = goal.as_ref() else {
        return false;
    };
    rooms
        .iter()
        .all(|r| goal.get(r).unwrap_or(&View::new()) == views.get(r).unwrap_or(&View::new()))
}

/// A long poller of one room, following its cursor until its view is the
/// goal.
async fn poller(
    base: String,
    room: i64,
    token: String,
    (start, views): (String, HashMap<i64, View>),
    limit: usize,
    goal: Goal,
) {
    let mut client = Client {
        views,
        ..Client::default()
    };
    let mut cursor = start;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !reached(&goal, &client.views, &[room]).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "poller of {room} stalled"
        );
        let url = format!(
            "{base}/api/chat/messages/poll/?room_id={room}&since={cursor}&timeout=2&limit={limit}"
        );
        match try_request(Method::GET, &url, Some(&token), None, &[]).await {
            Ok((StatusCode::OK, _, body)) => {
                let body = json(&body);
                let who = format!("poller of {room}");
                for d in body["deleted"].as_array().unwrap() {
                    apply(&mut client, &[room], &who, true, d);
                }
                for m in body["messages"].as_array().unwrap() {
                    apply(&mut client, &[room], &who, false, m);
                }
                cursor = body["cursor"].as_str().unwrap().to_string();
            }
            Ok((StatusCode::SERVICE_UNAVAILABLE, _, _)) | Err(_) => ready_again(&base).await,
            Ok((status, _, body)) => {
                panic!("poll answered {status}: {}", String::from_utf8_lossy(&body))
            }
        }
    }
}

/// An EventSource-like client of `query`, resuming with the last id it
/// saw, until its view of `rooms` is the goal.
async fn streamer(
    base: String,
    query: String,
    rooms: Vec<i64>,
    token: String,
    (start, views): (String, HashMap<i64, View>),
    goal: Goal,
) {
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut client = Client {
        views,
        ..Client::default()
    };
    let mut last_id = start;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let who = format!("stream {query}");
    while !reached(&goal, &client.views, &rooms).await {
        assert!(tokio::time::Instant::now() < deadline, "{who} stalled");
        let req = Request::get(format!("{base}/events{query}"))
            .header("authorization", format!("Bearer {token}"))
            .header("last-event-id", &last_id)
            .body(Empty::new())
            .unwrap();
        let resp = match http.request(req).await {
            Ok(resp) if resp.status() == StatusCode::OK => resp,
            Ok(resp) if resp.status() != StatusCode::SERVICE_UNAVAILABLE => {
                panic!("{who}: /events answered {}", resp.status())
            }
            _ => {
                ready_again(&base).await;
                continue;
            }
        };
        let mut events = sse::events(resp.into_body());
        loop {
            if reached(&goal, &client.views, &rooms).await {
                return;
            }
            let ev = match tokio::time::timeout(Duration::from_secs(2), events.next()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(_) => break,     // ended: resume from last_id
                Err(_) => continue, // quiet: look at the goal again
            };
            let kind = ev.event.as_deref().unwrap_or("");
            assert_ne!(kind, "reset", "{who}: hark refused its own cursor");
            if kind == "message" || kind == "delete" {
                let v = json(ev.data.as_deref().unwrap_or("").as_bytes());
                apply(&mut client, &rooms, &who, kind == "delete", &v);
            }
            if let Some(id) = ev.id {
                last_id = id;
            }
        }
    }
}

#[tokio::test]
async fn every_client_ends_with_the_table_through_edits_deletes_moves_and_faults() {
    let (mut hark, fx) = setup(&[]).await;
    let reader = fx.user("reader").await;
    let author = fx.user("author").await;
    let a = fx.room("a", &[reader, author]).await;
    let b = fx.room("b", &[reader, author]).await;
    let c = fx.room("c", &[author]).await;
    // Some history, so that the first edits and deletes have rows to hit.
    for room in [a, b, c] {
        fx.insert_many(room, author, 10, "old").await;
    }
    let t = token(reader);
    let (_, first) = get_json(&poll_url(&hark, a, None, "&limit=1"), Some(&t)).await;
    let start = first["cursor"].as_str().unwrap().to_string();
    let base = format!("http://{}", hark.addr);
    let goal: Goal = Arc::new(Mutex::new(None));
    // Each client starts from the views the cursor covers: the table now.
    let initial = table(&fx.db, &[a, b]).await;

    // A client's starting point: the cursor, and the rooms it covers as
    // the table held them then.
    let from = |rooms: &[i64]| {
        let views = rooms.iter().map(|r| (*r, initial[r].clone())).collect();
        (start.clone(), views)
    };
    let mut clients = Vec::new();
    for (room, limit) in [(a, 1000), (a, 3), (b, 50)] {
        let client = poller(
            base.clone(),
            room,
            t.clone(),
            from(&[room]),
            limit,
            goal.clone(),
        );
        clients.push(tokio::spawn(client));
    }
    for (query, rooms) in [
        (format!("?room_id={a}"), vec![a]),
        (format!("?room_id={a}&room_id={b}"), vec![a, b]),
        (String::new(), vec![a, b]),
    ] {
        let client = streamer(
            base.clone(),
            query,
            rooms.clone(),
            t.clone(),
            from(&rooms),
            goal.clone(),
        );
        clients.push(tokio::spawn(client));
    }
    let writers: Vec<_> = (1..=WRITERS)
        .map(|w| tokio::spawn(writer(hark.db.clone(), [a, b, c], author, w)))
        .collect();

    // Mid-run, once part of the work has committed: the LISTEN backend
    // dies, then hark restarts.
    let changed = |n: i64| {
        let db = &fx.db;
        async move {
            eventually("the writers make progress", || async {
                let row = db
                    .query_one("SELECT count(*) FROM hark_tombstone", &[])
                    .await
                    .unwrap();
                row.get::<_, i64>(0) >= n
            })
            .await;
        }
    };
    changed(20).await;
    assert_eq!(kill_listener(&fx.db).await, 1);
    changed(60).await;
    hark.restart().await;

    for w in writers {
        w.await.unwrap();
    }
    *goal.lock().await = Some(table(&fx.db, &[a, b]).await);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(150), client)
            .await
            .expect("a client did not reach the table")
            .unwrap();
    }
    // The workload did what it says: edits, deletes and moves happened.
    let edited: i64 = fx
        .db
        .query_one(
            "SELECT count(*) FROM chat_chatmessage WHERE hark_edited",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(edited > 0, "no edit reached the table");
}

fn ids_of(list: &Value) -> Vec<i64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect()
}

/// A rewrite with every value as it was (Django's `save()` of an unchanged
/// object) is no change: not delivered, not edited. A real edit is
/// delivered once, as it is now, marked edited, and the rooms list shows
/// it.
#[tokio::test]
async fn a_save_that_changes_nothing_is_not_delivered_and_an_edit_is() {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    let m = fx.insert(room, bob, "first").await;
    let t = token(alice);
    let (_, body) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    let cursor = body["cursor"].as_str().unwrap().to_string();
    fx.db
        .execute(
            "UPDATE chat_chatmessage SET content = content, room_id = room_id, \
             sender_id = sender_id, created_at = created_at WHERE id = $1",
            &[&m],
        )
        .await
        .unwrap();
    let marker = fx.insert(room, bob, "marker").await;
    let (s, body) = get_json(
        &poll_url(&hark, room, Some(&cursor), "&timeout=5"),
        Some(&t),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(ids_of(&body["messages"]), vec![marker], "{body}");
    assert_eq!(ids_of(&body["deleted"]), Vec::<i64>::new(), "{body}");
    let cursor = body["cursor"].as_str().unwrap().to_string();

    fx.db
        .execute(
            "UPDATE chat_chatmessage SET content = 'second' WHERE id = $1",
            &[&m],
        )
        .await
        .unwrap();
    let (_, body) = get_json(
        &poll_url(&hark, room, Some(&cursor), "&timeout=5"),
        Some(&t),
    )
    .await;
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(ids_of(&body["messages"]), vec![m], "{body}");
    assert_eq!(msgs[0]["content"], "second");
    assert_eq!(msgs[0]["edited"], true);
    // Nothing more is due: the edit came once.
    let cursor = body["cursor"].as_str().unwrap().to_string();
    let (_, body) = get_json(
        &poll_url(&hark, room, Some(&cursor), "&timeout=0"),
        Some(&t),
    )
    .await;
    assert_eq!(ids_of(&body["messages"]), Vec::<i64>::new(), "{body}");
    // The unedited marker says so too.
    let (_, body) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    let edited: Vec<bool> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["edited"].as_bool().unwrap())
        .collect();
    assert_eq!(edited, vec![true, false], "{body}");
}

/// A delete reaches polls (`deleted`) and streams (`event: delete`); a move
/// is a delete in the old room and a message in the new one; the rooms
/// list's last message and unread count follow.
#[tokio::test]
async fn a_delete_and_a_move_reach_polls_and_streams_and_the_rooms_list() {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let a = fx.room("a", &[alice, bob]).await;
    let b = fx.room("b", &[alice, bob]).await;
    let m1 = fx.insert(a, bob, "one").await;
    let m2 = fx.insert(a, bob, "two").await;
    let t = token(alice);
    let auth = format!("Bearer {t}");
    let cursor_of = |body: &Value| body["cursor"].as_str().unwrap().to_string();
    let (_, body) = get_json(&poll_url(&hark, a, None, ""), Some(&t)).await;
    let ca = cursor_of(&body);
    let (_, body) = get_json(&poll_url(&hark, b, None, ""), Some(&t)).await;
    let cb = cursor_of(&body);
    let mut stream = sse::Sse::connect(hark.addr, "/events", &[("Authorization", &auth)]).await;
    sse::open(&mut stream).await;

    fx.db
        .execute("DELETE FROM chat_chatmessage WHERE id = $1", &[&m2])
        .await
        .unwrap();
    let (_, body) = get_json(&poll_url(&hark, a, Some(&ca), "&timeout=5"), Some(&t)).await;
    assert_eq!(
        body["deleted"],
        serde_json::json!([{"id": m2, "room": a}]),
        "{body}"
    );
    assert_eq!(ids_of(&body["messages"]), Vec::<i64>::new());
    let ca = cursor_of(&body);
    let ev = stream.expect(Duration::from_secs(10)).await;
    assert_eq!(ev.kind(), "delete", "{ev:?}");
    assert_eq!(ev.json(), serde_json::json!({"id": m2, "room": a}));
    assert!(ev.id.is_some(), "a delete carries its cursor");
    // The rooms list: the last message is the one left, and it counts.
    let (_, room) = get_json(&hark.url(&format!("/api/chat/rooms/{a}/")), Some(&t)).await;
    assert_eq!(room["last_message"]["id"], m1, "{room}");
    assert_eq!(room["unread_count"], 1, "{room}");

    fx.db
        .execute(
            "UPDATE chat_chatmessage SET room_id = $1 WHERE id = $2",
            &[&b, &m1],
        )
        .await
        .unwrap();
    let (_, body) = get_json(&poll_url(&hark, a, Some(&ca), "&timeout=5"), Some(&t)).await;
    assert_eq!(
        body["deleted"],
        serde_json::json!([{"id": m1, "room": a}]),
        "{body}"
    );
    let (_, body) = get_json(&poll_url(&hark, b, Some(&cb), "&timeout=5"), Some(&t)).await;
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(ids_of(&body["messages"]), vec![m1], "{body}");
    assert_eq!(msgs[0]["room"], b);
    assert_eq!(msgs[0]["edited"], false, "a move alone is not an edit");
    // The all-rooms stream: the delete from a, then the message in b.
    let ev = stream.expect(Duration::from_secs(10)).await;
    assert_eq!(
        (ev.kind(), ev.json()["room"].clone()),
        ("delete", a.into()),
        "{ev:?}"
    );
    let ev = stream.expect(Duration::from_secs(10)).await;
    assert_eq!(
        (ev.kind(), ev.json()["room"].clone()),
        ("message", b.into()),
        "{ev:?}"
    );
    let (_, room) = get_json(&hark.url(&format!("/api/chat/rooms/{a}/")), Some(&t)).await;
    assert_eq!(room["last_message"], Value::Null, "{room}");
    assert_eq!(room["unread_count"], 0, "{room}");
}

/// Deletes are remembered for `HARK_TOMBSTONE_RETENTION_S`: a cursor from
/// before a delete hark has since forgotten is refused (409
/// `cursor_reset`; `event: reset` on a stream), never told that nothing
/// was deleted. (A process that read the delete into its memory before the
/// sweep still reports it: a restart makes this one forget.)
#[tokio::test]
async fn a_cursor_older_than_the_retention_gets_cursor_reset() {
    let (mut hark, fx) = setup(&[("HARK_TOMBSTONE_RETENTION_S", "1")]).await;
    let alice = fx.user("alice").await;
    let room = fx.room("r", &[alice]).await;
    let m = fx.insert(room, alice, "gone soon").await;
    let t = token(alice);
    let (_, body) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    let old = body["cursor"].as_str().unwrap().to_string();
    fx.db
        .execute("DELETE FROM chat_chatmessage WHERE id = $1", &[&m])
        .await
        .unwrap();
    eventually("the tombstone is swept", || async {
        let n: i64 = fx
            .db
            .query_one("SELECT count(*) FROM hark_tombstone", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    hark.restart().await;
    let (s, body) = get_json(&poll_url(&hark, room, Some(&old), "&timeout=0"), Some(&t)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "cursor_reset");
    let auth = format!("Bearer {t}");
    let mut stream = sse::Sse::connect(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &auth), ("Last-Event-ID", &old)],
    )
    .await;
    let (reset, ready) = sse::open(&mut stream).await;
    assert!(reset.is_some(), "the stream says reset before ready");
    assert_ne!(ready.id.as_deref(), Some(old.as_str()));
    // A cursor from after the sweep goes on.
    let (_, body) = get_json(&poll_url(&hark, room, None, ""), Some(&t)).await;
    let fresh = body["cursor"].as_str().unwrap().to_string();
    let (s, _) = get_json(&poll_url(&hark, room, Some(&fresh), "&timeout=0"), Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
}
