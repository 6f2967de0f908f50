//! Gives freed heap memory back to the operating system after a drop in
//! connections.
//!
//! glibc's malloc keeps what a burst of connections freed: RSS stays at
//! the peak, and the next burst touches pages of it that the first one
//! never did (an 8 KiB buffer of which one page was used is split up
//! differently next time), so memory per connection grows from burst to
//! burst. `malloc_trim(0)` hands every free page back (madvise), which
//! makes the next burst cost what the first one did. It holds malloc's
//! locks while it walks the heap (milliseconds for hundreds of MiB), so
//! it runs only when many connections have gone, at most once per check.

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
pub async fn run(metrics: Arc<Metrics>, min_drop: u32, mut shutdown: Shutdown) {
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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim only walks and releases glibc's own free lists.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}
