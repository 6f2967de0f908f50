//! The in-process hub: who is waiting on which room, and the recent
//! messages of those rooms, so that one catch-up query per wake-up serves
//! every waiting poll and stream (DESIGN §2).
//!
//! ## What the hub knows
//! `head` is the snapshot of the latest catch-up. For each watched room the
//! hub keeps a *bound* snapshot and a ring of rows, with the invariant
//!
//! > ring = every row of the room visible in `head` and not in `bound`.
//!
//! A cursor `At(S)` with `S ⊇ bound` is then answered from memory, exactly:
//! the rows due are the ring rows not visible in S (see
//! [`Snapshot::contains`]). Anything else — an older cursor, a room whose
//! coverage has not started, a snapshot newer than anything the hub has
//! seen — is [`HubRead::Unknown`], and the caller reads the database.
//!
//! ## Keeping the invariant
//! * A newly watched room is not *live*: the hub knows nothing of what
//!   committed in it since `head`, because NOTIFYs for rooms nobody watched
//!   were ignored. Registering it schedules a catch-up; the first catch-up
//!   whose plan includes it makes it live with `bound` = that catch-up's
//!   lower snapshot, and wakes its subscribers. Until then reads are
//!   `Unknown` (the database answers).
//! * A catch-up reads every row of every planned room that is new relative
//!   to `head`, then moves `head` — so every live ring stays complete,
//!   including rooms whose NOTIFY has not arrived yet.
//! * A room whose last subscriber left lingers (still planned, still
//!   complete) for [`LINGER`], so a client that polls in a loop finds it
//!   live; then it is forgotten.
//! * Trimming drops whole batches from the front and moves `bound` to the
//!   snapshot that ended the dropped batch.
//!
//! ## Waking
//! Each subscriber owns a `Notify`; a catch-up that adds rows to a room
//! calls `notify_one` on that room's subscribers. `notify_one` stores a
//! permit, so a subscriber that checked the ring and is about to wait
//! cannot miss it: register, then read. The lock is a std `Mutex`, held
//! only for map and ring work, never across an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cursor::{Origin, Snapshot};
use crate::http::park::Park;
use crate::message::{StoredMessage, User};
use crate::metrics::Metrics;

/// Most rows one catch-up may return before the hub gives up on memory and
/// sends every waiter to the database (overload, or a long listener outage).
pub const CATCHUP_LIMIT: usize = 10_000;
/// Typing events kept per room for streams that are between two reads.
const TYPING_RING: usize = 64;
/// How long a room nobody watches stays live (see the module docs).
pub const LINGER: Duration = Duration::from_secs(60);

/// A typing change as streams deliver it.
#[derive(Debug, Clone)]
pub struct TypingEvent {
    pub room: i64,
    pub user: User,
    pub is_typing: bool,
    /// The event's `data:` line, serialised once.
    pub json: bytes::Bytes,
}

impl TypingEvent {
    pub fn new(room: i64, user: User, is_typing: bool) -> TypingEvent {
        let json = serde_json::json!({"room": room, "user": &user, "is_typing": is_typing});
        TypingEvent {
            room,
            json: bytes::Bytes::from(json.to_string()),
            user,
            is_typing,
        }
    }
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the listener's catch-up loop.
    catchup: Notify,
    ring_capacity: usize,
    metrics: Arc<Metrics>,
    /// The newest typing event's number. Written only under the state
    /// lock, read without it: a woken stream looks for typing events only
    /// when it moved.
    typing_seq: AtomicU64,
}

#[derive(Default)]
struct State {
    head: Option<Arc<Snapshot>>,
    /// Highest xmax of any snapshot read from this database: a cursor
    /// beyond it may lie in the database's future, so the database decides.
    known_xmax: u64,
    origin: Option<Origin>,
    catchup_running: bool,
    /// A watched room was notified (or the listener reconnected).
    catchup_due: bool,
    listener_up: bool,
    rooms: HashMap<i64, Room>,
    /// Subscribers that follow every room of a user (membership changes),
    /// and a counter of that user's membership changes.
    users: HashMap<i64, (u64, HashMap<u64, Arc<Notify>>)>,
    next_key: u64,
}

struct Room {
    subs: HashMap<u64, Sub>,
    /// None until a catch-up planned after registration has read the room.
    bound: Option<Arc<Snapshot>>,
    /// Since when nobody watches the room (it lingers for LINGER).
    idle_since: Option<Instant>,
    ring: VecDeque<Entry>,
    typing: VecDeque<(u64, Arc<TypingEvent>)>,
    /// When the first NOTIFY since the last catch-up arrived: the start of
    /// the delivery latency of the rows that catch-up finds.
    heard: Option<Instant>,
}

struct Sub {
    /// The reader: a loss of their access to the room wakes them and stops
    /// writes to their park until they have checked it.
    user: i64,
    notify: Arc<Notify>,
    /// Event streams (typing and membership wake-ups, lag accounting);
    /// None for polls.
    lag: Option<Arc<Lag>>,
    /// A stream that may park ([`crate::http::park`]): a catch-up's rows
    /// are handed to [`Hub::finish_catchup`]'s caller instead of a wake-up.
    park: Option<Arc<Park>>,
}

impl Sub {
    fn is_stream(&self) -> bool {
        self.lag.is_some()
    }
}

/// How far an event stream is behind: rows the hub has added to its rooms
/// that it has not delivered yet. A reader that stops reading stops
/// delivering while catch-ups keep adding; past the bound the hub cuts it
/// (its connection is closed) and it resumes losslessly with Last-Event-ID.
pub struct Lag {
    pending: AtomicUsize,
    limit: usize,
    cut: AtomicBool,
    /// Closes the stream's connection. The hub fires it itself: a stream
    /// whose socket is full is not being polled and cannot notice.
    close: Option<Arc<Notify>>,
}

impl Lag {
    pub fn new(limit: usize, close: Option<Arc<Notify>>) -> Arc<Lag> {
        Arc::new(Lag {
            pending: AtomicUsize::new(0),
            limit: limit.max(1),
            cut: AtomicBool::new(false),
            close,
        })
    }

    /// The stream wrote `n` messages.
    pub fn delivered(&self, n: usize) {
        let _ = self
            .pending
            .fetch_update(Relaxed, Relaxed, |p| Some(p.saturating_sub(n)));
    }

    /// The stream found nothing due: whatever was counted is covered by
    /// its position (rows from before it opened, or read from the
    /// database). A catch-up racing this is under-counted by one batch at
    /// most, which only makes the cut later, never wrong.
    pub fn caught_up(&self) {
        self.pending.store(0, Relaxed);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Relaxed)
    }

    /// Most messages one page of this stream may carry.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// `n` more rows are due to this stream; true when that cuts it. A
    /// stream that had delivered everything is never cut, whatever the
    /// size of one batch: only one that keeps falling behind is.
    fn added(&self, n: usize) -> bool {
        let before = self.pending.fetch_add(n, Relaxed);
        if before > 0 && before + n > self.limit && !self.cut.swap(true, Relaxed) {
            // A stream waiting for the hub sees the cut when the catch-up
            // that made it wakes its room; one blocked on a full socket is
            // not waiting, so its connection is closed from here.
            if let Some(close) = &self.close {
                close.notify_one();
            }
            return true;
        }
        false
    }
}

struct Entry {
    /// The head snapshot of the catch-up that found this row.
    batch: Arc<Snapshot>,
    msg: Arc<StoredMessage>,
    heard: Instant,
}

/// The answer of [`Hub::read`].
#[derive(Debug)]
pub enum HubRead {
    /// The hub cannot tell for this cursor; read the database.
    Unknown,
    /// Nothing is due as of the hub's head: wait.
    Nothing,
    /// Rows due, ascending id (possibly none, when only rows beyond the
    /// paging batch are due); `more` when `limit` cut the list; `beyond`
    /// when rows after the paging batch's upper snapshot, or not yet read
    /// by a catch-up, are due too.
    Due {
        rows: Vec<Arc<StoredMessage>>,
        head: Arc<Snapshot>,
        more: bool,
        beyond: bool,
        /// When the earliest of these rows' NOTIFY arrived (latency metric).
        heard: Option<Instant>,
    },
}

/// A catch-up's rows for one room, for the room's parked streams and
/// polls: every row of the room visible in `head` and not in `lower` is in
/// `rows`, so one parked at a snapshot between the two is due exactly the
/// rows it does not see.
pub struct Delivery {
    pub lower: Arc<Snapshot>,
    pub head: Arc<Snapshot>,
    /// Ascending id.
    pub rows: Vec<Arc<StoredMessage>>,
    /// When the NOTIFY that led to them arrived (latency metric).
    pub heard: Instant,
    /// A NOTIFY for the room came after this catch-up began: more may be
    /// due than it read (a poll's `has_more`).
    pub beyond: bool,
    pub parked: Vec<Parked>,
}

/// A stream or a poll that may be parked.
pub struct Parked {
    pub park: Arc<Park>,
    pub notify: Arc<Notify>,
    /// None for a poll.
    pub lag: Option<Arc<Lag>>,
}

/// What a catch-up read.
pub struct Caught {
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
pub struct CatchupPlan {
    /// None before the first catch-up: only a snapshot is needed.
    pub lower: Option<Arc<Snapshot>>,
    pub rooms: Vec<i64>,
    started: Instant,
}

impl Hub {
    pub fn new(ring_capacity: usize, metrics: Arc<Metrics>) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                catchup: Notify::new(),
                ring_capacity: ring_capacity.max(1),
                metrics,
                typing_seq: AtomicU64::new(0),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `user`'s interest in `rooms`. The returned guard
    /// unregisters on drop (a client that hangs up frees its place at once).
    /// Streams pass their [`Lag`]; polls pass None.
    pub fn subscribe(&self, rooms: &[i64], user: i64, lag: Option<Arc<Lag>>) -> Subscription {
        let notify = Arc::new(Notify::new());
        let mut st = self.state();
        st.next_key += 1;
        let key = st.next_key;
        let mut fresh = false;
        let sub = Sub {
            user,
            notify,
            lag,
            park: None,
        };
        for &room in rooms {
            fresh |= add_sub(&mut st, room, key, &sub);
        }
        if fresh {
            st.catchup_due = true;
        }
        drop(st);
        if fresh {
            self.inner.catchup.notify_one();
        }
        Subscription {
            hub: self.clone(),
            key,
            rooms: rooms.to_vec(),
            user,
            follows: false,
            notify: sub.notify,
            lag: sub.lag,
        }
    }

    /// Answers "what is due in `rooms` after `lower`" from memory, or says
    /// it cannot. With `upper = Some((u, after_id))` only the rest of the
    /// batch `(lower, u]` past `after_id` is wanted (a paging cursor). The
    /// caller must hold a [`Subscription`] for `rooms` taken before this
    /// call, so nothing slips between read and wait.
    pub fn read(
        &self,
        rooms: &[i64],
        lower: &Snapshot,
        upper: Option<(&Snapshot, i64)>,
        limit: usize,
    ) -> HubRead {
        let st = self.state();
        let Some(head) = st.head.clone() else {
            return HubRead::Unknown;
        };
        if lower.xmax > st.known_xmax {
            return HubRead::Unknown;
        }
        if let Some((u, _)) = upper {
            if !head.contains(u) || !u.contains(lower) {
                return HubRead::Unknown;
            }
        }
        let mut due: Vec<&Entry> = Vec::new();
        let mut beyond = false;
        for room in rooms {
            let Some(r) = st.rooms.get(room) else {
                return HubRead::Unknown;
            };
            // Rows were notified that no catch-up has read yet.
            beyond |= r.heard.is_some();
            match &r.bound {
                Some(bound) if lower.contains(bound) => {}
                _ => return HubRead::Unknown,
            }
            for e in &r.ring {
                if lower.is_visible(e.msg.txid) {
                    continue;
                }
                match upper {
                    None => due.push(e),
                    Some((u, after_id)) => {
                        if !u.is_visible(e.msg.txid) {
                            beyond = true;
                        } else if e.msg.id > after_id {
                            due.push(e);
                        }
                    }
                }
            }
        }
        if due.is_empty() && (upper.is_none() || !beyond) {
            return HubRead::Nothing;
        }
        due.sort_unstable_by_key(|e| e.msg.id);
        let more = due.len() > limit;
        due.truncate(limit);
        let heard = due.iter().map(|e| e.heard).min();
        HubRead::Due {
            rows: due.iter().map(|e| e.msg.clone()).collect(),
            head,
            more,
            beyond,
            heard,
        }
    }

    /// The database identity cursors must carry, once the listener knows it.
    pub fn origin(&self) -> Option<Origin> {
        self.state().origin
    }

    /// Records a snapshot read on the cold path: cursors up to it are not
    /// from the future.
    pub fn observe(&self, snapshot: &Snapshot) {
        let mut st = self.state();
        st.known_xmax = st.known_xmax.max(snapshot.xmax);
    }

    pub fn listener_up(&self) -> bool {
        self.state().listener_up
    }

    // ---- listener side ----------------------------------------------------

    /// The listener (re)connected to a database with this identity. A
    /// different identity (failover, restore) invalidates every ring.
    pub fn connected(&self, origin: Origin) {
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
            }
        }
        st.origin = Some(origin);
        st.listener_up = true;
        // Notifications were lost while disconnected: the cursor, not the
        // notification, is the truth, so catch up from head.
        st.catchup_due = true;
        drop(st);
        self.inner.catchup.notify_one();
    }

    pub fn disconnected(&self) {
        self.state().listener_up = false;
    }

    /// A message NOTIFY for `room`.
    pub fn message_notified(&self, room: i64) {
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
    pub async fn next_catchup(&self) -> CatchupPlan {
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
                    };
                }
            }
            self.inner.catchup.notified().await;
        }
    }

    /// A catch-up failed (connection lost): it will be redone.
    pub fn catchup_failed(&self) {
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
    pub fn finish_catchup(&self, plan: CatchupPlan, caught: Caught) -> Vec<Delivery> {
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
        let mut deliveries: Vec<Delivery> = Vec::new();
        if !overflow {
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

    // ---- typing and membership ------------------------------------------

    /// A typing NOTIFY: kept for the room's streams and woken to them.
    pub fn typing(&self, ev: TypingEvent) {
        let mut st = self.state();
        // Moved under the lock, before the event is kept and its streams
        // are woken: a stream that reads the old value is woken after.
        let seq = self.inner.typing_seq.load(Relaxed) + 1;
        self.inner.typing_seq.store(seq, Release);
        let Some(r) = st.rooms.get_mut(&ev.room) else {
            return;
        };
        r.typing.push_back((seq, Arc::new(ev)));
        while r.typing.len() > TYPING_RING {
            r.typing.pop_front();
        }
        let wake: Vec<_> = r
            .subs
            .values()
            .filter(|s| s.is_stream())
            .map(|s| s.notify.clone())
            .collect();
        drop(st);
        for n in wake {
            n.notify_one();
        }
    }

    /// The newest typing sequence number: a stream starts after it.
    pub fn typing_seq(&self) -> u64 {
        self.inner.typing_seq.load(Acquire)
    }

    /// Typing events of `rooms` after `seq`, oldest first.
    pub fn typing_since(&self, rooms: &[i64], seq: u64) -> (Vec<Arc<TypingEvent>>, u64) {
        let st = self.state();
        let mut out: Vec<(u64, Arc<TypingEvent>)> = Vec::new();
        for room in rooms {
            if let Some(r) = st.rooms.get(room) {
                out.extend(r.typing.iter().filter(|(s, _)| *s > seq).cloned());
            }
        }
        out.sort_unstable_by_key(|(s, _)| *s);
        let seq = self.inner.typing_seq.load(Relaxed);
        (out.into_iter().map(|(_, e)| e).collect(), seq)
    }

    /// A participant joined or left `room` (`user`), or the room went away
    /// (None): that user's subscribers of the room (every subscriber, for
    /// a room gone) are woken to check their access, and nothing is written
    /// to their parks until they have; streams that follow the user's rooms
    /// are woken to take the new set.
    pub fn membership_changed(&self, room: i64, user: Option<i64>) {
        let mut st = self.state();
        let mut wake: Vec<Arc<Notify>> = Vec::new();
        revoke(&mut st, room, user, &mut wake);
        drop(st);
        for n in wake {
            n.notify_one();
        }
    }

    /// Wakes every event stream (shutdown: a stream waits only for its
    /// subscription, and looks at the shutdown signal when woken).
    pub fn wake_streams(&self) {
        let st = self.state();
        let wake: Vec<Arc<Notify>> = st
            .rooms
            .values()
            .flat_map(|r| r.subs.values())
            .filter(|s| s.is_stream())
            .map(|s| s.notify.clone())
            .chain(
                st.users
                    .values()
                    .flat_map(|(_, subs)| subs.values().cloned()),
            )
            .collect();
        drop(st);
        for n in wake {
            n.notify_one();
        }
    }

    /// Counts `user`'s membership changes seen while a stream follows them.
    pub fn user_epoch(&self, user: i64) -> u64 {
        self.state().users.get(&user).map_or(0, |(e, _)| *e)
    }

    #[cfg(test)]
    fn room_count(&self) -> usize {
        self.state().rooms.len()
    }
}

/// [`Hub::membership_changed`] under the lock. Before it returns, so that
/// no catch-up the listener runs afterwards writes to a subscriber that has
/// not checked its access.
fn revoke(st: &mut State, room: i64, user: Option<i64>, wake: &mut Vec<Arc<Notify>>) {
    if let Some(r) = st.rooms.get(&room) {
        for s in r.subs.values().filter(|s| user.is_none_or(|u| u == s.user)) {
            if let Some(park) = &s.park {
                park.revoke();
            }
            wake.push(s.notify.clone());
        }
    }
    if let Some((epoch, subs)) = user.and_then(|u| st.users.get_mut(&u)) {
        *epoch += 1;
        wake.extend(subs.values().cloned());
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

/// A registration in the hub; unregisters on drop.
pub struct Subscription {
    hub: Hub,
    key: u64,
    rooms: Vec<i64>,
    user: i64,
    /// Also registered for the user's membership changes.
    follows: bool,
    notify: Arc<Notify>,
    lag: Option<Arc<Lag>>,
}

impl Subscription {
    pub fn rooms(&self) -> &[i64] {
        &self.rooms
    }

    /// Resolves after the next wake-up for this subscriber (at once if one
    /// happened since the last call).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Also wake this subscriber when its user's memberships change.
    pub fn follow_user(&mut self) {
        let mut st = self.hub.state();
        st.users
            .entry(self.user)
            .or_default()
            .1
            .insert(self.key, self.notify.clone());
        drop(st);
        self.follows = true;
    }

    /// Lets catch-ups write to this stream (or poll) while it is parked.
    /// Only for one that keeps its one room ([`crate::http::park`]).
    pub fn allow_parking(&self, park: &Arc<Park>) {
        let mut st = self.hub.state();
        for room in &self.rooms {
            if let Some(s) = st
                .rooms
                .get_mut(room)
                .and_then(|r| r.subs.get_mut(&self.key))
            {
                s.park = Some(park.clone());
            }
        }
    }

    /// Replaces the room set (a stream following its user's rooms).
    pub fn set_rooms(&mut self, rooms: &[i64]) {
        let mut st = self.hub.state();
        for room in &self.rooms {
            if !rooms.contains(room) {
                remove_sub(&mut st, *room, self.key);
            }
        }
        let mut fresh = false;
        let sub = Sub {
            user: self.user,
            notify: self.notify.clone(),
            lag: self.lag.clone(),
            park: None,
        };
        for &room in rooms {
            if !self.rooms.contains(&room) {
                fresh |= add_sub(&mut st, room, self.key, &sub);
            }
        }
        if fresh {
            st.catchup_due = true;
        }
        drop(st);
        if fresh {
            self.hub.inner.catchup.notify_one();
        }
        self.rooms = rooms.to_vec();
    }
}

/// Adds a subscriber to a room; true when the room is new to the hub (and
/// so needs a catch-up before it is live).
fn add_sub(st: &mut State, room: i64, key: u64, sub: &Sub) -> bool {
    let mut fresh = false;
    let r = st.rooms.entry(room).or_insert_with(|| {
        fresh = true;
        Room {
            subs: HashMap::new(),
            bound: None,
            idle_since: None,
            ring: VecDeque::new(),
            typing: VecDeque::new(),
            heard: None,
        }
    });
    r.idle_since = None;
    r.subs.insert(
        key,
        Sub {
            user: sub.user,
            notify: sub.notify.clone(),
            lag: sub.lag.clone(),
            park: sub.park.clone(),
        },
    );
    fresh
}

fn remove_sub(st: &mut State, room: i64, key: u64) {
    if let Some(r) = st.rooms.get_mut(&room) {
        r.subs.remove(&key);
        if r.subs.is_empty() {
            r.idle_since = Some(Instant::now());
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.hub.state();
        for room in &self.rooms {
            remove_sub(&mut st, *room, self.key);
        }
        if self.follows {
            if let Some((_, subs)) = st.users.get_mut(&self.user) {
                subs.remove(&self.key);
                if subs.is_empty() {
                    st.users.remove(&self.user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, User};
    use chrono::Utc;

    fn snap(xmin: u64, xmax: u64, xip: &[u64]) -> Arc<Snapshot> {
        Arc::new(Snapshot::new(xmin, xmax, xip.to_vec()).unwrap())
    }

    fn msg(id: i64, room: i64, txid: u64) -> Arc<StoredMessage> {
        let m = Message {
            id,
            room,
            sender: User {
                id: 1,
                username: "a".into(),
                first_name: String::new(),
                last_name: String::new(),
            },
            content: format!("m{id}"),
            created_at: Utc::now(),
        };
        Arc::new(StoredMessage::new(&m, txid))
    }

    fn ids(r: &HubRead) -> Vec<i64> {
        match r {
            HubRead::Due { rows, .. } => rows.iter().map(|m| m.id).collect(),
            HubRead::Nothing => vec![],
            HubRead::Unknown => panic!("unknown"),
        }
    }

    async fn catch_up(hub: &Hub, head: Arc<Snapshot>, rows: Vec<Arc<StoredMessage>>) {
        let _ = deliveries_of(hub, head, rows).await;
    }

    async fn deliveries_of(
        hub: &Hub,
        head: Arc<Snapshot>,
        rows: Vec<Arc<StoredMessage>>,
    ) -> Vec<Delivery> {
        hub.message_notified(1);
        let plan = hub.next_catchup().await;
        hub.finish_catchup(plan, caught(head, rows))
    }

    fn caught(head: Arc<Snapshot>, rows: Vec<Arc<StoredMessage>>) -> Caught {
        Caught {
            head,
            rows,
            revoked: Vec::new(),
            complete: true,
        }
    }

    fn woken(sub: &Subscription) -> bool {
        use futures::FutureExt;
        sub.notified().now_or_never().is_some()
    }

    #[tokio::test]
    async fn parked_streams_get_their_rooms_rows_instead_of_a_wake_up() {
        let hub = started_hub(snap(10, 10, &[])).await;
        let poll = hub.subscribe(&[1], 1, None);
        let stream = hub.subscribe(&[1], 1, Some(Lag::new(8, None)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let park = Park::new(Arc::new(listener.accept().await.unwrap().0));
        stream.allow_parking(&park);
        catch_up(&hub, snap(10, 10, &[]), vec![]).await; // room 1 goes live
        let _ = (woken(&poll), woken(&stream));

        let d = deliveries_of(&hub, snap(11, 11, &[]), vec![msg(1, 1, 10)]).await;
        assert_eq!(d.len(), 1);
        assert_eq!(*d[0].lower, *snap(10, 10, &[]));
        assert_eq!(d[0].rows.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(d[0].parked.len(), 1);
        assert!(woken(&poll));
        assert!(!woken(&stream), "the delivery decides whether to wake it");

        // A catch-up that finds nothing for the room hands it nothing, and
        // the next delivery still covers everything since the room's last
        // rows: its lower snapshot is that batch, not the plan's.
        assert!(deliveries_of(&hub, snap(12, 12, &[]), vec![])
            .await
            .is_empty());
        let d = deliveries_of(&hub, snap(13, 13, &[]), vec![msg(2, 1, 12)]).await;
        assert_eq!(*d[0].lower, *snap(11, 11, &[]));

        // A membership change stops writes until the stream has checked.
        park.checking();
        hub.membership_changed(1, Some(1));
        assert!(woken(&stream));
        assert!(!park.park(&snap(13, 13, &[])));
    }

    #[tokio::test]
    async fn a_loss_of_access_in_a_catchup_stops_that_users_parks_before_its_rows() {
        let hub = started_hub(snap(10, 10, &[])).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut parks = Vec::new();
        let mut subs = Vec::new();
        for user in [7, 8] {
            let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let park = Park::new(Arc::new(listener.accept().await.unwrap().0));
            let sub = hub.subscribe(&[1], user, Some(Lag::new(8, None)));
            sub.allow_parking(&park);
            parks.push((park, _client));
            subs.push(sub);
        }
        catch_up(&hub, snap(10, 10, &[]), vec![]).await; // room 1 goes live
        for (sub, (park, _)) in subs.iter().zip(&parks) {
            let _ = woken(sub);
            park.checking();
            assert!(park.park(&snap(10, 10, &[])));
        }
        hub.message_notified(1);
        let plan = hub.next_catchup().await;
        let d = hub.finish_catchup(
            plan,
            Caught {
                head: snap(11, 11, &[]),
                rows: vec![msg(1, 1, 10)],
                revoked: vec![(1, 7)],
                complete: true,
            },
        );
        assert!(woken(&subs[0]), "user 7 is woken to check its access");
        assert!(!woken(&subs[1]), "user 8's stream is left to the delivery");
        // Both are handed over with the rows; only user 8's park may be
        // written to (user 7's is stale until it has checked).
        assert_eq!(d[0].parked.len(), 2);
        let (p7, p8) = (&parks[0].0, &parks[1].0);
        assert!(p7.unpark().is_some() && !p7.park(&snap(10, 10, &[])));
        assert!(p8.unpark().is_some() && p8.park(&snap(10, 10, &[])));
    }

    async fn started_hub(head: Arc<Snapshot>) -> Hub {
        let hub = Hub::new(4, Metrics::new());
        catch_up(&hub, head, vec![]).await;
        hub
    }

    #[tokio::test]
    async fn a_new_room_is_unknown_until_a_catchup_reads_it() {
        let hub = started_hub(snap(100, 100, &[])).await;
        let sub = hub.subscribe(&[1], 1, None);
        // Rows may have committed since head while nobody listened for them.
        assert!(matches!(
            hub.read(&[1], &snap(100, 100, &[]), None, 10),
            HubRead::Unknown
        ));
        // Registering scheduled a catch-up; it finds such a row and wakes us.
        catch_up(&hub, snap(101, 101, &[]), vec![msg(5, 1, 100)]).await;
        sub.notified().await;
        assert_eq!(
            ids(&hub.read(&[1], &snap(100, 100, &[]), None, 10)),
            vec![5]
        );
        assert!(matches!(
            hub.read(&[1], &snap(101, 101, &[]), None, 10),
            HubRead::Nothing
        ));
    }

    #[tokio::test]
    async fn out_of_order_commits_are_delivered_once() {
        let hub = started_hub(snap(100, 100, &[])).await;
        let sub = hub.subscribe(&[1], 1, None);
        catch_up(&hub, snap(100, 100, &[]), vec![]).await;
        let s0 = snap(100, 100, &[]);
        assert!(matches!(hub.read(&[1], &s0, None, 10), HubRead::Nothing));

        // Tx 100 (id 10) is open while tx 101 (id 11) commits.
        hub.message_notified(1);
        let s1 = snap(100, 102, &[100]);
        catch_up(&hub, s1.clone(), vec![msg(11, 1, 101)]).await;
        sub.notified().await;
        assert_eq!(ids(&hub.read(&[1], &s0, None, 10)), vec![11]);
        // A client now at s1 has nothing due until 100 commits.
        assert!(matches!(hub.read(&[1], &s1, None, 10), HubRead::Nothing));

        hub.message_notified(1);
        let s2 = snap(102, 102, &[]);
        catch_up(&hub, s2.clone(), vec![msg(10, 1, 100)]).await;
        assert_eq!(ids(&hub.read(&[1], &s1, None, 10)), vec![10]);
        assert_eq!(ids(&hub.read(&[1], &s0, None, 10)), vec![10, 11]);
        assert!(matches!(hub.read(&[1], &s2, None, 10), HubRead::Nothing));
    }

    #[tokio::test]
    async fn unknown_when_cursor_precedes_coverage_or_is_newer_than_known() {
        let hub = started_hub(snap(50, 50, &[])).await;
        let _sub = hub.subscribe(&[1], 1, None);
        catch_up(&hub, snap(50, 50, &[]), vec![]).await;
        // Older than the room's coverage.
        assert!(matches!(
            hub.read(&[1], &snap(40, 45, &[]), None, 10),
            HubRead::Unknown
        ));
        // Beyond anything read from the database: may be from the future.
        assert!(matches!(
            hub.read(&[1], &snap(60, 60, &[]), None, 10),
            HubRead::Unknown
        ));
        hub.observe(&snap(60, 60, &[]));
        assert!(matches!(
            hub.read(&[1], &snap(60, 60, &[]), None, 10),
            HubRead::Nothing
        ));
        // A room nobody subscribed to.
        assert!(matches!(
            hub.read(&[2], &snap(50, 50, &[]), None, 10),
            HubRead::Unknown
        ));
    }

    #[tokio::test]
    async fn room_registered_during_catchup_waits_for_the_next() {
        let hub = started_hub(snap(10, 10, &[])).await;
        let _a = hub.subscribe(&[1], 1, None);
        let plan = hub.next_catchup().await;
        // Not in this plan: room 2 had a row in this window, which the
        // plan did not read.
        let _b = hub.subscribe(&[2], 1, None);
        let _ = hub.finish_catchup(
            plan,
            caught(snap(12, 12, &[]), vec![msg(1, 1, 10), msg(2, 2, 11)]),
        );
        assert!(matches!(
            hub.read(&[2], &snap(12, 12, &[]), None, 10),
            HubRead::Unknown
        ));
        assert_eq!(ids(&hub.read(&[1], &snap(10, 10, &[]), None, 10)), vec![1]);
        catch_up(&hub, snap(13, 13, &[]), vec![]).await;
        assert!(matches!(
            hub.read(&[2], &snap(12, 12, &[]), None, 10),
            HubRead::Nothing
        ));
        // Its coverage starts at that catch-up's lower snapshot.
        assert!(matches!(
            hub.read(&[2], &snap(10, 10, &[]), None, 10),
            HubRead::Unknown
        ));
    }

    #[tokio::test]
    async fn trimming_moves_the_bound_and_limit_pages() {
        let hub = started_hub(snap(1, 1, &[])).await;
        let _s = hub.subscribe(&[1], 1, None);
        catch_up(&hub, snap(1, 1, &[]), vec![]).await;
        for i in 0..6u64 {
            hub.message_notified(1);
            catch_up(&hub, snap(i + 2, i + 2, &[]), vec![msg(i as i64, 1, i + 1)]).await;
        }
        // Capacity 4: rows 0 and 1 dropped, bound moved to snapshot 3:3.
        assert!(matches!(
            hub.read(&[1], &snap(1, 1, &[]), None, 10),
            HubRead::Unknown
        ));
        assert_eq!(
            ids(&hub.read(&[1], &snap(3, 3, &[]), None, 10)),
            vec![2, 3, 4, 5]
        );
        match hub.read(&[1], &snap(3, 3, &[]), None, 3) {
            HubRead::Due { rows, more, .. } => {
                assert_eq!(rows.len(), 3);
                assert!(more);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unwatched_room_lingers_then_is_forgotten() {
        let hub = started_hub(snap(1, 1, &[])).await;
        let a = hub.subscribe(&[1, 2], 1, None);
        let b = hub.subscribe(&[2], 1, Some(Lag::new(8, None)));
        catch_up(&hub, snap(1, 1, &[]), vec![]).await;
        drop(a);
        drop(b);
        // Still live for a client that comes straight back.
        let _c = hub.subscribe(&[2], 1, None);
        assert!(matches!(
            hub.read(&[2], &snap(1, 1, &[]), None, 10),
            HubRead::Nothing
        ));
        assert_eq!(hub.room_count(), 2);
        tokio::time::advance(LINGER + Duration::from_secs(1)).await;
        hub.message_notified(2);
        catch_up(&hub, snap(2, 2, &[]), vec![]).await;
        assert_eq!(
            hub.room_count(),
            1,
            "room 1 forgotten, room 2 still watched"
        );
    }
}
