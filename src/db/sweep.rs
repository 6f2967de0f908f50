//! Housekeeping of hark's own tables, by whichever process gets there
//! first (the others find nothing to delete): losses of access older than a
//! day, and tombstones older than `HARK_TOMBSTONE_RETENTION_S`.
//!
//! The listener's catch-up reads losses of access only for its own window
//! (since its previous catch-up); a day covers any listener outage, and
//! after a reconnect the directory's cache starts empty anyway. Tombstones
//! are what a cursor needs to learn of deletes: the newest transaction
//! swept is kept as the horizon, and a cursor that does not see it gets
//! `cursor_reset` rather than a silence about what it missed.

use std::time::Duration;

use deadpool_postgres::Pool;

use super::DbError;
use crate::shutdown::Shutdown;

/// How often the sweeps run: hourly, or twice per retention when that is
/// shorter.
fn period(retention: Duration) -> Duration {
    (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Sweeps until shutdown.
pub(crate) async fn run(pool: Pool, retention: Duration, mut shutdown: Shutdown) {
    let mut every = tokio::time::interval(period(retention));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait() => return,
        }
        match sweep(&pool, retention).await {
            Ok((0, 0)) => {}
            Ok((revoked, tombstones)) => {
                tracing::debug!(revoked, tombstones, "swept old rows");
            }
            Err(e) => tracing::warn!(error = %e, "sweeping old rows failed"),
        }
    }
}

/// One sweep: (losses of access, tombstones) deleted.
pub(crate) async fn sweep(pool: &Pool, retention: Duration) -> Result<(u64, u64), DbError> {
    let client = pool.get().await?;
    let revoked = client
        .execute(
            "DELETE FROM hark_access_revoked WHERE revoked_at < now() - interval '1 day'",
            &[],
        )
        .await?;
    // The horizon moves in the same statement as the delete: no reader
    // can see the tombstones gone and the horizon where it was.
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            "WITH d AS (DELETE FROM hark_tombstone \
                        WHERE deleted_at < now() - $1::int8 * interval '1 millisecond' \
                        RETURNING hark_txid), \
                  m AS (SELECT max(hark_txid) AS top, count(*) AS n FROM d), \
                  u AS (UPDATE hark_tombstone_horizon h SET swept_txid = greatest(h.swept_txid, m.top) \
                        FROM m WHERE m.top IS NOT NULL RETURNING 1) \
             SELECT n FROM m",
            &[&retention_ms],
        )
        .await?;
    let tombstones: i64 = row.try_get(0)?;
    Ok((revoked, tombstones as u64))
}
