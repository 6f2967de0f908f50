//! GET /events — the Server-Sent Events stream of messages and typing.
//!
//! A stream is a long poll that never answers: it subscribes to the hub
//! *before* it reads, then loops over [`reader::next_page`] with its cursor
//! and writes each message with its own cursor as the event `id`, so any
//! event is a valid `Last-Event-ID` to resume from, exactly once.
//!
//! The body is pulled by the connection (hark's own or hyper's), one
//! batch per poll of the body: nothing is produced
//! for a reader whose socket is full, and memory per stream is its
//! position and subscription. The hub counts what such a stream falls
//! behind by ([`Lag`]) and, past `HARK_STREAM_BACKLOG`, closes its
//! connection; the client resumes with Last-Event-ID and loses nothing.
//!
//! Streams end themselves on shutdown (hyper's graceful shutdown would wait
//! for an endless body forever), after writing what they hold.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response};
use tokio::time::{Instant, Sleep};

use super::chat::require_participant;
use super::error::ApiError;
use super::poll::parse_room_id;
use super::request::{authenticate_until, query_get, query_pairs};
use super::shared::Shared;
use super::sse;
use super::{Body, ConnectionKill};
use crate::cursor::{Cursor, Lower, Origin, Position, Snapshot};
use crate::db::DbError;
use crate::db::{self, messages};
use crate::delivery::directory::Access;
use crate::delivery::hub::Subscription;
use crate::delivery::lag::Lag;
use crate::delivery::park::Park;
use crate::delivery::presence::Held;
use crate::delivery::reader::{self, Want};
use crate::message::{Signal, SignalKind, StoredMessage, User};
use crate::shutdown::Shutdown;

/// The reconnection delay browsers are told to use.
const RETRY_MS: u64 = 2000;
/// Most rooms one stream may name.
pub(crate) const MAX_ROOMS: usize = 100;

pub(crate) async fn events(
    app: &Arc<Shared>,
    req: Request<()>,
) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(&req);
    let (user, token_exp) = authenticate_until(app, &req, &pairs).await?;
    let slot = app.stream_quota.take(user.id).ok_or_else(|| {
        app.metrics.streams_over_quota.fetch_add(1, Relaxed);
        ApiError::TooManyStreams(app.stream_quota.max())
    })?;
    let kill = req.extensions().get::<ConnectionKill>().cloned();
    let park = req.extensions().get::<Arc<Park>>().cloned();
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query_get(&pairs, "last_event_id").map(str::to_owned))
        .filter(|s| !s.trim().is_empty());
    drop(req);

    let mut rooms: Vec<i64> = Vec::new();
    for (k, v) in &pairs {
        if k == "room_id" {
            let room = parse_room_id(Some(v))?;
            if !rooms.contains(&room) {
                rooms.push(room);
            }
        }
    }
    if rooms.len() > MAX_ROOMS {
        return Err(ApiError::bad(
            "invalid_room_id",
            format!("at most {MAX_ROOMS} different rooms per stream"),
        ));
    }
    // 404 for a missing room wins over 403 for someone else's.
    let mut forbidden = false;
    for &room in &rooms {
        match require_participant(app, room, user.id).await {
            Ok(()) => {}
            Err(ApiError::NotParticipant) => forbidden = true,
            Err(e) => return Err(e),
        }
    }
    if forbidden {
        return Err(ApiError::NotParticipant);
    }
    let follow = rooms.is_empty();

    // Register before reading anything (rooms, snapshot, typists).
    let lag = Lag::new(app.config.stream_backlog as usize, kill.map(|k| k.0));
    let mut sub = app.hub.subscribe(&rooms, user.id, Some(lag.clone()));
    let mut user_epoch = 0;
    // A stream of one named room keeps its room set for good, so a
    // catch-up may write to it while it is parked.
    let park = park.filter(|_| rooms.len() == 1);
    if let Some(park) = &park {
        sub.allow_parking(park);
    }
    if follow {
        sub.follow_user();
        user_epoch = app.hub.user_epoch(user.id);
        rooms = app.directory.rooms_of(user.id).await?;
        sub.set_rooms(&rooms);
    }
    let signal_seq = app.hub.signal_seq();
    let origin = app.origin();
    let (now, horizon) = {
        let client = app.pool.get().await.map_err(DbError::from)?;
        messages::position_now(&client).await?
    };
    app.hub.observe(&now);
    let typists = app.typing.current(&rooms, user.id).await?;
    let online = {
        let client = app.pool.get().await.map_err(DbError::from)?;
        db::presence::online_in(&client, &rooms, user.id).await?
    };

    let mut head = BytesMut::new();
    sse::push_retry(&mut head, RETRY_MS);
    let current = Cursor::at(origin, now.clone());
    let resumed = last_event_id.and_then(|text| match Cursor::decode(&text) {
        // Continued only on this database, from its past, and not from
        // before deletes hark has forgotten.
        Ok(c)
            if c.origin == origin
                && c.newest_xmax() <= now.xmax
                && !c
                    .lower()
                    .is_some_and(|l| messages::missed_deletes(l, horizon)) =>
        {
            Some((text, c.position))
        }
        _ => {
            let data = serde_json::json!({ "cursor": current.encode() }).to_string();
            sse::push_event(&mut head, "reset", None, data.as_bytes());
            None
        }
    });
    let (ready_id, pos) = match resumed {
        Some((text, pos)) => (text, pos),
        None => (current.encode(), Position::At(now)),
    };
    let data = serde_json::json!({ "cursor": ready_id }).to_string();
    sse::push_event(&mut head, "ready", Some(&ready_id), data.as_bytes());
    // The current state after `ready`: who is typing, then who is online.
    let mut told = HashMap::new();
    let online = online
        .into_iter()
        .map(|(room, u)| Signal::presence(room, u, true));
    for ev in typists.into_iter().chain(online) {
        push_signal(&mut head, &ev);
        told.insert((ev.kind, ev.room, ev.user.id), true);
    }

    let held = app.presence.hold(user.id);
    app.metrics.open_streams.fetch_add(1, Relaxed);
    // Given back in the stream's Drop.
    slot.keep();
    let ping_every = app.config.ping_interval();
    let expires = expiry(token_exp, chrono::Utc::now());
    let stream = EventStream {
        app: app.clone(),
        user,
        follow,
        user_epoch,
        rooms,
        sub,
        lag,
        park,
        pos,
        signal_seq,
        told,
        _online: held,
        out: head,
        ping: Box::pin(tokio::time::sleep_until(earliest(
            Instant::now() + ping_every,
            expires,
        ))),
        ping_every,
        expires,
        last_write: Instant::now(),
        shutdown: app.shutdown.clone(),
        done: false,
        settled: false,
    };
    let body = futures::stream::unfold(stream, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(Frame::data(chunk)), s))
    });
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// When a token whose last accepted second is `exp` (Unix time) stops
/// being accepted, as an instant; None when that is over a year away.
fn expiry(exp: i64, now: chrono::DateTime<chrono::Utc>) -> Option<Instant> {
    let left_ms = exp
        .saturating_add(1)
        .saturating_mul(1000)
        .saturating_sub(now.timestamp_millis());
    let left = Duration::from_millis(u64::try_from(left_ms).unwrap_or(0));
    (left < Duration::from_secs(366 * 24 * 3600)).then(|| Instant::now() + left)
}

fn earliest(at: Instant, expires: Option<Instant>) -> Instant {
    expires.map_or(at, |e| e.min(at))
}

/// The `event: message` (or `event: delete`) of each of `rows`, a page of
/// the batch `batch`
/// whose position after its last row is `next`, each with its cursor as
/// the id ([`reader::position_after`]). The stream and the listener's
/// direct writes both write pages with this.
pub(crate) fn push_messages(
    out: &mut BytesMut,
    origin: Origin,
    batch: Option<(&Lower, &Arc<Snapshot>)>,
    next: &Position,
    rows: &[Arc<StoredMessage>],
) {
    for (i, row) in rows.iter().enumerate() {
        let position = reader::position_after(batch, next, rows, i);
        let id = Cursor { origin, position }.encode();
        let event = if row.deleted { "delete" } else { "message" };
        sse::push_event(out, event, Some(&id), &row.json);
    }
}

fn push_signal(out: &mut BytesMut, ev: &Signal) {
    sse::push_event(out, ev.kind.event(), None, &ev.json);
}

/// One open stream: its position and what it is waiting on.
struct EventStream {
    app: Arc<Shared>,
    user: Arc<User>,
    /// Following every room of the user (no `room_id` given).
    follow: bool,
    user_epoch: u64,
    rooms: Vec<i64>,
    sub: Subscription,
    lag: Arc<Lag>,
    /// Where the stream parks while idle, on a lean connection.
    park: Option<Arc<Park>>,
    pos: Position,
    signal_seq: u64,
    /// What this stream last told the client of each typist and each
    /// online co-participant, by room: a start already in the initial list
    /// may also arrive from the hub, and is not repeated.
    told: HashMap<(SignalKind, i64, i64), bool>,
    /// Its user is online while the stream lives.
    _online: Held,
    /// Events produced and not yet handed to hyper.
    out: BytesMut,
    ping: Pin<Box<Sleep>>,
    ping_every: Duration,
    /// When the last chunk was handed out: a ping is due `ping_every`
    /// after it.
    last_write: Instant,
    /// When the token the stream was opened with is no longer accepted:
    /// the stream ends then, as Mercure's does, rather than outlive its
    /// credential. The browser's reconnect then gets a 401. None: too far
    /// off to matter.
    expires: Option<Instant>,
    shutdown: Shutdown,
    done: bool,
    /// The last `produce()` delivered everything due, and nothing has woken
    /// the stream since: the next chunk can only come after a wake-up (the
    /// hub's `notify_one` keeps a wake-up that arrives while the stream is
    /// busy), so there is no need to read again before waiting.
    settled: bool,
}

impl EventStream {
    /// The next chunk to write, or None to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if !self.out.is_empty() {
                self.last_write = Instant::now();
                return Some(self.out.split().freeze());
            }
            if self.done || self.lag.is_cut() || self.shutdown.is_fired() {
                return None;
            }
            if self.expired() {
                tracing::debug!(user = self.user.id, "event stream ended: token expired");
                self.app.metrics.streams_expired.fetch_add(1, Relaxed);
                return None;
            }
            if !self.settled {
                // Boxed: an idle stream keeps only the waiting state below,
                // not the (larger) state of a database read.
                match Box::pin(self.produce()).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        // The client reconnects after `retry` and resumes.
                        tracing::info!(error = ?e, "ending event stream");
                        return None;
                    }
                }
            }
            // Idle: catch-ups may write for the stream meanwhile.
            let parked = match (&self.park, &self.pos) {
                (Some(park), Position::At(at)) if self.settled && park.park(at) => Some(park),
                _ => None,
            };
            // Only two things to wait for: whatever should end the stream
            // (a lag cut, shutdown) wakes its subscription too, and is
            // checked above. Each extra waiter would be a registration
            // and a removal on a shared lock per delivered event.
            tokio::select! {
                _ = self.sub.notified() => self.settled = false,
                // The timer is re-armed here rather than on every write: a
                // reset per event is a timer-wheel update per delivery.
                // The same timer wakes the stream when its token expires;
                // the check above then ends it.
                _ = &mut self.ping => {
                    let now = Instant::now();
                    let due = self.last_write + self.ping_every;
                    if !self.expired() {
                        let next = if now >= due {
                            sse::push_comment(&mut self.out, "ping");
                            now + self.ping_every
                        } else {
                            due
                        };
                        self.ping.as_mut().reset(earliest(next, self.expires));
                    }
                }
            }
            if let Some(park) = parked {
                if let Some(at) = park.unpark() {
                    self.pos = Position::At(at);
                }
                if park.has_rest() {
                    // The connection writes the tail of a cut-short direct
                    // write before this stream may write or park again.
                    return Some(Bytes::new());
                }
            }
        }
    }

    fn expired(&self) -> bool {
        self.expires.is_some_and(|at| Instant::now() >= at)
    }

    /// Appends what is due to `out`. Ok(true) when it should be called
    /// again at once (more is due), Ok(false) when it is time to wait.
    async fn produce(&mut self) -> Result<bool, ApiError> {
        self.settled = false;
        if let Some(park) = &self.park {
            park.checking();
        }
        let app = self.app.clone();
        let want = Want {
            user: self.user.id,
            limit: app.config.stream_backlog as usize,
            bytes: app.config.max_answer_bytes as usize,
        };
        let page = app
            .reader
            .next_page(&self.rooms, &self.pos, want, false)
            .await?;
        // Membership is checked after the read, not before: a room left
        // before or during the read must not leak its messages or typing.
        // Drop the page; the next round reads again from the same position
        // with the new room set. Rows read from the database may be newer
        // than the membership NOTIFYs processed so far, so for those ask
        // the database too.
        if !self.membership_holds().await? {
            return Ok(true);
        }

        if app.hub.signal_seq() != self.signal_seq {
            let (signals, seq) = app.hub.signals_since(&self.rooms, self.signal_seq);
            self.signal_seq = seq;
            // Never about oneself.
            for ev in signals.iter().filter(|e| e.user.id != self.user.id) {
                if ev.kind == SignalKind::Read {
                    push_signal(&mut self.out, ev);
                    continue;
                }
                let key = (ev.kind, ev.room, ev.user.id);
                let told = self.told.insert(key, ev.on);
                // Say only what changes the client's view (a stop for
                // someone it never saw start is noise too).
                if told.unwrap_or(false) != ev.on {
                    push_signal(&mut self.out, ev);
                }
                if !ev.on {
                    self.told.remove(&key);
                }
            }
        }
        // The database's answer in the read's own snapshot, for rows
        // newer than the NOTIFYs processed so far.
        if page.from_db && page.member_of < self.rooms.len() as i64 {
            if self.follow {
                self.rooms = app.directory.rooms_of(self.user.id).await?;
                self.sub.set_rooms(&self.rooms);
            } else {
                self.done = true;
            }
            return Ok(true);
        }
        let batch = page.batch.as_ref().map(|(l, u)| (l, u));
        push_messages(&mut self.out, app.origin(), batch, &page.next, &page.rows);
        self.lag.delivered(page.rows.len());
        if page.settled {
            self.lag.caught_up();
        }
        if let (Some(heard), false) = (page.heard, page.rows.is_empty()) {
            app.metrics.delivery_latency.observe(heard.elapsed());
        }
        self.pos = page.next;
        self.settled = page.settled;
        Ok(!self.out.is_empty() || !page.settled)
    }

    /// True when the stream's room set is still right. An all-rooms stream
    /// whose user's memberships changed takes the new set (and returns
    /// false: read again); a stream naming rooms ends when its user is no
    /// longer in one of them.
    async fn membership_holds(&mut self) -> Result<bool, ApiError> {
        let app = &self.app;
        if self.follow {
            let epoch = app.hub.user_epoch(self.user.id);
            if epoch == self.user_epoch {
                return Ok(true);
            }
            self.user_epoch = epoch;
            self.rooms = app.directory.rooms_of(self.user.id).await?;
            self.sub.set_rooms(&self.rooms);
            return Ok(false);
        }
        for &room in &self.rooms {
            if app.directory.access(room, self.user.id).await? != Access::Participant {
                self.done = true;
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(park) = &self.park {
            park.close();
        }
        self.app.metrics.open_streams.fetch_sub(1, Relaxed);
        self.app.stream_quota.give_back(self.user.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_expires_after_its_last_second() {
        let now = chrono::DateTime::from_timestamp_millis(1_000_250).unwrap();
        let before = Instant::now();
        // exp 1000: accepted through second 1000, so 750 ms are left.
        let at = expiry(1000, now).expect("soon");
        let left = at - before;
        assert!(left >= Duration::from_millis(750), "{left:?}");
        assert!(left < Duration::from_millis(850), "{left:?}");
        // Already past: at once, not never.
        assert!(expiry(998, now).expect("past") <= Instant::now());
        assert!(expiry(i64::MIN, now).is_some());
        // Over a year away, or `exp` far out: never.
        assert_eq!(expiry(1000 + 400 * 24 * 3600, now), None);
        assert_eq!(expiry(i64::MAX, now), None);
    }
}
