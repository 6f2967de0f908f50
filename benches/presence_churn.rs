//! Presence under churn: N clients connecting and disconnecting `/events`
//! streams for a minute; what presence costs the database (writes, NOTIFYs)
//! and hark (CPU, RSS), and what it does to the delivery of a message sent
//! meanwhile.
//!
//!     cargo bench --bench presence_churn
//!
//! Users and rooms: CHURN_USERS users (10,000) in rooms of CHURN_ROOM_SIZE
//! (10), each user in exactly one room, so a presence transition is one
//! NOTIFY (`hark_presence_notify`: one per room of the user) and reaches at
//! most the 9 other members' streams. One more user, the observer, is also
//! in the first CHURN_WATCH_ROOMS rooms (100, hark's most per stream);
//! a writer user is in the first room and never connects.
//!
//! Churn: CHURN_CLIENTS clients (10,000; client i is user i mod
//! CHURN_USERS), each first waiting a random 0–CHURN_RAMP_S (5) s, then
//! until the end: open `/events?room_id=<its room>` as its user (the
//! `ready` event read), hold it a random CHURN_HOLD_MS ("500,5000") reading
//! whatever comes, close the socket, pause, reconnect. A pause is short,
//! a random CHURN_PAUSE_MS ("100,2000"), well within the grace; or, with
//! probability CHURN_AWAY_PCT (20) %, the user goes away: the grace plus a
//! random CHURN_AWAY_MS ("2000,7000"), well past the grace and the
//! tick (at most 1 s) on which hark ends graces. hark runs with
//! HARK_PRESENCE_GRACE_MS=CHURN_GRACE_MS (10000, hark's default).
//!
//! Meanwhile, on a thread of its own (as the benches' writer), the
//! observer holds two streams: one on the first room, which receives a
//! message the writer thread INSERTs there every CHURN_PROBE_MS (100):
//! COMMIT returned -> `event: message` fully received; and one on the
//! CHURN_WATCH_ROOMS rooms, which receives the presence events of their
//! users: an online event is timed from the `ready` of the stream that
//! made the user online (as the churning client saw it), an offline event
//! from the close of the user's last stream plus the grace (so it includes
//! the up-to-1-s tick by design).
//!
//! The presence transitions the churn should produce are computed from
//! the clients' own log: per user, the union of [ready, close + grace] of
//! its streams; each interval of it is one online and one offline
//! transition, unless hark writes the offline only after the user is back
//! (it then sees one interval: counted as "seen as one"). A LISTEN on
//! channel `hark` in this process counts the presence NOTIFYs (`"k":
//! "o"`) the database sent. After the churn every client stops and the
//! bench waits until no churning user is left in `hark_presence`, then
//! checks the totals: presence writes (`hark_presence_writes_total`) =
//! presence NOTIFYs, as many online as offline, none beyond the predicted
//! transitions. Writes that followed connections rather than users would
//! show there (and as writes in the steady window with CHURN_CLIENTS a
//! multiple of CHURN_USERS, when every user always has a client online).
//!
//! Reported over the whole minute and over its steady part (from
//! CHURN_WARM_S, 20 s, on: past the ramp and the first graces): streams
//! opened/s, transitions/s (predicted and NOTIFYed), presence writes/s
//! (users) and `hark_presence_set` statements/s (batches) from
//! pg_stat_statements, NOTIFYs/s received by hark
//! (`hark_notifications_total`, all kinds) and the presence ones alone,
//! hark's statements/s, the CPU of hark, PostgreSQL and this process (% of
//! one core, /proc, and per stream opened), hark's RSS, the open streams,
//! the p50/p99 of stream opens, of the probe messages and of the presence
//! events, and the steady window's top statements with their mean
//! execution and planning time (pg_stat_statements with
//! `track_planning`). The fixture's tables are ANALYZEd, as autovacuum
//! would have done on a real database. CHURN_SEED (1) seeds the clients'
//! randomness.
//!
//! Against a build from before presence (`HARK_BENCH_BINARY`, for an A/B
//! with the commit presence started from) the presence figures are
//! skipped and the rest is measured the same way.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;

fn main() -> std::process::ExitCode {
    main_with("presence_churn", run())
}

struct Settings {
    users: usize,
    clients: usize,
    room_size: usize,
    watch_rooms: usize,
    secs: u64,
    warm: u64,
    ramp: Duration,
    grace: Duration,
    hold: (u64, u64),
    pause: (u64, u64),
    away: (u64, u64),
    away_pct: u32,
    probe: Duration,
    seed: u64,
}

/// "a,b" in milliseconds (a ≤ b).
fn range_ms(name: &str, default: (u64, u64)) -> Result<(u64, u64)> {
    let Ok(v) = std::env::var(name) else {
        return Ok(default);
    };
    let parts: Vec<u64> = v
        .split(',')
        .map(|p| p.trim().parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(format!("{name}: {e}")))?;
    match parts[..] {
        [a, b] if a <= b => Ok((a, b)),
        _ => Err(err(format!("{name}: expected \"min,max\" in ms"))),
    }
}

fn settings() -> Result<Settings> {
    let users = env_num("CHURN_USERS", 10_000usize).max(1);
    let s = Settings {
        users,
        clients: env_num("CHURN_CLIENTS", 10_000usize).max(1),
        room_size: env_num("CHURN_ROOM_SIZE", 10usize).clamp(1, users),
        watch_rooms: env_num("CHURN_WATCH_ROOMS", 100usize).clamp(1, 100),
        secs: env_num("CHURN_SECONDS", 60u64).max(1),
        warm: env_num("CHURN_WARM_S", 20u64),
        ramp: Duration::from_secs(env_num("CHURN_RAMP_S", 5)),
        grace: Duration::from_millis(env_num("CHURN_GRACE_MS", 10_000)),
        hold: range_ms("CHURN_HOLD_MS", (500, 5000))?,
        pause: range_ms("CHURN_PAUSE_MS", (100, 2000))?,
        away: range_ms("CHURN_AWAY_MS", (2000, 7000))?,
        away_pct: env_num("CHURN_AWAY_PCT", 20u32).min(100),
        probe: Duration::from_millis(env_num("CHURN_PROBE_MS", 100u64).max(1)),
        seed: env_num("CHURN_SEED", 1u64),
    };
    if Duration::from_millis(s.pause.1) >= s.grace {
        println!("note: CHURN_PAUSE_MS reaches the grace: some short pauses are not within it");
    }
    Ok(s)
}

/// The fixture: rooms of `room_size` churning users; the observer in the
/// first `watch_rooms`, the writer in the first.
struct World {
    /// Room of each churning user, by index.
    room_of: Vec<i64>,
    user_ids: Vec<i64>,
    rooms: Vec<i64>,
    observer: i64,
    writer: i64,
}

async fn create_world(db: &tokio_postgres::Client, s: &Settings) -> Result<World> {
    let users: Vec<i64> = db
        .query(
            "INSERT INTO users_user (username, first_name, last_name) \
             SELECT 'churn-' || g, 'Churn' || g, 'Test' FROM generate_series(1, $1::int8) g \
             RETURNING id",
            &[&(s.users as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut user_ids = users;
    user_ids.sort_unstable();
    let n_rooms = s.users.div_ceil(s.room_size);
    let mut rooms: Vec<i64> = db
        .query(
            "INSERT INTO chat_chatroom (type, name) \
             SELECT 'group', 'churn-' || g FROM generate_series(1, $1::int8) g RETURNING id",
            &[&(n_rooms as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    rooms.sort_unstable();
    let room_of: Vec<i64> = (0..s.users).map(|i| rooms[i / s.room_size]).collect();
    let observer: i64 = db
        .query_one(
            "INSERT INTO users_user (username, first_name, last_name) VALUES ('churn-observer', 'Observer', 'Test') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let writer: i64 = db
        .query_one(
            "INSERT INTO users_user (username, first_name, last_name) VALUES ('churn-writer', 'Writer', 'Test') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let watch = s.watch_rooms.min(rooms.len());
    let mut p_rooms: Vec<i64> = room_of.clone();
    let mut p_users: Vec<i64> = user_ids.clone();
    p_rooms.extend_from_slice(&rooms[..watch]);
    p_users.extend(std::iter::repeat_n(observer, watch));
    p_rooms.push(rooms[0]);
    p_users.push(writer);
    db.execute(
        "INSERT INTO chat_chatroom_participants (chatroom_id, user_id) \
         SELECT * FROM unnest($1::int8[], $2::int8[])",
        &[&p_rooms, &p_users],
    )
    .await?;
    // Statistics, as autovacuum would have gathered on a real database
    // (hark's presence read plans per call with them).
    db.batch_execute("ANALYZE users_user, chat_chatroom, chat_chatroom_participants")
        .await?;
    Ok(World {
        room_of,
        user_ids,
        rooms,
        observer,
        writer,
    })
}

// ---- the churning clients ---------------------------------------------------

/// One stream of a churning client.
struct Session {
    user: usize,
    /// The request was sent (connect started).
    start: Instant,
    /// Its `ready` event was received.
    ready: Instant,
    /// The socket was closed.
    close: Instant,
}

#[derive(Default)]
struct ClientOut {
    sessions: Vec<Session>,
    /// Pauses within the grace, and beyond it, that ended in a reconnect.
    short: u64,
    away: u64,
    open_errors: u64,
    /// Streams hark ended before the client closed them.
    ended: u64,
    first_error: Option<String>,
    presence_events: u64,
    other_events: u64,
}

fn rand_ms(rng: &mut fastrand::Rng, (a, b): (u64, u64)) -> Duration {
    Duration::from_millis(rng.u64(a..=b))
}

async fn client(
    addr: SocketAddr,
    user: usize,
    path: Arc<str>,
    s: Arc<Settings>,
    t0: Instant,
    end: Instant,
    seed: u64,
) -> ClientOut {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = ClientOut::default();
    let ramp_ms = s.ramp.as_millis() as u64;
    tokio::time::sleep_until((t0 + Duration::from_millis(rng.u64(0..=ramp_ms))).into()).await;
    loop {
        if Instant::now() >= end {
            break;
        }
        let start = Instant::now();
        let opened = tokio::time::timeout(Duration::from_secs(30), SseStream::open(addr, &path))
            .await
            .map_err(|_| err("no ready within 30 s"))
            .and_then(|r| r);
        match opened {
            Err(e) => {
                out.open_errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
                // Backing off a little, as a browser's EventSource does.
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Ok((mut st, _)) => {
                let ready = Instant::now();
                let until = (ready + rand_ms(&mut rng, s.hold)).min(end);
                let (mut presence, mut other) = (0u64, 0u64);
                let r: std::result::Result<std::io::Result<()>, _> =
                    tokio::time::timeout_at(until.into(), async {
                        loop {
                            st.read_some(&mut |item| {
                                if let SseItem::Event(e) = item {
                                    if e.kind == SseKind::Other
                                        && memchr::memmem::find(e.data, b"\"online\"").is_some()
                                    {
                                        presence += 1;
                                    } else {
                                        other += 1;
                                    }
                                }
                            })
                            .await?;
                        }
                    })
                    .await;
                drop(st);
                let close = Instant::now();
                out.presence_events += presence;
                out.other_events += other;
                if let Ok(Err(e)) = r {
                    out.ended += 1;
                    out.first_error.get_or_insert_with(|| e.to_string());
                }
                out.sessions.push(Session {
                    user,
                    start,
                    ready,
                    close,
                });
            }
        }
        let away = rng.u32(0..100) < s.away_pct;
        let pause = if away {
            s.grace + rand_ms(&mut rng, s.away)
        } else {
            rand_ms(&mut rng, s.pause)
        };
        if Instant::now() + pause >= end {
            break;
        }
        if away {
            out.away += 1;
        } else {
            out.short += 1;
        }
        tokio::time::sleep(pause).await;
    }
    out
}

// ---- the observer -----------------------------------------------------------

/// What the observer's two streams received.
#[derive(Default)]
struct ObserverOut {
    /// Probe number and when its event was fully received.
    messages: Vec<(u64, Instant)>,
    /// (user, online, received).
    presence: Vec<(i64, bool, Instant)>,
    error: Option<String>,
}

fn probe_of(data: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(data, PROBE.as_bytes())? + PROBE.len();
    let digits: Vec<u8> = data[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

const PROBE: &str = "presence churn probe ";

fn presence_of(data: &[u8]) -> Option<(i64, bool)> {
    #[derive(serde::Deserialize)]
    struct U {
        id: i64,
    }
    #[derive(serde::Deserialize)]
    struct P {
        user: U,
        online: bool,
    }
    let p: P = serde_json::from_slice(data).ok()?;
    Some((p.user.id, p.online))
}

/// Reads the probe messages of `s` until it fails.
async fn read_messages(s: &mut SseStream, out: &mut Vec<(u64, Instant)>) -> std::io::Error {
    let mut found: Vec<u64> = Vec::new();
    loop {
        let r = s
            .read_some(&mut |item| {
                if let SseItem::Event(e) = item {
                    if e.kind == SseKind::Message {
                        if let Some(n) = probe_of(e.data) {
                            found.push(n);
                        }
                    }
                }
            })
            .await;
        // Every event this read completed was fully received now.
        let at = Instant::now();
        out.extend(found.drain(..).map(|n| (n, at)));
        if let Err(e) = r {
            return e;
        }
    }
}

/// Reads the presence events of `s` until it fails.
async fn read_presence(s: &mut SseStream, out: &mut Vec<(i64, bool, Instant)>) -> std::io::Error {
    let mut found: Vec<(i64, bool)> = Vec::new();
    loop {
        let r = s
            .read_some(&mut |item| {
                if let SseItem::Event(e) = item {
                    if e.kind == SseKind::Other {
                        if let Some(p) = presence_of(e.data) {
                            found.push(p);
                        }
                    }
                }
            })
            .await;
        let at = Instant::now();
        out.extend(found.drain(..).map(|(u, on)| (u, on, at)));
        if let Err(e) = r {
            return e;
        }
    }
}

/// Opens the observer's streams on a thread of its own (the writer's
/// priority: events are timed as they arrive, not when the load
/// generator's runtime gets to them); returns once both are ready.
async fn start_observer(
    addr: SocketAddr,
    msg_path: String,
    watch_path: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::sync::oneshot::Receiver<ObserverOut>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let (out_tx, out_rx) = tokio::sync::oneshot::channel::<ObserverOut>();
    writer_thread("bench-observer", move |_| async move {
        let opened = async {
            let (m, _) = SseStream::open(addr, &msg_path).await?;
            let (w, _) = SseStream::open(addr, &watch_path).await?;
            Ok::<_, BoxError>((m, w))
        }
        .await;
        let (mut m, mut w) = match opened {
            Ok(x) => {
                let _ = ready_tx.send(Ok(()));
                x
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let mut out = ObserverOut::default();
        out.error = {
            let messages = read_messages(&mut m, &mut out.messages);
            let presence = read_presence(&mut w, &mut out.presence);
            tokio::select! {
                _ = stop.changed() => None,
                e = messages => Some(format!("message stream: {e}")),
                e = presence => Some(format!("presence stream: {e}")),
            }
        };
        let _ = out_tx.send(out);
    })?;
    ready_rx.await.map_err(|_| err("observer thread died"))??;
    Ok(out_rx)
}

// ---- LISTEN in the bench ------------------------------------------------------

/// Every NOTIFY on channel `hark` this process received: presence ones
/// as (user, online, received), the others counted by kind.
#[derive(Default)]
struct Heard {
    presence: Vec<(i64, bool, Instant)>,
    other: HashMap<String, u64>,
}

async fn listen(conn: &str) -> Result<(tokio_postgres::Client, Arc<Mutex<Heard>>)> {
    let (client, mut connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    let heard = Arc::new(Mutex::new(Heard::default()));
    let h = heard.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let tokio_postgres::AsyncMessage::Notification(n) = m else {
                continue;
            };
            let at = Instant::now();
            #[derive(serde::Deserialize)]
            struct U {
                id: i64,
            }
            #[derive(serde::Deserialize)]
            struct P {
                k: String,
                on: Option<bool>,
                u: Option<U>,
            }
            let Ok(p) = serde_json::from_str::<P>(n.payload()) else {
                *h.lock().unwrap().other.entry("?".into()).or_default() += 1;
                continue;
            };
            let mut h = h.lock().unwrap();
            match (p.k.as_str(), p.u, p.on) {
                ("o", Some(u), Some(on)) => h.presence.push((u.id, on, at)),
                _ => *h.other.entry(p.k).or_default() += 1,
            }
        }
    });
    client.batch_execute("LISTEN hark").await?;
    Ok((client, heard))
}

// ---- pg_stat_statements ---------------------------------------------------------

/// A statement's calls, and its execution and planning time (ms).
#[derive(Clone, Copy, Default)]
struct Calls {
    n: i64,
    exec: f64,
    plan: f64,
}

impl Calls {
    fn exec_mean(&self) -> f64 {
        self.exec / self.n.max(1) as f64
    }

    fn plan_mean(&self) -> f64 {
        self.plan / self.n.max(1) as f64
    }
}

/// Per statement text, from pg_stat_statements.
type Stmts = HashMap<String, Calls>;

async fn statements(admin: &tokio_postgres::Client) -> Result<Stmts> {
    let rows = admin
        .query(
            "SELECT query, sum(calls)::int8, sum(total_exec_time)::float8, sum(total_plan_time)::float8 \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             GROUP BY query",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let c = Calls {
                n: r.get(1),
                exec: r.get(2),
                plan: r.get(3),
            };
            (r.get(0), c)
        })
        .collect())
}

/// What the statements that `f` picks did between two readings.
fn calls_delta(a: &Stmts, b: &Stmts, f: impl Fn(&str) -> bool) -> Calls {
    b.iter()
        .filter(|(q, _)| f(q))
        .map(|(q, c)| {
            let c0 = a.get(q).copied().unwrap_or_default();
            Calls {
                n: c.n - c0.n,
                exec: c.exec - c0.exec,
                plan: c.plan - c0.plan,
            }
        })
        .fold(Calls::default(), |t, c| Calls {
            n: t.n + c.n,
            exec: t.exec + c.exec,
            plan: t.plan + c.plan,
        })
}

/// A statement this process sends (probes, LISTEN, these counts), not hark.
fn bench_statement(q: &str) -> bool {
    q == INSERT_SQL
        || q.contains("pg_stat_statements")
        || q.starts_with("LISTEN")
        || q.starts_with("BEGIN")
        || q.starts_with("COMMIT")
}

// ---- the run ----------------------------------------------------------------

/// A reading at a point of the run.
struct Mark {
    at: Instant,
    metrics: HashMap<String, f64>,
    cpu: CpuSnap,
    stmts: Stmts,
}

async fn mark(hark: &Hark, mc: &mut MetricsClient, admin: &tokio_postgres::Client) -> Result<Mark> {
    Ok(Mark {
        at: Instant::now(),
        metrics: mc.scrape().await?,
        cpu: CpuSnap::take(hark.pid),
        stmts: statements(admin).await?,
    })
}

async fn run() -> Result<()> {
    let s = Arc::new(settings()?);
    // pg_stat_statements as `start_counting_statements` loads it, with
    // planning time too: a statement planned on every call shows there.
    let pg = Pg::start(&[
        ("shared_preload_libraries", "pg_stat_statements"),
        ("pg_stat_statements.track", "top"),
        ("pg_stat_statements.track_planning", "on"),
    ])
    .await?;
    let admin = connect_db(&pg.conn).await?;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    let result = async {
        let grace_ms = s.grace.as_millis().to_string();
        let mut hark = start_hark(
            &pg.conn,
            "presence_churn",
            &[("HARK_PRESENCE_GRACE_MS", grace_ms.as_str())],
        )
        .await?;
        let r = churn(&hark, &pg.conn, &admin, s.clone()).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

fn in_window(t: Instant, a: Instant, b: Instant) -> bool {
    t >= a && t < b
}

fn p(sorted: &[Duration], q: f64) -> String {
    if sorted.is_empty() {
        "-".into()
    } else {
        ms(pct(sorted, q))
    }
}

async fn churn(
    hark: &Hark,
    db: &str,
    admin: &tokio_postgres::Client,
    s: Arc<Settings>,
) -> Result<()> {
    let fx = Fixture::new(db).await;
    let t = Instant::now();
    let world = create_world(&fx.db, &s).await?;
    println!(
        "fixture: {} users in {} rooms of {} (one room each), observer in {} of them; {:.1} s",
        s.users,
        world.rooms.len(),
        s.room_size,
        s.watch_rooms.min(world.rooms.len()),
        t.elapsed().as_secs_f64()
    );
    let observer_rooms = &world.rooms[..s.watch_rooms.min(world.rooms.len())];
    let probe_room = world.rooms[0];

    // One descriptor per open stream on each side (pauses hold none).
    let (own_soft, own_open) = fd_usage(std::process::id())?;
    let (hark_soft, hark_open) = fd_usage(hark.pid)?;
    let room = own_soft
        .saturating_sub(own_open + 64)
        .min(hark_soft.saturating_sub(hark_open + 64)) as usize;
    let clients = s.clients.min(room);
    println!(
        "fds: load generator {own_open} of {own_soft} open, hark {hark_open} of {hark_soft}; {clients} clients{}",
        if clients < s.clients {
            format!(" (asked for {}: the fd limit)", s.clients)
        } else {
            String::new()
        }
    );
    println!(
        "churn: {clients} clients over {} users for {} s; hold {}–{} ms; pause {}–{} ms, or with {} % the grace ({} ms) + {}–{} ms; ramp {} s",
        s.users,
        s.secs,
        s.hold.0,
        s.hold.1,
        s.pause.0,
        s.pause.1,
        s.away_pct,
        s.grace.as_millis(),
        s.away.0,
        s.away.1,
        s.ramp.as_secs()
    );

    let (_listen_client, heard) = listen(db).await?;
    let writer = Writer::start(db, true).await?;
    let mut mc = MetricsClient::new(hark.addr);

    // The observer's streams first (its user is in no churning client).
    let obs_token = token(world.observer);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let observer = start_observer(
        hark.addr,
        events_path(&[probe_room], &obs_token),
        events_path(observer_rooms, &obs_token),
        stop_rx,
    )
    .await?;
    mc.wait_until("hark_open_streams", Duration::from_secs(30), |v| v >= 2.0)
        .await?;
    // A hark from before presence (an A/B run against the commit it
    // started from) has no presence to measure: the rest still is.
    let presence = mc
        .scrape()
        .await?
        .contains_key("hark_presence_writes_total");
    if !presence {
        println!("this hark has no presence (no hark_presence_writes_total): presence figures are not measured");
    } else {
        // The observer's own online (one write) is done before the window.
        mc.wait_until("hark_presence_writes_total", Duration::from_secs(30), |v| {
            v >= 1.0
        })
        .await?;
    }

    // ... and its NOTIFYs (one per room) heard, so none falls in the window.
    let (obs_id, watch_n) = (world.observer, observer_rooms.len());
    hark_kit::within(Duration::from_secs(10), || {
        let n = heard
            .lock()
            .unwrap()
            .presence
            .iter()
            .filter(|(u, _, _)| *u == obs_id)
            .count();
        async move { !presence || n >= watch_n }
    })
    .await;

    let tokens: Vec<Arc<str>> = (0..s.users)
        .map(|i| Arc::from(events_path(&[world.room_of[i]], &token(world.user_ids[i]))))
        .collect();
    let idle_rss = rss_median(hark).await?;
    let overflows0 = listen_overflows();
    let m0 = mark(hark, &mut mc, admin).await?;
    let t0 = m0.at;
    let end = t0 + Duration::from_secs(s.secs);
    let warm_at = t0 + Duration::from_secs(s.warm.min(s.secs.saturating_sub(1)));
    println!(
        "hark idle RSS {} MiB; churn starts (load average {})",
        mib(idle_rss),
        loadavg()
    );

    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let user = i % s.users;
            tokio::spawn(client(
                hark.addr,
                user,
                tokens[user].clone(),
                s.clone(),
                t0,
                end,
                s.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
            ))
        })
        .collect();

    // The probes: one INSERT every CHURN_PROBE_MS until the end.
    let commits: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let probe_errors = Arc::new(AtomicU64::new(0));
    let prober = {
        let commits = commits.clone();
        let probe_errors = probe_errors.clone();
        let every = s.probe;
        let sender = world.writer;
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tick.tick().await;
                if Instant::now() >= end {
                    break;
                }
                match writer
                    .insert(probe_room, sender, &format!("{PROBE}{n}"))
                    .await
                {
                    Ok(at) => commits.lock().unwrap().push((n, at)),
                    Err(_) => {
                        probe_errors.fetch_add(1, Relaxed);
                    }
                }
                n += 1;
            }
        }
    };
    let prober = tokio::spawn(prober);

    // Once a second: open streams and RSS (a sample, not a wait).
    let mut open_samples: Vec<f64> = Vec::new();
    let mut rss_samples: Vec<u64> = Vec::new();
    let mut warm_mark: Option<Mark> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if warm_mark.is_none() && now >= warm_at {
            warm_mark = Some(mark(hark, &mut mc, admin).await?);
        }
        if now >= t0 + s.ramp {
            open_samples.push(mc.get("hark_open_streams").await?);
            rss_samples.push(hark.rss()?);
        }
    }
    tokio::time::sleep_until(end.into()).await;
    let m1 = mark(hark, &mut mc, admin).await?;
    let rss_end = hark.rss()?;
    let overflows = listen_overflows() - overflows0;
    let warm_mark = warm_mark.ok_or_else(|| err("no steady window: CHURN_WARM_S too large"))?;

    let mut outs = Vec::with_capacity(tasks.len());
    for t in tasks {
        outs.push(t.await?);
    }
    prober.await?;
    let closed_at = Instant::now();
    let sessions: Vec<&Session> = outs.iter().flat_map(|o| o.sessions.iter()).collect();
    let (intervals, ambiguous) = online_intervals(&sessions, s.users, s.grace);
    let n_intervals: u64 = intervals.iter().map(|v| v.len() as u64).sum();
    let churn_users: HashSet<i64> = world.user_ids.iter().copied().collect();

    // Settle: every churning user offline again in the database (the
    // graces end; the observer stays online), and their NOTIFYs heard.
    let mut settled = true;
    if presence {
        let (db, obs) = (&fx.db, world.observer);
        settled = hark_kit::within(s.grace + Duration::from_secs(60), move || async move {
            db.query_one(
                "SELECT count(*) FROM hark_presence WHERE user_id <> $1",
                &[&obs],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 0)
        })
        .await;
        let balanced = |h: &Heard| {
            let (mut on, mut off) = (0i64, 0i64);
            for (u, o, _) in &h.presence {
                if churn_users.contains(u) {
                    if *o {
                        on += 1;
                    } else {
                        off += 1;
                    }
                }
            }
            on == off
        };
        let _ = hark_kit::within(Duration::from_secs(10), || {
            let ok = balanced(&heard.lock().unwrap());
            async move { ok }
        })
        .await;
    }
    let writes0 = m0
        .metrics
        .get("hark_presence_writes_total")
        .copied()
        .unwrap_or(0.0);
    let writes = if presence {
        mc.get("hark_presence_writes_total").await? - writes0
    } else {
        0.0
    };
    let m_settled = statements(admin).await?;
    let idle_after = rss_median(hark).await?;
    let settle_s = closed_at.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let obs = observer.await.map_err(|_| err("observer thread died"))?;

    // ---- analysis ----
    let heard = std::mem::take(&mut *heard.lock().unwrap());
    let churn_notices: Vec<&(i64, bool, Instant)> = heard
        .presence
        .iter()
        .filter(|(u, _, _)| churn_users.contains(u))
        .collect();
    let total_notices = churn_notices.len() as u64;
    let total_on = churn_notices.iter().filter(|(_, on, _)| *on).count() as u64;

    let sum = |f: &dyn Fn(&ClientOut) -> u64| outs.iter().map(f).sum::<u64>();
    let (short, away) = (sum(&|o| o.short), sum(&|o| o.away));
    let (open_errors, ended) = (sum(&|o| o.open_errors), sum(&|o| o.ended));
    let first_error = outs.iter().find_map(|o| o.first_error.clone());
    let hold_mean = sessions
        .iter()
        .map(|x| x.close.duration_since(x.ready).as_secs_f64())
        .sum::<f64>()
        / sessions.len().max(1) as f64;
    let mut open_lat: Vec<Duration> = sessions
        .iter()
        .map(|x| x.ready.duration_since(x.start))
        .collect();
    open_lat.sort_unstable();

    // Presence at the observer: each online event against the latest
    // predicted interval of its user that had begun (request sent) when it
    // arrived, timed from that interval's `ready`; each offline event
    // against the latest predicted end (close + grace) before it.
    let index_of: HashMap<i64, usize> = world
        .user_ids
        .iter()
        .enumerate()
        .map(|(i, &u)| (u, i))
        .collect();
    let (mut lat_on, mut lat_off) = (Vec::new(), Vec::new());
    let (mut unmatched, mut early) = (0usize, 0usize);
    for &(u, on, at) in &obs.presence {
        let Some(&i) = index_of.get(&u) else {
            continue;
        };
        let iv = &intervals[i];
        if on {
            match iv.iter().rev().find(|x| x.start <= at) {
                Some(x) => {
                    if at < x.ready {
                        early += 1;
                    }
                    lat_on.push(at.saturating_duration_since(x.ready));
                }
                None => unmatched += 1,
            }
        } else {
            match iv.iter().rev().find(|x| x.off <= at) {
                Some(x) => lat_off.push(at.duration_since(x.off)),
                None => unmatched += 1,
            }
        }
    }
    lat_on.sort_unstable();
    lat_off.sort_unstable();
    let watched = (0..s.users)
        .filter(|&i| observer_rooms.contains(&world.room_of[i]))
        .count();

    // Probe messages: COMMIT returned -> event received.
    let commits = std::mem::take(&mut *commits.lock().unwrap());
    let arrived: HashMap<u64, Instant> = obs.messages.iter().copied().collect();
    let mut msg_lat: Vec<Duration> = Vec::new();
    let (mut lost, mut msg_early) = (0usize, 0usize);
    for (n, at) in &commits {
        match arrived.get(n) {
            Some(&a) => {
                if a < *at {
                    msg_early += 1;
                }
                msg_lat.push(a.saturating_duration_since(*at));
            }
            None => lost += 1,
        }
    }
    msg_lat.sort_unstable();

    // ---- report ----
    println!();
    println!(
        "churn done: {} streams opened ({open_errors} open errors, {ended} ended by hark{}), hold mean {hold_mean:.2} s; reconnects within the grace {short}, after it {away} ({:.1} % after); settle {settle_s:.1} s",
        sessions.len(),
        first_error.map(|e| format!(", e.g. {e}")).unwrap_or_default(),
        100.0 * away as f64 / (short + away).max(1) as f64,
    );
    println!(
        "stream open (request sent -> ready): p50 {} ms, p99 {} ms, max {} ms; ListenOverflows during the churn {overflows}",
        p(&open_lat, 50.0),
        p(&open_lat, 99.0),
        p(&open_lat, 100.0)
    );
    println!(
        "presence events received by churning streams: {}; other events {}",
        sum(&|o| o.presence_events),
        sum(&|o| o.other_events)
    );

    let window_row = |name: &str, a: &Mark, b: &Mark| -> Vec<String> {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let d = |k: &str| delta(&a.metrics, &b.metrics, k);
        let opened = sessions
            .iter()
            .filter(|x| in_window(x.start, a.at, b.at))
            .count();
        let predicted: usize = intervals
            .iter()
            .flatten()
            .map(|x| {
                in_window(x.ready, a.at, b.at) as usize + in_window(x.off, a.at, b.at) as usize
            })
            .sum();
        let notices = churn_notices
            .iter()
            .filter(|(_, _, at)| in_window(*at, a.at, b.at))
            .count();
        let set = calls_delta(&a.stmts, &b.stmts, |q| q.contains("hark_presence_set"));
        let hark_calls = calls_delta(&a.stmts, &b.stmts, |q| !bench_statement(q)).n;
        let cpu = b.cpu.since(&a.cpu);
        let per_s = |v: f64| format!("{:.0}", v / secs);
        let per_open = |pct: f64| format!("{:.0}", pct / 100.0 * secs * 1e6 / opened.max(1) as f64);
        let dash = |v: String| if presence { v } else { "-".into() };
        vec![
            name.to_string(),
            format!("{secs:.1}"),
            per_s(opened as f64),
            per_s(predicted as f64),
            dash(per_s(notices as f64)),
            dash(per_s(d("hark_presence_writes_total"))),
            dash(format!("{:.1}", set.n as f64 / secs)),
            dash(format!("{:.1}", set.exec_mean())),
            per_s(d("hark_notifications_total")),
            per_s(hark_calls as f64),
            format!("{:.0}", cpu.hark),
            per_open(cpu.hark),
            format!("{:.0}", cpu.pg),
            per_open(cpu.pg),
            format!("{:.0}", cpu.bench),
            format!("{:.0}", cpu.other),
            server_quantile(&a.metrics, &b.metrics, 0.99),
        ]
    };
    println!();
    println!(
        "Per second over each window: streams opened; presence transitions predicted from the clients' log, and NOTIFYed (LISTEN, \"k\":\"o\", churning users); users hark wrote (hark_presence_writes_total) and its hark_presence_set statements (pg_stat_statements; mean execution ms); NOTIFYs hark received (all kinds); hark's statements (all). CPU in % of one core, and µs per stream opened."
    );
    table(
        &[
            "window",
            "s",
            "opened/s",
            "transitions/s",
            "presence NOTIFYs/s",
            "presence writes/s",
            "presence stmts/s",
            "ms/presence stmt",
            "NOTIFYs/s (hark)",
            "hark stmts/s",
            "hark CPU %",
            "hark µs/open",
            "PG CPU %",
            "PG µs/open",
            "bench CPU %",
            "other CPU %",
            "server p99 ms",
        ],
        &[
            window_row("whole", &m0, &m1),
            window_row("steady", &warm_mark, &m1),
        ],
    );
    let open_mean = open_samples.iter().sum::<f64>() / open_samples.len().max(1) as f64;
    let open_max = open_samples.iter().copied().fold(0.0, f64::max);
    println!(
        "open streams after the ramp: mean {open_mean:.0}, max {open_max:.0}; hark RSS: idle {} MiB, during the churn max {} MiB, at its end {} MiB, idle after {} MiB",
        mib(idle_rss),
        mib(rss_samples.iter().copied().max().unwrap_or(0)),
        mib(rss_end),
        mib(idle_after),
    );
    let steady = m1.at.duration_since(warm_mark.at).as_secs_f64();
    let mut top: Vec<(String, Calls)> = m1
        .stmts
        .keys()
        .map(|q| {
            (
                q.clone(),
                calls_delta(&warm_mark.stmts, &m1.stmts, |x| x == q),
            )
        })
        .filter(|(_, c)| c.n > 0)
        .collect();
    top.sort_by_key(|(_, c)| -c.n);
    top.truncate(8);
    println!("statements in the steady window: calls/s, mean execution ms, mean planning ms:");
    for (q, c) in top {
        let q: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
        let q: String = q.chars().take(100).collect();
        println!(
            "  {:>7.1} {:>7.3} {:>7.3}  {q}",
            c.n as f64 / steady,
            c.exec_mean(),
            c.plan_mean()
        );
    }
    println!();
    let transitions = 2 * n_intervals;
    println!(
        "Totals from the start of the churn until every churning user was offline again{}:",
        if settled {
            ""
        } else {
            " (NOT SETTLED: some still online)"
        }
    );
    println!(
        "  streams opened {}, users {}; online intervals predicted {n_intervals} ({transitions} transitions; {ambiguous} gaps too close to the grace to call)",
        sessions.len(),
        s.users,
    );
    if presence {
        let set = calls_delta(&m0.stmts, &m_settled, |q| q.contains("hark_presence_set"));
        println!(
            "  presence NOTIFYs heard {total_notices} ({total_on} online, {} offline); presence writes {writes:.0} in {} hark_presence_set statements ({:.1} users and {:.1} ms each)",
            total_notices - total_on,
            set.n,
            writes / set.n.max(1) as f64,
            set.exec_mean(),
        );
        println!(
            "  writes per predicted transition {:.3}, per stream opened {:.3}; NOTIFYs per write {:.3}",
            writes / transitions.max(1) as f64,
            writes / sessions.len().max(1) as f64,
            total_notices as f64 / writes.max(1.0),
        );
        println!(
            "  predicted intervals hark saw as one: {} (a reconnect came before hark wrote the offline)",
            n_intervals as i64 - total_on as i64
        );
        let consistent = settled
            && writes as u64 == total_notices
            && 2 * total_on == total_notices
            && total_notices <= transitions;
        println!(
            "  writes = NOTIFYs, as many online as offline, none beyond the predicted transitions: {}",
            if consistent { "yes" } else { "NO" }
        );
        if !consistent {
            eprintln!("warning: the presence totals are not consistent (see above)");
        }
    }
    let others: Vec<String> = heard
        .other
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    println!("  other NOTIFYs heard: {}", others.join(", "));

    println!();
    println!(
        "Delivery during the churn (observer on its own thread): probe messages, COMMIT returned -> event received; presence events at the observer's stream on {} rooms ({watched} churning users)",
        observer_rooms.len(),
    );
    table(
        &[
            "what",
            "n",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "early",
            "missing / unmatched",
        ],
        &[
            vec![
                format!("message, every {} ms", s.probe.as_millis()),
                msg_lat.len().to_string(),
                p(&msg_lat, 50.0),
                p(&msg_lat, 90.0),
                p(&msg_lat, 99.0),
                p(&msg_lat, 100.0),
                msg_early.to_string(),
                (lost as u64 + probe_errors.load(Relaxed)).to_string(),
            ],
            vec![
                "presence online (from the ready)".into(),
                lat_on.len().to_string(),
                p(&lat_on, 50.0),
                p(&lat_on, 90.0),
                p(&lat_on, 99.0),
                p(&lat_on, 100.0),
                early.to_string(),
                unmatched.to_string(),
            ],
            vec![
                "presence offline (from close + grace)".into(),
                lat_off.len().to_string(),
                p(&lat_off, 50.0),
                p(&lat_off, 90.0),
                p(&lat_off, 99.0),
                p(&lat_off, 100.0),
                "".into(),
                "".into(),
            ],
        ],
    );
    if let Some(e) = obs.error {
        return Err(err(format!("observer: {e}")));
    }
    Ok(())
}

/// A stretch a user is online by the clients' log.
struct Interval {
    /// Its first stream's request was sent.
    start: Instant,
    /// Its first stream's `ready` arrived.
    ready: Instant,
    /// The last stream's close plus the grace.
    off: Instant,
}

/// Per user, the union of [ready, close + grace] of its streams; and how
/// many gaps between two stretches are shorter than the tick on which hark
/// ends graces (≤ 1 s) plus a write, where either outcome is right.
fn online_intervals(
    sessions: &[&Session],
    users: usize,
    grace: Duration,
) -> (Vec<Vec<Interval>>, u64) {
    let mut by_user: Vec<Vec<&Session>> = (0..users).map(|_| Vec::new()).collect();
    for x in sessions {
        by_user[x.user].push(x);
    }
    let mut ambiguous = 0;
    let intervals = by_user
        .iter_mut()
        .map(|v| {
            v.sort_by_key(|x| x.ready);
            let mut iv: Vec<Interval> = Vec::new();
            for x in v.iter() {
                let off = x.close + grace;
                match iv.last_mut() {
                    Some(last) if x.ready <= last.off => last.off = last.off.max(off),
                    last => {
                        if last.is_some_and(|l| x.ready < l.off + Duration::from_millis(1500)) {
                            ambiguous += 1;
                        }
                        iv.push(Interval {
                            start: x.start,
                            ready: x.ready,
                            off,
                        });
                    }
                }
            }
            iv
        })
        .collect();
    (intervals, ambiguous)
}
