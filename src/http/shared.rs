//! The state every handler of the HTTP edge shares.

use std::sync::Arc;

use deadpool_postgres::Pool;

use super::cors::Cors;
use super::h1::Limits;
use crate::auth::Auth;
use crate::config::Config;
use crate::cursor::Origin;
use crate::delivery::directory::Directory;
use crate::delivery::hub::Hub;
use crate::delivery::presence::Presence;
use crate::delivery::reader::Reader;
use crate::delivery::typing::Typing;
use crate::metrics::Metrics;
use crate::ratelimit::WriteLimit;
use crate::shutdown::Shutdown;
use crate::stream_quota::StreamQuota;

/// What the handlers share, one per process behind an `Arc`: handles to
/// the delivery core, the database pool, and the edge's own settings.
/// `app.rs` builds it.
pub(crate) struct Shared {
    pub config: Config,
    pub pool: Pool,
    pub hub: Hub,
    /// Pages after a position, from the hub or the database.
    pub reader: Reader,
    pub directory: Directory,
    pub typing: Typing,
    /// Who holds a stream or poll here (online, cluster-wide).
    pub presence: Presence,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub cors: Cors,
    /// Each user's budget of writes (send, typing, read marker).
    pub write_limit: WriteLimit,
    /// Each user's count of open event streams, and its cap.
    pub stream_quota: StreamQuota,
    /// hark's own HTTP/1.1's limits.
    pub limits: Limits,
    pub shutdown: Shutdown,
    /// `GET /openapi.json`, with this process's limits, built at start.
    pub openapi: bytes::Bytes,
    /// The database identity read at start, until the listener has its own.
    pub startup_origin: Origin,
}

impl Shared {
    /// The identity cursors must carry now.
    pub(crate) fn origin(&self) -> Origin {
        self.hub.origin().unwrap_or(self.startup_origin)
    }
}

#[cfg(test)]
impl Shared {
    /// A process's shared state with the default settings and a pool that
    /// never connects, for tests that build handlers' futures without a
    /// database.
    pub(crate) fn for_tests() -> Arc<Shared> {
        use clap::Parser;
        let config = Config::parse_from(["hark"]);
        let pg = crate::db::pg_config("host=/nonexistent dbname=none", "hark-test").unwrap();
        let pool = crate::db::pool(pg, 1).unwrap();
        let metrics = Metrics::new();
        let hub = Hub::new(
            config.hub_ring as usize,
            config.hub_window as usize,
            metrics.clone(),
        );
        let (_trigger, shutdown) = crate::shutdown::channel();
        Arc::new(Shared {
            reader: Reader::new(hub.clone(), pool.clone(), metrics.clone()),
            directory: Directory::new(pool.clone(), hub.clone()),
            typing: Typing::new(pool.clone(), config.typing_ttl()),
            presence: Presence::new(pool.clone(), config.presence_grace(), metrics.clone()),
            auth: Auth::new(b"secret"),
            cors: Cors::new(None),
            write_limit: WriteLimit::new(config.write_rate, config.write_burst),
            stream_quota: StreamQuota::new(config.max_streams_per_user),
            limits: Limits {
                header: std::time::Duration::from_secs(10),
                stall: std::time::Duration::from_secs(60),
                max_body: config.max_body_bytes,
                parking: config.direct_writes,
                shutdown: shutdown.clone(),
            },
            shutdown,
            openapi: bytes::Bytes::new(),
            startup_origin: Origin {
                system_id: 1,
                timeline: 1,
            },
            pool,
            hub,
            metrics,
            config,
        })
    }
}
