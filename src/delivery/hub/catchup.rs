//! The catch-up cycle: what the listener must read next, and how its
//! result enters the rings (see the module docs of [`super`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{revoke, window, Entry, Hub, Room, CATCHUP_LIMIT, LINGER};
use crate::cursor::{Origin, Snapshot};
use crate::delivery::park::{Delivery, Parked};
use crate::message::StoredMessage;

/// What a catch-up read.
pub(crate) struct Caught {
    pub head: Arc<Snapshot>,
    /// Every row of the plan's rooms new relative to its lower snapshot and
    /// visible in `head`, ascending id (at most CATCHUP_LIMIT + 1 of them),
    /// unless `complete` is false.
    pub rows: Vec<Arc<StoredMessage>>,
    /// (room, user) pairs that lost access in the same window.
    pub revoked: Vec<(i64, i64)>,
    /// False when the read stopped early (its byte budget): the hub then
    /// starts over from `head`, as for an overflow.
    pub complete: bool,
}

/// What a catch-up must read.
pub(crate) struct CatchupPlan {
    /// None before the first catch-up: only a snapshot is needed.
    pub lower: Option<Arc<Snapshot>>,
    pub rooms: Vec<i64>,
    started: Instant,
    /// The LISTEN connection it was planned in (`State::connection`).
    connection: u64,
}

impl Hub {
    /// The listener (re)connected to a database with this identity. A
    /// different identity (failover, restore) invalidates every ring.
    pub(crate) fn connected(&self, origin: Origin) {
        let mut st = self.state();
        if st.origin.is_some_and(|o| o != origin) {
            tracing::warn!(
                ?origin,
                "database identity changed; dropping the hub's memory"
            );
            st.head = None;
            st.known_xmax = 0;
            for r in st.rooms.values_mut() {
                r.bound = None;
                r.ring.clear();
                r.window = None;
                r.seed = None;
            }
        }
        st.origin = Some(origin);
        st.listener_up = true;
        st.connection += 1;
        st.synced = false;
        // Notifications were lost while disconnected: the cursor, not the
        // notification, is the truth, so catch up from head.
        st.catchup_due = true;
        drop(st);
        self.inner.catchup.notify_one();
    }

    pub(crate) fn disconnected(&self) {
        let mut st = self.state();
        st.listener_up = false;
        st.synced = false;
    }

    /// A message NOTIFY for `room`.
    pub(crate) fn message_notified(&self, room: i64) {
        let mut st = self.state();
        let Some(r) = st.rooms.get_mut(&room) else {
            return;
        };
        r.heard.get_or_insert_with(Instant::now);
        st.catchup_due = true;
        drop(st);
        self.inner.catchup.notify_one();
    }

    /// Resolves when a catch-up is due; returns its plan (and marks it
    /// running). Bursts of notifications during a catch-up coalesce into
    /// the next one.
    pub(crate) async fn next_catchup(&self) -> CatchupPlan {
        loop {
            {
                let mut st = self.state();
                if st.catchup_due || st.head.is_none() {
                    st.catchup_due = false;
                    st.catchup_running = true;
                    let rooms = st.rooms.keys().copied().collect();
                    return CatchupPlan {
                        lower: st.head.clone(),
                        rooms,
                        started: Instant::now(),
                        connection: st.connection,
                    };
                }
            }
            self.inner.catchup.notified().await;
        }
    }

    /// A catch-up failed (connection lost): it will be redone.
    pub(crate) fn catchup_failed(&self) {
        let mut st = self.state();
        st.catchup_running = false;
        st.catchup_due = true;
    }

    /// Applies a catch-up's result (see [`Caught`]).
    ///
    /// Losses of access are applied first, as a participant NOTIFY would
    /// be, so that none of these rows reaches a subscriber who lost access
    /// before it committed. Subscribers are woken, except parked streams and
    /// polls of rooms that got rows: those are returned, for the caller to
    /// write to or wake.
    #[must_use]
    pub(crate) fn finish_catchup(&self, plan: CatchupPlan, caught: Caught) -> Vec<Delivery> {
        let Caught {
            head,
            rows,
            revoked,
            complete,
        } = caught;
        self.inner.metrics.catchup_queries.fetch_add(1, Relaxed);
        let planned: HashSet<i64> = plan.rooms.iter().copied().collect();
        let mut wake: Vec<Arc<Notify>> = Vec::new();
        let mut st = self.state();
        for &(room, user) in &revoked {
            revoke(&mut st, room, Some(user), &mut wake);
        }
        st.catchup_running = false;
        st.known_xmax = st.known_xmax.max(head.xmax);
        st.head = Some(head.clone());
        // Planned in this connection: it read what any lost NOTIFY was for.
        st.synced = st.listener_up && plan.connection == st.connection;
        // Rooms nobody has watched for a while are forgotten (bounded memory;
        // mini-redis #63 is a pub/sub map that never shrinks).
        st.rooms
            .retain(|_, r| r.idle_since.is_none_or(|t| t.elapsed() < LINGER));
        let overflow = !complete || rows.len() > CATCHUP_LIMIT || plan.lower.is_none();
        if overflow && plan.lower.is_some() {
            tracing::warn!(
                rows = rows.len(),
                "catch-up overflow; waiters re-read from the database"
            );
        }
        let capacity = self.inner.ring_capacity;
        // Rooms going live now: their rows in this batch predate every
        // subscriber's first read (which went to the database), so they are
        // no stream's backlog.
        let mut activated: Vec<i64> = Vec::new();
        for (id, r) in st.rooms.iter_mut() {
            if !planned.contains(id) {
                continue; // registered during this catch-up: the next one reads it
            }
            if overflow {
                // Start over from the new head: every waiter's cursor is
                // older, so each reads the database once.
                r.bound = Some(head.clone());
                r.ring.clear();
                wake.extend(r.subs.values().map(|s| s.notify.clone()));
            } else if r.bound.is_none() {
                // Goes live now; its waiters went to the database meanwhile
                // and must look again.
                r.bound = plan.lower.clone();
                wake.extend(r.subs.values().map(|s| s.notify.clone()));
                activated.push(*id);
            }
            // A NOTIFY heard after this plan was made may not be covered.
            if r.heard.is_some_and(|h| h <= plan.started) {
                r.heard = None;
            }
        }
        window::advance(
            &mut st,
            &planned,
            plan.lower.as_deref(),
            &head,
            &rows,
            overflow,
            self.inner.window_capacity,
        );
        let mut deliveries: Vec<Delivery> = Vec::new();
        if !overflow {
            // An update or a delete supersedes what the ring holds of the
            // same message in the same room: a reader is due a message once,
            // as it is now (its current version or its deletion), and the
            // ring keeps only that.
            let mut changed: HashMap<i64, HashSet<i64>> = HashMap::new();
            for msg in &rows {
                changed.entry(msg.room).or_default().insert(msg.id);
            }
            for (room, ids) in &changed {
                if let Some(r) = st.rooms.get_mut(room) {
                    r.ring.retain(|e| !ids.contains(&e.msg.id));
                }
            }
            // Per room: rows added, and for rooms with parked streams the
            // delivery being built.
            let mut touched: Vec<(i64, usize, Option<Delivery>)> = Vec::new();
            for msg in rows {
                let Some(r) = st.rooms.get_mut(&msg.room) else {
                    continue; // nobody watches it any more
                };
                let Some(bound) = &r.bound else {
                    continue;
                };
                let heard = r.heard.unwrap_or(plan.started);
                let t = match touched.iter().position(|(room, ..)| *room == msg.room) {
                    Some(i) => i,
                    None => {
                        let parks = !activated.contains(&msg.room)
                            && r.subs.values().any(|s| s.park.is_some());
                        // Every catch-up since the ring's last batch read
                        // this (live, so planned) room and found nothing:
                        // its rows new since that batch are this
                        // catch-up's.
                        let lower = r.ring.back().map_or(bound, |e| &e.batch).clone();
                        let delivery = parks.then(|| Delivery {
                            lower,
                            head: head.clone(),
                            rows: Vec::new(),
                            heard,
                            beyond: false,
                            parked: Vec::new(),
                        });
                        touched.push((msg.room, 0, delivery));
                        wake.extend(
                            r.subs
                                .values()
                                .filter(|s| !parks || s.park.is_none())
                                .map(|s| s.notify.clone()),
                        );
                        touched.len() - 1
                    }
                };
                touched[t].1 += 1;
                if let Some(d) = &mut touched[t].2 {
                    d.rows.push(msg.clone());
                }
                r.ring.push_back(Entry {
                    batch: head.clone(),
                    msg,
                    heard,
                });
            }
            for (room, n, delivery) in touched {
                if let Some(r) = st.rooms.get_mut(&room) {
                    trim(r, capacity);
                    if activated.contains(&room) {
                        continue;
                    }
                    for lag in r.subs.values().filter_map(|s| s.lag.as_ref()) {
                        if lag.added(n) {
                            self.inner.metrics.streams_cut_slow.fetch_add(1, Relaxed);
                        }
                    }
                    if let Some(mut d) = delivery {
                        d.beyond = r.heard.is_some();
                        d.parked = r
                            .subs
                            .values()
                            .filter_map(|s| {
                                Some(Parked {
                                    park: s.park.clone()?,
                                    notify: s.notify.clone(),
                                    lag: s.lag.clone(),
                                })
                            })
                            .collect();
                        deliveries.push(d);
                    }
                }
            }
        }
        drop(st);
        for n in wake {
            n.notify_one();
        }
        deliveries
    }
}

/// Drops whole batches from the front until the ring fits (a single batch
/// larger than the capacity is kept whole: it came from one catch-up).
fn trim(r: &mut Room, capacity: usize) {
    while r.ring.len() > capacity {
        let Some(front) = r.ring.front() else { break };
        let batch = front.batch.clone();
        let batch_len = r
            .ring
            .iter()
            .take_while(|e| Arc::ptr_eq(&e.batch, &batch))
            .count();
        if batch_len == r.ring.len() {
            break;
        }
        r.ring.drain(..batch_len);
        r.bound = Some(batch);
    }
}
