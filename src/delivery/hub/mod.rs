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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cursor::{Origin, Snapshot};
use crate::delivery::lag::Lag;
use crate::delivery::park::Park;
use crate::message::{Signal, StoredMessage};
use crate::metrics::Metrics;

mod catchup;
mod subscription;
#[cfg(test)]
mod tests;
mod window;

pub(crate) use catchup::Caught;
pub(crate) use subscription::Subscription;
pub(crate) use window::Window;

/// Most rows one catch-up may return before the hub gives up on memory and
/// sends every waiter to the database (overload, or a long listener outage).
pub(crate) const CATCHUP_LIMIT: usize = 10_000;
/// Signals (typing, presence, read receipts) kept per room for streams
/// that are between two reads.
const SIGNAL_RING: usize = 64;
/// How long a room nobody watches stays live (see the module docs).
pub(crate) const LINGER: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub(crate) struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the listener's catch-up loop.
    catchup: Notify,
    ring_capacity: usize,
    /// Messages (and deletions) a room's [`Window`] may hold; 0: none.
    window_capacity: usize,
    metrics: Arc<Metrics>,
    /// The newest signal's number. Written only under the state lock, read
    /// without it: a woken stream looks for signals only when it moved.
    signal_seq: AtomicU64,
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
    /// Counts the LISTEN connection's (re)connections: a catch-up planned
    /// in the current one, once finished, has read everything notifications
    /// were lost for.
    connection: u64,
    /// Since the last (re)connection a catch-up has finished, and the
    /// connection is up: every commit hark has not read yet has a NOTIFY on
    /// its way, so memory is as current as hark can know without asking
    /// the database (DESIGN §2, "When memory is current").
    synced: bool,
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
    signals: VecDeque<(u64, Arc<Signal>)>,
    /// When the first NOTIFY since the last catch-up arrived: the start of
    /// the delivery latency of the rows that catch-up finds.
    heard: Option<Instant>,
    /// The newest messages as of `head`, for polls without a cursor.
    window: Option<Window>,
    /// A window read from the database at a snapshot newer than `head`,
    /// brought up to date by the catch-ups until `head` sees its snapshot.
    seed: Option<Seed>,
}

struct Seed {
    snapshot: Arc<Snapshot>,
    window: Window,
    /// A catch-up has applied its rows: every change since `snapshot` is
    /// being read for the room.
    chained: bool,
}

struct Sub {
    /// The reader: a loss of their access to the room wakes them and stops
    /// writes to their park until they have checked it.
    user: i64,
    notify: Arc<Notify>,
    /// Event streams (typing and membership wake-ups, lag accounting);
    /// None for polls.
    lag: Option<Arc<Lag>>,
    /// A stream that may park ([`crate::delivery::park`]): a catch-up's rows
    /// are handed to [`Hub::finish_catchup`]'s caller instead of a wake-up.
    park: Option<Arc<Park>>,
}

impl Sub {
    fn is_stream(&self) -> bool {
        self.lag.is_some()
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
pub(crate) enum HubRead {
    /// The hub cannot tell for this cursor; read the database.
    Unknown,
    /// Nothing is due as of the hub's head: wait, or answer at `next`.
    Nothing {
        /// The hub's head, when it sees all the cursor's snapshot saw (then
        /// moving there skips no row); None: stay at the cursor.
        next: Option<Arc<Snapshot>>,
        /// Memory is current for these rooms: no NOTIFY of theirs waits
        /// for a catch-up, and none was lost (see `State::synced`).
        current: bool,
    },
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

impl Hub {
    pub(crate) fn new(ring_capacity: usize, window_capacity: usize, metrics: Arc<Metrics>) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                catchup: Notify::new(),
                ring_capacity: ring_capacity.max(1),
                window_capacity,
                metrics,
                signal_seq: AtomicU64::new(0),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers "what is due in `rooms` after `lower`" from memory, or says
    /// it cannot. With `upper = Some((u, after_id))` only the rest of the
    /// batch `(lower, u]` past `after_id` is wanted (a paging cursor). The
    /// caller must hold a [`Subscription`] for `rooms` taken before this
    /// call, so nothing slips between read and wait.
    pub(crate) fn read(
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
        let mut current = st.synced && st.listener_up;
        for room in rooms {
            let Some(r) = st.rooms.get(room) else {
                return HubRead::Unknown;
            };
            // Rows were notified that no catch-up has read yet.
            beyond |= r.heard.is_some();
            current &= r.heard.is_none();
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
                        } else if e.msg.key > after_id {
                            due.push(e);
                        }
                    }
                }
            }
        }
        if due.is_empty() && (upper.is_none() || !beyond) {
            // Every row visible in head is visible in `lower` (the ring holds
            // the rest, and none of it is due): moving to head skips nothing,
            // when head also sees all that `lower` saw.
            let next = (upper.is_none() && head.contains(lower)).then_some(head);
            return HubRead::Nothing { next, current };
        }
        due.sort_unstable_by_key(|e| e.msg.key);
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
    pub(crate) fn origin(&self) -> Option<Origin> {
        self.state().origin
    }

    /// Records a snapshot read on the cold path: cursors up to it are not
    /// from the future.
    pub(crate) fn observe(&self, snapshot: &Snapshot) {
        let mut st = self.state();
        st.known_xmax = st.known_xmax.max(snapshot.xmax);
    }

    pub(crate) fn listener_up(&self) -> bool {
        self.state().listener_up
    }

    /// A signal NOTIFY (typing, presence, a read receipt): kept for the
    /// room's streams and woken to them.
    pub(crate) fn signal(&self, ev: Signal) {
        let mut st = self.state();
        // Moved under the lock, before the event is kept and its streams
        // are woken: a stream that reads the old value is woken after.
        let seq = self.inner.signal_seq.load(Relaxed) + 1;
        self.inner.signal_seq.store(seq, Release);
        let Some(r) = st.rooms.get_mut(&ev.room) else {
            return;
        };
        r.signals.push_back((seq, Arc::new(ev)));
        while r.signals.len() > SIGNAL_RING {
            r.signals.pop_front();
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

    /// The newest signal's number: a stream starts after it.
    pub(crate) fn signal_seq(&self) -> u64 {
        self.inner.signal_seq.load(Acquire)
    }

    /// Signals of `rooms` after `seq`, oldest first.
    pub(crate) fn signals_since(&self, rooms: &[i64], seq: u64) -> (Vec<Arc<Signal>>, u64) {
        let st = self.state();
        let mut out: Vec<(u64, Arc<Signal>)> = Vec::new();
        for room in rooms {
            if let Some(r) = st.rooms.get(room) {
                out.extend(r.signals.iter().filter(|(s, _)| *s > seq).cloned());
            }
        }
        out.sort_unstable_by_key(|(s, _)| *s);
        let seq = self.inner.signal_seq.load(Relaxed);
        (out.into_iter().map(|(_, e)| e).collect(), seq)
    }

    /// A participant joined or left `room` (`user`), or the room went away
    /// (None): that user's subscribers of the room (every subscriber, for
    /// a room gone) are woken to check their access, and nothing is written
    /// to their parks until they have; streams that follow the user's rooms
    /// are woken to take the new set.
    pub(crate) fn membership_changed(&self, room: i64, user: Option<i64>) {
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
    pub(crate) fn wake_streams(&self) {
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
    pub(crate) fn user_epoch(&self, user: i64) -> u64 {
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
