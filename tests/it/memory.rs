//! Polls answered from the hub's memory: the head-of-room poll (a cursor
//! with nothing new, `timeout=0`), the latest page (no `since`) and the
//! seed frontend's ISO `since`. They must cost no database query once the
//! room is held, and lose nothing: clients that re-poll at once with
//! `timeout=0` at the head, and clients that join with a latest page or
//! an ISO timestamp at any moment, get every message exactly once while
//! writers commit out of id order, the LISTEN connection is killed, and
//! hark restarts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use hyper::{Method, StatusCode};
use tokio::sync::watch;

use crate::kit::*;

fn answers(since: &str, source: &str) -> String {
    format!("hark_poll_answers_total{{since=\"{since}\",source=\"{source}\"}}")
}

fn ids(body: &serde_json::Value) -> Vec<i64> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect()
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Once a room is held, its head polls, latest pages and ISO polls are
/// answered without a database query, and `/metrics` counts each as an
/// answer from memory; a message committed later still arrives.
#[tokio::test]
async fn held_rooms_answer_every_common_poll_without_a_query() {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("r", &[alice, bob]).await;
    let before = Utc::now() - chrono::Duration::seconds(1);
    let sent = fx.insert_many(room, bob, 5, "m").await;
    let t = token(alice);

    // The first latest page reads the database and offers the read to
    // the hub; once a catch-up has brought it to the hub's head, the page
    // comes from memory.
    let (s, first) = get_json(&poll_url(&hark, room, None, "&timeout=0"), Some(&t)).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(ids(&first), sent);
    assert_eq!(hark.metric(&answers("none", "database")).await, 1.0);
    eventually("the latest page comes from memory", || async {
        let (_, body) = get_json(&poll_url(&hark, room, None, "&timeout=0"), Some(&t)).await;
        assert_eq!(ids(&body), sent, "{body}");
        hark.metric(&answers("none", "memory")).await >= 1.0
    })
    .await;
    let since = iso(before);
    eventually("the ISO `since` comes from memory", || async {
        let (_, body) =
            get_json(&poll_url(&hark, room, Some(&since), "&timeout=0"), Some(&t)).await;
        assert_eq!(ids(&body), sent, "{body}");
        hark.metric(&answers("time", "memory")).await >= 1.0
    })
    .await;
    let (_, body) = get_json(&poll_url(&hark, room, None, "&timeout=0"), Some(&t)).await;
    let mut cursor = body["cursor"].as_str().unwrap().to_string();
    eventually("a head poll comes from memory", || async {
        let (_, body) = get_json(
            &poll_url(&hark, room, Some(&cursor), "&timeout=0"),
            Some(&t),
        )
        .await;
        assert!(ids(&body).is_empty(), "{body}");
        hark.metric(&answers("cursor", "memory")).await >= 1.0
    })
    .await;

    // The steady state: not one query more, whatever the form.
    let cold = hark.metric("hark_cold_queries_total").await;
    let counts = |form| {
        let hark = &hark;
        async move {
            (
                hark.metric(&answers(form, "memory")).await,
                hark.metric(&answers(form, "database")).await,
            )
        }
    };
    let (head0, latest0, time0) = (
        counts("cursor").await,
        counts("none").await,
        counts("time").await,
    );
    const N: f64 = 25.0;
    for _ in 0..N as usize {
        let (s, body) = get_json(
            &poll_url(&hark, room, Some(&cursor), "&timeout=0"),
            Some(&t),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(ids(&body).is_empty(), "{body}");
        cursor = body["cursor"].as_str().unwrap().to_string();
        let (_, body) = get_json(&poll_url(&hark, room, None, "&timeout=0"), Some(&t)).await;
        assert_eq!(ids(&body), sent, "{body}");
        let (_, body) =
            get_json(&poll_url(&hark, room, Some(&since), "&timeout=0"), Some(&t)).await;
        assert_eq!(ids(&body), sent, "{body}");
    }
    assert_eq!(
        hark.metric("hark_cold_queries_total").await,
        cold,
        "a poll of a held room asked the database"
    );
    let (head1, latest1, time1) = (
        counts("cursor").await,
        counts("none").await,
        counts("time").await,
    );
    assert_eq!(
        (head1.0 - head0.0, head1.1 - head0.1),
        (N, 0.0),
        "head polls"
    );
    assert_eq!(
        (latest1.0 - latest0.0, latest1.1 - latest0.1),
        (N, 0.0),
        "latest pages"
    );
    assert_eq!(
        (time1.0 - time0.0, time1.1 - time0.1),
        (N, 0.0),
        "ISO polls"
    );

    // What commits later reaches the head poller, the latest page and the
    // ISO poll alike.
    let late = fx.insert(room, bob, "late").await;
    let (s, body) = get_json(
        &poll_url(&hark, room, Some(&cursor), "&timeout=10"),
        Some(&t),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), vec![late]);
    let mut all = sent.clone();
    all.push(late);
    let (_, body) = get_json(&poll_url(&hark, room, None, "&timeout=0"), Some(&t)).await;
    assert_eq!(ids(&body), all, "{body}");
    let (_, body) = get_json(&poll_url(&hark, room, Some(&since), "&timeout=0"), Some(&t)).await;
    assert_eq!(ids(&body), all, "{body}");
}

/// A room's window is bounded by `HARK_HUB_WINDOW`: a latest page larger
/// than it, or an ISO `since` older than what it holds, is read from the
/// database, and still right.
#[tokio::test]
async fn pages_beyond_the_window_are_read_from_the_database() {
    let (hark, fx) = setup(&[("HARK_HUB_WINDOW", "4")]).await;
    let alice = fx.user("alice").await;
    let room = fx.room("r", &[alice]).await;
    let before = iso(Utc::now() - chrono::Duration::seconds(1));
    let sent = fx.insert_many(room, alice, 10, "m").await;
    let t = token(alice);
    let latest = |limit: usize| poll_url(&hark, room, None, &format!("&timeout=0&limit={limit}"));
    let (_, body) = get_json(&latest(3), Some(&t)).await;
    assert_eq!(ids(&body), sent[7..]);
    eventually("a small latest page comes from memory", || async {
        let (_, body) = get_json(&latest(3), Some(&t)).await;
        assert_eq!(ids(&body), sent[7..], "{body}");
        hark.metric(&answers("none", "memory")).await >= 1.0
    })
    .await;
    let cold = hark.metric(&answers("none", "database")).await;
    let (_, body) = get_json(&latest(8), Some(&t)).await;
    assert_eq!(ids(&body), sent[2..], "{body}");
    assert_eq!(hark.metric(&answers("none", "database")).await, cold + 1.0);
    let (_, body) = get_json(
        &poll_url(&hark, room, Some(&before), "&timeout=0"),
        Some(&t),
    )
    .await;
    assert_eq!(ids(&body), sent, "{body}");
    assert_eq!(hark.metric(&answers("time", "database")).await, 1.0);
}

/// `HARK_HUB_WINDOW=0` keeps no window: every poll without a cursor reads
/// the database. A window beyond 10,000 is refused at start.
#[tokio::test]
async fn the_window_can_be_turned_off_and_is_bounded() {
    for value in ["10001", "-1", "many"] {
        assert_refused_at_start("HARK_HUB_WINDOW", value);
    }
    let (hark, fx) = setup(&[("HARK_HUB_WINDOW", "0")]).await;
    let alice = fx.user("alice").await;
    let room = fx.room("r", &[alice]).await;
    let sent = fx.insert_many(room, alice, 3, "m").await;
    let t = token(alice);
    // Long enough for a window to have been installed, were there one.
    for _ in 0..20 {
        let (_, body) = get_json(&poll_url(&hark, room, None, "&timeout=0"), Some(&t)).await;
        assert_eq!(ids(&body), sent, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hark.metric(&answers("none", "memory")).await, 0.0);
    assert_eq!(hark.metric(&answers("none", "database")).await, 20.0);
}

const WRITERS: usize = 6;
const MESSAGES: usize = 1200;
/// Clients joining mid-run: each of the [`Join`] kinds at every step.
const JOIN_STEPS: usize = 5;

#[derive(Clone, Copy, Debug)]
enum Join {
    /// At a cursor taken before the writers started.
    Head,
    /// With a latest page of `limit`.
    Latest(usize),
    /// With an ISO `since`.
    Time(DateTime<Utc>),
}

/// The room's messages once the writers are done: id and creation time.
type Table = Arc<Vec<(i64, DateTime<Utc>)>>;

/// A client that joins as `join` says, then re-polls its cursor at once
/// with `timeout=0`, until the writers are done and it holds all it is
/// due. Returns how often it saw each id, and the ids it is due.
async fn client(
    base: String,
    room: i64,
    token: String,
    join: Join,
    head: String,
    mut done: watch::Receiver<Option<Table>>,
) -> (HashMap<i64, usize>, Vec<i64>) {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let poll = |since: Option<&str>, limit: usize| {
        let since = since.map(|s| format!("&since={s}")).unwrap_or_default();
        format!("{base}/api/chat/messages/poll/?room_id={room}{since}&timeout=0&limit={limit}")
    };
    let mut first = match join {
        Join::Head => Some(poll(Some(&head), 100)),
        Join::Latest(limit) => Some(poll(None, limit)),
        Join::Time(t) => Some(poll(Some(&iso(t)), 100)),
    };
    // The smallest id of the first page of a latest join.
    let mut floor: Option<i64> = None;
    let mut cursor = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{join:?} stalled with {} ids",
            seen.len()
        );
        let url = first.clone().unwrap_or_else(|| poll(Some(&cursor), 100));
        match try_request(Method::GET, &url, Some(&token), None, &[]).await {
            Ok((StatusCode::OK, _, body)) => {
                let body = json(&body);
                let page = ids(&body);
                if first.take().is_some() {
                    if let Join::Latest(_) = join {
                        floor = Some(page.iter().copied().min().unwrap_or(i64::MAX));
                    }
                }
                for id in page {
                    *seen.entry(id).or_default() += 1;
                }
                cursor = body["cursor"].as_str().unwrap().to_string();
            }
            // hark restarting, or its database connection coming back:
            // the same request again once it is ready.
            Ok((StatusCode::SERVICE_UNAVAILABLE, _, _)) | Err(_) => {
                ready_again(&base).await;
                continue;
            }
            Ok((status, _, body)) => {
                panic!("{join:?}: {status}: {}", String::from_utf8_lossy(&body))
            }
        }
        if first.is_some() {
            continue;
        }
        let table = done.borrow_and_update().clone();
        if let Some(table) = table {
            // What this client is due: a head client everything; a latest
            // join everything from its first page's oldest on (older ones
            // that commit later come too, and are checked for duplicates);
            // an ISO join everything created after its time.
            let due: Vec<i64> = table
                .iter()
                .filter(|(id, at)| match join {
                    Join::Head => true,
                    Join::Latest(_) => floor.is_none_or(|f| f == i64::MAX || *id >= f),
                    Join::Time(t) => *at > t,
                })
                .map(|(id, _)| *id)
                .collect();
            if due.iter().all(|id| seen.contains_key(id)) {
                return (seen, due);
            }
        }
    }
}

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
    let head = first["cursor"].as_str().unwrap().to_string();
    let base = format!("http://{}", hark.addr);
    let (done_tx, done_rx) = watch::channel::<Option<Table>>(None);
    let spawn = |join: Join| {
        tokio::spawn(client(
            base.clone(),
            room,
            t.clone(),
            join,
            head.clone(),
            done_rx.clone(),
        ))
    };
    let mut clients = vec![spawn(Join::Head), spawn(Join::Head)];
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            // Quiet moments, in which the hub has read every commit: the
            // joins that come then are answered from memory.
            tokio::spawn(crate::lossless::writer(
                hark.db.clone(),
                room,
                writer_user,
                MESSAGES / WRITERS,
                w as u64 + 1,
                20_000,
            ))
        })
        .collect();
    for step in 1..=JOIN_STEPS {
        let want = (MESSAGES * step / (JOIN_STEPS + 1)) as i64;
        eventually("the writers make progress", || async {
            fx.message_count(room).await >= want
        })
        .await;
        // A time a little behind the newest message: the window holds it,
        // and late commits from before it are still coming.
        let at: DateTime<Utc> = fx
            .db
            .query_one(
                "SELECT created_at FROM chat_chatmessage WHERE room_id = $1 ORDER BY id DESC OFFSET 20 LIMIT 1",
                &[&room],
            )
            .await
            .unwrap()
            .get(0);
        clients.push(spawn(Join::Latest(30)));
        clients.push(spawn(Join::Latest(1000)));
        clients.push(spawn(Join::Time(at)));
        match (&disturb, step) {
            (Disturb::KillListener, 1..=3) => {
                assert_eq!(kill_listener(&fx.db).await, 1);
            }
            (Disturb::RestartHark, 2 | 4) => hark.restart().await,
            _ => {}
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let table: Table = Arc::new(
        fx.db
            .query(
                "SELECT id, created_at FROM chat_chatmessage WHERE room_id = $1 ORDER BY id",
                &[&room],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    );
    assert_eq!(table.len(), MESSAGES);
    done_tx.send(Some(table.clone())).unwrap();
    let in_room: HashSet<i64> = table.iter().map(|(id, _)| *id).collect();
    for c in clients {
        let (seen, due) = tokio::time::timeout(Duration::from_secs(160), c)
            .await
            .expect("a client timed out")
            .unwrap();
        let dupes: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
        assert!(dupes.is_empty(), "duplicates: {dupes:?}");
        assert!(seen.keys().all(|id| in_room.contains(id)));
        assert!(due.iter().all(|id| seen.contains_key(id)));
        assert!(!due.is_empty(), "a client due nothing proves nothing");
    }
    let mut from_memory = Vec::new();
    for form in ["cursor", "none", "time"] {
        from_memory.push((form, hark.metric(&answers(form, "memory")).await));
    }
    eprintln!("answers from memory during the run, since the last start: {from_memory:?}");

    // The quiet room afterwards: each form comes from memory, and says
    // what the table says.
    let ids_now: Vec<i64> = table.iter().map(|(id, _)| *id).collect();
    let latest = poll_url(&hark, room, None, "&timeout=0&limit=30");
    eventually("the latest page comes from memory", || async {
        let before = hark.metric(&answers("none", "memory")).await;
        let (_, body) = get_json(&latest, Some(&t)).await;
        assert_eq!(ids(&body), ids_now[MESSAGES - 30..], "{body}");
        hark.metric(&answers("none", "memory")).await > before
    })
    .await;
    let at = table[MESSAGES - 10].1;
    let since = iso(at);
    let after: Vec<i64> = table
        .iter()
        .filter(|(_, c)| *c > at)
        .map(|(id, _)| *id)
        .collect();
    let iso_url = poll_url(&hark, room, Some(&since), "&timeout=0");
    eventually("the ISO page comes from memory", || async {
        let before = hark.metric(&answers("time", "memory")).await;
        let (_, body) = get_json(&iso_url, Some(&t)).await;
        assert_eq!(ids(&body), after, "{body}");
        hark.metric(&answers("time", "memory")).await > before
    })
    .await;
    let (_, body) = get_json(&latest, Some(&t)).await;
    let cursor = body["cursor"].as_str().unwrap().to_string();
    let head_url = poll_url(&hark, room, Some(&cursor), "&timeout=0");
    eventually("the head poll comes from memory", || async {
        let before = hark.metric(&answers("cursor", "memory")).await;
        let (_, body) = get_json(&head_url, Some(&t)).await;
        assert!(ids(&body).is_empty(), "{body}");
        hark.metric(&answers("cursor", "memory")).await > before
    })
    .await;
    if let Disturb::KillListener = disturb {
        assert!(hark.metric("hark_listener_reconnects_total").await >= 3.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polls_at_the_head_and_joins_lose_nothing_under_out_of_order_commits() {
    run(Disturb::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polls_at_the_head_and_joins_lose_nothing_when_the_listener_is_killed() {
    run(Disturb::KillListener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polls_at_the_head_and_joins_lose_nothing_across_restarts() {
    run(Disturb::RestartHark).await;
}
