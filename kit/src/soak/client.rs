//! The soak's clients: long pollers that pass back their cursor, and
//! EventSource-like streams that resume with `Last-Event-ID`. Each keeps
//! a view of its room (message id → version), and counts what it was
//! given: versions new to it, versions it already had (duplicates), a
//! version older than the one it holds or a message after its delete (out
//! of order), every answer that was not a 200, and the latency of each
//! new version from the writer's COMMIT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use super::wire::{closes, error_code, retry_after, Event, Events, Wire};
use super::{key_of, Ctx, Rng};

/// A room as the table holds it: message id → version key.
pub(crate) type RoomState = HashMap<i64, u64>;

/// What the clients converge to: the table, per room.
pub(crate) struct Goal {
    pub(crate) gen: u64,
    pub(crate) rooms: HashMap<i64, RoomState>,
    /// The end: a client whose view is this one returns, and one that is
    /// not there by `deadline` returns too (and counts what differs).
    pub(crate) last: bool,
    pub(crate) deadline: Option<Instant>,
}

pub(crate) type GoalRx = watch::Receiver<Option<Arc<Goal>>>;

/// A client's view of its room.
#[derive(Default, Clone)]
pub(crate) struct View {
    rows: HashMap<i64, Entry>,
    live: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    key: u64,
    deleted: bool,
}

enum Applied {
    Fresh,
    Duplicate,
    OutOfOrder,
}

impl View {
    pub(crate) fn of(state: &RoomState) -> View {
        View {
            rows: state
                .iter()
                .map(|(id, key)| {
                    (
                        *id,
                        Entry {
                            key: *key,
                            deleted: false,
                        },
                    )
                })
                .collect(),
            live: state.len(),
        }
    }

    /// A message version arrived; applied as a client does (an upsert by
    /// id).
    fn message(&mut self, id: i64, key: u64) -> Applied {
        match self.rows.get_mut(&id) {
            None => {
                self.rows.insert(
                    id,
                    Entry {
                        key,
                        deleted: false,
                    },
                );
                self.live += 1;
                Applied::Fresh
            }
            Some(e) if e.deleted => {
                *e = Entry {
                    key,
                    deleted: false,
                };
                self.live += 1;
                Applied::OutOfOrder
            }
            Some(e) if e.key == key => Applied::Duplicate,
            Some(e) if key < e.key => {
                e.key = key;
                Applied::OutOfOrder
            }
            Some(e) => {
                e.key = key;
                Applied::Fresh
            }
        }
    }

    /// A delete arrived (for a message this view may never have held: one
    /// inserted and deleted between two polls).
    fn delete(&mut self, id: i64) -> Applied {
        match self.rows.get_mut(&id) {
            None => {
                self.rows.insert(
                    id,
                    Entry {
                        key: 0,
                        deleted: true,
                    },
                );
                Applied::Fresh
            }
            Some(e) if e.deleted => Applied::Duplicate,
            Some(e) => {
                e.deleted = true;
                self.live -= 1;
                Applied::Fresh
            }
        }
    }

    fn matches(&self, goal: &RoomState) -> bool {
        self.live == goal.len()
            && goal.iter().all(|(id, key)| {
                self.rows
                    .get(id)
                    .is_some_and(|e| !e.deleted && e.key == *key)
            })
    }

    /// How many messages differ from `goal`: missing here, here at another
    /// version (an edit not applied), or here but not in the table (a
    /// delete not applied).
    pub(crate) fn diff(&self, goal: &RoomState) -> u64 {
        let missing_or_stale = goal
            .iter()
            .filter(|(id, key)| {
                !self
                    .rows
                    .get(id)
                    .is_some_and(|e| !e.deleted && e.key == **key)
            })
            .count();
        let extra = self
            .rows
            .iter()
            .filter(|(id, e)| !e.deleted && !goal.contains_key(id))
            .count();
        (missing_or_stale + extra) as u64
    }
}

/// An answer that was not a 200 (or a 200 that could not be read).
#[derive(Clone, Debug)]
pub(crate) struct Status {
    pub(crate) at_ms: u32,
    pub(crate) status: u16,
    pub(crate) code: String,
    pub(crate) retry_after: bool,
    pub(crate) poll: bool,
}

/// What one client saw, returned when it ends.
#[derive(Default)]
pub(crate) struct ClientReport {
    pub(crate) poller: bool,
    /// Message versions new to the client (inserts and edits).
    pub(crate) messages: u64,
    /// Deletes new to the client.
    pub(crate) deletes: u64,
    /// A version (or a delete) the client already had.
    pub(crate) duplicated: u64,
    /// A version older than the one held, or a message after its delete.
    pub(crate) out_of_order: u64,
    /// A message of another room, or one whose content is not a soak
    /// version.
    pub(crate) foreign: u64,
    /// `cursor_reset` (409) or `event: reset`.
    pub(crate) resets: u64,
    pub(crate) statuses: Vec<Status>,
    /// Connections refused or broken, requests that failed on the wire.
    pub(crate) transport_errors: u64,
    /// A poll with no answer within its timeout + 30 s; a stream head not
    /// within 30 s.
    pub(crate) hung: u64,
    /// A stream with no byte (not even a ping) for 45 s.
    pub(crate) stalled: u64,
    /// Streams hark ended (cut, restart, shutdown).
    pub(crate) ended_by_hark: u64,
    pub(crate) connections: u64,
    /// typing, presence and read events.
    pub(crate) signals: u64,
    /// (COMMIT sent, ms since t0; latency to the client, µs) per new
    /// version.
    pub(crate) latencies: Vec<(u32, u32)>,
    pub(crate) converged: bool,
    /// Messages that differ from the table at the end.
    pub(crate) lost: u64,
}

impl ClientReport {
    fn status(&mut self, ctx: &Ctx, status: u16, code: String, retry_after: bool) {
        if status >= 500 {
            ctx.live.fivexx.fetch_add(1, Relaxed);
        }
        self.statuses.push(Status {
            at_ms: ctx.ms(std::time::Instant::now()),
            status,
            code,
            retry_after,
            poll: self.poller,
        });
    }

    fn transport(&mut self, ctx: &Ctx) {
        self.transport_errors += 1;
        ctx.live.transport.fetch_add(1, Relaxed);
    }

    fn message(&mut self, ctx: &Ctx, view: &mut View, room: i64, m: &Value) {
        let (Some(id), Some(key), Some(r)) = (
            m["id"].as_i64(),
            m["content"].as_str().and_then(key_of),
            m["room"].as_i64(),
        ) else {
            self.foreign += 1;
            return;
        };
        if r != room {
            self.foreign += 1;
            return;
        }
        ctx.live.deliveries.fetch_add(1, Relaxed);
        match view.message(id, key) {
            Applied::Fresh => {
                self.messages += 1;
                if let Some(at) = ctx.commit_at(key) {
                    let now = ctx.t0.elapsed();
                    let latency = now.saturating_sub(at);
                    self.latencies.push((
                        at.as_millis() as u32,
                        latency.as_micros().min(u32::MAX as u128) as u32,
                    ));
                }
            }
            Applied::Duplicate => self.duplicated += 1,
            Applied::OutOfOrder => self.out_of_order += 1,
        }
    }

    fn delete(&mut self, ctx: &Ctx, view: &mut View, room: i64, d: &Value) {
        let (Some(id), Some(r)) = (d["id"].as_i64(), d["room"].as_i64()) else {
            self.foreign += 1;
            return;
        };
        if r != room {
            self.foreign += 1;
            return;
        }
        ctx.live.deliveries.fetch_add(1, Relaxed);
        match view.delete(id) {
            Applied::Fresh => self.deletes += 1,
            Applied::Duplicate => self.duplicated += 1,
            Applied::OutOfOrder => self.out_of_order += 1,
        }
    }
}

/// How far a client of the slow-reader fault got: the goal generation its
/// view reached, and how many stream connections it has made.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) reached: AtomicU64,
    pub(crate) connections: AtomicU64,
}

/// One client's settings.
pub(crate) struct Spec {
    pub(crate) addr: SocketAddr,
    pub(crate) room: i64,
    pub(crate) token: String,
    /// The cursor to start from; `view` holds what it covers.
    pub(crate) start: String,
    pub(crate) view: View,
    pub(crate) goal: GoalRx,
    pub(crate) progress: Option<Arc<Progress>>,
    /// The slow reader: while true, the stream is not read.
    pub(crate) pause: Option<watch::Receiver<bool>>,
    pub(crate) recv_buffer: Option<u32>,
    pub(crate) seed: u64,
    /// A random delay before the first connection, up to this.
    pub(crate) spread: Duration,
}

/// Follows the goal a client converges to.
struct Follow {
    rx: GoalRx,
    goal: Option<Arc<Goal>>,
    progress: Option<Arc<Progress>>,
    room: i64,
}

impl Follow {
    /// True once the client is done: its view is the last goal, or the
    /// last goal's deadline has passed.
    fn done(&mut self, view: &View, rep: &mut ClientReport) -> bool {
        self.goal = self.rx.borrow_and_update().clone();
        let Some(goal) = &self.goal else {
            return false;
        };
        let empty = RoomState::new();
        let state = goal.rooms.get(&self.room).unwrap_or(&empty);
        if view.matches(state) {
            if let Some(p) = &self.progress {
                p.reached.fetch_max(goal.gen, Relaxed);
            }
            if goal.last {
                rep.converged = true;
                return true;
            }
            return false;
        }
        goal.last && goal.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Returns when there is a new goal, or the last goal's deadline
    /// passes.
    async fn changed(&mut self) {
        let deadline = self.goal.as_ref().and_then(|g| g.deadline);
        tokio::select! {
            r = self.rx.changed() => {
                if r.is_err() {
                    // The sender is gone: no goal will come any more.
                    std::future::pending::<()>().await;
                }
            }
            _ = sleep_until_opt(deadline) => {}
        }
    }

    /// What differs from the last goal, at the end.
    fn lost(&self, view: &View) -> u64 {
        match &self.goal {
            Some(goal) => {
                let empty = RoomState::new();
                view.diff(goal.rooms.get(&self.room).unwrap_or(&empty))
            }
            None => 0,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn changed_opt(rx: &mut Option<watch::Receiver<bool>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A stream with no byte for this long is taken for dead (hark pings
/// every 15 s).
const STALL: Duration = Duration::from_secs(45);

/// A long poller of one room, following its cursor.
pub(crate) async fn poller(ctx: Arc<Ctx>, spec: Spec, limit: u32) -> ClientReport {
    let Spec {
        addr,
        room,
        token,
        start,
        mut view,
        goal,
        progress,
        seed,
        spread,
        ..
    } = spec;
    let mut rng = Rng::new(seed);
    let mut rep = ClientReport {
        poller: true,
        ..ClientReport::default()
    };
    let mut follow = Follow {
        rx: goal,
        goal: None,
        progress,
        room,
    };
    let mut cursor = Some(start);
    let mut wire: Option<Wire> = None;
    let mut backoff = BACKOFF_MIN;
    tokio::time::sleep(spread.mul_f64(rng.f64())).await;
    let bound = Duration::from_secs(ctx.poll_timeout_s + 30);
    loop {
        if follow.done(&view, &mut rep) {
            break;
        }
        let w = match &mut wire {
            Some(w) => w,
            None => match Wire::connect(addr, None).await {
                Ok(w) => {
                    rep.connections += 1;
                    wire.insert(w)
                }
                Err(_) => {
                    rep.transport(&ctx);
                    tokio::time::sleep(backoff.mul_f64(0.5 + rng.f64())).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        let mut req = format!("GET /api/chat/messages/poll/?room_id={room}");
        if let Some(c) = &cursor {
            req.push_str("&since=");
            req.extend(form_urlencoded::byte_serialize(c.as_bytes()));
        }
        req.push_str(&format!(
            "&timeout={}&limit={limit} HTTP/1.1\r\nhost: soak\r\nauthorization: Bearer {token}\r\n\r\n",
            ctx.poll_timeout_s
        ));
        let answer = tokio::select! {
            a = tokio::time::timeout(bound, w.exchange(req.as_bytes())) => a,
            // A new goal: look at it (this request is given up, and its
            // connection with it).
            _ = follow.changed() => {
                wire = None;
                continue;
            }
        };
        let (head, body) = match answer {
            Err(_) => {
                rep.hung += 1;
                wire = None;
                continue;
            }
            Ok(Err(_)) => {
                rep.transport(&ctx);
                wire = None;
                tokio::time::sleep(backoff.mul_f64(0.5 + rng.f64())).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Ok(Ok(a)) => a,
        };
        backoff = BACKOFF_MIN;
        if closes(&head) {
            wire = None;
        }
        match head.status {
            200 => match serde_json::from_slice::<Value>(&body) {
                Ok(v) => {
                    // No message changes rooms here, so a delete is final:
                    // the versions first, then the deletes.
                    for m in v["messages"].as_array().into_iter().flatten() {
                        rep.message(&ctx, &mut view, room, m);
                    }
                    for d in v["deleted"].as_array().into_iter().flatten() {
                        rep.delete(&ctx, &mut view, room, d);
                    }
                    match v["cursor"].as_str() {
                        Some(c) => cursor = Some(c.to_string()),
                        None => rep.status(&ctx, 200, "no cursor".into(), false),
                    }
                }
                Err(e) => rep.status(&ctx, 200, format!("not JSON: {e}"), false),
            },
            409 => {
                // The cursor cannot be continued: start again from the
                // latest page (what a client does; what it missed shows as
                // lost at the end).
                rep.resets += 1;
                cursor = None;
            }
            status => {
                let wait = retry_after(&head);
                rep.status(&ctx, status, error_code(&body), wait.is_some());
                let wait = wait
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(10));
                tokio::time::sleep(wait.mul_f64(0.75 + 0.5 * rng.f64())).await;
            }
        }
    }
    rep.lost = follow.lost(&view);
    rep
}

/// An EventSource-like client of `/events?room_id=…`: reads events, and
/// after any end, error or refusal reconnects after `retry:` with the
/// last id it saw as `Last-Event-ID`.
pub(crate) async fn streamer(ctx: Arc<Ctx>, spec: Spec) -> ClientReport {
    let Spec {
        addr,
        room,
        token,
        start,
        mut view,
        goal,
        progress,
        mut pause,
        recv_buffer,
        seed,
        spread,
    } = spec;
    let mut rng = Rng::new(seed);
    let mut rep = ClientReport::default();
    let mut follow = Follow {
        rx: goal,
        goal: None,
        progress: progress.clone(),
        room,
    };
    let mut last_id = start;
    // hark's `retry:` once it has said it; 2 s (its default) until then.
    let mut retry = Duration::from_millis(2000);
    let mut buf = vec![0u8; 16 * 1024];
    let mut evs: Vec<Event> = Vec::new();
    tokio::time::sleep(spread.mul_f64(rng.f64())).await;
    'connect: loop {
        if follow.done(&view, &mut rep) {
            break;
        }
        let req = format!(
            "GET /events?room_id={room} HTTP/1.1\r\nhost: soak\r\naccept: text/event-stream\r\n\
             authorization: Bearer {token}\r\nlast-event-id: {last_id}\r\n\r\n"
        );
        let open = async {
            let mut w = Wire::connect(addr, recv_buffer).await?;
            w.send(req.as_bytes()).await?;
            let head = w.head().await?;
            Ok::<_, std::io::Error>((w, head))
        };
        let opened = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(30), open) => r,
            _ = follow.changed() => continue 'connect,
        };
        let (mut w, head) = match opened {
            Err(_) => {
                rep.hung += 1;
                tokio::time::sleep(retry.mul_f64(0.5 + rng.f64())).await;
                continue;
            }
            Ok(Err(_)) => {
                rep.transport(&ctx);
                tokio::time::sleep(retry.mul_f64(0.5 + rng.f64())).await;
                continue;
            }
            Ok(Ok(x)) => x,
        };
        if head.status != 200 {
            let body = tokio::time::timeout(Duration::from_secs(10), w.body(&head))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let wait = retry_after(&head);
            rep.status(&ctx, head.status, error_code(&body), wait.is_some());
            let wait = wait.unwrap_or(retry).min(Duration::from_secs(10));
            tokio::time::sleep(wait.mul_f64(0.75 + 0.5 * rng.f64())).await;
            continue;
        }
        rep.connections += 1;
        if let Some(p) = &progress {
            p.connections.fetch_add(1, Relaxed);
        }
        let mut dec = Events::default();
        let first = w.take_buffered();
        let mut fed = dec.feed(&first, &mut evs);
        loop {
            if fed.is_err() {
                rep.status(&ctx, 200, "bad event stream".into(), false);
                break;
            }
            for ev in evs.drain(..) {
                match ev.name.as_str() {
                    "message" | "delete" => match serde_json::from_str::<Value>(&ev.data) {
                        Ok(v) if ev.name == "message" => rep.message(&ctx, &mut view, room, &v),
                        Ok(v) => rep.delete(&ctx, &mut view, room, &v),
                        Err(_) => rep.foreign += 1,
                    },
                    "reset" => rep.resets += 1,
                    "ready" => {}
                    _ => rep.signals += 1,
                }
                // As EventSource: the last id seen is the one to resume from.
                if let Some(id) = ev.id {
                    last_id = id;
                }
            }
            if dec.ended() {
                rep.ended_by_hark += 1;
                break;
            }
            if follow.done(&view, &mut rep) {
                break 'connect;
            }
            // The slow reader: not a byte is read while paused.
            while pause.as_mut().is_some_and(|p| *p.borrow_and_update()) {
                tokio::select! {
                    _ = changed_opt(&mut pause) => {}
                    _ = follow.changed() => {}
                }
                if follow.done(&view, &mut rep) {
                    break 'connect;
                }
            }
            let read = tokio::select! {
                r = tokio::time::timeout(STALL, w.read_some(&mut buf)) => r,
                _ = follow.changed() => continue,
                _ = changed_opt(&mut pause) => continue,
            };
            match read {
                Err(_) => {
                    rep.stalled += 1;
                    break;
                }
                Ok(Ok(0)) | Ok(Err(_)) => {
                    rep.ended_by_hark += 1;
                    break;
                }
                Ok(Ok(n)) => fed = dec.feed(&buf[..n], &mut evs),
            }
        }
        if let Some(ms) = dec.retry {
            retry = Duration::from_millis(ms);
        }
        drop(w);
        tokio::time::sleep(retry.mul_f64(0.5 + rng.f64())).await;
    }
    rep.lost = follow.lost(&view);
    rep
}
