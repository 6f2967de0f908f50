//! The one LISTEN connection of the process (DESIGN §2–3).
//!
//! A dedicated tokio-postgres connection — not a pooled one: pooled
//! connections drop notifications and deadpool's recycling runs
//! `UNLISTEN *`. A driver task polls the connection with `poll_message` and
//! routes each NOTIFY (`{"k": kind, …}`) to the hub, the directory and the
//! typing sweeper. The owner loop runs the hub's catch-up queries on the
//! same connection and probes it, because a LISTEN session can die
//! silently. When the connection is lost it reconnects with backoff,
//! LISTENs again and catches up from the hub's head: the cursor, not the
//! notification, is the source of truth.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use futures::StreamExt;
use serde::Deserialize;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::db::messages;
use crate::db::{CachingClient, DbError};
use crate::delivery::directory::Directory;
use crate::delivery::hub::{Caught, Hub, CATCHUP_LIMIT};
use crate::delivery::park::{self, Encode};
use crate::delivery::typing::Typing;
use crate::message::{Signal, User};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// The NOTIFY channel every trigger and typing write uses.
pub(crate) const CHANNEL: &str = "hark";
/// `application_name` of the LISTEN session, to find it in pg_stat_activity.
pub(crate) const APPLICATION_NAME: &str = "hark-listener";

const PROBE_INTERVAL: Duration = Duration::from_secs(10);
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most bytes of messages one catch-up reads: past it the hub starts over
/// from the new head and waiters read the database, as for more than
/// CATCHUP_LIMIT rows (the hub holds what it reads until its rings trim).
const CATCHUP_BYTES: usize = 32 << 20;

pub(crate) struct Listener {
    pub pg: tokio_postgres::Config,
    pub hub: Hub,
    pub directory: Directory,
    pub typing: Typing,
    pub metrics: Arc<Metrics>,
    /// Builds what the listener writes to parked streams and polls: the
    /// HTTP edge's encoding, wired in by `app.rs`.
    pub encode: Arc<dyn Encode>,
    /// `HARK_MAX_ANSWER_BYTES`, for the answers it writes to parked polls.
    pub answer_bytes: usize,
}

/// A NOTIFY payload. Kinds: `m` message (room), `t` typing (room, user,
/// on, exp), `o` presence (room, user, on), `rd` read receipt (room, user,
/// at), `p` participant change (room, user id), `r` room deleted, `u` user
/// changed.
#[derive(Deserialize)]
struct Payload {
    k: String,
    r: Option<i64>,
    u: Option<serde_json::Value>,
    on: Option<bool>,
    exp: Option<i64>,
    /// A read receipt's time, in microseconds since the epoch.
    at: Option<i64>,
}

impl Listener {
    /// Runs until shutdown.
    pub(crate) async fn run(self, mut shutdown: Shutdown) {
        let mut backoff = BACKOFF_MIN;
        let mut connected_once = false;
        let mut pg = self.pg.clone();
        pg.application_name(APPLICATION_NAME);
        loop {
            let mut listening = false;
            match self
                .session(&pg, &mut shutdown, connected_once, &mut listening)
                .await
            {
                Ok(()) => return, // shutdown
                Err(e) => {
                    self.hub.disconnected();
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "LISTEN connection lost");
                }
            }
            if listening {
                // It worked for a while: retry soon, then back off again.
                connected_once = true;
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life. Ok(()) only on shutdown.
    async fn session(
        &self,
        pg: &tokio_postgres::Config,
        shutdown: &mut Shutdown,
        reconnect: bool,
        listening: &mut bool,
    ) -> Result<(), DbError> {
        let (client, mut connection) = pg.connect(NoTls).await?;
        let hub = self.hub.clone();
        let directory = self.directory.clone();
        let typing = self.typing.clone();
        let metrics = self.metrics.clone();
        let mut driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(msg) = messages.next().await {
                match msg {
                    Ok(AsyncMessage::Notification(n)) => {
                        metrics.notifications.fetch_add(1, Relaxed);
                        dispatch(n.payload(), &hub, &directory, &typing);
                    }
                    Ok(AsyncMessage::Notice(n)) => {
                        tracing::debug!(notice = %n.message(), "listener notice");
                    }
                    Ok(_) => {}
                    Err(e) => return DbError::Unavailable(Box::new(e)),
                }
            }
            DbError::Unavailable("connection closed".into())
        });
        let client = CachingClient::new(client);
        use crate::db::Prepared;
        client
            .pg()
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await?;
        let origin = crate::db::origin(client.pg()).await;
        // Invalidations may have been missed while we were away.
        self.directory.clear();
        self.hub.connected(origin);
        if reconnect {
            self.metrics.listener_reconnects.fetch_add(1, Relaxed);
            tracing::info!("LISTEN connection re-established");
        }
        *listening = true;

        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.tick().await;
        loop {
            tokio::select! {
                plan = self.hub.next_catchup() => {
                    let result = tokio::time::timeout(QUERY_TIMEOUT, async {
                        match &plan.lower {
                            Some(lower) => {
                                let limit = CATCHUP_LIMIT as i64 + 1;
                                let f = messages::catch_up(&client, &plan.rooms, lower, limit, CATCHUP_BYTES).await?;
                                // Tombstones of this window may have been swept
                                // (a long outage): the hub starts over from the
                                // head, and old cursors go to the database, which
                                // refuses them.
                                let complete = !f.cut && !messages::missed_deletes(lower, f.horizon);
                                Ok(Caught { head: f.head, rows: f.rows, revoked: f.revoked, complete })
                            }
                            None => messages::current_snapshot(&client).await.map(|head| Caught {
                                head,
                                rows: Vec::new(),
                                revoked: Vec::new(),
                                complete: true,
                            }),
                        }
                    })
                    .await;
                    match result {
                        Ok(Ok(caught)) => {
                            // Before the rows can be read from the hub: a
                            // reader of them who lost access in the same
                            // window then asks the database, not the cache.
                            for &(room, _) in &caught.revoked {
                                self.directory.invalidate_room(room);
                            }
                            let deliveries = self.hub.finish_catchup(plan, caught);
                            // Before the next catch-up: a parked stream gets
                            // its pages in order.
                            let ctx = park::Ctx {
                                origin,
                                answer_bytes: self.answer_bytes,
                                metrics: &self.metrics,
                                encode: &self.encode,
                            };
                            park::deliver(deliveries, &ctx).await;
                        }
                        Ok(Err(e)) => {
                            self.hub.catchup_failed();
                            driver.abort();
                            return Err(e);
                        }
                        Err(_) => {
                            self.hub.catchup_failed();
                            driver.abort();
                            return Err(DbError::Unavailable("catch-up query timed out".into()));
                        }
                    }
                }
                _ = probe.tick() => {
                    let alive = tokio::time::timeout(QUERY_TIMEOUT, client.pg().simple_query("SELECT 1")).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        driver.abort();
                        return Err(DbError::Unavailable("LISTEN connection stopped answering".into()));
                    }
                }
                why = &mut driver => {
                    return Err(why.unwrap_or_else(|e| DbError::Unavailable(Box::new(e))));
                }
                _ = shutdown.wait() => {
                    driver.abort();
                    return Ok(());
                }
            }
        }
    }
}

fn dispatch(payload: &str, hub: &Hub, directory: &Directory, typing: &Typing) {
    let Ok(p) = serde_json::from_str::<Payload>(payload) else {
        tracing::debug!(payload, "ignoring unknown NOTIFY payload");
        return;
    };
    match (p.k.as_str(), p.r) {
        ("m", Some(room)) => hub.message_notified(room),
        ("t" | "o" | "rd", Some(room)) => {
            let Some(user) = p.u.and_then(|u| serde_json::from_value::<User>(u).ok()) else {
                return;
            };
            let on = p.on.unwrap_or(false);
            let signal = match p.k.as_str() {
                "t" => {
                    if on {
                        if let Some(at) = p.exp.and_then(DateTime::from_timestamp_millis) {
                            typing.expires_at(at);
                        }
                    }
                    Signal::typing(room, user, on)
                }
                "o" => Signal::presence(room, user, on),
                _ => {
                    let Some(at) = p.at.and_then(DateTime::from_timestamp_micros) else {
                        return;
                    };
                    Signal::read(room, user, at)
                }
            };
            hub.signal(signal);
        }
        ("p", Some(room)) => {
            directory.invalidate_room(room);
            hub.membership_changed(room, p.u.and_then(|u| u.as_i64()));
        }
        ("r", Some(room)) => {
            directory.invalidate_room(room);
            hub.membership_changed(room, None);
        }
        ("u", _) => {
            if let Some(user) = p.u.and_then(|u| u.as_i64()) {
                directory.invalidate_user(user);
            }
        }
        _ => tracing::debug!(payload, "ignoring unknown NOTIFY payload"),
    }
}
