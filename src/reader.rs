//! From a position to the next page of messages — the one place that
//! decides between the hub's memory and the database, shared by the long
//! poll and the event stream so both keep the same cursor guarantee.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::time::Instant;

use crate::app::App;
use crate::cursor::{Lower, Position, Snapshot};
use crate::db::messages::{self, Fetched, Read};
use crate::db::DbError;
use crate::http::error::ApiError;
use crate::hub::HubRead;
use crate::message::StoredMessage;

/// One page after a position.
pub struct Page {
    /// Ascending id.
    pub rows: Vec<Arc<StoredMessage>>,
    /// The batch the rows belong to: a row's own cursor is
    /// `Paging { lower, upper, after_id: row.id }`.
    pub batch: Option<(Lower, Arc<Snapshot>)>,
    /// The position after the last row (or a fresher equivalent of the
    /// old one when there are none).
    pub next: Position,
    /// More rows are due after `next` right now.
    pub more: bool,
    /// Nothing is due after these rows as of now: the caller may wait for
    /// the hub once it has delivered them.
    pub settled: bool,
    /// When the NOTIFY of the earliest row from memory arrived.
    pub heard: Option<Instant>,
    /// The rows were read from the database, which may be ahead of the
    /// NOTIFYs hark has processed (a membership change among them).
    pub from_db: bool,
}

impl Page {
    /// The cursor position after `rows[i]`.
    pub fn position_after(&self, i: usize) -> Position {
        match &self.batch {
            Some((lower, upper)) if i + 1 < self.rows.len() => Position::Paging {
                lower: lower.clone(),
                upper: upper.clone(),
                after_id: self.rows[i].id,
            },
            _ => self.next.clone(),
        }
    }
}

/// The next page after `pos` in `rooms`, at most `limit` rows. The caller
/// holds a hub subscription for `rooms`, taken before this call.
///
/// `fresh`: the caller answers now rather than waiting (a poll with
/// `timeout=0`), so "nothing as of the hub's last catch-up" is not good
/// enough — a NOTIFY may still be on its way — and the database decides.
pub async fn next_page(
    app: &App,
    rooms: &[i64],
    pos: &Position,
    limit: usize,
    fresh: bool,
) -> Result<Page, ApiError> {
    match memory_page(app, rooms, pos, limit, fresh)? {
        Some(page) => Ok(page),
        None => db_page(app, rooms, pos, limit).await,
    }
}

/// [`next_page`] when the hub's memory can answer; None when the database
/// must. Synchronous, so that a woken poll answers without allocating a
/// future for the read.
pub fn memory_page(
    app: &App,
    rooms: &[i64],
    pos: &Position,
    limit: usize,
    fresh: bool,
) -> Result<Option<Page>, ApiError> {
    match pos {
        Position::At(s) => match app.hub.read(rooms, s, None, limit) {
            HubRead::Due {
                rows,
                head,
                more,
                beyond,
                heard,
            } => {
                app.metrics.polls_answered_from_memory.fetch_add(1, Relaxed);
                let mut page = split(rows, more, Lower::Snapshot(s.clone()), head, heard);
                page.more |= beyond;
                // Every row visible in the hub's head is in this page, and
                // the catch-up that moves the head past it wakes the
                // subscriber: a stream reading again now would find nothing.
                page.settled = !page.more;
                Ok(Some(page))
            }
            HubRead::Nothing if !fresh => Ok(Some(Page {
                rows: Vec::new(),
                batch: None,
                next: pos.clone(),
                more: false,
                settled: true,
                heard: None,
                from_db: false,
            })),
            HubRead::Nothing | HubRead::Unknown => Ok(None),
        },
        Position::Paging {
            lower,
            upper,
            after_id,
        } => {
            // A batch whose upper snapshot does not see all its lower one
            // saw (only a forged cursor's) the hub declines; SQL reads it.
            if let Lower::Snapshot(l) = lower {
                // A fresh answer needs an exact `has_more`, which only the
                // database knows while a NOTIFY may be in flight.
                if !fresh {
                    if let HubRead::Due {
                        rows,
                        more,
                        beyond,
                        heard,
                        ..
                    } = app.hub.read(rooms, l, Some((upper, *after_id)), limit)
                    {
                        return Ok(Some(rest_of_batch(rows, more, beyond, lower, upper, heard)));
                    }
                }
            }
            Ok(None)
        }
    }
}

/// [`next_page`] from the database, when [`memory_page`] said None.
pub async fn db_page(
    app: &App,
    rooms: &[i64],
    pos: &Position,
    limit: usize,
) -> Result<Page, ApiError> {
    match pos {
        Position::At(s) => {
            let f = cold(
                app,
                rooms,
                Read::After {
                    lower: s,
                    limit: limit as i64 + 1,
                },
            )
            .await?;
            if s.xmax > f.head.xmax {
                return Err(ApiError::CursorReset);
            }
            let mut rows = f.rows;
            let more = rows.len() > limit;
            rows.truncate(limit);
            let mut page = split(rows, more, Lower::Snapshot(s.clone()), f.head, None);
            page.from_db = true;
            Ok(page)
        }
        Position::Paging {
            lower,
            upper,
            after_id,
        } => {
            let f = cold(
                app,
                rooms,
                Read::Batch {
                    lower,
                    upper,
                    after_id: *after_id,
                    limit: limit as i64 + 1,
                },
            )
            .await?;
            let future = upper.xmax > f.head.xmax
                || matches!(lower, Lower::Snapshot(l) if l.xmax > f.head.xmax);
            if future {
                return Err(ApiError::CursorReset);
            }
            let Fetched {
                mut rows, beyond, ..
            } = f;
            let more = rows.len() > limit;
            rows.truncate(limit);
            let mut page = rest_of_batch(rows, more, beyond, lower, upper, None);
            page.from_db = true;
            Ok(page)
        }
    }
}

/// Rows new relative to `lower`, read at `head`: either a page inside the
/// batch `(lower, head]` or the whole rest of it.
fn split(
    rows: Vec<Arc<StoredMessage>>,
    more: bool,
    lower: Lower,
    head: Arc<Snapshot>,
    heard: Option<Instant>,
) -> Page {
    let next = match (more, rows.last()) {
        (true, Some(last)) => Position::Paging {
            lower: lower.clone(),
            upper: head.clone(),
            after_id: last.id,
        },
        _ => Position::At(head.clone()),
    };
    Page {
        settled: rows.is_empty(),
        rows,
        batch: Some((lower, head)),
        next,
        more,
        heard,
        from_db: false,
    }
}

fn rest_of_batch(
    rows: Vec<Arc<StoredMessage>>,
    more: bool,
    beyond: bool,
    lower: &Lower,
    upper: &Arc<Snapshot>,
    heard: Option<Instant>,
) -> Page {
    let next = match (more, rows.last()) {
        (true, Some(last)) => Position::Paging {
            lower: lower.clone(),
            upper: upper.clone(),
            after_id: last.id,
        },
        // The batch is done: everything visible in `upper` has been seen.
        _ => Position::At(upper.clone()),
    };
    Page {
        rows,
        batch: Some((lower.clone(), upper.clone())),
        next,
        more: more || beyond,
        // An empty rest-of-batch is not a reason to wait: the caller reads
        // again from `At(upper)`.
        settled: false,
        heard,
        from_db: false,
    }
}

/// A read on a pooled connection, released before any wait.
pub async fn cold(app: &App, rooms: &[i64], read: Read<'_>) -> Result<Fetched, ApiError> {
    app.metrics.cold_queries.fetch_add(1, Relaxed);
    let client = app.pool.get().await.map_err(DbError::from)?;
    let f = messages::read(&client, rooms, read).await?;
    app.hub.observe(&f.head);
    Ok(f)
}
