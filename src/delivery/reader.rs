//! From a position to the next page of messages — the one place that
//! decides between the hub's memory and the database, shared by the long
//! poll and the event stream so both keep the same cursor guarantee.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use deadpool_postgres::Pool;

use crate::cursor::{Lower, Position, Snapshot};
use crate::db::messages::{self, Budget, Fetched, Read};
use crate::db::DbError;
use crate::delivery::hub::{Hub, HubRead, Window};
use crate::message::StoredMessage;
use crate::metrics::Metrics;

/// Why a page could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The position cannot be continued on this database: it names a
    /// snapshot from its future (a cursor from another cluster, or forged),
    /// or one older than the deletes hark still remembers.
    #[error("the cursor cannot be continued on this database")]
    CursorReset,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Where pages come from: the hub's memory when it can answer, else the
/// database. A cheap handle.
#[derive(Clone)]
pub(crate) struct Reader {
    hub: Hub,
    pool: Pool,
    metrics: Arc<Metrics>,
}

/// One page after a position.
pub(crate) struct Page {
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
    /// When `from_db`: how many of the rooms read the reader participates
    /// in, as of the snapshot the rows were read with.
    pub member_of: i64,
}

/// The first page of a poll without a cursor (the latest page, an ISO
/// `since`).
pub(crate) struct Start {
    /// Ascending paging key.
    pub rows: Vec<Arc<StoredMessage>>,
    /// The position after them.
    pub next: Position,
    /// More are due after `next` right now.
    pub more: bool,
    /// As in [`Page`].
    pub from_db: bool,
    pub member_of: i64,
}

/// What one page may hold, and for whom.
#[derive(Clone, Copy)]
pub(crate) struct Want {
    /// The reader (whose participation a database read checks).
    pub user: i64,
    /// Most rows.
    pub limit: usize,
    /// Most bytes of messages (`HARK_MAX_ANSWER_BYTES`); a first row
    /// larger than this still comes alone.
    pub bytes: usize,
}

impl Want {
    pub(crate) fn budget(&self) -> Budget {
        Budget {
            bytes: self.bytes,
            member: Some(self.user),
        }
    }
}

/// Keeps the longest prefix of `rows` whose JSON fits in `bytes`, and at
/// least one row; true when it dropped any.
pub(crate) fn fit(rows: &mut Vec<Arc<StoredMessage>>, bytes: usize) -> bool {
    let mut total = 0usize;
    let keep = rows
        .iter()
        .position(|m| {
            total = total.saturating_add(m.json.len() + 1);
            total > bytes
        })
        .map_or(rows.len(), |i| i.max(1));
    let cut = keep < rows.len();
    rows.truncate(keep);
    cut
}

/// The cursor position after `rows[i]` of a page of the batch `(lower,
/// upper]` (ascending id) whose position after its last row is `next`:
/// inside the batch, past that row's id; after the last, `next`. Every
/// writer of a page's events uses it, so every event's id is the same
/// resume point whoever wrote it.
pub(crate) fn position_after(
    batch: Option<(&Lower, &Arc<Snapshot>)>,
    next: &Position,
    rows: &[Arc<StoredMessage>],
    i: usize,
) -> Position {
    match batch {
        Some((lower, upper)) if i + 1 < rows.len() => Position::Paging {
            lower: lower.clone(),
            upper: upper.clone(),
            after_id: rows[i].key,
        },
        _ => next.clone(),
    }
}

impl Reader {
    pub(crate) fn new(hub: Hub, pool: Pool, metrics: Arc<Metrics>) -> Reader {
        Reader { hub, pool, metrics }
    }

    /// The next page after `pos` in `rooms`, within `want`. The caller holds a
    /// hub subscription for `rooms`, taken before this call.
    ///
    /// `fresh`: the caller answers now rather than waiting (a poll with
    /// `timeout=0`), so "nothing as of the hub's last catch-up" is the
    /// answer only while memory is current (no NOTIFY of the room waits for
    /// a catch-up, none was lost); otherwise the database decides.
    pub(crate) async fn next_page(
        &self,
        rooms: &[i64],
        pos: &Position,
        want: Want,
        fresh: bool,
    ) -> Result<Page, ReadError> {
        match self.memory_page(rooms, pos, want, fresh)? {
            Some(page) => Ok(page),
            None => self.db_page(rooms, pos, want).await,
        }
    }

    /// [`next_page`] when the hub's memory can answer; None when the database
    /// must. Synchronous, so that a woken poll answers without allocating a
    /// future for the read.
    pub(crate) fn memory_page(
        &self,
        rooms: &[i64],
        pos: &Position,
        want: Want,
        fresh: bool,
    ) -> Result<Option<Page>, ReadError> {
        match pos {
            Position::At(s) => match self.hub.read(rooms, s, None, want.limit) {
                HubRead::Due {
                    mut rows,
                    head,
                    more,
                    beyond,
                    heard,
                } => {
                    self.metrics
                        .polls_answered_from_memory
                        .fetch_add(1, Relaxed);
                    let more = fit(&mut rows, want.bytes) || more;
                    let mut page = split(rows, more, Lower::Snapshot(s.clone()), head, heard);
                    page.more |= beyond;
                    // Every row visible in the hub's head is in this page, and
                    // the catch-up that moves the head past it wakes the
                    // subscriber: a stream reading again now would find nothing.
                    page.settled = !page.more;
                    Ok(Some(page))
                }
                // A fresh answer of "nothing" needs memory to be current:
                // then it is what the database would say, as of the head.
                HubRead::Nothing { next, current } if current || !fresh => Ok(Some(Page {
                    rows: Vec::new(),
                    batch: None,
                    next: next.map_or_else(|| pos.clone(), Position::At),
                    more: false,
                    settled: true,
                    heard: None,
                    from_db: false,
                    member_of: 0,
                })),
                HubRead::Nothing { .. } | HubRead::Unknown => Ok(None),
            },
            Position::Paging {
                lower,
                upper,
                after_id,
            } => {
                // A batch whose upper snapshot does not see all its lower
                // one saw (only a forged cursor's) the hub declines; SQL
                // reads it.
                if let Lower::Snapshot(l) = lower {
                    // A fresh answer needs an exact `has_more`, which only the
                    // database knows while a NOTIFY may be in flight.
                    if !fresh {
                        if let HubRead::Due {
                            mut rows,
                            more,
                            beyond,
                            heard,
                            ..
                        } = self
                            .hub
                            .read(rooms, l, Some((upper, *after_id)), want.limit)
                        {
                            let more = fit(&mut rows, want.bytes) || more;
                            return Ok(Some(rest_of_batch(
                                rows, more, beyond, lower, upper, heard,
                            )));
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// [`next_page`] from the database, when [`memory_page`] said None.
    pub(crate) async fn db_page(
        &self,
        rooms: &[i64],
        pos: &Position,
        want: Want,
    ) -> Result<Page, ReadError> {
        let limit = want.limit;
        match pos {
            Position::At(s) => {
                let f = self
                    .cold(
                        rooms,
                        Read::After {
                            lower: s,
                            limit: limit as i64 + 1,
                        },
                        want.budget(),
                    )
                    .await?;
                if s.xmax > f.head.xmax || messages::missed_deletes(s, f.horizon) {
                    return Err(ReadError::CursorReset);
                }
                let mut rows = f.rows;
                let more = limit_rows(&mut rows, want) || f.cut;
                let mut page = split(rows, more, Lower::Snapshot(s.clone()), f.head, None);
                page.from_db = true;
                page.member_of = f.member_of;
                Ok(page)
            }
            Position::Paging {
                lower,
                upper,
                after_id,
            } => {
                let f = self
                    .cold(
                        rooms,
                        Read::Batch {
                            lower,
                            upper,
                            after_id: *after_id,
                            limit: limit as i64 + 1,
                        },
                        want.budget(),
                    )
                    .await?;
                let future = upper.xmax > f.head.xmax
                    || matches!(lower, Lower::Snapshot(l) if l.xmax > f.head.xmax);
                let forgotten =
                    matches!(lower, Lower::Snapshot(l) if messages::missed_deletes(l, f.horizon));
                if future || forgotten {
                    return Err(ReadError::CursorReset);
                }
                let Fetched {
                    mut rows,
                    beyond,
                    cut,
                    member_of,
                    ..
                } = f;
                let more = limit_rows(&mut rows, want) || cut;
                let mut page = rest_of_batch(rows, more, beyond, lower, upper, None);
                page.from_db = true;
                page.member_of = member_of;
                Ok(page)
            }
        }
    }

    /// The newest messages of `room` within `want`: from the hub's window
    /// of the room when it holds them; else read, and the read offered to
    /// the hub as the window (so it reads up to the window's size).
    pub(crate) async fn latest(&self, room: i64, want: Want) -> Result<Start, ReadError> {
        if let Some(p) = self.hub.latest(room, want.limit) {
            let mut rows = p.rows;
            fit_newest(&mut rows, want.bytes);
            return Ok(Start {
                rows,
                next: Position::At(p.head),
                more: false,
                from_db: false,
                member_of: 0,
            });
        }
        let size = want.limit.max(self.hub.window_capacity());
        let read = Read::Latest { limit: size as i64 };
        let f = self.cold(&[room], read, want.budget()).await?;
        if self.hub.window_capacity() > 0 {
            // Fewer than asked for, and not for want of bytes: all there is.
            let whole = !f.cut && f.rows.len() < size;
            if let Some(w) = Window::from_latest(&f.rows, whole) {
                self.hub.seed(room, f.head.clone(), w);
            }
        }
        let mut rows = f.rows;
        let extra = rows.len().saturating_sub(want.limit);
        rows.drain(..extra);
        fit_newest(&mut rows, want.bytes);
        Ok(Start {
            rows,
            next: Position::At(f.head),
            more: false,
            from_db: true,
            member_of: f.member_of,
        })
    }

    /// The first page after an ISO `since` in `room`: messages created
    /// after it and deletions after it. From the hub's window of the room
    /// when it reaches back to `since`; else read, and a complete read
    /// offered to the hub as the window.
    pub(crate) async fn created_after(
        &self,
        room: i64,
        since: DateTime<Utc>,
        want: Want,
    ) -> Result<Start, ReadError> {
        if let Some(p) = self.hub.created_after(room, since, want.limit) {
            let mut rows = p.rows;
            let more = fit(&mut rows, want.bytes) || p.more;
            return Ok(after_time(since, rows, more, p.head, None));
        }
        let size = want.limit.max(self.hub.window_capacity());
        let read = Read::CreatedAfter {
            since,
            limit: size as i64 + 1,
        };
        let f = self.cold(&[room], read, want.budget()).await?;
        if self.hub.window_capacity() > 0 && !f.cut && f.rows.len() <= size {
            let w = Window::from_created_after(&f.rows, since);
            self.hub.seed(room, f.head.clone(), w);
        }
        let mut rows = f.rows;
        let more = limit_rows(&mut rows, want) || f.cut;
        Ok(after_time(since, rows, more, f.head, Some(f.member_of)))
    }

    /// A read on a pooled connection, released before any wait.
    pub(crate) async fn cold(
        &self,
        rooms: &[i64],
        read: Read<'_>,
        budget: Budget,
    ) -> Result<Fetched, DbError> {
        self.metrics.cold_queries.fetch_add(1, Relaxed);
        let client = self.pool.get().await?;
        let f = messages::read(&client, rooms, read, budget).await?;
        self.hub.observe(&f.head);
        Ok(f)
    }
}

/// [`fit`] for the latest page: keeps the newest rows that fit.
pub(crate) fn fit_newest(rows: &mut Vec<Arc<StoredMessage>>, bytes: usize) {
    rows.reverse();
    fit(rows, bytes);
    rows.reverse();
}

/// Cuts rows read with `limit + 1` to the page `want` allows; true when
/// more are due.
pub(crate) fn limit_rows(rows: &mut Vec<Arc<StoredMessage>>, want: Want) -> bool {
    let more = rows.len() > want.limit;
    rows.truncate(want.limit);
    fit(rows, want.bytes) || more
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
            after_id: last.key,
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
        member_of: 0,
    }
}

/// The first page after an ISO `since`, read at `head`: when more are due,
/// the next position pages through the batch of the changes after `since`
/// visible in `head`.
fn after_time(
    since: DateTime<Utc>,
    rows: Vec<Arc<StoredMessage>>,
    more: bool,
    head: Arc<Snapshot>,
    member_of: Option<i64>,
) -> Start {
    let next = match (more, rows.last()) {
        (true, Some(last)) => Position::Paging {
            lower: Lower::CreatedAfter(since),
            upper: head,
            after_id: last.key,
        },
        _ => Position::At(head),
    };
    Start {
        rows,
        next,
        more,
        from_db: member_of.is_some(),
        member_of: member_of.unwrap_or(0),
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
            after_id: last.key,
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
        member_of: 0,
    }
}
