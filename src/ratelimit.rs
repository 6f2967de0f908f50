//! The per-user limit on writes: sending a message, typing changes and the
//! read marker share one bucket per user id, `HARK_WRITE_RATE` writes per
//! second sustained with bursts of `HARK_WRITE_BURST`.
//!
//! Each of those writes is a database statement, and a message or typing
//! change fans out to every stream in the room, so one client looping on
//! them costs the database and every reader. Reads (polls, streams, the
//! rooms list) are not limited here: they are cheap by design (DESIGN §2).
//!
//! The bucket is governor's GCRA (one timestamp per user, no timer) in a
//! mutex-guarded `HashMap` keyed by user id. Keys are users whose token
//! verified and who exist, never anything a client can invent, and a
//! sweeper drops every bucket that has refilled (it is then the same as
//! no bucket), so the map holds only users who wrote in the last minute or
//! so. The limit is per process: behind a load balancer each hark process
//! allows the rate.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::shutdown::Shutdown;

/// How often buckets that have refilled are dropped. A user who wrote
/// once stays at most this long plus the time the bucket takes to refill.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

type Buckets<C> =
    RateLimiter<i64, HashMapStateStore<i64>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The write limit, a cheap handle shared by the handlers and the sweeper.
/// Generic over the clock only so the tests can move time.
pub(crate) struct WriteLimit<C: Clock = DefaultClock> {
    /// `None`: the limit is off (`HARK_WRITE_RATE=0`).
    buckets: Option<Arc<Buckets<C>>>,
}

impl<C: Clock> Clone for WriteLimit<C> {
    fn clone(&self) -> Self {
        WriteLimit {
            buckets: self.buckets.clone(),
        }
    }
}

/// How long a refused user must wait before a write fits again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryAfter(pub Duration);

impl RetryAfter {
    /// For the `Retry-After` header: whole seconds, rounded up (a client
    /// that waits that long is never refused again for the same write),
    /// and at least 1, since `0` would invite an immediate retry.
    pub(crate) fn whole_seconds(self) -> u32 {
        let d = self.0;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        u32::try_from(secs).unwrap_or(u32::MAX).max(1)
    }
}

impl WriteLimit {
    /// `rate` writes per second sustained (0: no limit), bursts of `burst`.
    pub(crate) fn new(rate: u32, burst: u32) -> WriteLimit {
        WriteLimit::with_clock(rate, burst, DefaultClock::default())
    }
}

impl<C: Clock> WriteLimit<C> {
    pub(crate) fn with_clock(rate: u32, burst: u32, clock: C) -> WriteLimit<C> {
        let buckets = NonZeroU32::new(rate).map(|rate| {
            // A burst of 0 could never write; config forbids it, and 1 is
            // the smallest bucket that means anything.
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::per_second(rate).allow_burst(burst);
            Arc::new(RateLimiter::new(quota, HashMapStateStore::default(), clock))
        });
        WriteLimit { buckets }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.buckets.is_some()
    }

    /// Spends one write of `user`'s, or says how long until one fits.
    pub(crate) fn check(&self, user: i64) -> Result<(), RetryAfter> {
        let Some(b) = &self.buckets else {
            return Ok(());
        };
        b.check_key(&user)
            .map_err(|not_until| RetryAfter(not_until.wait_time_from(b.clock().now())))
    }

    /// Drops the buckets that have refilled (a user who comes back starts
    /// from a full bucket either way) and gives their memory back.
    pub(crate) fn forget_idle(&self) {
        if let Some(b) = &self.buckets {
            b.retain_recent();
            b.shrink_to_fit();
        }
    }

    /// How many users have a bucket now.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets.as_ref().map_or(0, |b| b.len())
    }

    /// Forgets idle users every [`SWEEP_EVERY`] until shutdown.
    pub(crate) async fn run_sweeper(self, mut shutdown: Shutdown) {
        if !self.enabled() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => self.forget_idle(),
                _ = shutdown.wait() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limit(rate: u32, burst: u32) -> (WriteLimit<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (WriteLimit::with_clock(rate, burst, clock.clone()), clock)
    }

    #[test]
    fn a_burst_then_refusal_then_the_sustained_rate() {
        let (l, clock) = limit(2, 3);
        for i in 0..3 {
            assert_eq!(l.check(7), Ok(()), "write {i} of the burst");
        }
        let wait = l.check(7).expect_err("the fourth write is over the burst");
        // At 2 per second the next write fits half a second later.
        assert_eq!(wait, RetryAfter(Duration::from_millis(500)));
        assert_eq!(wait.whole_seconds(), 1);
        // A refusal spends nothing: still refused, and no later.
        assert_eq!(l.check(7), Err(RetryAfter(Duration::from_millis(500))));
        clock.advance(Duration::from_millis(499));
        assert!(l.check(7).is_err());
        clock.advance(Duration::from_millis(1));
        assert_eq!(l.check(7), Ok(()));
        assert!(l.check(7).is_err(), "one write per half second, no more");
        // Another user has a bucket of their own.
        for _ in 0..3 {
            assert_eq!(l.check(8), Ok(()));
        }
        assert!(l.check(8).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        let s = |d: Duration| RetryAfter(d).whole_seconds();
        assert_eq!(s(Duration::ZERO), 1);
        assert_eq!(s(Duration::from_nanos(1)), 1);
        assert_eq!(s(Duration::from_millis(999)), 1);
        assert_eq!(s(Duration::from_secs(1)), 1);
        assert_eq!(s(Duration::from_millis(1001)), 2);
        assert_eq!(s(Duration::from_secs(59) + Duration::from_nanos(1)), 60);
        assert_eq!(s(Duration::from_secs(u64::MAX)), u32::MAX);

        // And from the bucket itself: 1 write per second, a burst of 1.
        let (l, clock) = limit(1, 1);
        assert_eq!(l.check(1), Ok(()));
        clock.advance(Duration::from_millis(100));
        let wait = l.check(1).expect_err("over the limit");
        assert_eq!(wait.0, Duration::from_millis(900));
        assert_eq!(wait.whole_seconds(), 1);
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let (l, _) = limit(0, 1);
        assert!(!l.enabled());
        for _ in 0..10_000 {
            assert_eq!(l.check(1), Ok(()));
        }
        assert_eq!(l.tracked(), 0, "nothing is kept when the limit is off");
    }

    #[test]
    fn idle_users_are_forgotten_and_busy_ones_kept() {
        // 10 per second, bursts of 30: one write refills in 100 ms, an
        // empty bucket in 3 s.
        let (l, clock) = limit(10, 30);
        for user in 0..1000 {
            assert_eq!(l.check(user), Ok(()));
        }
        // User 0 empties their bucket.
        let mut spent = 1;
        while l.check(0).is_ok() {
            spent += 1;
        }
        assert_eq!(spent, 30);
        assert_eq!(l.tracked(), 1000);
        clock.advance(Duration::from_millis(50));
        l.forget_idle();
        assert_eq!(l.tracked(), 1000, "no bucket has refilled yet");
        clock.advance(Duration::from_millis(950));
        l.forget_idle();
        assert_eq!(l.tracked(), 1, "only the user whose bucket is not full");
        // The sweep handed user 0 no fresh burst: one second refilled ten.
        let mut refilled = 0;
        while l.check(0).is_ok() {
            refilled += 1;
        }
        assert_eq!(refilled, 10);
        clock.advance(Duration::from_secs(4));
        l.forget_idle();
        assert_eq!(l.tracked(), 0);
        for _ in 0..30 {
            assert_eq!(l.check(0), Ok(()), "a full bucket after the refill");
        }
        assert!(l.check(0).is_err());
    }
}
