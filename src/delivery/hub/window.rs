//! A room's newest messages as of one snapshot, for the polls that carry
//! no cursor: the latest page (no `since`) and the seed frontend's ISO
//! `since` (DESIGN §2, "Polls without a cursor").
//!
//! A window is a set of current messages and of deletions together with
//! the regions it is *complete* for:
//!
//! * `ids_from = Some(f)`: every current message of the room with id ≥ f
//!   is held (`i64::MIN`: the whole room). The latest page of `limit`
//!   messages is answered when at least `limit` are held there, or the
//!   window holds the whole room.
//! * `after = Some(t)`: every current message created after t, and every
//!   deletion after t, is held. An ISO `since` ≥ t is answered.
//!
//! A window starts from a database read (a *seed*) and is kept current by
//! applying, in order, the changes each catch-up reads for the room: a
//! message in a region is upserted (an edit replaces it), one outside is
//! dropped, a deletion drops the message and is kept for the `after`
//! region. Two windows of the same snapshot merge into one complete for
//! both regions. Capacity is bounded: evicting a message or a deletion
//! shrinks the regions so that what remains is still complete.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Hub, Room, Seed, State};
use crate::cursor::Snapshot;
use crate::message::StoredMessage;

/// A page of a poll without a cursor, from memory.
pub(crate) struct WindowPage {
    /// Ascending paging key.
    pub rows: Vec<Arc<StoredMessage>>,
    /// More than the limit were due.
    pub more: bool,
    /// The snapshot the page is exact for: the next cursor.
    pub head: Arc<Snapshot>,
}

impl Hub {
    /// The newest `limit` messages of `room`, when memory is current for
    /// it and its window holds them.
    pub(crate) fn latest(&self, room: i64, limit: usize) -> Option<WindowPage> {
        let st = self.state();
        let (r, head) = current_room(&st, room)?;
        let rows = r.window.as_ref()?.latest(limit)?;
        Some(WindowPage {
            rows,
            more: false,
            head,
        })
    }

    /// What an ISO `since` is due in `room` (at most `limit`), when memory
    /// is current for it and its window reaches back to `since`.
    pub(crate) fn created_after(
        &self,
        room: i64,
        since: DateTime<Utc>,
        limit: usize,
    ) -> Option<WindowPage> {
        let st = self.state();
        let (r, head) = current_room(&st, room)?;
        let (rows, more) = r.window.as_ref()?.created_after(since, limit)?;
        Some(WindowPage { rows, more, head })
    }

    /// How many messages a room's window keeps (the size a seeding read
    /// should ask for); 0 when windows are off.
    pub(crate) fn window_capacity(&self) -> usize {
        self.inner.window_capacity
    }

    /// Offers `window`, read from the database at `snapshot`, as `room`'s
    /// window. Read before the hub's head, the ring brings it up to date
    /// at once; read after, the catch-ups do, until the head sees
    /// `snapshot`. Dropped when neither can (a room not live, a ring that
    /// does not reach back to `snapshot`).
    pub(crate) fn seed(&self, room: i64, snapshot: Arc<Snapshot>, mut window: Window) {
        let cap = self.inner.window_capacity;
        if cap == 0 {
            return;
        }
        let mut st = self.state();
        let Some(head) = st.head.clone() else {
            return;
        };
        let Some(r) = st.rooms.get_mut(&room) else {
            return;
        };
        let Some(bound) = r.bound.clone() else {
            return;
        };
        if head.contains(&snapshot) {
            // The ring holds every change of the room since `bound`, one
            // version each: those the read did not see make it current.
            if !snapshot.contains(&bound) {
                return;
            }
            for e in &r.ring {
                if !snapshot.is_visible(e.msg.txid) {
                    window.apply(&e.msg);
                }
            }
            install(r, window, cap);
        } else if snapshot.contains(&head) {
            r.seed = Some(Seed {
                snapshot,
                window,
                chained: false,
            });
            // With no write to wake it, the catch-up that brings the seed
            // to the head would not come.
            st.catchup_due = true;
            drop(st);
            self.inner.catchup.notify_one();
        }
    }
}

/// A live room whose memory is current, and the head it is current at.
fn current_room(st: &State, room: i64) -> Option<(&Room, Arc<Snapshot>)> {
    if !(st.synced && st.listener_up) {
        return None;
    }
    let head = st.head.clone()?;
    let r = st.rooms.get(&room)?;
    if r.bound.is_none() || r.heard.is_some() {
        return None;
    }
    Some((r, head))
}

fn install(r: &mut Room, window: Window, cap: usize) {
    let w = match r.window.take() {
        Some(mut w) => {
            w.merge(window);
            w
        }
        None => window,
    };
    let w = r.window.insert(w);
    w.trim(cap);
}

/// Brings the windows and seeds of a catch-up's planned rooms to its head
/// `head` from `lower`, applying `rows` (the catch-up's changes, in order).
/// After an overflow they are dropped: the rows are not all there.
pub(super) fn advance(
    st: &mut State,
    planned: &HashSet<i64>,
    lower: Option<&Snapshot>,
    head: &Snapshot,
    rows: &[Arc<StoredMessage>],
    overflow: bool,
    cap: usize,
) {
    let mut by_room: Option<HashMap<i64, Vec<&Arc<StoredMessage>>>> = None;
    for (id, r) in st.rooms.iter_mut() {
        if !planned.contains(id) || (r.window.is_none() && r.seed.is_none()) {
            continue;
        }
        let Some(lower) = lower.filter(|_| !overflow) else {
            r.window = None;
            r.seed = None;
            continue;
        };
        let by_room = by_room.get_or_insert_with(|| {
            let mut m: HashMap<i64, Vec<&Arc<StoredMessage>>> = HashMap::new();
            for row in rows {
                m.entry(row.room).or_default().push(row);
            }
            m
        });
        let mine = by_room.get(id).map(Vec::as_slice).unwrap_or_default();
        if let Some(w) = &mut r.window {
            for row in mine {
                w.apply(row);
            }
        }
        if let Some(mut seed) = r.seed.take() {
            // The first catch-up to reach a seed must read from a snapshot
            // it saw; after that they chain.
            seed.chained |= seed.snapshot.contains(lower);
            if seed.chained {
                for row in mine {
                    if !seed.snapshot.is_visible(row.txid) {
                        seed.window.apply(row);
                    }
                }
                if head.contains(&seed.snapshot) {
                    install(r, seed.window, cap);
                } else {
                    r.seed = Some(seed);
                }
            }
        }
        if let Some(w) = &mut r.window {
            w.trim(cap);
        }
    }
}

#[derive(Default)]
pub(crate) struct Window {
    msgs: BTreeMap<i64, Arc<StoredMessage>>,
    /// In the order they were applied (about their time).
    tombs: VecDeque<Arc<StoredMessage>>,
    ids_from: Option<i64>,
    after: Option<DateTime<Utc>>,
}

impl Window {
    /// From a read of the room's newest messages: `rows` are all of them
    /// from the oldest returned on, or the whole room when `whole`.
    pub(crate) fn from_latest(rows: &[Arc<StoredMessage>], whole: bool) -> Option<Window> {
        let msgs: BTreeMap<i64, Arc<StoredMessage>> = rows
            .iter()
            .filter(|m| !m.deleted)
            .map(|m| (m.id, m.clone()))
            .collect();
        let ids_from = if whole {
            i64::MIN
        } else {
            // Nothing read and not the whole room: nothing is known.
            *msgs.keys().next()?
        };
        Some(Window {
            msgs,
            tombs: VecDeque::new(),
            ids_from: Some(ids_from),
            after: None,
        })
    }

    /// From a complete read of the messages created, and the deletions
    /// made, after `after`.
    pub(crate) fn from_created_after(rows: &[Arc<StoredMessage>], after: DateTime<Utc>) -> Window {
        let mut w = Window {
            after: Some(after),
            ..Window::default()
        };
        for m in rows {
            if m.deleted {
                w.tombs.push_back(m.clone());
            } else {
                w.msgs.insert(m.id, m.clone());
            }
        }
        w
    }

    fn in_region(&self, m: &StoredMessage) -> bool {
        self.ids_from.is_some_and(|f| m.id >= f) || self.after.is_some_and(|a| m.at > a)
    }

    /// Applies one change read after the window's snapshot.
    pub(crate) fn apply(&mut self, change: &Arc<StoredMessage>) {
        if change.deleted {
            self.msgs.remove(&change.id);
            if self.after.is_some() {
                self.tombs.push_back(change.clone());
            }
        } else if self.in_region(change) {
            self.msgs.insert(change.id, change.clone());
        } else {
            // Edited out of every region (its time moved back): a stale
            // version must not stay behind.
            self.msgs.remove(&change.id);
        }
    }

    /// Adds what `other`, of the same snapshot, holds and is complete for.
    pub(crate) fn merge(&mut self, other: Window) {
        for (id, m) in other.msgs {
            self.msgs.insert(id, m);
        }
        for t in other.tombs {
            if !self.tombs.iter().any(|x| x.key == t.key) {
                self.tombs.push_back(t);
            }
        }
        self.ids_from = min_some(self.ids_from, other.ids_from);
        self.after = min_some(self.after, other.after);
        if self.after.is_none() {
            self.tombs.clear();
        }
    }

    /// Keeps at most `cap` messages and `cap` deletions, shrinking the
    /// regions past what it drops.
    pub(crate) fn trim(&mut self, cap: usize) {
        while self.msgs.len() > cap {
            // The latest page needs the newest ids; the ISO `since` the
            // newest times: drop the oldest by whichever region exists.
            let victim = match self.ids_from {
                Some(_) => self.msgs.keys().next().copied(),
                None => self
                    .msgs
                    .values()
                    .min_by_key(|m| (m.at, m.id))
                    .map(|m| m.id),
            };
            let Some(id) = victim else { break };
            let Some(m) = self.msgs.remove(&id) else {
                break;
            };
            if let Some(f) = &mut self.ids_from {
                *f = (*f).max(m.id.saturating_add(1));
            }
            if let Some(a) = &mut self.after {
                *a = (*a).max(m.at);
            }
        }
        while self.tombs.len() > cap {
            let Some(t) = self.tombs.pop_front() else {
                break;
            };
            if let Some(a) = &mut self.after {
                *a = (*a).max(t.at);
            }
        }
        // What no region needs any more.
        let (ids_from, after) = (self.ids_from, self.after);
        self.msgs
            .retain(|_, m| ids_from.is_some_and(|f| m.id >= f) || after.is_some_and(|a| m.at > a));
        if let Some(a) = after {
            self.tombs.retain(|t| t.at > a);
        }
    }

    /// The newest `limit` messages, ascending id, when the window is
    /// complete for them.
    pub(crate) fn latest(&self, limit: usize) -> Option<Vec<Arc<StoredMessage>>> {
        let f = self.ids_from?;
        let held = self.msgs.range(f..);
        let n = held.clone().count();
        if n < limit && f != i64::MIN {
            return None;
        }
        Some(
            held.skip(n.saturating_sub(limit))
                .map(|(_, m)| m.clone())
                .collect(),
        )
    }

    /// The changes an ISO `since` is due (messages created after it,
    /// deletions after it), in paging-key order, at most `limit`, and
    /// whether more are due; None when the window is not complete for it.
    pub(crate) fn created_after(
        &self,
        since: DateTime<Utc>,
        limit: usize,
    ) -> Option<(Vec<Arc<StoredMessage>>, bool)> {
        if self.after? > since {
            return None;
        }
        let mut rows: Vec<Arc<StoredMessage>> = self
            .tombs
            .iter()
            .chain(self.msgs.values())
            .filter(|m| m.at > since)
            .cloned()
            .collect();
        rows.sort_unstable_by_key(|m| m.key);
        let more = rows.len() > limit;
        rows.truncate(limit);
        Some((rows, more))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> (usize, usize) {
        (self.msgs.len(), self.tombs.len())
    }
}

fn min_some<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{deletion_key, Message, User};

    fn msg(id: i64, secs: i64, content: &str) -> Arc<StoredMessage> {
        let m = Message {
            id,
            room: 1,
            sender: User {
                id: 1,
                username: "a".into(),
                first_name: String::new(),
                last_name: String::new(),
            },
            content: content.into(),
            created_at: DateTime::from_timestamp(secs, 0).unwrap(),
            edited: false,
        };
        Arc::new(StoredMessage::new(&m, 10))
    }

    fn gone(id: i64, seq: i64, secs: i64) -> Arc<StoredMessage> {
        Arc::new(StoredMessage::deletion(
            id,
            deletion_key(seq),
            1,
            11,
            DateTime::from_timestamp(secs, 0).unwrap(),
        ))
    }

    fn ids(rows: &[Arc<StoredMessage>]) -> Vec<i64> {
        rows.iter().map(|m| m.key).collect()
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn the_latest_page_is_answered_only_where_the_window_is_complete() {
        let rows: Vec<_> = (5..=9).map(|i| msg(i, i, "x")).collect();
        let mut w = Window::from_latest(&rows, false).unwrap();
        assert_eq!(ids(&w.latest(3).unwrap()), [7, 8, 9]);
        assert_eq!(ids(&w.latest(5).unwrap()), [5, 6, 7, 8, 9]);
        // Messages older than id 5 may exist: six cannot be told.
        assert!(w.latest(6).is_none());
        // A delete leaves fewer held than asked for.
        w.apply(&gone(9, 1, 20));
        assert!(w.latest(5).is_none());
        assert_eq!(ids(&w.latest(4).unwrap()), [5, 6, 7, 8]);
        // The whole room: any limit.
        let whole = Window::from_latest(&rows[..2], true).unwrap();
        assert_eq!(ids(&whole.latest(100).unwrap()), [5, 6]);
    }

    #[test]
    fn an_edit_replaces_and_a_move_out_removes() {
        let mut w = Window::from_latest(&[msg(5, 5, "a"), msg(6, 6, "b")], true).unwrap();
        w.apply(&msg(6, 6, "b2"));
        let page = w.latest(10).unwrap();
        assert!(std::str::from_utf8(&page[1].json).unwrap().contains("b2"));
        w.apply(&gone(5, 1, 30));
        assert_eq!(ids(&w.latest(10).unwrap()), [6]);
        // A latest-only window keeps no deletions.
        assert_eq!(w.len(), (1, 0));
    }

    #[test]
    fn the_iso_since_is_answered_from_its_bound_on_with_deletions() {
        let mut w = Window::from_created_after(&[msg(5, 105, "a"), msg(6, 106, "b")], t(100));
        assert!(w.created_after(t(99), 10).is_none());
        w.apply(&msg(7, 107, "c"));
        w.apply(&gone(5, 1, 108));
        // A message committed late with an old time: outside, not held.
        w.apply(&msg(4, 90, "old"));
        let (rows, more) = w.created_after(t(100), 10).unwrap();
        assert_eq!(ids(&rows), [deletion_key(1), 6, 7]);
        assert!(!more);
        let (rows, more) = w.created_after(t(106), 1).unwrap();
        assert_eq!(ids(&rows), [deletion_key(1)]);
        assert!(more);
        // An edit that moves a message's time back out of the region drops it.
        w.apply(&msg(7, 50, "c"));
        assert_eq!(
            ids(&w.created_after(t(100), 10).unwrap().0),
            [deletion_key(1), 6]
        );
    }

    #[test]
    fn trimming_shrinks_the_regions_so_that_what_is_left_stays_complete() {
        let rows: Vec<_> = (1..=10).map(|i| msg(i, 100 + i, "x")).collect();
        let mut w = Window::from_latest(&rows, true).unwrap();
        w.merge(Window::from_created_after(&rows, t(100)));
        w.trim(4);
        assert_eq!(w.len().0, 4);
        assert_eq!(ids(&w.latest(4).unwrap()), [7, 8, 9, 10]);
        assert!(w.latest(5).is_none());
        // Times up to the dropped 106 are no longer covered.
        assert!(w.created_after(t(105), 10).is_none());
        assert_eq!(ids(&w.created_after(t(106), 10).unwrap().0), [7, 8, 9, 10]);
        for seq in 1..=6 {
            w.apply(&gone(100 + seq, seq, 200 + seq));
        }
        w.trim(4);
        assert!(w.created_after(t(201), 10).is_none());
        let (rows, _) = w.created_after(t(202), 10).unwrap();
        assert_eq!(ids(&rows), (3..=6).map(deletion_key).collect::<Vec<_>>());
    }

    #[test]
    fn merging_keeps_both_regions() {
        let latest = Window::from_latest(&[msg(8, 1, "a"), msg(9, 2, "b")], false).unwrap();
        let mut w = Window::from_created_after(&[msg(3, 500, "late id")], t(400));
        w.merge(latest);
        assert_eq!(ids(&w.latest(2).unwrap()), [8, 9]);
        assert_eq!(ids(&w.created_after(t(400), 10).unwrap().0), [3]);
    }
}
