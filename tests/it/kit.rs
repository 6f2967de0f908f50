//! The tests' side of the kit (`kit/`, the crate `hark_kit`, shared with
//! the benchmarks): the binary under test and start-up with the tests'
//! defaults.

pub use hark_kit::sse;
pub use hark_kit::webdriver;
pub use hark_kit::*;
// The kit's boxed-error `Result` is for the benchmarks; tests keep std's.
pub use std::result::Result;

/// The hark binary Cargo built for these tests.
pub const HARK: &str = env!("CARGO_BIN_EXE_hark");

/// A first request that hark's own HTTP leaves to hyper (a method it does
/// not serve; a 405 that keeps the connection): a request after it on the
/// same connection is served by hyper.
pub const HYPER_FIRST: Option<&str> = Some("PUT /api/chat/messages/");

/// Starts hark on `db` at a free port of 127.0.0.1 (log in memory, at
/// `info`); `env` adds or overrides settings.
pub async fn start_hark(db: &str, env: &[(&str, &str)]) -> Hark {
    Hark::launch(Launch::new(HARK, db).env(&[("HARK_LOG", "info")]).env(env))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts hark on a fresh database (its schema applied) and returns both.
pub async fn setup(env: &[(&str, &str)]) -> (Hark, Fixture) {
    let db = fresh_db().await;
    let hark = start_hark(&db, env).await;
    hark.wait_ready().await;
    let fx = Fixture::new(&db).await;
    (hark, fx)
}

/// Three users, `alice`, `bob` and `carol`, and a room `name` of alice,
/// bob and (`with_carol`) carol: (alice, bob, carol, room).
pub async fn three_users(fx: &Fixture, name: &str, with_carol: bool) -> (i64, i64, i64, i64) {
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let carol = fx.user("carol").await;
    let members = [alice, bob, carol];
    let room = fx
        .room(name, &members[..if with_carol { 3 } else { 2 }])
        .await;
    (alice, bob, carol, room)
}

/// hark on a fresh database with [`three_users`].
pub struct Chat {
    pub hark: Hark,
    pub fx: Fixture,
    pub alice: i64,
    pub bob: i64,
    pub carol: i64,
    pub room: i64,
}

impl Chat {
    pub async fn start(env: &[(&str, &str)], name: &str, with_carol: bool) -> Chat {
        let (hark, fx) = setup(env).await;
        let (alice, bob, carol, room) = three_users(&fx, name, with_carol).await;
        Chat {
            hark,
            fx,
            alice,
            bob,
            carol,
            room,
        }
    }
}

/// Sends a message as the holder of `token`; asserts the 201 and returns
/// the message.
pub async fn post_message(hark: &Hark, room: i64, token: &str, content: &str) -> serde_json::Value {
    let (s, body) = post_json(
        &hark.url("/api/chat/messages/"),
        Some(token),
        &serde_json::json!({"room_id": room, "content": content}).to_string(),
    )
    .await;
    assert_eq!(s, hyper::StatusCode::CREATED, "{body}");
    body
}

/// Starts or stops typing as the holder of `token`; asserts the answer.
pub async fn set_typing(hark: &Hark, room: i64, token: &str, on: bool) {
    let (s, body) = post_json(
        &hark.url(&format!("/api/chat/rooms/{room}/typing/")),
        Some(token),
        &serde_json::json!({ "is_typing": on }).to_string(),
    )
    .await;
    assert_eq!(s, hyper::StatusCode::OK, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"success": true, "message": "Typing status updated"})
    );
}

/// The poll URL for a room and optional cursor.
pub fn poll_url(hark: &Hark, room: i64, since: Option<&str>, extra: &str) -> String {
    hark.url(&poll_path(room, since, extra))
}

/// Asserts that hark refuses `var=value` at start with clap's "invalid
/// value" naming the value. Were the value accepted, hark would stop at
/// once all the same (a database URL without a secret is refused before
/// connecting), so a wrong acceptance fails on the message, not a hang.
pub fn assert_refused_at_start(var: &str, value: &str) {
    let out = std::process::Command::new(HARK)
        .env_clear()
        .env("DATABASE_URL", "host=/nonexistent dbname=none")
        .env(var, value)
        .output()
        .expect("run hark");
    assert!(!out.status.success(), "{var}={value} was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value") && err.contains(value),
        "{var}={value}: {err}"
    );
}

/// FNV-1a, 64 bits: a stable name for a content, such as a virtualenv's
/// pins (std's hasher may change between Rust releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs a command to its end within `limit`; its output.
pub async fn run(
    cmd: &mut tokio::process::Command,
    what: &str,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start it: {e}"));
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A finished command's stdout and stderr, as text.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
