//! Two hark processes on one database, as behind a load balancer: what is
//! written through one reaches streams and polls on the other, typing
//! included, and expiry's stop goes out once, not once per process.

use std::time::Duration;

use crate::kit::sse::{open, Sse};
use crate::kit::*;
use hyper::StatusCode;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

struct Two {
    a: Hark,
    b: Hark,
    fx: Fixture,
    alice: i64,
    bob: i64,
    carol: i64,
    room: i64,
}

/// Two processes on one fresh database, started one after the other (each
/// applies the schema at start), and a room of three.
async fn two(env: &[(&str, &str)]) -> Two {
    let db = fresh_db().await;
    let a = start_hark(&db, env).await;
    a.wait_ready().await;
    let b = start_hark(&db, env).await;
    b.wait_ready().await;
    let fx = Fixture::new(&db).await;
    let (alice, bob, carol, room) = three_users(&fx, "r", true).await;
    Two {
        a,
        b,
        fx,
        alice,
        bob,
        carol,
        room,
    }
}

async fn stream(hark: &Hark, query: &str, token: &str, last: Option<&str>) -> (Sse, String) {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(l) = last {
        headers.push(("Last-Event-ID", l));
    }
    let mut s = Sse::connect(hark.addr, &format!("/events{query}"), &headers).await;
    let (reset, ready) = open(&mut s).await;
    assert_eq!(reset, None, "{query}: not reset");
    (s, ready.id.unwrap())
}

async fn expect_message(s: &mut Sse) -> (String, Value) {
    let ev = s.expect(T).await;
    assert_eq!(ev.kind(), "message", "expected a message, got {ev:?}");
    (ev.id.clone().expect("message id"), ev.json())
}

async fn expect_typing(s: &mut Sse) -> Value {
    let ev = s.expect(T).await;
    assert_eq!(ev.kind(), "typing", "expected a typing event, got {ev:?}");
    assert_eq!(ev.id, None);
    ev.json()
}

fn user_json(id: i64, name: &str) -> Value {
    let mut first = name.to_string();
    first[..1].make_ascii_uppercase();
    json!({"id": id, "username": name, "first_name": first, "last_name": "Test"})
}

#[tokio::test]
async fn a_message_posted_to_one_process_reaches_streams_on_both() {
    let Two {
        a,
        b,
        fx,
        alice,
        bob,
        room,
        ..
    } = two(&[]).await;
    let (ta, tb) = (token(alice), token(bob));
    let q = format!("?room_id={room}");
    let (mut on_b, _) = stream(&b, &q, &ta, None).await;
    let (mut on_a, _) = stream(&a, "", &ta, None).await;

    let posted = post_message(&a, room, &tb, "through A").await;
    let (id_b, m) = expect_message(&mut on_b).await;
    assert_eq!(m, posted, "B's stream carries the Message A answered");
    let (_, m) = expect_message(&mut on_a).await;
    assert_eq!(m, posted);

    let posted2 = post_message(&b, room, &tb, "through B").await;
    assert_eq!(expect_message(&mut on_a).await.1, posted2);
    assert_eq!(expect_message(&mut on_b).await.1, posted2);
    let sql = fx.insert(room, bob, "plain sql").await;
    assert_eq!(expect_message(&mut on_a).await.1["id"], sql);
    assert_eq!(expect_message(&mut on_b).await.1["id"], sql);

    // A cursor from B resumes on A: one database, one cursor space.
    drop(on_b);
    let missed = post_message(&b, room, &tb, "while away").await;
    let (mut on_a2, ready) = stream(&a, &q, &ta, Some(&id_b)).await;
    assert_eq!(ready, id_b);
    assert_eq!(expect_message(&mut on_a2).await.1, posted2);
    assert_eq!(expect_message(&mut on_a2).await.1["id"], sql);
    assert_eq!(expect_message(&mut on_a2).await.1, missed);
}

#[tokio::test]
async fn typing_crosses_processes_and_expiry_stops_once() {
    let Two {
        a,
        b,
        fx,
        alice,
        bob,
        carol,
        room,
    } = two(&[("HARK_TYPING_TTL_MS", "300")]).await;
    let (ta, tb, tc) = (token(alice), token(bob), token(carol));
    let q = format!("?room_id={room}");
    let (mut alice_on_b, _) = stream(&b, &q, &ta, None).await;
    let (mut carol_on_a, _) = stream(&a, "", &tc, None).await;
    let (mut bob_on_b, _) = stream(&b, &q, &tb, None).await;
    let bob_user = user_json(bob, "bob");
    let on = json!({"room": room, "user": bob_user, "is_typing": true});
    let off = json!({"room": room, "user": bob_user, "is_typing": false});

    for round in 0..2 {
        // The start goes to A; both processes sweep expiries.
        set_typing(&a, room, &tb, true).await;
        assert_eq!(expect_typing(&mut alice_on_b).await, on, "round {round}");
        assert_eq!(expect_typing(&mut carol_on_a).await, on, "round {round}");
        assert_eq!(expect_typing(&mut alice_on_b).await, off, "round {round}");
        assert_eq!(expect_typing(&mut carol_on_a).await, off, "round {round}");
        // No second stop from the other process: give it five TTLs.
        alice_on_b.expect_quiet(Duration::from_millis(1500)).await;
        let marker = fx.insert(room, alice, "marker").await;
        for (name, s) in [
            ("alice on B", &mut alice_on_b),
            ("carol on A", &mut carol_on_a),
            ("bob on B", &mut bob_on_b),
        ] {
            let (_, m) = expect_message(s).await;
            assert_eq!(m["id"], marker, "round {round}, {name}: one stop only");
        }
    }

    // An explicit stop through B reaches A's stream.
    set_typing(&a, room, &tb, true).await;
    assert_eq!(expect_typing(&mut carol_on_a).await, on);
    set_typing(&b, room, &tb, false).await;
    assert_eq!(expect_typing(&mut carol_on_a).await, off);
}

#[tokio::test]
async fn a_long_poll_on_one_process_wakes_for_a_post_to_the_other() {
    let Two {
        a,
        b,
        alice,
        bob,
        room,
        ..
    } = two(&[]).await;
    let (ta, tb) = (token(alice), token(bob));
    let (s, first) = get_json(&poll_url(&b, room, None, ""), Some(&ta)).await;
    assert_eq!(s, StatusCode::OK);
    let cursor = first["cursor"].as_str().unwrap().to_string();

    let url = poll_url(&b, room, Some(&cursor), "&timeout=30");
    let started = std::time::Instant::now();
    let waiter = tokio::spawn(async move { get_json(&url, Some(&ta)).await });
    b.wait_for_metric("hark_waiting_polls", 1.0).await;
    assert!(!waiter.is_finished());
    let posted = post_message(&a, room, &tb, "wake B").await;
    let (s, body) = tokio::time::timeout(T, waiter)
        .await
        .expect("B's poll was not woken by a POST to A")
        .unwrap();
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["messages"], json!([posted]));
    assert!(started.elapsed() < Duration::from_secs(25));
    b.wait_for_metric("hark_waiting_polls", 0.0).await;
}

#[tokio::test]
async fn expiry_still_stops_when_the_process_that_took_the_start_is_gone() {
    let Two {
        mut a,
        b,
        alice,
        bob,
        room,
        ..
    } = two(&[("HARK_TYPING_TTL_MS", "1000")]).await;
    let (ta, tb) = (token(alice), token(bob));
    let (mut alice_on_b, _) = stream(&b, &format!("?room_id={room}"), &ta, None).await;
    let bob_user = user_json(bob, "bob");
    set_typing(&a, room, &tb, true).await;
    assert_eq!(
        expect_typing(&mut alice_on_b).await,
        json!({"room": room, "user": bob_user, "is_typing": true})
    );
    a.stop().await;
    assert_eq!(
        expect_typing(&mut alice_on_b).await,
        json!({"room": room, "user": bob_user, "is_typing": false})
    );
}
