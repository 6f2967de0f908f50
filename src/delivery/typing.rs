//! Typing state: who is typing where, until when, and the one `stop` event
//! when it lapses.
//!
//! The truth is the UNLOGGED table `hark_typing`, so every hark process and
//! the rooms list agree; each change is a NOTIFY that the listener turns
//! into SSE `typing` events (DESIGN §4). A repeated `true` inside the window
//! only moves the expiry and says nothing. Expiry is swept by whichever
//! process's `DELETE … RETURNING` removes the row first, so the `false` goes
//! out exactly once even with many processes, and still goes out if the
//! process that received the `true` has died.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::db::{self, DbError};
use crate::message::Signal;
use crate::shutdown::Shutdown;

/// Typing writes and the expiry sweeper. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Typing {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    ttl: Duration,
    /// Earliest expiry this process has heard of; the sweeper sleeps until it.
    next: Mutex<Option<DateTime<Utc>>>,
    wake: Notify,
}

impl Typing {
    pub(crate) fn new(pool: Pool, ttl: Duration) -> Typing {
        Typing {
            inner: Arc::new(Inner {
                pool,
                ttl,
                next: Mutex::new(None),
                wake: Notify::new(),
            }),
        }
    }

    /// Marks or clears `user` typing in `room` (membership already checked).
    pub(crate) async fn set(&self, room: i64, user: i64, on: bool) -> Result<(), DbError> {
        let client = self.inner.pool.get().await?;
        if on {
            db::typing::start(&client, room, user, self.inner.ttl).await
        } else {
            db::typing::stop(&client, room, user).await
        }
    }

    /// Who is typing in `rooms` now, other than `me` (a new event stream
    /// starts with these).
    pub(crate) async fn current(&self, rooms: &[i64], me: i64) -> Result<Vec<Signal>, DbError> {
        let client = self.inner.pool.get().await?;
        let typists = db::typing::current(&client, rooms, me).await?;
        Ok(typists
            .into_iter()
            .map(|(room, user)| Signal::typing(room, user, true))
            .collect())
    }

    /// Called for every typing start heard on the LISTEN connection, from
    /// any process: every process sweeps, the table decides who wins.
    pub(crate) fn expires_at(&self, at: DateTime<Utc>) {
        let mut next = self.inner.next.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_none_or(|n| at < n) {
            *next = Some(at);
            drop(next);
            self.inner.wake.notify_one();
        }
    }

    /// Runs until shutdown: sleeps until the earliest known expiry, deletes
    /// what has lapsed (NOTIFYing a stop for each), and looks up the next.
    pub(crate) async fn run_sweeper(self, mut shutdown: Shutdown) {
        loop {
            let next = *self.inner.next.lock().unwrap_or_else(|e| e.into_inner());
            let sleep = match next {
                Some(at) => {
                    let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    // A little slack so the row has lapsed by the database's clock too.
                    Instant::now() + wait + Duration::from_millis(20)
                }
                None => Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep_until(sleep) => {}
                _ = self.inner.wake.notified() => continue,
                _ = shutdown.wait() => return,
            }
            if next.is_none() {
                continue;
            }
            // Forget the expiry being swept, so that any start heard while
            // the sweep runs is kept and merged below.
            *self.inner.next.lock().unwrap_or_else(|e| e.into_inner()) = None;
            match self.sweep().await {
                Ok(after) => {
                    let mut slot = self.inner.next.lock().unwrap_or_else(|e| e.into_inner());
                    *slot = match (*slot, after) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "typing sweep failed; retrying");
                    self.expires_at(Utc::now() + Duration::from_secs(1));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.wait() => return,
                    }
                }
            }
        }
    }

    /// Deletes lapsed rows; returns the next expiry still in the table.
    async fn sweep(&self) -> Result<Option<DateTime<Utc>>, DbError> {
        let client = self.inner.pool.get().await?;
        db::typing::sweep(&client).await
    }
}
