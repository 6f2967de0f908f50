//! Registrations in the hub: a poll's or stream's interest in rooms,
//! removed when the guard drops.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Hub, Room, State, Sub};
use crate::delivery::lag::Lag;
use crate::delivery::park::Park;

impl Hub {
    /// Registers `user`'s interest in `rooms`. The returned guard
    /// unregisters on drop (a client that hangs up frees its place at once).
    /// Streams pass their [`Lag`]; polls pass None.
    pub(crate) fn subscribe(
        &self,
        rooms: &[i64],
        user: i64,
        lag: Option<Arc<Lag>>,
    ) -> Subscription {
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
}

/// A registration in the hub; unregisters on drop.
pub(crate) struct Subscription {
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
    /// Resolves after the next wake-up for this subscriber (at once if one
    /// happened since the last call).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Also wake this subscriber when its user's memberships change.
    pub(crate) fn follow_user(&mut self) {
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
    /// Only for one that keeps its one room ([`crate::delivery::park`]).
    pub(crate) fn allow_parking(&self, park: &Arc<Park>) {
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
    pub(crate) fn set_rooms(&mut self, rooms: &[i64]) {
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
            signals: VecDeque::new(),
            heard: None,
            window: None,
            seed: None,
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
