//! Forged cursors: any text a client may send as `since` or
//! `Last-Event-ID`. PostgreSQL's own input rules for snapshots and
//! timestamps are pinned down against the test cluster; every cursor that
//! decodes reads through the real SQL without a database error; and over
//! HTTP, on both connection paths, a poll answers 200, 400 `invalid_since`
//! or 409 `cursor_reset`, a stream opens with `ready` (after `reset` when
//! it cannot resume) and goes on live, and hark logs no error.
//!
//! The cases come from a fixed seed, so a run is repeatable; set
//! `HARK_FUZZ_SEED` to explore further.

use std::time::Duration;

use crate::kit::sse::{open, Next, Opts, Sse};
use crate::kit::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hark::cursor::{Cursor, Lower, Position, Snapshot, PG_MIN_MICROS};
use hark::db::messages::{self, Read};
use hark::db::CachingClient;
use hyper::StatusCode;

const T: Duration = Duration::from_secs(10);

fn seed() -> u64 {
    std::env::var("HARK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261206)
}

// ------------------------------------------------------------- forging

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// A snapshot in the cursor's wire form, from exact values (valid or not).
fn put_snapshot(buf: &mut Vec<u8>, xmin: u64, xmax: u64, xip: &[u64]) {
    put_varint(buf, xmin);
    put_varint(buf, xmax.wrapping_sub(xmin));
    put_varint(buf, xip.len() as u64);
    let mut prev = xmin;
    for &x in xip {
        put_varint(buf, x.wrapping_sub(prev));
        prev = x;
    }
}

/// A number a forger would try: the edges of PostgreSQL's 32-bit epochs
/// and of signed and unsigned types, near the present, or any.
fn extreme(rng: &mut fastrand::Rng, present: u64) -> u64 {
    const EDGES: &[u64] = &[
        0,
        1,
        2,
        3,
        (1 << 31) - 1,
        1 << 31,
        (1 << 32) - 1,
        1 << 32,
        (1 << 32) + 1,
        (1 << 32) + 3,
        (1 << 63) - 1,
        1 << 63,
        (1 << 63) + 1,
        u64::MAX - (1 << 32) + 1,
        u64::MAX - 1,
        u64::MAX,
    ];
    match rng.u8(..5) {
        0 => rng.u64(..),
        1 => present.saturating_sub(rng.u64(..50)),
        2 => rng.u64(..present.max(2)),
        _ => EDGES[rng.usize(..EDGES.len())],
    }
}

fn forged_snapshot(rng: &mut fastrand::Rng, buf: &mut Vec<u8>, present: u64) {
    let xmin = extreme(rng, present);
    let span = if rng.bool() {
        rng.u64(..20)
    } else {
        extreme(rng, present)
    };
    put_varint(buf, xmin);
    put_varint(buf, span);
    let n = rng.u64(..4);
    put_varint(buf, n);
    for i in 0..n {
        let delta = match rng.u8(..3) {
            0 if i > 0 => 0,
            1 => extreme(rng, present),
            _ => rng.u64(..span.clamp(1, 10)),
        };
        put_varint(buf, delta);
    }
}

/// Cursor bytes as a forger makes them: `prefix` (the version, system
/// identifier and timeline of a genuine cursor, so that the cursor gets
/// past the origin check to the SQL), a tag and fields picked at the
/// edges, at times a byte changed anywhere; or random bytes.
fn forged(rng: &mut fastrand::Rng, prefix: &[u8], present: u64) -> Vec<u8> {
    if rng.u8(..10) == 0 {
        return (0..rng.usize(..48)).map(|_| rng.u8(..)).collect();
    }
    let mut b = prefix.to_vec();
    let tag = rng.u8(..3);
    b.push(tag);
    if tag == 1 {
        forged_snapshot(rng, &mut b, present);
    }
    if tag == 2 {
        const YEAR_US: i64 = 31_557_600_000_000;
        let micros = match rng.u8(..4) {
            0 => rng.i64(..),
            1 => PG_MIN_MICROS + rng.i64(-2..2),
            2 => [i64::MIN, i64::MAX, 0, -1][rng.usize(..4)],
            _ => rng.i64(-250_000 * YEAR_US..250_000 * YEAR_US),
        };
        put_varint(&mut b, zigzag(micros));
    }
    forged_snapshot(rng, &mut b, present);
    if tag != 0 {
        put_varint(&mut b, zigzag(rng.i64(..)));
    }
    if rng.u8(..4) == 0 {
        let i = rng.usize(..b.len());
        b[i] = rng.u8(..);
    }
    b
}

/// `n` forged cursor texts, and a few texts that are no cursor at all.
fn forged_texts(rng: &mut fastrand::Rng, prefix: &[u8], present: u64, n: usize) -> Vec<String> {
    let mut out: Vec<String> = (0..n)
        .map(|_| URL_SAFE_NO_PAD.encode(forged(rng, prefix, present)))
        .collect();
    for _ in 0..n / 20 {
        // Visible ASCII, so that it can travel in a header too.
        let len = rng.usize(1..60);
        out.push((0..len).map(|_| rng.char('!'..='~')).collect());
    }
    out
}

/// The version, system identifier and timeline of a genuine cursor, and
/// the xmax of its snapshot: the database's present.
fn genuine_parts(cursor: &str) -> (Vec<u8>, u64) {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).expect("a cursor is base64");
    let Ok(Cursor {
        position: Position::At(s),
        ..
    }) = Cursor::decode(cursor)
    else {
        panic!("not a plain cursor: {cursor}");
    };
    (bytes[..13].to_vec(), s.xmax)
}

/// The cases of issue 22, named, as (what, cursor, status of a poll):
/// each decodes to something the SQL used to refuse (a 500), or is a
/// snapshot from the database's future.
fn named_cases(prefix: &[u8], present: u64) -> Vec<(&'static str, String, u16)> {
    let at = |xmin: u64, xmax: u64| {
        let mut b = prefix.to_vec();
        b.push(0);
        put_snapshot(&mut b, xmin, xmax, &[]);
        URL_SAFE_NO_PAD.encode(b)
    };
    let paging = |lower: Option<(u64, u64)>, micros: i64, upper: (u64, u64, &[u64])| {
        let mut b = prefix.to_vec();
        match lower {
            Some((xmin, xmax)) => {
                b.push(1);
                put_snapshot(&mut b, xmin, xmax, &[]);
            }
            None => {
                b.push(2);
                put_varint(&mut b, zigzag(micros));
            }
        }
        put_snapshot(&mut b, upper.0, upper.1, upper.2);
        put_varint(&mut b, zigzag(0));
        URL_SAFE_NO_PAD.encode(b)
    };
    let bc_200000 = -200_000 * 31_557_600_000_000;
    vec![
        ("snapshot 0:0", at(0, 0), 400),
        (
            "200,000 years BC",
            paging(None, bc_200000, (3, present, &[])),
            400,
        ),
        (
            "a batch whose lower xmin is 0",
            paging(Some((0, 5)), 0, (3, present, &[])),
            400,
        ),
        ("xmin 2^32", at(1 << 32, (1 << 32) + 5), 409),
        ("xmin 2^63", at(1 << 63, (1 << 63) + 5), 409),
        ("xmax 2^63", at(5, 1 << 63), 409),
        ("xmin 2^32 + 1", at((1 << 32) + 1, (1 << 32) + 5), 409),
        // Valid, and in the database's past: read like any other.
        ("snapshot 1:1, before all", at(1, 1), 200),
        (
            "a batch whose upper snapshot does not see what its lower one saw",
            paging(
                Some((present - 5, present)),
                0,
                (3, present, &[present - 3]),
            ),
            200,
        ),
    ]
}

/// Alice and Bob in one room with a few messages; alice's token and a
/// genuine cursor.
async fn chat() -> (Hark, Fixture, i64, i64, String, String) {
    // No cap on streams: each batch of streams would otherwise wait for
    // the previous batch's to be noticed closed.
    let (hark, fx) = setup(&[("HARK_MAX_STREAMS_PER_USER", "0")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("general", &[alice, bob]).await;
    for i in 0..3 {
        fx.insert(room, bob, &format!("before {i}")).await;
    }
    let t = token(alice);
    let (s, body) = get_json(&poll_url(&hark, room, None, "&limit=1"), Some(&t)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let cursor = body["cursor"].as_str().unwrap().to_string();
    (hark, fx, bob, room, t, cursor)
}

fn assert_no_error_logged(hark: &Hark) {
    let logs = hark.logs();
    assert!(
        !logs.contains(" ERROR ") && !logs.contains("panicked"),
        "hark logged an error:\n{logs}"
    );
}

// -------------------------------------------------- PostgreSQL's rules

/// PostgreSQL 15's input rules, which `Cursor::decode` and
/// `Snapshot::new` apply before any SQL sees a cursor: a `pg_snapshot`
/// bound whose low 32 bits are 0 is refused (even 2^32 and 2^63; 2^32 + 1
/// is taken), xmin ≤ xmax, running ids ascending (repeats allowed) in
/// `[xmin, xmax)`, and any id (even one whose low bits are 0) among them;
/// a `timestamptz` no earlier than 4714-11-24 BC, and every instant
/// `chrono` holds up to its latest.
#[tokio::test]
async fn postgresql_s_own_input_rules_are_the_ones_hark_checks() {
    let db = fresh_db().await;
    let client = connect(&db).await;
    let snapshot = |text: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT $1::text::pg_snapshot::text", &[&text])
                .await
        }
    };
    for ok in [
        "1:1:",
        "3:3:",
        "5:10:5",
        "5:10:6,6",
        "5:10:",
        "4294967297:4294967300:",
        "4294967295:4294967297:",
        "4294967297:8589934597:8589934592",
        "9223372036854775809:9223372036854775810:",
        "18446744073709551615:18446744073709551615:",
    ] {
        snapshot(ok)
            .await
            .unwrap_or_else(|e| panic!("{ok} refused: {e}"));
    }
    for bad in [
        "0:0:",
        "0:5:",
        "5:0:",
        "6:5:",
        "4294967296:4294967300:",
        "4294967295:4294967296:",
        "9223372036854775808:9223372036854775808:",
        "5:10:10",
        "5:10:4",
        "5:10:7,6",
    ] {
        let e = snapshot(bad).await.expect_err(bad);
        assert_eq!(e.code().map(|c| c.code()), Some("22P02"), "{bad}: {e}");
    }
    // Each bound PostgreSQL refuses, hark turns into one it takes.
    for (xmin, xmax) in [(1 << 32, 1 << 32), (5, 1 << 63), ((1 << 33) - 7, 1 << 33)] {
        let s = Snapshot::new(xmin, xmax, vec![]).expect("valid");
        client
            .query_one("SELECT $1::text::pg_snapshot", &[&s.to_pg()])
            .await
            .unwrap_or_else(|e| panic!("{s:?}: {e}"));
    }
    assert!(Snapshot::new(0, 0, vec![]).is_none());

    let earliest = chrono::DateTime::from_timestamp_micros(PG_MIN_MICROS).unwrap();
    let before = earliest - chrono::Duration::microseconds(1);
    for ts in [earliest, chrono::DateTime::<chrono::Utc>::MAX_UTC] {
        client
            .query_one("SELECT $1::timestamptz", &[&ts])
            .await
            .unwrap_or_else(|e| panic!("{ts}: {e}"));
    }
    let e = client
        .query_one("SELECT $1::timestamptz", &[&before])
        .await
        .expect_err("before 4714 BC");
    assert_eq!(e.code().map(|c| c.code()), Some("22008"), "{e}");
}

/// Every cursor that decodes — of thousands forged at random and at the
/// edges — is read by the real SQL (the cold path of polls and streams)
/// without a database error.
#[tokio::test]
async fn every_cursor_that_decodes_reads_through_the_real_sql() {
    let db = fresh_db().await;
    let mut client = connect(&db).await;
    hark::db::migrate::migrate(&mut client)
        .await
        .expect("migrate");
    let client = CachingClient::new(client);
    let fx = Fixture::new(&db).await;
    let alice = fx.user("alice").await;
    let room = fx.room("general", &[alice]).await;
    fx.insert_many(room, alice, 5, "m").await;
    let present = messages::current_snapshot(&client)
        .await
        .expect("snapshot")
        .xmax;
    let prefix = [1u8; 13];
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut read = [0usize; 3];
    let budget = messages::Budget {
        bytes: 1 << 20,
        member: Some(1),
    };
    for case in 0..6000 {
        let text = URL_SAFE_NO_PAD.encode(forged(&mut rng, &prefix, present));
        let Ok(cursor) = Cursor::decode(&text) else {
            continue;
        };
        let result = match &cursor.position {
            Position::At(s) => {
                read[0] += 1;
                let r = Read::After {
                    lower: s,
                    limit: 10,
                };
                messages::read(&client, &[room], r, budget).await
            }
            Position::Paging {
                lower,
                upper,
                after_id,
            } => {
                read[matches!(lower, Lower::CreatedAfter(_)) as usize + 1] += 1;
                let r = Read::Batch {
                    lower,
                    upper,
                    after_id: *after_id,
                    limit: 10,
                };
                messages::read(&client, &[room], r, budget).await
            }
        };
        if let Err(e) = result {
            panic!("seed {}, case {case}: {text} ({cursor:?}): {e}", seed());
        }
    }
    // Each kind of cursor reached the SQL, many times.
    assert!(read.iter().all(|&n| n > 300), "{read:?}");
}

// ------------------------------------------------------------- over HTTP

/// Polls with forged cursors as `since`, on one keep-alive connection per
/// path: 200, 400 `invalid_since` or 409 `cursor_reset`, never a 500; the
/// cases of issue 22 each get their own status.
#[tokio::test]
async fn forged_cursors_as_since_are_200_400_or_409_on_both_paths() {
    let (hark, _fx, _bob, room, t, cursor) = chat().await;
    let (prefix, present) = genuine_parts(&cursor);
    let named = named_cases(&prefix, present);
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut cases: Vec<(String, String, Option<u16>)> = named
        .into_iter()
        .map(|(what, c, status)| (what.to_string(), c, Some(status)))
        .collect();
    for c in forged_texts(&mut rng, &prefix, present, 300) {
        cases.push((format!("seed {}", seed()), c, None));
    }
    let mut seen = std::collections::BTreeMap::new();
    for first in [None, HYPER_FIRST] {
        let mut raw = Raw::connect(hark.addr).await;
        if let Some(first) = first {
            raw.send(
                format!("{first} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
            )
            .await;
            raw.answer().await;
        }
        for (what, since, want) in &cases {
            let since: String = form_urlencoded::byte_serialize(since.as_bytes()).collect();
            raw.send(
                format!(
                    "GET /api/chat/messages/poll/?room_id={room}&since={since}&timeout=0 HTTP/1.1\r\n\
                     Host: x\r\nAuthorization: Bearer {t}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            let (head, body) = raw.answer().await;
            let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
            let v = json(&body);
            let what = format!("{what}, since={since}, via {first:?}: {status} {v}");
            match status {
                200 => assert!(v["messages"].is_array(), "{what}"),
                400 => assert_eq!(v["code"], "invalid_since", "{what}"),
                409 => assert_eq!(v["code"], "cursor_reset", "{what}"),
                _ => panic!("{what}"),
            }
            if let Some(want) = want {
                assert_eq!(status, *want, "{what}");
            }
            *seen.entry(status).or_insert(0) += 1;
        }
    }
    // The random cases reached every outcome, not only the refusal.
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_no_error_logged(&hark);
}

/// Streams resumed with forged cursors as `Last-Event-ID`, on both paths:
/// each opens with `ready` (after `reset` when it cannot resume: the cases
/// of issue 22 that a poll refuses), and goes on live — it delivers a
/// message committed after all of them opened, so none ended after
/// `ready`.
#[tokio::test]
async fn streams_resumed_from_forged_cursors_reset_or_resume_and_go_on_live_on_both_paths() {
    let (hark, fx, bob, room, t, cursor) = chat().await;
    let (prefix, present) = genuine_parts(&cursor);
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut cases: Vec<(String, String, Option<bool>)> = named_cases(&prefix, present)
        .into_iter()
        .map(|(what, c, status)| (what.to_string(), c, Some(status != 200)))
        .collect();
    for c in forged_texts(&mut rng, &prefix, present, 100) {
        cases.push((format!("seed {}", seed()), c, None));
    }
    let auth = format!("Bearer {t}");
    let (mut resets, mut resumed) = (0, 0);
    for batch in cases.chunks(25) {
        let mut streams = Vec::new();
        for (what, last, want_reset) in batch {
            for first in [None, HYPER_FIRST] {
                let mut s = Sse::connect_with(
                    hark.addr,
                    &format!("/events?room_id={room}"),
                    &[("Authorization", &auth), ("Last-Event-ID", last.as_str())],
                    Opts {
                        first,
                        ..Opts::default()
                    },
                )
                .await;
                let what = format!("{what}, Last-Event-ID {last:?}, via {first:?}");
                let (reset, ready) = open(&mut s).await;
                if let Some(want) = want_reset {
                    assert_eq!(reset.is_some(), *want, "{what}");
                }
                if reset.is_some() {
                    resets += 1;
                } else {
                    resumed += 1;
                    assert_eq!(ready.id.as_deref(), Some(last.as_str()), "{what}");
                }
                streams.push((what, s));
            }
        }
        let id = fx.insert(room, bob, "live").await;
        for (what, s) in &mut streams {
            // A resumed stream replays what its cursor has not seen first:
            // at most the room's few messages.
            let mut replayed = 0;
            loop {
                match s.next_non_ping(T).await {
                    Next::Event(ev) if ev.kind() == "message" && ev.json()["id"] == id => break,
                    Next::Event(ev) if ev.kind() == "message" && replayed < 50 => replayed += 1,
                    other => panic!("{what}: {other:?} instead of message {id}"),
                }
            }
        }
    }
    assert!(
        resets > 0 && resumed > 0,
        "{resets} resets, {resumed} resumed"
    );
    assert_no_error_logged(&hark);
}
