//! How far an event stream is behind, and the cut of one that keeps
//! falling behind (DESIGN §5). Counted by the hub as catch-ups add rows to
//! a stream's rooms, discounted by the stream (or a direct write) as it
//! delivers them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use tokio::sync::Notify;

/// How far an event stream is behind: rows the hub has added to its rooms
/// that it has not delivered yet. A reader that stops reading stops
/// delivering while catch-ups keep adding; past the bound the hub cuts it
/// (its connection is closed) and it resumes losslessly with Last-Event-ID.
pub(crate) struct Lag {
    pending: AtomicUsize,
    limit: usize,
    cut: AtomicBool,
    /// Closes the stream's connection. The hub fires it itself: a stream
    /// whose socket is full is not being polled and cannot notice.
    close: Option<Arc<Notify>>,
}

impl Lag {
    pub(crate) fn new(limit: usize, close: Option<Arc<Notify>>) -> Arc<Lag> {
        Arc::new(Lag {
            pending: AtomicUsize::new(0),
            limit: limit.max(1),
            cut: AtomicBool::new(false),
            close,
        })
    }

    /// The stream wrote `n` messages.
    pub(crate) fn delivered(&self, n: usize) {
        let _ = self
            .pending
            .fetch_update(Relaxed, Relaxed, |p| Some(p.saturating_sub(n)));
    }

    /// The stream found nothing due: whatever was counted is covered by
    /// its position (rows from before it opened, or read from the
    /// database). A catch-up racing this is under-counted by one batch at
    /// most, which only makes the cut later, never wrong.
    pub(crate) fn caught_up(&self) {
        self.pending.store(0, Relaxed);
    }

    pub(crate) fn is_cut(&self) -> bool {
        self.cut.load(Relaxed)
    }

    /// Most messages one page of this stream may carry.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// `n` more rows are due to this stream; true when that cuts it. A
    /// stream that had delivered everything is never cut, whatever the
    /// size of one batch: only one that keeps falling behind is.
    pub(crate) fn added(&self, n: usize) -> bool {
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
