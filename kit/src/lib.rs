//! The kit of hark's integration tests (`tests/it`) and benchmarks
//! (`benches/`): one copy of what both need.
//!
//! - [`pg`]: a private PostgreSQL cluster through hark's embedded module
//!   (ephemeral: it stops and is deleted when this process exits, however
//!   it exits), one per process for tests, a fresh database per test.
//! - [`process`]: the real `hark` binary as a child process (its path is
//!   the caller's `env!("CARGO_BIN_EXE_hark")`), its address from its
//!   first line, its log, `/readyz`, `/metrics`, stop and restart.
//! - [`fixture`]: users, rooms and messages written with plain SQL, as
//!   Django or psql would.
//! - [`http`]: requests through hyper's client; [`http::Raw`] and
//!   [`http::Conn`] for raw sockets (exact bytes, pipelining, and the
//!   benchmarks' 10,000 low-overhead connections); one response-head
//!   parser (httparse) for both.
//! - [`sse`]: one incremental de-chunker and event-stream parser, under
//!   the raw-socket [`sse::Sse`] client of the tests (slow readers,
//!   framing, pings) and the benchmarks' [`sse::SseDecoder`]; and
//!   [`sse::events`] (the `sse-stream` crate) where a client only reads
//!   events from an HTTP body.
//! - [`metrics`]: the Prometheus text parsed once.
//! - [`webdriver`]: a W3C WebDriver client for headless Chromium.
//! - [`soak`]: the soak with faults (two harks, writers, pollers and
//!   streams, a fault every interval), for `benches/soak.rs` and its short
//!   form in `tests/it/soak.rs`; [`pg::Restartable`], the cluster it
//!   restarts.

pub mod fixture;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod process;
pub mod procfs;
pub mod soak;
pub mod sse;
pub mod webdriver;

use std::time::Duration;

pub use fixture::{kill_listener, Fixture};
pub use http::{
    get_json, json, post_json, request, try_request, wait_peer_read, Conn, Headers, Raw, Resp,
};
pub use metrics::MetricsClient;
pub use pg::{connect, fresh_db};
pub use process::{Hark, Launch, Log};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, BoxError>;

/// An error from a message.
pub fn err(msg: impl Into<String>) -> BoxError {
    msg.into().into()
}

/// The JWT secret every hark started here gets.
pub const SECRET: &str = "test-secret-for-hark";

/// A simplejwt-shaped access token for `user` signed with [`SECRET`],
/// good for an hour.
pub fn token(user: i64) -> String {
    token_for(user, chrono::Duration::hours(1))
}

/// The same, good for `ttl` (its `exp`: now + ttl, in whole seconds).
pub fn token_for(user: i64, ttl: chrono::Duration) -> String {
    hark::auth::issue(SECRET.as_bytes(), user, ttl)
}

/// Polls `check` until it holds, within a generous bound (state the server
/// reaches on its own, e.g. after a NOTIFY, is looked at, not slept on).
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if !within(Duration::from_secs(15), check).await {
        panic!("{what}: not within 15 s");
    }
}

/// Polls `check` every 25 ms until it holds (true) or `limit` passes
/// (false). What the server announces only through state (a metric,
/// `/readyz`, a row, a socket read, a process gone) is waited for here,
/// never slept on.
pub async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(limit, || {
        let f = check();
        async move { f.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `probe` every 25 ms until it gives something, for at most
/// `limit`: the one polling loop of the kit.
pub async fn wait_for<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A path under the temp dir unique to this process and `name`.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hark-test-{}-{name}", std::process::id()))
}

/// `prefix-PID-NANOS` under the temp dir: a fresh directory name.
pub fn fresh_temp_dir(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ))
}

/// The poll path for a room, an optional cursor and extra query text.
pub fn poll_path(room: i64, since: Option<&str>, extra: &str) -> String {
    let mut u = format!("/api/chat/messages/poll/?room_id={room}");
    if let Some(s) = since {
        u.push_str("&since=");
        u.extend(form_urlencoded::byte_serialize(s.as_bytes()));
    }
    u.push_str(extra);
    u
}
