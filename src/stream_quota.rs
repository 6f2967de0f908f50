//! How many event streams each user has open on this process, and the cap
//! on it (`HARK_MAX_STREAMS_PER_USER`).
//!
//! A page that opens a new `EventSource` on every render and never closes
//! the old one is a common client bug. Without a cap, one user's leak (or
//! one client in a loop) can hold every connection hark allows
//! (`HARK_MAX_CONNECTIONS`), and everyone else gets 503s. With it, that
//! user's next stream is refused with 429 and the others are unaffected.
//!
//! The count is taken when a stream is authenticated, before any database
//! work, and given back when the stream ends, however it ends. Like the
//! write limit it is per process. Users with no stream open have no entry,
//! so the map holds only users who are streaming now.

use std::collections::HashMap;
use std::sync::Mutex;

pub(crate) struct StreamQuota {
    /// 0: no cap, and nothing is counted.
    max: u32,
    open: Mutex<HashMap<i64, u32>>,
}

/// One stream's place in its user's count, until [`Slot::keep`] hands it
/// to the stream or it is dropped (the request failed before the stream
/// began) and given back.
pub(crate) struct Slot<'a> {
    quota: &'a StreamQuota,
    user: i64,
}

impl StreamQuota {
    pub(crate) fn new(max: u32) -> StreamQuota {
        StreamQuota {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// One more stream for `user`, or None when they have `max` open.
    pub(crate) fn take(&self, user: i64) -> Option<Slot<'_>> {
        if self.max > 0 {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(user).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(Slot { quota: self, user })
    }

    /// Gives back a stream [`Slot::keep`] kept, when it ends.
    pub(crate) fn give_back(&self, user: i64) {
        if self.max == 0 {
            return;
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&user);
            }
        }
    }

    /// How many streams `user` has open (0 when the cap is off).
    #[cfg(test)]
    pub(crate) fn open_for(&self, user: i64) -> u32 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&user).copied().unwrap_or(0)
    }

    /// How many users have a stream open (0 when the cap is off).
    #[cfg(test)]
    pub(crate) fn users(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Slot<'_> {
    /// The stream has begun: from now on it gives its place back itself
    /// ([`StreamQuota::give_back`]) when it ends. It holds the app already,
    /// so this costs the stream no memory of its own.
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.quota.give_back(self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_max_streams_and_no_more_and_others_are_not_affected() {
        let q = StreamQuota::new(2);
        q.take(1).expect("first").keep();
        q.take(1).expect("second").keep();
        assert!(q.take(1).is_none(), "a third");
        assert_eq!(q.open_for(1), 2);
        q.take(2).expect("another user").keep();
        q.give_back(1);
        assert_eq!(q.open_for(1), 1);
        q.take(1).expect("a place was given back").keep();
        assert!(q.take(1).is_none());
    }

    #[test]
    fn a_slot_dropped_before_its_stream_began_is_given_back() {
        let q = StreamQuota::new(1);
        {
            let _slot = q.take(7).expect("first");
            assert!(q.take(7).is_none());
            // The request fails here (a 403, a database error): the slot drops.
        }
        assert_eq!(q.open_for(7), 0);
        assert_eq!(
            q.users(),
            0,
            "no entry is left for a user with nothing open"
        );
        q.take(7).expect("again").keep();
    }

    #[test]
    fn every_end_removes_the_entry_so_the_map_holds_only_streaming_users() {
        let q = StreamQuota::new(3);
        for user in 0..1000 {
            q.take(user).expect("room").keep();
        }
        assert_eq!(q.users(), 1000);
        for user in 0..1000 {
            q.give_back(user);
        }
        assert_eq!(q.users(), 0);
    }

    #[test]
    fn a_max_of_zero_counts_nothing() {
        let q = StreamQuota::new(0);
        for _ in 0..10_000 {
            q.take(1).expect("no cap").keep();
        }
        assert_eq!(q.open_for(1), 0);
        q.give_back(1);
        assert_eq!(q.users(), 0);
    }
}
