//! GET /api/chat/messages/poll/ — the true long poll.
//!
//! The poll registers with the hub *before* it reads anything, then loops:
//! answer from the hub's memory if it can, else read the database (the
//! cold path); if nothing is due, wait — holding no database connection —
//! until the hub wakes it, the timeout passes, the client goes away (the
//! connection drops this future, and the subscription guard unregisters)
//! or shutdown begins (answer with the cursor at once). After each read it
//! checks that its user may still read the room.
//!
//! On a keep-alive connection of hark's own HTTP/1.1 a waiting poll parks
//! ([`crate::delivery::park`]): the listener may write its answer instead,
//! and the poll, once it wakes, only takes note.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hyper::header::{HeaderValue, CACHE_CONTROL, ORIGIN};
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;

use super::chat::{require_participant, require_still_participant};
use super::error::ApiError;
use super::request::{query_get, query_pairs, token_claims};
use super::response::json_response;
use super::shared::Shared;
use super::Body;
use crate::config::Config;
use crate::cursor::{Cursor, Origin, Position};
use crate::delivery::park::{Park, PollForm};
use crate::delivery::reader::{Start, Want};
use crate::message::{format_ts, StoredMessage};
use crate::metrics::PollSince;

const DEFAULT_LIMIT: u32 = 100;

/// Where a poll starts, from `since`.
#[derive(Debug)]
pub(crate) enum Since {
    /// No `since`: the latest messages, at once.
    Latest,
    /// An ISO timestamp (the seed frontend): created after it.
    CreatedAfter(DateTime<Utc>),
    Cursor(Cursor),
}

/// Parses `since`: empty is absent; an ISO-8601 timestamp with `Z` or an
/// offset (a `+` that arrived as a space is read as `+`); else a cursor.
pub(crate) fn parse_since(raw: Option<&str>) -> Result<Since, ApiError> {
    let Some(raw) = raw.filter(|s| !s.is_empty()) else {
        return Ok(Since::Latest);
    };
    if let Some(ts) = parse_iso(raw) {
        return Ok(Since::CreatedAfter(ts));
    }
    Cursor::decode(raw).map(Since::Cursor).map_err(|_| {
        ApiError::bad(
            "invalid_since",
            "since must be a cursor from an earlier response or an ISO-8601 timestamp",
        )
    })
}

fn parse_iso(raw: &str) -> Option<DateTime<Utc>> {
    if raw.len() > 64 {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    // `2026-01-15T10:00:00 00:00`: a `+` decoded as a space.
    let i = raw.rfind(' ')?;
    let fixed = format!("{}+{}", &raw[..i], &raw[i + 1..]);
    DateTime::parse_from_rfc3339(&fixed)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A whole number in `min..=max`, or a 400 naming the parameter.
fn whole(
    raw: Option<&str>,
    name: &'static str,
    code: &'static str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    let bad = || {
        ApiError::bad(
            code,
            format!("{name} must be a whole number from {min} to {max}"),
        )
    };
    if raw.is_empty() || raw.len() > 19 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let v: u64 = raw.parse().map_err(|_| bad())?;
    if v < min || v > max {
        return Err(bad());
    }
    Ok(v)
}

/// The `timeout` of a poll that gives none: the configured default,
/// within the configured maximum.
pub(crate) fn default_timeout(cfg: &Config) -> u64 {
    cfg.poll_timeout_default_s.min(cfg.poll_timeout_max_s)
}

/// The `limit` of a poll that gives none.
pub(crate) fn default_limit(cfg: &Config) -> u32 {
    DEFAULT_LIMIT.min(cfg.poll_limit_max)
}

pub(crate) fn parse_room_id(raw: Option<&str>) -> Result<i64, ApiError> {
    let raw = raw.ok_or_else(|| ApiError::bad("invalid_room_id", "room_id is required"))?;
    raw.parse::<i64>()
        .ok()
        .filter(|&r| r > 0 && raw.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ApiError::bad("invalid_room_id", "room_id must be a positive integer"))
}

/// The cursor's database must be this one.
pub(crate) fn check_origin(cursor: &Cursor, origin: Origin) -> Result<(), ApiError> {
    if cursor.origin != origin {
        return Err(ApiError::CursorReset);
    }
    Ok(())
}

/// What a poll takes from its request, read before anything is awaited so
/// that the request is not kept in the poll's state.
struct Asked {
    user: i64,
    /// The query's errors wait until the user is known: an unknown user
    /// is told so first.
    params: Result<Params, ApiError>,
    park: Option<Arc<Park>>,
    /// A parked answer's CORS headers depend on it.
    origin: Option<bytes::Bytes>,
}

struct Params {
    room: i64,
    since: Since,
    timeout: u64,
    limit: usize,
}

fn params(cfg: &Config, pairs: &[(String, String)]) -> Result<Params, ApiError> {
    let room = parse_room_id(query_get(pairs, "room_id"))?;
    let since = parse_since(query_get(pairs, "since"))?;
    let timeout = whole(
        query_get(pairs, "timeout"),
        "timeout",
        "invalid_timeout",
        0,
        cfg.poll_timeout_max_s,
        default_timeout(cfg),
    )?;
    let limit = whole(
        query_get(pairs, "limit"),
        "limit",
        "invalid_limit",
        1,
        u64::from(cfg.poll_limit_max),
        u64::from(default_limit(cfg)),
    )? as usize;
    Ok(Params {
        room,
        since,
        timeout,
        limit,
    })
}

pub(crate) fn poll(
    app: &Shared,
    req: Request<()>,
) -> impl std::future::Future<Output = Result<Response<Body>, ApiError>> + '_ {
    let pairs = query_pairs(&req);
    let asked = token_claims(app, &req, &pairs).map(|(user, _)| {
        let park = req.extensions().get::<Arc<Park>>().cloned();
        let origin = park.as_ref().and_then(|_| {
            let origin = req.headers().get(ORIGIN)?;
            Some(bytes::Bytes::copy_from_slice(origin.as_bytes()))
        });
        Asked {
            user,
            params: params(&app.config, &pairs),
            park,
            origin,
        }
    });
    wait_poll(app, asked)
}

async fn wait_poll(
    app: &Shared,
    asked: Result<Asked, ApiError>,
) -> Result<Response<Body>, ApiError> {
    let Asked {
        user,
        params,
        park,
        origin: req_origin,
    } = asked?;
    let user = Box::pin(app.directory.user(user))
        .await?
        .ok_or(ApiError::UnknownUser)?;
    let Params {
        room,
        since,
        timeout,
        limit,
    } = params?;
    if !app.directory.cached_participant(room, user.id) {
        Box::pin(require_participant(app, room, user.id)).await?;
    }
    if let Since::Cursor(c) = &since {
        check_origin(c, app.origin())?;
    }
    // Online while the poll lasts, and the grace after.
    let _online = app.presence.hold(user.id);

    // Register before the first read: a row committing in between still
    // wakes us, and so does a loss of access.
    let sub = app.hub.subscribe(&[room], user.id, None);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    // Answers at once, so "nothing yet" must be current (see memory_page).
    let fresh = timeout == 0;
    let mut shutdown = app.shutdown.clone();
    let want = Want {
        user: user.id,
        limit,
        bytes: app.config.max_answer_bytes as usize,
    };
    drop(user);
    // The first reads of the two other forms of `since` are boxed, so a
    // waiting poll's state does not keep room for them.
    let (mut pos, since, used_db) = match since {
        Since::Latest => return Box::pin(latest(app, room, want)).await,
        Since::CreatedAfter(since) => {
            match Box::pin(created_after(app, room, since, want)).await? {
                Ok(answer) => return Ok(answer),
                Err((next, from_db)) => (next, PollSince::Time, from_db),
            }
        }
        Since::Cursor(c) => (c.position, PollSince::Cursor, false),
    };
    let mut me = Waiter {
        app,
        park,
        waiting: false,
        parkable: false,
        since,
        used_db,
    };
    loop {
        if let Some(park) = &me.park {
            // A loss of access heard from here on keeps the poll from
            // parking until it has checked again.
            park.checking();
        }
        // A block, so that the page is not kept across the wait below.
        let settled = {
            let page = match app.reader.memory_page(&[room], &pos, want, fresh)? {
                Some(page) => page,
                None => Box::pin(app.reader.db_page(&[room], &pos, want)).await?,
            };
            // After the read, so that what it returned is covered: nothing
            // committed after the user lost access is ever answered.
            // Without a future when the read or the cache already says yes:
            // most polls are answered at once, from memory.
            me.used_db |= page.from_db;
            let member = page.from_db.then_some(page.member_of > 0);
            let allowed = match member {
                Some(m) => m,
                None => app.directory.cached_participant(room, want.user),
            };
            if !allowed {
                Box::pin(require_still_participant(app, room, want.user, member)).await?;
            }
            pos = page.next;
            if !page.rows.is_empty() {
                let resp = answer(
                    &page.rows,
                    &Cursor {
                        origin: app.origin(),
                        position: pos,
                    },
                    page.more,
                );
                if let Some(heard) = page.heard {
                    app.metrics.delivery_latency.observe(heard.elapsed());
                }
                me.answered();
                return Ok(resp);
            }
            page.settled
        };
        if !settled {
            continue;
        }
        if Instant::now() >= deadline || shutdown.is_fired() {
            me.answered();
            return Ok(answer(
                &[],
                &Cursor {
                    origin: app.origin(),
                    position: pos,
                },
                false,
            ));
        }
        // Counted from here: a poll answered at once, or still reading, is
        // not waiting. Counting and parking happen in one step, with
        // nothing awaited between, so a poll seen counted is parked.
        if !me.waiting {
            app.metrics.waiting_polls.fetch_add(1, Relaxed);
            me.waiting = true;
        }
        let parked = match (&me.park, &pos) {
            (Some(park), Position::At(at)) => {
                if !me.parkable {
                    // Only now: a poll answered at once (the hot path)
                    // skips the hub's lock this takes. Until then the hub
                    // wakes it as any poll.
                    sub.allow_parking(park);
                    me.parkable = true;
                }
                park.park_poll(
                    at,
                    PollForm {
                        limit: want.limit,
                        variant: req_origin.clone(),
                    },
                )
            }
            _ => false,
        };
        tokio::select! {
            _ = sub.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait() => {}
        }
        if parked && me.park.as_ref().is_some_and(|p| p.unpark_poll()) {
            // The connection sees that its park answered, and writes
            // nothing of this.
            me.answered();
            return Ok(Response::new(Body::default()));
        }
    }
}

/// The answer without `since`: the latest messages that fit, at once.
async fn latest(app: &Shared, room: i64, want: Want) -> Result<Response<Body>, ApiError> {
    let start = app.reader.latest(room, want).await?;
    still_allowed(app, room, want.user, &start).await?;
    app.metrics.poll_answered(PollSince::Absent, start.from_db);
    let cursor = Cursor {
        origin: app.origin(),
        position: start.next,
    };
    Ok(answer(&start.rows, &cursor, false))
}

/// The first page after an ISO `since`: the answer when messages are
/// due, else the position to wait at (and whether the database was read).
async fn created_after(
    app: &Shared,
    room: i64,
    since: DateTime<Utc>,
    want: Want,
) -> Result<Result<Response<Body>, (Position, bool)>, ApiError> {
    let start = app.reader.created_after(room, since, want).await?;
    still_allowed(app, room, want.user, &start).await?;
    if start.rows.is_empty() {
        return Ok(Err((start.next, start.from_db)));
    }
    app.metrics.poll_answered(PollSince::Time, start.from_db);
    let cursor = Cursor {
        origin: app.origin(),
        position: start.next,
    };
    Ok(Ok(answer(&start.rows, &cursor, start.more)))
}

/// After the first read of a poll without a cursor: its user may still
/// read the room, as of that read (a database read says so itself).
async fn still_allowed(app: &Shared, room: i64, user: i64, start: &Start) -> Result<(), ApiError> {
    let member = start.from_db.then_some(start.member_of > 0);
    let allowed = match member {
        Some(m) => m,
        None => app.directory.cached_participant(room, user),
    };
    if !allowed {
        require_still_participant(app, room, user, member).await?;
    }
    Ok(())
}

/// The response: `rows`' messages and deletions, the cursor, `has_more`.
pub(crate) fn answer(
    rows: &[Arc<StoredMessage>],
    cursor: &Cursor,
    has_more: bool,
) -> Response<Body> {
    let cursor = cursor.encode();
    let now = format_ts(&Utc::now());
    let mut body = Vec::with_capacity(
        96 + cursor.len() + rows.iter().map(|m| m.json.len() + 1).sum::<usize>(),
    );
    // Messages and deletions are JSON already: this only concatenates.
    let list = |body: &mut Vec<u8>, deleted: bool| {
        let mut first = true;
        for m in rows.iter().filter(|m| m.deleted == deleted) {
            if !first {
                body.push(b',');
            }
            first = false;
            body.extend_from_slice(&m.json);
        }
    };
    body.extend_from_slice(b"{\"messages\":[");
    list(&mut body, false);
    body.extend_from_slice(b"],\"deleted\":[");
    list(&mut body, true);
    body.extend_from_slice(b"],\"timestamp\":\"");
    body.extend_from_slice(now.as_bytes());
    body.extend_from_slice(b"\",\"cursor\":\"");
    body.extend_from_slice(cursor.as_bytes());
    body.extend_from_slice(if has_more {
        b"\",\"has_more\":true}"
    } else {
        b"\",\"has_more\":false}"
    });
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// What a poll keeps across its waits besides its position, in one place
/// (a waiting poll's state is what each one costs): its park, and how it is
/// counted. While `waiting` it is counted in `hark_waiting_polls`, until it
/// ends, however it ends, or its park answers it (which counted it out).
struct Waiter<'a> {
    app: &'a Shared,
    park: Option<Arc<Park>>,
    waiting: bool,
    /// The hub may write to its park.
    parkable: bool,
    /// For `hark_poll_answers_total`: the form of `since`, and whether
    /// any read of this poll went to the database.
    since: PollSince,
    used_db: bool,
}

impl Waiter<'_> {
    fn answered(&self) {
        self.app.metrics.poll_answered(self.since, self.used_db);
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Taking the poll back first: a poll dropped while parked (its
        // client went away) must not be answered and counted out again.
        if self.waiting && !self.park.as_deref().is_some_and(Park::unpark_poll) {
            self.app.metrics.waiting_polls.fetch_sub(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_forms() {
        assert!(matches!(parse_since(None), Ok(Since::Latest)));
        assert!(matches!(parse_since(Some("")), Ok(Since::Latest)));
        for iso in [
            "2026-01-15T10:00:00Z",
            "2026-01-15T10:00:00.123456Z",
            "2026-01-15T10:00:00+02:00",
            "2026-01-15T10:00:00.5 02:00",
        ] {
            assert!(
                matches!(parse_since(Some(iso)), Ok(Since::CreatedAfter(_))),
                "{iso}"
            );
        }
        for bad in [
            "yesterday",
            "2026-01-15",
            "2026-01-15T10:00:00",
            "12",
            "%%%",
        ] {
            match parse_since(Some(bad)) {
                Err(ApiError::BadRequest { code, .. }) => assert_eq!(code, "invalid_since"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    /// A waiting poll's handler future is most of what each waiting poll
    /// costs (DESIGN §7): it must fit jemalloc's 1,280-byte size class, as
    /// it did before the loss-of-access check and the answer budget were
    /// added. What pushes it over is usually a local kept across the wait,
    /// or an unboxed read inlined into the state.
    #[test]
    fn a_waiting_polls_state_fits_its_size_class() {
        let app = crate::http::shared::Shared::for_tests();
        let req = Request::get("/api/chat/messages/poll/?room_id=1")
            .body(())
            .unwrap();
        let size = std::mem::size_of_val(&poll(&app, req));
        assert!(size <= 1280, "{size} bytes");
    }

    #[test]
    fn whole_numbers_only() {
        assert_eq!(whole(None, "t", "c", 0, 60, 25).unwrap(), 25);
        assert_eq!(whole(Some("0"), "t", "c", 0, 60, 25).unwrap(), 0);
        assert_eq!(whole(Some("60"), "t", "c", 0, 60, 25).unwrap(), 60);
        for bad in [
            "61",
            "-1",
            "1.5",
            "",
            "abc",
            " 1",
            "99999999999999999999999",
        ] {
            assert!(whole(Some(bad), "t", "c", 0, 60, 25).is_err(), "{bad}");
        }
    }
}
