//! Presence and read receipts over real HTTP, one or two hark processes
//! on one real PostgreSQL: online and offline events and the snapshot
//! after `ready`, the grace (a reload does not flicker, and costs no
//! write), a process killed with SIGKILL, a graceful stop while another
//! process holds the user, receipts to the others and never to oneself,
//! and nothing of either for a non-participant or a removed participant.

use std::time::{Duration, Instant};

use crate::kit::sse::{open, Opts, Sse};
use crate::kit::*;
use hyper::StatusCode;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);
/// The grace these tests run with (HARK_PRESENCE_GRACE_MS).
const GRACE_MS: &str = "300";

async fn stream(hark: &Hark, query: &str, user: i64) -> Sse {
    let auth = format!("Bearer {}", token(user));
    let opts = Opts {
        signals: true,
        ..Opts::default()
    };
    let path = format!("/events{query}");
    let mut s = Sse::connect_with(hark.addr, &path, &[("Authorization", &auth)], opts).await;
    let (reset, _) = open(&mut s).await;
    assert_eq!(reset, None);
    s
}

fn user_json(id: i64, name: &str) -> Value {
    let mut first = name.to_string();
    first[..1].make_ascii_uppercase();
    json!({"id": id, "username": name, "first_name": first, "last_name": "Test"})
}

/// The next non-ping event, which must be of `kind` and carry no id.
async fn expect(s: &mut Sse, kind: &str) -> Value {
    let ev = s.expect(T).await;
    assert_eq!(ev.kind(), kind, "expected {kind}, got {ev:?}");
    assert_eq!(ev.id, None, "{kind} events carry no id: {ev:?}");
    ev.json()
}

fn presence(room: i64, user: &Value, online: bool) -> Value {
    json!({"room": room, "user": user, "online": online})
}

async fn room_of(hark: &Hark, room: i64, user: i64) -> Value {
    let (s, body) = get_json(
        &hark.url(&format!("/api/chat/rooms/{room}/")),
        Some(&token(user)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

fn online_ids(room: &Value) -> Vec<i64> {
    room["online_users"]
        .as_array()
        .unwrap_or_else(|| panic!("no online_users: {room}"))
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn online_and_offline_reach_co_participants_with_a_snapshot_after_ready() {
    let (hark, fx) = setup(&[("HARK_PRESENCE_GRACE_MS", GRACE_MS)]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let carol = fx.user("carol").await;
    let room = fx.room("ab", &[alice, bob]).await;
    let other = fx.room("ac", &[alice, carol]).await;
    let (a, b, c) = (
        user_json(alice, "alice"),
        user_json(bob, "bob"),
        user_json(carol, "carol"),
    );

    let mut alice_s = stream(&hark, &format!("?room_id={room}"), alice).await;
    alice_s.expect_quiet(Duration::from_millis(300)).await;
    // Carol shares a room with Alice, not with Bob.
    eventually("alice is online", || async {
        online_ids(&room_of(&hark, other, carol).await) == [alice]
    })
    .await;
    let mut carol_s = stream(&hark, "", carol).await;
    assert_eq!(
        expect(&mut carol_s, "presence").await,
        presence(other, &a, true)
    );

    // Bob arrives: his stream opens with Alice online, and Alice hears of
    // him once.
    let mut bob_s = stream(&hark, "", bob).await;
    assert_eq!(
        expect(&mut bob_s, "presence").await,
        presence(room, &a, true)
    );
    assert_eq!(
        expect(&mut alice_s, "presence").await,
        presence(room, &b, true)
    );
    assert_eq!(online_ids(&room_of(&hark, room, alice).await), [bob]);
    assert_eq!(online_ids(&room_of(&hark, room, bob).await), [alice]);

    // Bob leaves: offline once the grace has passed.
    drop(bob_s);
    let left = Instant::now();
    assert_eq!(
        expect(&mut alice_s, "presence").await,
        presence(room, &b, false)
    );
    assert!(
        left.elapsed() >= Duration::from_millis(250),
        "offline before the grace ended"
    );
    assert!(online_ids(&room_of(&hark, room, alice).await).is_empty());

    // Nothing of Bob reached Carol; never anything about oneself.
    carol_s.expect_quiet(Duration::from_millis(500)).await;
    alice_s.expect_quiet(Duration::from_millis(300)).await;
    let _ = c;
}

#[tokio::test]
async fn reloads_and_re_polls_within_the_grace_do_not_flicker_or_write() {
    let (hark, fx) = setup(&[("HARK_PRESENCE_GRACE_MS", "1500")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("ab", &[alice, bob]).await;
    let b = user_json(bob, "bob");
    let mut alice_s = stream(&hark, &format!("?room_id={room}"), alice).await;
    let bob_s = stream(&hark, &format!("?room_id={room}"), bob).await;
    assert_eq!(
        expect(&mut alice_s, "presence").await,
        presence(room, &b, true)
    );
    // Alice and Bob written online (the count moves just after the NOTIFY
    // that told Alice).
    eventually("both written online", || async {
        hark.metric("hark_presence_writes_total").await == 2.0
    })
    .await;
    let writes = 2.0;

    // Ten reloads, and polls between them: no event, no write.
    drop(bob_s);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = stream(&hark, &format!("?room_id={room}"), bob).await;
        let (st, _) = get_json(
            &poll_url(&hark, room, None, "&timeout=0"),
            Some(&token(bob)),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        drop(s);
    }
    // A poll alone keeps Bob online: it ended less than the grace ago.
    let (st, _) = get_json(
        &poll_url(&hark, room, None, "&timeout=0"),
        Some(&token(bob)),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    alice_s.expect_quiet(Duration::from_millis(1000)).await;
    assert_eq!(hark.metric("hark_presence_writes_total").await, writes);
    assert_eq!(
        expect(&mut alice_s, "presence").await,
        presence(room, &b, false)
    );
    assert_eq!(
        hark.metric("hark_presence_writes_total").await,
        writes + 1.0
    );
}

#[tokio::test]
async fn a_killed_process_takes_its_users_offline_and_a_stopped_one_only_its_own() {
    let (hark, fx) = setup(&[("HARK_PRESENCE_GRACE_MS", GRACE_MS)]).await;
    let mut second = start_hark(&hark.db, &[("HARK_PRESENCE_GRACE_MS", GRACE_MS)]).await;
    second.wait_ready().await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("ab", &[alice, bob]).await;
    let b = user_json(bob, "bob");
    let mut alice_s = stream(&hark, &format!("?room_id={room}"), alice).await;

    // Bob on both processes; the second stops gracefully: still online.
    let bob_first = stream(&hark, &format!("?room_id={room}"), bob).await;
    let bob_second = stream(&second, &format!("?room_id={room}"), bob).await;
    assert_eq!(
        expect(&mut alice_s, "presence").await,
        presence(room, &b, true)
    );
    drop(bob_second);
    second.restart().await;
    alice_s.expect_quiet(Duration::from_millis(1000)).await;
    assert_eq!(online_ids(&room_of(&hark, room, alice).await), [bob]);
    drop(bob_first);
    assert_eq!(
        expect(&mut alice_s, "presence").await,
        presence(room, &b, false)
    );

    // Bob on the second process only, which is killed outright: the first
    // sweeps him offline within 30 s.
    let _bob_s = stream(&second, &format!("?room_id={room}"), bob).await;
    assert_eq!(
        expect(&mut alice_s, "presence").await,
        presence(room, &b, true)
    );
    let pid = second.pid();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let at = Instant::now();
    let ev = alice_s.expect(Duration::from_secs(30)).await;
    assert_eq!(ev.kind(), "presence", "{ev:?}");
    assert_eq!(ev.json(), presence(room, &b, false));
    eprintln!("offline {:?} after SIGKILL", at.elapsed());
    assert!(at.elapsed() <= Duration::from_secs(30));
}

#[tokio::test]
async fn read_receipts_reach_the_others_never_oneself_nor_outsiders() {
    let (hark, fx) = setup(&[("HARK_PRESENCE_GRACE_MS", GRACE_MS)]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let carol = fx.user("carol").await;
    let room = fx.room("ab", &[alice, bob]).await;
    let _other = fx.room("c", &[carol]).await;
    let b = user_json(bob, "bob");
    let mut alice_s = stream(&hark, &format!("?room_id={room}"), alice).await;
    let mut bob_s = stream(&hark, "", bob).await;
    assert_eq!(expect(&mut bob_s, "presence").await["online"], true);
    assert_eq!(expect(&mut alice_s, "presence").await["online"], true);
    let mut carol_s = stream(&hark, "", carol).await;

    let (s, _) = post_json(
        &hark.url(&format!("/api/chat/rooms/{room}/read/")),
        Some(&token(bob)),
        "{}",
    )
    .await;
    assert!(s.is_success(), "{s}");
    let read = expect(&mut alice_s, "read").await;
    assert_eq!(read["room"], room);
    assert_eq!(read["user"], b);
    let read_at = read["read_at"].as_str().unwrap().to_string();
    assert!(read_at.ends_with('Z') && read_at.len() == 27, "{read_at}");
    bob_s.expect_quiet(Duration::from_millis(500)).await;
    carol_s.expect_quiet(Duration::from_millis(100)).await;

    let for_alice = room_of(&hark, room, alice).await;
    assert_eq!(
        for_alice["read_markers"],
        json!([{"user": bob, "read_at": read_at}])
    );
    // One's own marker is not among the others'.
    assert_eq!(room_of(&hark, room, bob).await["read_markers"], json!([]));
}

#[tokio::test]
async fn a_removed_participant_stops_getting_presence_and_receipts_at_once() {
    let (hark, fx) = setup(&[("HARK_PRESENCE_GRACE_MS", GRACE_MS)]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let carol = fx.user("carol").await;
    let room = fx.room("ab", &[alice, bob]).await;
    let _kept = fx.room("ac", &[alice, carol]).await;
    // Alice follows all her rooms, and hears Bob come and go in theirs.
    let mut alice_s = stream(&hark, "", alice).await;
    let bob_s = stream(&hark, &format!("?room_id={room}"), bob).await;
    assert_eq!(expect(&mut alice_s, "presence").await["online"], true);
    drop(bob_s);
    assert_eq!(expect(&mut alice_s, "presence").await["online"], false);
    fx.db
        .execute(
            "DELETE FROM chat_chatroom_participants WHERE chatroom_id = $1 AND user_id = $2",
            &[&room, &alice],
        )
        .await
        .unwrap();
    // Bob arrives and reads: Alice, no longer in the room, hears nothing.
    let bob_s = stream(&hark, &format!("?room_id={room}"), bob).await;
    let (s, _) = post_json(
        &hark.url(&format!("/api/chat/rooms/{room}/read/")),
        Some(&token(bob)),
        "{}",
    )
    .await;
    assert!(s.is_success(), "{s}");
    drop(bob_s);
    alice_s.expect_quiet(Duration::from_millis(1500)).await;
}
