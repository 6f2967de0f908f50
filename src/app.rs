//! Start-up, wiring and shutdown: the embedded cluster when there is no
//! `DATABASE_URL`, the schema, the delivery core, the HTTP edge's shared
//! state ([`crate::http::shared::Shared`]) and the background tasks, each
//! part owned by its module and handed over as a cheap handle, not a
//! global.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::net::TcpListener;

use crate::auth::Auth;
use crate::config::Config;
use crate::db::embedded::{EmbeddedError, EmbeddedOptions, EmbeddedPg};
use crate::db::{self, migrate, DbError};
use crate::delivery::directory::Directory;
use crate::delivery::hub::Hub;
use crate::delivery::listener::Listener;
use crate::delivery::presence::Presence;
use crate::delivery::reader::Reader;
use crate::delivery::typing::Typing;
use crate::http::cors::Cors;
use crate::http::h1::Limits;
use crate::http::shared::Shared;
use crate::metrics::Metrics;
use crate::ratelimit::WriteLimit;
use crate::shutdown;
use crate::stream_quota::StreamQuota;

/// A start-up failure, said in one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
        /// What to do about it, when hark can tell.
        hint: &'static str,
    },
    /// A setting that cannot work.
    #[error("{0}")]
    Setting(String),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] DbError),
    #[error("cannot apply the schema: {0}")]
    Schema(#[source] DbError),
    #[error("cannot seed the demo: {0}")]
    Seed(#[source] DbError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs hark until SIGTERM or SIGINT.
pub async fn run(mut config: Config) -> Result<(), StartError> {
    // The port first: a clash is the likeliest start-up failure of a
    // first try, and should not wait for a database to start.
    let tcp = listen(config.bind).map_err(|source| StartError::Listen {
        addr: config.bind,
        hint: if source.kind() == std::io::ErrorKind::AddrInUse {
            " (another process has it: set HARK_BIND to another address, e.g. HARK_BIND=127.0.0.1:8081)"
        } else {
            ""
        },
        source,
    })?;
    if let Some(fds) = raise_fd_limit() {
        let cap = connection_cap(fds, config.db_pool_size);
        if config.max_connections > cap {
            tracing::warn!(
                configured = config.max_connections,
                cap,
                open_files = fds,
                "HARK_MAX_CONNECTIONS is more than the open-file limit allows; \
                 connections beyond the cap get 503 (raise `ulimit -n` for more)"
            );
            config.max_connections = cap;
        }
    }
    let mut embedded = None;
    let url = match &config.database_url {
        Some(url) => url.clone(),
        None => {
            let pg = EmbeddedPg::start(EmbeddedOptions {
                data_dir: config.data_dir.join("pg"),
                ephemeral: false,
                settings: Vec::new(),
            })
            .await?;
            pg.ensure_database("hark").await?;
            let url = pg.connection_string("hark");
            embedded = Some(pg);
            url
        }
    };
    let result = serve(config, tcp, &url, embedded.is_some()).await;
    if let Some(pg) = embedded {
        if let Err(e) = pg.stop().await {
            tracing::warn!(error = %e, "embedded PostgreSQL did not stop cleanly");
        }
    }
    result
}

async fn serve(
    config: Config,
    tcp: TcpListener,
    url: &str,
    embedded: bool,
) -> Result<(), StartError> {
    let secret = jwt_secret(&config, embedded)?;
    let openapi = crate::http::openapi::document(&config).map_err(StartError::Setting)?;
    let pg = db::pg_config(url, "hark").map_err(StartError::Setting)?;
    let pool = db::pool(pg.clone(), config.db_pool_size as usize).map_err(StartError::Setting)?;
    let origin = {
        let mut client = pool
            .get()
            .await
            .map_err(|e| StartError::Connect(e.into()))?;
        migrate::migrate(&mut client)
            .await
            .map_err(StartError::Schema)?;
        db::origin(&client).await
    };
    let demo = if embedded {
        seed_demo(&pool).await.map_err(StartError::Seed)?
    } else {
        Vec::new()
    };

    let (trigger, shutdown) = shutdown::channel();
    let metrics = Metrics::new();
    let hub = Hub::new(
        config.hub_ring as usize,
        config.hub_window as usize,
        metrics.clone(),
    );
    let directory = Directory::new(pool.clone(), hub.clone());
    let typing = Typing::new(pool.clone(), config.typing_ttl());
    let presence = Presence::new(pool.clone(), config.presence_grace(), metrics.clone());
    let cors = Cors::new(config.cors_origins.as_deref());
    let listener_task = tokio::spawn(
        Listener {
            pg,
            hub: hub.clone(),
            directory: directory.clone(),
            typing: typing.clone(),
            metrics: metrics.clone(),
            encode: Arc::new(crate::http::parked::Frames { cors: cors.clone() }),
            answer_bytes: config.max_answer_bytes as usize,
        }
        .run(shutdown.clone()),
    );
    let sweeper_task = tokio::spawn(typing.clone().run_sweeper(shutdown.clone()));
    let presence_task = tokio::spawn(presence.clone().run(shutdown.clone()));
    let table_sweeper_task = tokio::spawn(db::sweep::run(
        pool.clone(),
        Duration::from_secs(config.tombstone_retention_s),
        shutdown.clone(),
    ));
    // Streams wait only on their subscriptions, so the signal (also fired
    // by a dropped trigger) reaches them through the hub.
    tokio::spawn({
        let hub = hub.clone();
        let mut shutdown = shutdown.clone();
        async move {
            shutdown.wait().await;
            hub.wake_streams();
        }
    });
    let write_limit = WriteLimit::new(config.write_rate, config.write_burst);
    let limit_sweeper_task = tokio::spawn(write_limit.clone().run_sweeper(shutdown.clone()));
    let trim_task = tokio::spawn(crate::trim::run(
        metrics.clone(),
        config.trim_after_connections,
        shutdown.clone(),
    ));
    // Serving before the listener is up would only send every poll to the
    // cold path; wait briefly for it (readyz reports it either way).
    for _ in 0..100 {
        if hub.listener_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stream_quota = StreamQuota::new(config.max_streams_per_user);
    let limits = Limits {
        header: crate::http::server::HEADER_READ_TIMEOUT,
        stall: Duration::from_secs(config.send_timeout_s),
        max_body: config.max_body_bytes,
        parking: config.direct_writes,
        shutdown: shutdown.clone(),
    };
    let app = Arc::new(Shared {
        cors,
        auth: Auth::new(secret.as_bytes()),
        config,
        pool: pool.clone(),
        reader: Reader::new(hub.clone(), pool.clone(), metrics.clone()),
        hub,
        directory,
        typing,
        presence,
        metrics,
        write_limit,
        stream_quota,
        limits,
        shutdown: shutdown.clone(),
        openapi,
        startup_origin: origin,
    });
    let addr = tcp.local_addr().map_err(|source| StartError::Io {
        what: "cannot read the listening address".into(),
        source,
    })?;
    announce(addr, &secret, &demo);
    let server = tokio::spawn(crate::http::serve(app.clone(), tcp, shutdown));

    wait_for_signal().await;
    tracing::info!("shutting down: answering waiting polls, ending streams");
    trigger.fire();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = listener_task.await;
    let _ = sweeper_task.await;
    let _ = presence_task.await;
    let _ = table_sweeper_task.await;
    let _ = limit_sweeper_task.await;
    let _ = trim_task.await;
    pool.close();
    Ok(())
}

/// Binds with a deep accept queue: thousands of clients reconnect at once
/// after a restart, and std's default backlog of 128 drops their SYNs
/// (they retry only after a second). The kernel caps it at somaxconn.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The signing secret: configured, or (embedded mode only) generated once
/// and kept in the data directory.
fn jwt_secret(config: &Config, embedded: bool) -> Result<String, StartError> {
    if let Some(s) = &config.jwt_secret {
        if s.is_empty() {
            return Err(StartError::Setting("HARK_JWT_SECRET is empty".into()));
        }
        return Ok(s.clone());
    }
    if !embedded {
        return Err(StartError::Setting(
            "HARK_JWT_SECRET is required with DATABASE_URL: set it to the Django SIMPLE_JWT signing key"
                .into(),
        ));
    }
    let path = config.data_dir.join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StartError::Io {
                what: format!("cannot read {}", path.display()),
                source,
            })
        }
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| StartError::Setting(format!("no randomness for the secret: {e}")))?;
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &secret).map_err(|source| StartError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    })?;
    Ok(secret)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// Two users and a room on an empty embedded database; returns the demo
/// users (id, username) whenever they exist.
async fn seed_demo(pool: &Pool) -> Result<Vec<(i64, String)>, db::DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let empty: bool = tx
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM users_user)", &[])
        .await?
        .get(0);
    if empty {
        tx.batch_execute(
            "INSERT INTO users_user (username, first_name, last_name) VALUES
                 ('alice', 'Alice', 'Liddell'), ('bob', 'Bob', 'Builder');
             INSERT INTO chat_chatroom (type, name) VALUES ('group', 'General');
             INSERT INTO chat_chatroom_participants (chatroom_id, user_id)
                 SELECT r.id, u.id FROM chat_chatroom r, users_user u
                 WHERE r.name = 'General' AND u.username IN ('alice', 'bob');
             INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at)
                 SELECT r.id, u.id, 'Welcome to hark! Open this page as the other user in a second tab.', now()
                 FROM chat_chatroom r, users_user u WHERE r.name = 'General' AND u.username = 'alice';",
        )
        .await?;
        tracing::info!("seeded the demo: users alice and bob, room General");
    }
    let rows = tx
        .query(
            "SELECT id, username::text FROM users_user WHERE username IN ('alice', 'bob') ORDER BY id",
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Tells the operator where hark is (stdout, not the log: the demo tokens
/// printed here are the point of embedded mode).
fn announce(addr: SocketAddr, secret: &str, demo: &[(i64, String)]) {
    tracing::info!(%addr, "listening");
    let host = if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    };
    println!("hark is listening on http://{host}");
    for (id, name) in demo {
        let token = crate::auth::issue(secret.as_bytes(), *id, chrono::Duration::days(7));
        println!("  demo user {name} (id {id}): http://{host}/?token={token}");
        println!("    curl -H 'Authorization: Bearer {token}' http://{host}/api/chat/rooms/");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM's default action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Each waiting poll and stream is a socket: lift the soft descriptor limit
/// to the hard one, as servers do. Returns the soft limit now in force.
fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// The most client connections `fds` descriptors carry while hark keeps
/// what it needs besides: its own files and the embedded PostgreSQL's
/// pipes, the pool and the LISTEN connection, /metrics and /readyz, and the
/// connections it refuses (each holds a descriptor until its 503 is out).
/// Past it, accept() fails with EMFILE and clients wait unanswered in the
/// kernel's queue instead of getting the 503 the setting exists for.
fn connection_cap(fds: u64, pool: u32) -> u32 {
    let reserve = 64 + u64::from(pool) + 1 + fds / 20;
    u32::try_from(fds.saturating_sub(reserve).max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::connection_cap;

    #[test]
    fn the_connection_cap_leaves_room_for_harks_own_descriptors() {
        // 20,000 descriptors (this project's machines): 18,919 clients.
        assert_eq!(connection_cap(20_000, 16), 20_000 - (64 + 16 + 1 + 1_000));
        assert_eq!(connection_cap(1_024, 16), 1_024 - (64 + 16 + 1 + 51));
        assert_eq!(connection_cap(10, 16), 1);
    }
}
