//! Gives freed heap memory back to the operating system after a drop in
//! connections.
//!
//! The hark binary allocates with jemalloc (src/main.rs), whose
//! background threads hand the pages a burst of connections freed back to
//! the OS on a decay timer (about 10 s). A large drop in connections is
//! worth more than waiting: purging every arena hands the free pages back
//! at once (madvise), so a burst that follows soon costs what the first
//! one did (benches/RESULTS.md: without it, RSS grew from burst to burst
//! when they came faster than the decay). The purge runs on a blocking
//! thread and only when many connections have gone, at most once per
//! check.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often the connection count is compared with its high-water mark.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Watches `hark_open_connections` until shutdown. `min_drop`: how many
/// connections must have closed since the peak (after the last trim)
/// before a trim is worth it; 0 never trims.
pub(crate) async fn run(metrics: Arc<Metrics>, min_drop: u32, mut shutdown: Shutdown) {
    if min_drop == 0 {
        return;
    }
    let min_drop = i64::from(min_drop);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = shutdown.wait() => return,
        }
        let now = metrics.open_connections.load(Relaxed);
        let peak = metrics.connections_high_water.load(Relaxed);
        // Half of the peak gone, and at least min_drop connections.
        if peak - now >= min_drop && now <= peak / 2 {
            // A connection counted in between only lowers the next peak.
            metrics.connections_high_water.store(now, Relaxed);
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            metrics.memory_trims.fetch_add(1, Relaxed);
            tracing::debug!(
                released,
                open_connections = now,
                "returned free heap memory"
            );
        }
    }
}

/// Purges the dirty pages of every jemalloc arena; false if jemalloc
/// refused.
fn trim() -> bool {
    // jemalloc's MALLCTL_ARENAS_ALL: the purge applies to every arena.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: "arena.<i>.purge" takes no input and writes no output, so
    // every pointer may be null; the name is NUL-terminated.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    rc == 0
}
