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
