//! Configuration: every setting is an environment variable and a flag of the
//! same meaning (`hark --help` lists them with their defaults).
//!
//! Limits live here rather than as constants in the modules that enforce them
//! so that one place documents every bound a production operator can tune.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// hark's settings. Field docs are the `--help` text.
#[derive(Parser, Clone)]
#[command(
    name = "hark",
    version,
    about = "Typing indicators and real-time message sync (long poll + SSE) on PostgreSQL",
    long_about = None
)]
pub struct Config {
    /// PostgreSQL connection URL. Unset: hark starts an embedded PostgreSQL
    /// under its data directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Address to listen on.
    #[arg(long, env = "HARK_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// HS256 secret of the access tokens (the Django SIMPLE_JWT signing key).
    /// Unset in embedded mode: generated once and kept in the data directory.
    #[arg(long, env = "HARK_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Directory for the embedded cluster and the generated secret.
    #[arg(long, env = "HARK_DATA_DIR", default_value = "hark-data")]
    pub data_dir: PathBuf,

    /// Origins allowed to call hark from a browser: comma-separated, or `*`.
    /// Unset: no cross-origin access.
    #[arg(long, env = "HARK_CORS_ORIGINS")]
    pub cors_origins: Option<String>,

    /// How long a typing state lasts after the user's last `is_typing: true`.
    #[arg(long, env = "HARK_TYPING_TTL_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub typing_ttl_ms: u64,

    /// How long a user stays online after their last stream or poll ended
    /// (a reload or a re-poll within it is no change).
    #[arg(long, env = "HARK_PRESENCE_GRACE_MS", default_value_t = 10000,
          value_parser = clap::value_parser!(u64).range(0..=20_000))]
    pub presence_grace_ms: u64,

    /// Interval of `: ping` comments on idle event streams.
    #[arg(long, env = "HARK_PING_INTERVAL_MS", default_value_t = 15000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub ping_interval_ms: u64,

    /// Long-poll timeout when the request gives none, in seconds.
    #[arg(long, env = "HARK_POLL_TIMEOUT_DEFAULT_S", default_value_t = 25)]
    pub poll_timeout_default_s: u64,

    /// Largest long-poll timeout a request may ask for, in seconds.
    #[arg(long, env = "HARK_POLL_TIMEOUT_MAX_S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub poll_timeout_max_s: u64,

    /// Largest `limit` a poll may ask for.
    #[arg(long, env = "HARK_POLL_LIMIT_MAX", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub poll_limit_max: u32,

    /// Longest message content, in characters.
    #[arg(long, env = "HARK_MAX_CONTENT_CHARS", default_value_t = 10000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_content_chars: u32,

    /// Largest request body, in bytes.
    #[arg(long, env = "HARK_MAX_BODY_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u64).range(64..=16_777_216))]
    pub max_body_bytes: u64,

    /// Most bytes of messages one answer holds: a poll returns fewer
    /// messages with `has_more: true`, and a stream writes its catch-up page
    /// by page, so a client that does not read holds at most this much
    /// (a single larger message still goes out alone).
    #[arg(long, env = "HARK_MAX_ANSWER_BYTES", default_value_t = 1_048_576,
          value_parser = clap::value_parser!(u64).range(1024..=67_108_864))]
    pub max_answer_bytes: u64,

    /// How long hark remembers a deleted message (for cursors that have not
    /// seen the delete), in seconds; a cursor older than that gets
    /// `cursor_reset` (`event: reset` on a stream).
    #[arg(long, env = "HARK_TOMBSTONE_RETENTION_S", default_value_t = 604_800,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub tombstone_retention_s: u64,

    /// Message events an event stream may fall behind before the slow reader
    /// is disconnected (it resumes losslessly with Last-Event-ID).
    #[arg(long, env = "HARK_STREAM_BACKLOG", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub stream_backlog: u32,

    /// Seconds a response write may make no progress (a client that
    /// stopped reading: an event stream in a quiet room is never cut for
    /// lag) before its connection is closed.
    #[arg(long, env = "HARK_SEND_TIMEOUT_S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub send_timeout_s: u64,

    /// Most simultaneous client connections; beyond it hark answers 503.
    #[arg(long, env = "HARK_MAX_CONNECTIONS", default_value_t = 10000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Let the listener write a catch-up's rows to parked streams and
    /// waiting polls itself (docs/DESIGN.md §8); false wakes each of them
    /// instead. For measuring what the direct writes buy, and as an escape
    /// hatch.
    #[arg(long, env = "HARK_DIRECT_WRITES", default_value_t = true, action = clap::ArgAction::Set)]
    pub direct_writes: bool,

    /// Connections in the database pool (the LISTEN connection is extra).
    #[arg(long, env = "HARK_DB_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,

    /// Recent messages the hub keeps per watched room to answer polls from
    /// memory.
    #[arg(long, env = "HARK_HUB_RING", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub hub_ring: u32,

    /// Newest messages the hub keeps per watched room for polls without a
    /// cursor (the latest page, an ISO `since`), kept current by the
    /// catch-ups; 0 sends those polls to the database.
    #[arg(long, env = "HARK_HUB_WINDOW", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub hub_window: u32,

    /// Return freed heap memory to the OS (a jemalloc purge) once this many
    /// connections, and half of the peak, have closed; 0 turns it off.
    #[arg(long, env = "HARK_TRIM_AFTER_CONNECTIONS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub trim_after_connections: u32,

    /// Writes (messages, typing changes, read markers) one user may make
    /// per second, sustained, in this process; 0 turns the limit off.
    #[arg(long, env = "HARK_WRITE_RATE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub write_rate: u32,

    /// Writes one user may make at once before the rate applies.
    #[arg(long, env = "HARK_WRITE_BURST", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub write_burst: u32,

    /// Event streams one user may have open at once (per process); beyond
    /// it 429 `too_many_streams`. 0: no cap.
    #[arg(long, env = "HARK_MAX_STREAMS_PER_USER", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_streams_per_user: u32,

    /// Log filter (tracing's EnvFilter syntax, e.g. `info` or
    /// `warn,hark::request=info`). A filter that does not parse stops hark
    /// at start.
    #[arg(long, env = "HARK_LOG", default_value = "info", value_parser = log_filter)]
    pub log: String,

    /// Log line format: `text` (key=value) or `json` (one object per line,
    /// the event's fields at the top level, for log collectors).
    #[arg(long, env = "HARK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A filter tracing accepts, or clap's "invalid value" with the reason:
/// a typo in HARK_LOG should not silently log at another level.
fn log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

impl Config {
    pub fn typing_ttl(&self) -> Duration {
        Duration::from_millis(self.typing_ttl_ms)
    }

    pub fn presence_grace(&self) -> Duration {
        Duration::from_millis(self.presence_grace_ms)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
}

impl std::fmt::Debug for Config {
    // Secrets (the JWT key, the password inside DATABASE_URL) never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("bind", &self.bind)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<set>"))
            .field("data_dir", &self.data_dir)
            .field("cors_origins", &self.cors_origins)
            .field("typing_ttl_ms", &self.typing_ttl_ms)
            .field("presence_grace_ms", &self.presence_grace_ms)
            .field("ping_interval_ms", &self.ping_interval_ms)
            .field("poll_timeout_default_s", &self.poll_timeout_default_s)
            .field("poll_timeout_max_s", &self.poll_timeout_max_s)
            .field("poll_limit_max", &self.poll_limit_max)
            .field("max_content_chars", &self.max_content_chars)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_answer_bytes", &self.max_answer_bytes)
            .field("tombstone_retention_s", &self.tombstone_retention_s)
            .field("stream_backlog", &self.stream_backlog)
            .field("send_timeout_s", &self.send_timeout_s)
            .field("max_connections", &self.max_connections)
            .field("direct_writes", &self.direct_writes)
            .field("db_pool_size", &self.db_pool_size)
            .field("hub_ring", &self.hub_ring)
            .field("hub_window", &self.hub_window)
            .field("trim_after_connections", &self.trim_after_connections)
            .field("write_rate", &self.write_rate)
            .field("write_burst", &self.write_burst)
            .field("max_streams_per_user", &self.max_streams_per_user)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .finish()
    }
}
