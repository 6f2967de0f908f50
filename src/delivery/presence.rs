//! Presence: who is online on this process, and what the database is told.
//!
//! A user is online here while they hold a stream or a waiting poll, and
//! for `HARK_PRESENCE_GRACE_MS` after the last one ended (a reload or a
//! re-poll is no change). State is kept per user, not per connection: the
//! database hears only of a user's first hold here and of the end of their
//! grace, in batches, so its writes and NOTIFYs do not grow with the
//! connections a user churns through. The database decides what is a
//! change cluster-wide (`hark_presence_set`: the first process to hold a
//! user, or the last to let go) and NOTIFYs it per room; the listener
//! turns that into `event: presence`.
//!
//! Every process beats every [`BEAT`] and sweeps processes silent for
//! [`DEAD_AFTER`], so a process killed outright takes its users offline
//! within `DEAD_AFTER + BEAT` (20 s), held by no other process. A graceful
//! stop lets go of all its users at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::db::{self, DbError};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often a process says it is alive, and sweeps the dead.
pub(crate) const BEAT: Duration = Duration::from_secs(5);
/// A process silent this long is dead: its users go offline.
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(15);

/// Cheap to clone; one per process.
#[derive(Clone)]
pub(crate) struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// This process in `hark_process`: unique per start.
    process: String,
    grace: Duration,
    users: Mutex<HashMap<i64, Local>>,
    /// A user's state here changed in a way the database must hear of.
    dirty: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Local {
    /// Streams and waiting polls of the user here.
    holds: u32,
    /// When the last hold ended (while `holds` is 0).
    released: Option<Instant>,
    /// The database holds the user online for this process.
    published: bool,
}

/// A user's stream or poll, online while it lives (and the grace after).
pub(crate) struct Held {
    inner: Arc<Inner>,
    user: i64,
}

impl Presence {
    pub(crate) fn new(pool: Pool, grace: Duration, metrics: Arc<Metrics>) -> Presence {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Presence {
            inner: Arc::new(Inner {
                pool,
                process: format!("{}-{nanos:x}", std::process::id()),
                grace,
                users: Mutex::new(HashMap::new()),
                dirty: Notify::new(),
                metrics,
            }),
        }
    }

    /// `user` holds a stream or poll here until the guard drops.
    pub(crate) fn hold(&self, user: i64) -> Held {
        let mut users = self.inner.users();
        let l = users.entry(user).or_default();
        l.holds += 1;
        l.released = None;
        let tell = !l.published;
        drop(users);
        if tell {
            self.inner.dirty.notify_one();
        }
        Held {
            inner: self.inner.clone(),
            user,
        }
    }

    /// Writes what changed, beats and sweeps, until shutdown; then lets go
    /// of every user of this process.
    pub(crate) async fn run(self, mut shutdown: Shutdown) {
        let inner = &self.inner;
        // The process row first: a sweeper elsewhere takes presence rows
        // without one for a dead process's.
        if let Err(e) = inner.beat().await {
            tracing::warn!(error = %e, "presence heartbeat failed");
        }
        let mut beat = tokio::time::interval_at(Instant::now() + BEAT, BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Graces end on a tick rather than each on its own timer: a release
        // costs no wake-up, and an offline comes at most a tick late.
        let mut check = tokio::time::interval(
            (inner.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        );
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if let Err(e) = inner.beat().await {
                        tracing::warn!(error = %e, "presence heartbeat failed");
                    }
                }
                _ = inner.dirty.notified() => {}
                _ = check.tick() => {}
                _ = shutdown.wait() => break,
            }
            if let Err(e) = inner.flush().await {
                tracing::warn!(error = %e, "presence write failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if let Err(e) = inner.leave().await {
            tracing::warn!(error = %e, "presence not cleared at shutdown; the survivors sweep it");
        }
    }
}

impl Inner {
    fn users(&self) -> MutexGuard<'_, HashMap<i64, Local>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the database who went online here and whose grace ended.
    async fn flush(&self) -> Result<(), DbError> {
        let now = Instant::now();
        let (online, offline) = {
            let mut users = self.users();
            let online: Vec<i64> = users
                .iter()
                .filter(|(_, l)| l.holds > 0 && !l.published)
                .map(|(u, _)| *u)
                .collect();
            let lapsed = |l: &Local| l.released.is_some_and(|t| now >= t + self.grace);
            let offline: Vec<i64> = users
                .iter()
                .filter(|(_, l)| l.holds == 0 && l.published && lapsed(l))
                .map(|(u, _)| *u)
                .collect();
            // Never published and lapsed: nothing to tell, nothing to keep.
            users.retain(|_, l| l.holds > 0 || l.published || !lapsed(l));
            (online, offline)
        };
        if online.is_empty() && offline.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await?;
        if !online.is_empty() {
            db::presence::set(&client, &self.process, &online, true).await?;
        }
        if !offline.is_empty() {
            db::presence::set(&client, &self.process, &offline, false).await?;
        }
        let written = (online.len() + offline.len()) as u64;
        self.metrics
            .presence_writes
            .fetch_add(written, std::sync::atomic::Ordering::Relaxed);
        let mut users = self.users();
        for u in &online {
            if let Some(l) = users.get_mut(u) {
                l.published = true;
            }
        }
        for u in &offline {
            // Held again while the write ran: online again, written again.
            if let Some(l) = users.get_mut(u) {
                l.published = false;
                if l.holds == 0 {
                    users.remove(u);
                }
            }
        }
        let again = users.values().any(|l| l.holds > 0 && !l.published);
        drop(users);
        if again {
            self.dirty.notify_one();
        }
        Ok(())
    }

    /// Says this process is alive and sweeps the dead. A row that had to
    /// be created means the database lost what this process held: all of
    /// it is written again.
    async fn beat(&self) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        if db::presence::beat(&client, &self.process).await? {
            let mut users = self.users();
            let any = users.values().any(|l| l.published);
            for l in users.values_mut() {
                l.published = false;
            }
            drop(users);
            if any {
                tracing::info!("presence rows lost; writing them again");
            }
        }
        let swept = db::presence::sweep(&client, DEAD_AFTER).await?;
        if swept > 0 {
            tracing::info!(users = swept, "users of stopped processes went offline");
        }
        Ok(())
    }

    async fn leave(&self) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        db::presence::leave(&client, &self.process).await
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut users = self.inner.users();
        if let Some(l) = users.get_mut(&self.user) {
            l.holds = l.holds.saturating_sub(1);
            if l.holds == 0 {
                l.released = Some(Instant::now());
            }
        }
    }
}
