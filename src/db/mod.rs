//! The database edge: the connection pool, the schema (`sql/`), the
//! embedded cluster, and the queries on messages and rooms.
//!
//! Pooled connections serve requests; the LISTEN connection is separate and
//! belongs to `delivery::listener`, because pooled connections drop
//! notifications and deadpool's recycling runs `UNLISTEN *`.

pub mod embedded;
pub mod messages;
pub mod migrate;
pub mod presence;
pub mod rooms;
pub(crate) mod sweep;
pub mod typing;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, Statement};

use crate::cursor::Origin;

/// A database failure, kept apart from client errors: it maps to 503 when
/// the database is unreachable and to 500 otherwise, never to a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had in time (pool exhausted or server down).
    /// Holds the failure itself — a [`tokio_postgres::Error`] or a pool
    /// error, for `source()` and `downcast_ref` — or, where nothing failed
    /// but a wait or a check, its description (`"…".into()`).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The server answered with an error.
    #[error("database error: {}", describe_query_error(.0))]
    Query(#[source] tokio_postgres::Error),
}

/// Operators grep logs for the SQLSTATE, so it leads when there is one.
fn describe_query_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        // A closed or broken connection is the database being away, not a
        // bad query; anything else (a server error, a type mismatch) is ours.
        use std::error::Error as _;
        let io = e.source().is_some_and(|s| s.is::<std::io::Error>());
        // SQLSTATE classes 08 (connection), 53 (resources), 57 (shutdown).
        let away = e
            .code()
            .is_some_and(|c| matches!(&c.code()[..2], "08" | "53" | "57"));
        if e.is_closed() || io || away {
            DbError::Unavailable(Box::new(e))
        } else {
            DbError::Query(e)
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => DbError::Unavailable(Box::new(other)),
        }
    }
}

/// Parses DATABASE_URL (URL or key=value form) and names the application so
/// hark's sessions can be told apart in `pg_stat_activity`.
pub fn pg_config(url: &str, application_name: &str) -> Result<tokio_postgres::Config, String> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))?;
    if cfg.get_application_name().is_none() {
        cfg.application_name(application_name);
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(30));
    Ok(cfg)
}

/// A fixed-size pool whose waits are bounded: an exhausted pool answers
/// 503 after a few seconds instead of queueing requests forever.
pub fn pool(cfg: tokio_postgres::Config, size: usize) -> Result<Pool, String> {
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| e.to_string())
}

/// The cluster's identity, stamped into every cursor. Reading the control
/// data needs no superuser; should a managed service refuse it anyway, the
/// database's OID and creation-time fallbacks would not be stable enough, so
/// hark uses 0 and says so (cursors then cannot detect a restore).
pub async fn origin(client: &tokio_postgres::Client) -> Origin {
    let row = client
        .query_one(
            "SELECT s.system_identifier::text, c.timeline_id::int8 \
             FROM pg_control_system() s, pg_control_checkpoint() c",
            &[],
        )
        .await;
    match row {
        Ok(row) => Origin {
            system_id: row.get::<_, String>(0).parse().unwrap_or(0),
            timeline: row.get::<_, i64>(1) as u32,
        },
        Err(e) => {
            tracing::warn!(error = %DbError::from(e), "cannot read the cluster identity; cursors will not detect a restore or failover");
            Origin {
                system_id: 0,
                timeline: 0,
            }
        }
    }
}

/// A client that keeps its prepared statements, so a query is one round
/// trip: pooled connections (deadpool's statement cache) and the listener's
/// own connection ([`CachingClient`]).
pub trait Prepared: Sync {
    fn statement(
        &self,
        sql: &'static str,
    ) -> impl Future<Output = Result<Statement, tokio_postgres::Error>> + Send;
    fn pg(&self) -> &tokio_postgres::Client;
}

impl Prepared for deadpool_postgres::Object {
    fn statement(
        &self,
        sql: &'static str,
    ) -> impl Future<Output = Result<Statement, tokio_postgres::Error>> + Send {
        self.prepare_cached(sql)
    }

    fn pg(&self) -> &tokio_postgres::Client {
        self
    }
}

/// A plain connection with a statement cache (the listener's).
pub struct CachingClient {
    client: tokio_postgres::Client,
    cache: Mutex<HashMap<&'static str, Statement>>,
}

impl CachingClient {
    pub fn new(client: tokio_postgres::Client) -> CachingClient {
        CachingClient {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl Prepared for CachingClient {
    async fn statement(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let hit = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
            .cloned();
        if let Some(st) = hit {
            return Ok(st);
        }
        let st = self.client.prepare(sql).await?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql, st.clone());
        Ok(st)
    }

    fn pg(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    /// A connection to a socket directory that does not exist: a real
    /// tokio-postgres failure, with no server needed.
    fn refused_config() -> tokio_postgres::Config {
        let dir = std::env::temp_dir().join(format!("hark-no-such-dir-{}", std::process::id()));
        pg_config(
            &format!("host={} user=nobody dbname=nothing", dir.display()),
            "test",
        )
        .expect("valid")
    }

    #[tokio::test]
    async fn an_unreachable_server_keeps_its_source() {
        let Err(e) = refused_config().connect(NoTls).await else {
            panic!("nothing listens there");
        };
        let why = e.to_string();
        let err = DbError::from(e);
        assert!(matches!(err, DbError::Unavailable(_)), "{err:?}");
        assert_eq!(err.to_string(), format!("database unavailable: {why}"));
        let source = err.source().expect("the failure is kept");
        assert!(source.downcast_ref::<tokio_postgres::Error>().is_some());
        // And its own cause, the I/O error, is still reachable.
        assert!(source.source().is_some());
    }

    #[tokio::test]
    async fn pool_failures_keep_their_source() {
        let pool = pool(refused_config(), 1).expect("pool");
        let err = DbError::from(pool.get().await.expect_err("nothing listens there"));
        assert!(matches!(err, DbError::Unavailable(_)), "{err:?}");
        assert!(err
            .source()
            .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
            .is_some());

        pool.close();
        let err = DbError::from(pool.get().await.expect_err("closed"));
        assert!(matches!(err, DbError::Unavailable(_)), "{err:?}");
        let source = err.source().expect("the pool error is kept");
        assert!(source
            .downcast_ref::<deadpool_postgres::PoolError>()
            .is_some());
        assert_eq!(err.to_string(), format!("database unavailable: {source}"));
    }
}
