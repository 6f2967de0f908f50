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

use crate::db::DbError;
use crate::hub::TypingEvent;
use crate::message::User;
use crate::shutdown::Shutdown;

/// The SQL of a typing NOTIFY payload for room `$room` and user `$user`
/// (expressions), `{"k":"t","r":…,"on":…,"u":User}`: the user travels in the
/// payload so streams need no lookup per event. Usernames and names are at
/// most a few hundred bytes, far below NOTIFY's 8,000-byte limit.
macro_rules! typing_payload_sql {
    ($room:literal, $user:literal, $on:literal, $exp:literal) => {
        concat!(
            "json_build_object('k', 't', 'r', ",
            $room,
            "::int8, 'on', ",
            $on,
            ", 'exp', ",
            $exp,
            ", 'u', (SELECT json_build_object('id', tu.id, 'username', tu.username, \
               'first_name', tu.first_name, 'last_name', tu.last_name) \
               FROM users_user tu WHERE tu.id = ",
            $user,
            "::int8))::text"
        )
    };
}
pub(crate) use typing_payload_sql;

/// The payload of a `stop` for room and user expressions.
macro_rules! stop_payload_sql {
    ($room:literal, $user:literal) => {
        $crate::typing::typing_payload_sql!($room, $user, "false", "0")
    };
}
pub(crate) use stop_payload_sql;

const START: &str = concat!(
    "WITH prev AS (SELECT expires_at > now() AS active FROM hark_typing \
                   WHERE room_id = $1 AND user_id = $2), \
          up AS (INSERT INTO hark_typing (room_id, user_id, expires_at) \
                 VALUES ($1, $2, now() + $3::int8 * interval '1 millisecond') \
                 ON CONFLICT (room_id, user_id) DO UPDATE SET expires_at = EXCLUDED.expires_at \
                 RETURNING expires_at) \
     SELECT (SELECT expires_at FROM up), \
            (SELECT count(pg_notify('hark', ",
    typing_payload_sql!(
        "$1",
        "$2",
        "true",
        "(extract(epoch FROM (SELECT expires_at FROM up)) * 1000)::int8"
    ),
    ")) WHERE NOT coalesce((SELECT active FROM prev), false))"
);

const STOP: &str = concat!(
    "WITH d AS (DELETE FROM hark_typing WHERE room_id = $1 AND user_id = $2 \
                RETURNING expires_at > now() AS was_typing) \
     SELECT count(pg_notify('hark', ",
    stop_payload_sql!("$1", "$2"),
    ")) FROM d WHERE d.was_typing"
);

const SWEEP: &str = concat!(
    "WITH d AS (DELETE FROM hark_typing WHERE expires_at <= now() RETURNING room_id, user_id) \
     SELECT count(pg_notify('hark', ",
    typing_payload_sql!("d.room_id", "d.user_id", "false", "0"),
    ")) FROM d"
);

/// Typing writes and the expiry sweeper. Cheap to clone.
#[derive(Clone)]
pub struct Typing {
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
    pub fn new(pool: Pool, ttl: Duration) -> Typing {
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
    pub async fn set(&self, room: i64, user: i64, on: bool) -> Result<(), DbError> {
        let client = self.inner.pool.get().await?;
        if on {
            let ttl_ms = self.inner.ttl.as_millis() as i64;
            let st = client.prepare_cached(START).await?;
            client.execute(&st, &[&room, &user, &ttl_ms]).await?;
        } else {
            let st = client.prepare_cached(STOP).await?;
            client.execute(&st, &[&room, &user]).await?;
        }
        Ok(())
    }

    /// Who is typing in `rooms` now, other than `me` (a new event stream
    /// starts with these).
    pub async fn current(&self, rooms: &[i64], me: i64) -> Result<Vec<TypingEvent>, DbError> {
        let client = self.inner.pool.get().await?;
        let st = client
            .prepare_cached(
                "SELECT t.room_id, u.id, u.username::text, u.first_name::text, u.last_name::text \
                 FROM hark_typing t JOIN users_user u ON u.id = t.user_id \
                 WHERE t.room_id = ANY($1) AND t.user_id <> $2 AND t.expires_at > now() \
                 ORDER BY t.expires_at",
            )
            .await?;
        let rows = client.query(&st, &[&rooms, &me]).await?;
        rows.iter()
            .map(|r| {
                let user = User {
                    id: r.try_get(1)?,
                    username: r.try_get(2)?,
                    first_name: r.try_get(3)?,
                    last_name: r.try_get(4)?,
                };
                Ok(TypingEvent::new(r.try_get(0)?, user, true))
            })
            .collect()
    }

    /// Called for every typing start heard on the LISTEN connection, from
    /// any process: every process sweeps, the table decides who wins.
    pub fn expires_at(&self, at: DateTime<Utc>) {
        let mut next = self.inner.next.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_none_or(|n| at < n) {
            *next = Some(at);
            drop(next);
            self.inner.wake.notify_one();
        }
    }

    /// Runs until shutdown: sleeps until the earliest known expiry, deletes
    /// what has lapsed (NOTIFYing a stop for each), and looks up the next.
    pub async fn run_sweeper(self, mut shutdown: Shutdown) {
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
        let st = client.prepare_cached(SWEEP).await?;
        client.execute(&st, &[]).await?;
        let row = client
            .query_one("SELECT min(expires_at) FROM hark_typing", &[])
            .await?;
        Ok(row.try_get(0)?)
    }
}
