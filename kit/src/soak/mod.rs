//! The soak with faults: two hark processes on one database, writers that
//! insert, edit and delete, long pollers and event streams that follow
//! their cursors, and a fault at every interval, in turn — the LISTEN
//! backends killed, PostgreSQL restarted, one hark killed with SIGKILL
//! and started again, a reader that stops reading, a burst of connections
//! over `HARK_MAX_CONNECTIONS`. [`run`] sets everything up itself (a
//! private PostgreSQL that it can restart, the two harks, users, rooms)
//! and returns a [`Report`]. `benches/soak.rs` runs it for 10 minutes (or
//! an hour); `tests/it/soak.rs` runs a short form of it in CI.
//!
//! # What is counted
//!
//! Every message version carries its own key: a writer's content is
//! `v<key> …`, with a key no other version has, so a version is (id,
//! key), and the key of an edit is taken once its row is locked (of two
//! edits of a message, the later commit has the larger key). No message
//! changes rooms. Each client holds a view of its room (id → key, and the
//! deletes it was told of), starting from the table as it was when the
//! starting cursor was taken, and applies what it is given as a client
//! does (a message is an upsert by id; in a poll answer the versions
//! before the deletes).
//!
//! - **written**: inserts, edits and deletes whose COMMIT returned success
//!   (a COMMIT whose connection broke is "in doubt": the table says
//!   whether it happened, and the table is what the views are held to).
//! - **deliveries**: message versions and deletes handed to clients, as
//!   poll answers and `message`/`delete` events (duplicates included).
//! - **lost**: at the end, after the writers stop, each client's view is
//!   compared with the table, message by message: a message of the table
//!   missing from the view, held at another version (an edit not
//!   applied), or held although the table no longer has it (a delete not
//!   applied) is one lost. Clients get `converge` to get there.
//! - **duplicated**: a version (same id, same key) or a delete given to a
//!   client that already had it. An edited message arriving again with its
//!   new content is not a duplicate: it is a new version.
//! - **out of order**: a version older than the one the client holds, or
//!   a message after its delete (must be 0 too).
//! - **5xx**: every answer with a status of 500 or more that the soak's
//!   clients got (polls and stream requests), sorted by when and why:
//!   503 `database_unavailable` inside a PostgreSQL-restart window (hark
//!   maps a database it cannot reach to 503 with `Retry-After`,
//!   docs/DESIGN.md "a fixed pool whose waits end in a 503"), 503
//!   `unavailable` inside a connection-burst window (API.md: over
//!   `HARK_MAX_CONNECTIONS`, 503 with `Retry-After`), and every other one,
//!   "unexpected". The burst's own connections are not soak clients:
//!   their refusals are the fault's detail. A window is from a fault's
//!   start to the end of its recovery plus `settle`.
//! - **delivery latency**: from the instant a writer sends COMMIT to the
//!   instant the client has parsed the version, for each version new to
//!   a client; "outside the fault windows" keeps a delivery only when
//!   neither its COMMIT nor its arrival falls in a window.
//! - **RSS**: VmRSS of each hark process, sampled every 5 s: at the start
//!   of the writes (or the process's first sample), and at its end (the
//!   last sample before it was killed, or at the end of the soak).

mod client;
mod fault;
mod report;
mod wire;
mod writer;

pub use fault::{FaultKind, FaultRecord};
pub use report::{Latency, Report};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::process::{Hark, Launch, Log};
use crate::{err, Result};
use client::{ClientReport, Goal, Progress, RoomState, Spec, View};
use fault::{ready, Rig, SlowRig};
use writer::{WriterReport, WriterSpec};

/// How a soak runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The hark binary.
    pub bin: PathBuf,
    /// Of writes and faults (the end's convergence comes after).
    pub duration: Duration,
    /// A fault every interval, the first half an interval in.
    pub fault_interval: Duration,
    pub pollers: usize,
    pub streams: usize,
    pub rooms: usize,
    pub writers: usize,
    /// Changes (inserts, edits, deletes) per second, all writers together.
    pub rate: f64,
    /// Messages each room has before the start.
    pub seed_messages: usize,
    /// `HARK_MAX_CONNECTIONS` of each hark.
    pub max_connections: u32,
    /// Connections the burst opens at once to one hark (as many as
    /// `max_connections`: over the limit by every connection its clients
    /// hold).
    pub burst: usize,
    /// How long the burst holds the connections it got.
    pub burst_hold: Duration,
    /// The slow-reader fault's messages: their length, and the most
    /// batches of 50 it writes while waiting for hark to cut the reader.
    pub slow_message_chars: usize,
    pub slow_max_batches: usize,
    /// Added to the end of each fault's recovery to make its window.
    pub settle: Duration,
    /// How long the clients have, after the writers stop, to reach the
    /// table.
    pub converge: Duration,
    /// The pollers' `timeout`.
    pub poll_timeout_s: u64,
    /// The clients' first connections are spread over this.
    pub client_spread: Duration,
    /// Where hark's logs go.
    pub log_dir: PathBuf,
    /// A progress line this often.
    pub progress_every: Duration,
    /// hark's `HARK_LOG`.
    pub log_level: String,
    /// More hark settings.
    pub env: Vec<(String, String)>,
}

impl Config {
    /// The benchmark: 1,000 pollers and 1,000 streams over 100 rooms, 8
    /// writers at 100 changes/s, a fault every minute.
    pub fn full(bin: impl Into<PathBuf>, minutes: u64) -> Config {
        Config {
            bin: bin.into(),
            duration: Duration::from_secs(minutes * 60),
            fault_interval: Duration::from_secs(60),
            pollers: 1000,
            streams: 1000,
            rooms: 100,
            writers: 8,
            rate: 100.0,
            seed_messages: 5,
            max_connections: 1500,
            burst: 1500,
            burst_hold: Duration::from_secs(3),
            slow_message_chars: 9000,
            slow_max_batches: 80,
            settle: Duration::from_secs(5),
            converge: Duration::from_secs(120),
            poll_timeout_s: 20,
            client_spread: Duration::from_secs(5),
            log_dir: std::env::temp_dir(),
            progress_every: Duration::from_secs(30),
            log_level: "warn".into(),
            env: Vec::new(),
        }
    }

    /// The CI form: about a minute, every fault once, 100 pollers and 100
    /// streams over 10 rooms, 8 writers at 20 changes/s.
    pub fn short(bin: impl Into<PathBuf>) -> Config {
        Config {
            duration: Duration::from_secs(50),
            fault_interval: Duration::from_secs(10),
            pollers: 100,
            streams: 100,
            rooms: 10,
            rate: 20.0,
            max_connections: 150,
            burst: 150,
            burst_hold: Duration::from_secs(2),
            slow_max_batches: 60,
            settle: Duration::from_secs(3),
            converge: Duration::from_secs(45),
            poll_timeout_s: 10,
            client_spread: Duration::from_secs(1),
            progress_every: Duration::from_secs(10),
            ..Config::full(bin, 1)
        }
    }
}

/// Counters the progress line reads while the soak runs.
#[derive(Default)]
pub(crate) struct LiveCounts {
    pub(crate) writes: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) fivexx: AtomicU64,
    pub(crate) transport: AtomicU64,
}

/// What every task of the soak shares.
pub(crate) struct Ctx {
    pub(crate) t0: Instant,
    next_key: AtomicU64,
    /// Version key → when its COMMIT was sent (ns since t0, + 1; 0: not
    /// known).
    commits: RwLock<Vec<u64>>,
    pub(crate) live: LiveCounts,
    pub(crate) poll_timeout_s: u64,
}

impl Ctx {
    fn new(poll_timeout_s: u64) -> Ctx {
        Ctx {
            t0: Instant::now(),
            next_key: AtomicU64::new(1),
            commits: RwLock::new(Vec::new()),
            live: LiveCounts::default(),
            poll_timeout_s,
        }
    }

    /// Reserves `n` version keys; the first.
    pub(crate) fn keys(&self, n: u64) -> u64 {
        self.next_key.fetch_add(n, Relaxed)
    }

    /// Keys `first..first + n` are being committed now.
    pub(crate) fn committing(&self, first: u64, n: u64) {
        let at = self.t0.elapsed().as_nanos() as u64 + 1;
        let mut c = self.commits.write().unwrap();
        let end = (first + n) as usize;
        if c.len() < end {
            let len = end.max(c.len() * 2);
            c.resize(len, 0);
        }
        for k in first..first + n {
            c[k as usize] = at;
        }
    }

    pub(crate) fn commit_at(&self, key: u64) -> Option<Duration> {
        let c = self.commits.read().unwrap();
        match c.get(key as usize) {
            Some(&at) if at > 0 => Some(Duration::from_nanos(at - 1)),
            _ => None,
        }
    }

    /// Milliseconds since t0.
    pub(crate) fn ms(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.t0).as_millis() as u32
    }
}

/// A message's content: its version key first.
pub(crate) fn content(key: u64, writer: usize) -> String {
    format!("v{key} from writer {writer}: a soak message, about as long as a line of chat")
}

/// The version key of a content (`v<key> …`).
pub(crate) fn key_of(content: &str) -> Option<u64> {
    content.strip_prefix('v')?.split(' ').next()?.parse().ok()
}

/// A small deterministic generator (splitmix64): the soak needs pauses
/// and picks, not statistics.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// In `[0, 1)`.
    pub(crate) fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One hark process's life: which slot (A or B), when, and its memory.
#[derive(Clone, Debug)]
pub struct HarkLife {
    pub slot: usize,
    pub pid: u32,
    pub from_ms: u32,
    pub to_ms: Option<u32>,
    /// How it ended: "SIGKILL", "SIGTERM at the end".
    pub ended: String,
    /// (ms since t0, bytes) of its first and last RSS samples.
    pub rss_first: Option<(u32, u64)>,
    pub rss_last: Option<(u32, u64)>,
    pub rss_max: u64,
    /// CPU time (user + system) at its last sample.
    pub cpu: Duration,
}

pub(crate) fn begin_life(lives: &Mutex<Vec<HarkLife>>, ctx: &Ctx, slot: usize, pid: u32) {
    lives.lock().unwrap().push(HarkLife {
        slot,
        pid,
        from_ms: ctx.ms(Instant::now()),
        to_ms: None,
        ended: String::new(),
        rss_first: None,
        rss_last: None,
        rss_max: 0,
        cpu: Duration::ZERO,
    });
}

pub(crate) fn end_life(lives: &Mutex<Vec<HarkLife>>, ctx: &Ctx, pid: u32, how: &str) {
    for l in lives.lock().unwrap().iter_mut() {
        if l.pid == pid && l.to_ms.is_none() {
            l.to_ms = Some(ctx.ms(Instant::now()));
            l.ended = how.into();
        }
    }
}

/// One RSS (and CPU time) sample of every running hark.
pub(crate) fn sample_rss(lives: &Mutex<Vec<HarkLife>>, ctx: &Ctx) {
    let at = ctx.ms(Instant::now());
    for l in lives.lock().unwrap().iter_mut() {
        if l.to_ms.is_some() {
            continue;
        }
        if let Ok(kib) = crate::procfs::status_kib(l.pid, "VmRSS:") {
            let bytes = kib * 1024;
            l.rss_first.get_or_insert((at, bytes));
            l.rss_last = Some((at, bytes));
            l.rss_max = l.rss_max.max(bytes);
        }
        if let Ok(cpu) = crate::procfs::cpu_time_of(l.pid) {
            l.cpu = cpu;
        }
    }
}

/// How hark `slot` (0: A, 1: B) is started, its `incarnation`-th time.
pub(crate) fn hark_launch(cfg: &Config, db: &str, slot: usize, incarnation: usize) -> Launch {
    let name = (b'a' + slot as u8) as char;
    let log = cfg.log_dir.join(format!(
        "soak-{}-hark-{name}{incarnation}.log",
        std::process::id()
    ));
    let max = cfg.max_connections.to_string();
    let mut launch = Launch::new(&cfg.bin, db).env(&[
        ("HARK_LOG", cfg.log_level.as_str()),
        ("HARK_MAX_CONNECTIONS", max.as_str()),
    ]);
    launch.env.extend(cfg.env.iter().cloned());
    launch.log = Log::File(log);
    launch.die_with_parent = true;
    launch.listen_timeout = Duration::from_secs(60);
    launch
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; returns
/// the soft limit now.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft)
}

/// /proc/loadavg's first three fields: other work on the machine shows.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Seconds since the writes began, for the progress lines.
fn secs(ctx: &Ctx, writes_ms: u32) -> f64 {
    (ctx.ms(Instant::now()) as f64 - writes_ms as f64) / 1000.0
}

/// The table, per room.
async fn table(db: &tokio_postgres::Client, rooms: &[i64]) -> Result<HashMap<i64, RoomState>> {
    let mut out: HashMap<i64, RoomState> = rooms.iter().map(|r| (*r, RoomState::new())).collect();
    for row in db
        .query(
            "SELECT room_id, id, content FROM chat_chatmessage WHERE room_id = ANY($1)",
            &[&rooms],
        )
        .await?
    {
        let content: String = row.get(2);
        let key = key_of(&content)
            .ok_or_else(|| err(format!("a message without a version key: {content:?}")))?;
        out.entry(row.get(0)).or_default().insert(row.get(1), key);
    }
    Ok(out)
}

/// Users, rooms, memberships and the first messages, with plain SQL.
struct Setup {
    users: Vec<i64>,
    writer: i64,
    slow_users: [i64; 2],
    rooms: Vec<i64>,
    slow_room: i64,
    seeded: Vec<i64>,
}

async fn set_up(ctx: &Ctx, cfg: &Config, db: &tokio_postgres::Client) -> Result<Setup> {
    let n_users = cfg.pollers.max(cfg.streams).max(1) as i64;
    let ids = |rows: Vec<tokio_postgres::Row>| {
        let mut v: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        v.sort_unstable();
        v
    };
    let users = ids(db
        .query(
            "INSERT INTO users_user (username, first_name, last_name) \
             SELECT 'soak' || g, 'Soak', 'User ' || g FROM generate_series(1, $1::int8) g \
             RETURNING id",
            &[&n_users],
        )
        .await?);
    let special = ids(db
        .query(
            "INSERT INTO users_user (username, first_name, last_name) \
             VALUES ('soak-writer', 'Soak', 'Writer'), ('soak-slow-a', 'Slow', 'A'), \
             ('soak-slow-b', 'Slow', 'B') RETURNING id",
            &[],
        )
        .await?);
    let (writer, slow_users) = (special[0], [special[1], special[2]]);
    let n_rooms = cfg.rooms.max(1) as i64;
    let rooms = ids(db
        .query(
            "INSERT INTO chat_chatroom (type, name) \
             SELECT 'group', 'soak room ' || g FROM generate_series(1, $1::int8) g RETURNING id",
            &[&n_rooms],
        )
        .await?);
    let slow_room: i64 = db
        .query_one(
            "INSERT INTO chat_chatroom (type, name) VALUES ('group', 'soak slow room') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let (mut pr, mut pu) = (Vec::new(), Vec::new());
    for (i, u) in users.iter().enumerate() {
        pr.push(rooms[i % rooms.len()]);
        pu.push(*u);
    }
    for r in rooms.iter().chain([&slow_room]) {
        pr.push(*r);
        pu.push(writer);
    }
    for u in slow_users {
        pr.push(slow_room);
        pu.push(u);
    }
    db.execute(
        "INSERT INTO chat_chatroom_participants (chatroom_id, user_id) \
         SELECT unnest($1::int8[]), unnest($2::int8[])",
        &[&pr, &pu],
    )
    .await?;
    let mut seeded = Vec::new();
    for r in &rooms {
        let first = ctx.keys(cfg.seed_messages as u64);
        let contents: Vec<String> = (0..cfg.seed_messages as u64)
            .map(|i| content(first + i, 0))
            .collect();
        let rows = db
            .query(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                 SELECT $1, $2, unnest($3::text[]), now() RETURNING id",
                &[r, &writer, &contents],
            )
            .await?;
        seeded.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    Ok(Setup {
        users,
        writer,
        slow_users,
        rooms,
        slow_room,
        seeded,
    })
}

/// A cursor from a poll without `since`: where every client starts.
async fn first_cursor(addr: SocketAddr, room: i64, token: &str) -> Result<String> {
    let mut w = wire::Wire::connect(addr, None).await?;
    let req = format!(
        "GET /api/chat/messages/poll/?room_id={room}&limit=1 HTTP/1.1\r\nhost: soak\r\n\
         authorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    let (head, body) = w.exchange(req.as_bytes()).await?;
    if head.status != 200 {
        return Err(err(format!(
            "the first poll answered {}: {}",
            head.status,
            String::from_utf8_lossy(&body)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    v["cursor"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| err("the first poll has no cursor"))
}

/// Long polls' page sizes, in turn: paging inside batches too.
const LIMITS: [u32; 4] = [100, 1000, 7, 25];

/// Runs the soak (in a multi-threaded tokio runtime); prints progress
/// lines as it goes. An error only when it could not be set up or torn
/// down; what went wrong during the run is in the [`Report`].
pub async fn run(cfg: Config) -> Result<Report> {
    let cfg = Arc::new(cfg);
    let nofile = raise_nofile();
    let ctx = Arc::new(Ctx::new(cfg.poll_timeout_s));
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.log_dir)?;
    let cluster = crate::pg::Restartable::start(
        "hark-soak-pg",
        &[("max_connections", "300"), ("shared_buffers", "128MB")],
    )
    .await?;
    let db = cluster.database("hark_soak").await?;
    let lives = Arc::new(Mutex::new(Vec::new()));
    let mut harks = Vec::new();
    for k in 0..2 {
        // One after the other: the first applies the schema.
        let h = Hark::launch(hark_launch(&cfg, &db, k, 0)).await?;
        if !ready(h.addr, Duration::from_secs(60)).await {
            return Err(err(format!("hark {k} never became ready")));
        }
        begin_life(&lives, &ctx, k, h.pid);
        harks.push(h);
    }
    let addrs: Vec<SocketAddr> = harks.iter().map(|h| h.addr).collect();
    println!(
        "soak: PostgreSQL and 2 harks (A on {}, B on {}) up in {:.1} s; logs in {}; \
         this process's RLIMIT_NOFILE {nofile}",
        addrs[0],
        addrs[1],
        started.elapsed().as_secs_f64(),
        cfg.log_dir.display()
    );

    let fx = crate::pg::try_connect(&db).await?;
    let setup = set_up(&ctx, &cfg, &fx).await?;
    let ttl = chrono::Duration::seconds((cfg.duration.as_secs() + 7200) as i64);
    let token = |u: i64| crate::token_for(u, ttl);
    let start = first_cursor(addrs[0], setup.rooms[0], &token(setup.users[0])).await?;
    let mut all_rooms = setup.rooms.clone();
    all_rooms.push(setup.slow_room);
    let initial = table(&fx, &all_rooms).await?;

    let (goal_tx, goal_rx) = watch::channel::<Option<Arc<Goal>>>(None);
    let (slow_goal_tx, slow_goal_rx) = watch::channel::<Option<Arc<Goal>>>(None);
    let mut clients = Vec::new();
    let spec = |addr: SocketAddr, room: i64, user: i64, seed: u64| Spec {
        addr,
        room,
        token: token(user),
        start: start.clone(),
        view: View::of(&initial[&room]),
        goal: goal_rx.clone(),
        progress: None,
        pause: None,
        recv_buffer: None,
        seed,
        spread: cfg.client_spread,
    };
    for i in 0..cfg.pollers {
        let room = setup.rooms[i % setup.rooms.len()];
        let s = spec(addrs[i % 2], room, setup.users[i], i as u64);
        let limit = LIMITS[(i / 2) % LIMITS.len()];
        clients.push(tokio::spawn(client::poller(ctx.clone(), s, limit)));
    }
    for i in 0..cfg.streams {
        let room = setup.rooms[i % setup.rooms.len()];
        let s = spec(
            addrs[(i + 1) % 2],
            room,
            setup.users[i],
            1_000_000 + i as u64,
        );
        clients.push(tokio::spawn(client::streamer(ctx.clone(), s)));
    }
    let mut pause_tx = Vec::new();
    let mut progress = Vec::new();
    for (k, (addr, user)) in addrs.iter().zip(setup.slow_users).enumerate() {
        let (tx, rx) = watch::channel(false);
        let p = Arc::new(Progress::default());
        let mut s = spec(*addr, setup.slow_room, user, 2_000_000 + k as u64);
        s.goal = slow_goal_rx.clone();
        s.progress = Some(p.clone());
        s.pause = Some(rx);
        s.recv_buffer = Some(4096);
        clients.push(tokio::spawn(client::streamer(ctx.clone(), s)));
        pause_tx.push(tx);
        progress.push(p);
    }
    drop(goal_rx);
    drop(slow_goal_rx);

    // Warm-up: until (nearly) every client waits in a poll or holds a
    // stream.
    let expected = (cfg.pollers + cfg.streams + 2) as f64;
    let warm = Instant::now();
    let warmed = crate::within(Duration::from_secs(120), || {
        let addrs = addrs.clone();
        async move {
            let mut n = 0.0;
            for a in &addrs {
                let mut m = crate::metrics::MetricsClient::new(*a);
                let Ok(s) = m.scrape().await else {
                    return false;
                };
                n += s.get("hark_waiting_polls").copied().unwrap_or(0.0)
                    + s.get("hark_open_streams").copied().unwrap_or(0.0);
            }
            n >= expected * 0.95
        }
    })
    .await;
    if !warmed {
        return Err(err("the clients did not connect within 120 s"));
    }
    println!(
        "soak: {} users, {} rooms (+1 for the slow reader), {} pollers and {} streams \
         (+2 slow-room streams) connected in {:.1} s",
        setup.users.len(),
        setup.rooms.len(),
        cfg.pollers,
        cfg.streams,
        warm.elapsed().as_secs_f64()
    );

    // The writes and the faults.
    let load_at_start = loadavg();
    let writes_at = Instant::now();
    let writes_ms = ctx.ms(writes_at);
    sample_rss(&lives, &ctx);
    let (stop_tx, stop_rx) = watch::channel(false);
    let live: writer::Live = Arc::new(Mutex::new(setup.seeded.clone()));
    let rooms = Arc::new(setup.rooms.clone());
    let writers: Vec<_> = (0..cfg.writers)
        .map(|n| {
            let spec = WriterSpec {
                db: db.clone(),
                rooms: rooms.clone(),
                sender: setup.writer,
                live: live.clone(),
                rate: cfg.rate / cfg.writers.max(1) as f64,
                n: n + 1,
            };
            tokio::spawn(writer::writer(ctx.clone(), spec, stop_rx.clone()))
        })
        .collect();
    let sampler = {
        let (lives, ctx, mut stop) = (lives.clone(), ctx.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => sample_rss(&lives, &ctx),
                    _ = stop.changed() => return,
                }
            }
        })
    };
    let progress_task = {
        let (ctx, mut stop, every) = (ctx.clone(), stop_rx.clone(), cfg.progress_every);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                println!(
                    "[{:>6.1} s] written {}, deliveries {}, 5xx {}, transport errors {}; \
                     load average {}",
                    secs(&ctx, writes_ms),
                    ctx.live.writes.load(Relaxed),
                    ctx.live.deliveries.load(Relaxed),
                    ctx.live.fivexx.load(Relaxed),
                    ctx.live.transport.load(Relaxed),
                    loadavg(),
                );
            }
        })
    };
    let rig = Rig {
        cfg: cfg.clone(),
        ctx: ctx.clone(),
        cluster,
        db: db.clone(),
        harks,
        addrs: addrs.clone(),
        lives: lives.clone(),
        slow: SlowRig {
            room: setup.slow_room,
            sender: setup.writer,
            pause: [pause_tx.remove(0), pause_tx.remove(0)],
            progress: [progress[0].clone(), progress[1].clone()],
            goal: slow_goal_tx,
            gen: 0,
        },
        counts: [0; 5],
        slow_fillers: 0,
        slow_deletes: 0,
    };
    let end = writes_at + cfg.duration;
    let driver = tokio::spawn(drive(rig, writes_at, writes_ms, end, cfg.fault_interval));
    tokio::time::sleep_until(end.into()).await;
    let (mut rig, faults) = driver
        .await
        .map_err(|e| err(format!("fault driver: {e}")))?;
    let writes_end = Instant::now();
    stop_tx.send_replace(true);
    let mut written = WriterReport::default();
    for w in writers {
        let r = w.await.map_err(|e| err(format!("writer: {e}")))?;
        written.inserts += r.inserts;
        written.edits += r.edits;
        written.deletes += r.deletes;
        written.noops += r.noops;
        written.in_doubt += r.in_doubt;
        written.failed += r.failed;
        written.connect_errors += r.connect_errors;
    }
    let _ = progress_task.await;
    let _ = sampler.await;
    println!(
        "[{:>6.1} s] writers stopped; the clients have {} s to reach the table",
        secs(&ctx, writes_ms),
        cfg.converge.as_secs()
    );

    // The end: every client's view against the table.
    let fx = crate::pg::try_connect(&db).await?;
    let goal = table(&fx, &all_rooms).await?;
    let rows: usize = goal.values().map(HashMap::len).sum();
    let converge_from = Instant::now();
    let deadline = tokio::time::Instant::now() + cfg.converge;
    let goal = Arc::new(Goal {
        gen: u64::MAX,
        rooms: goal,
        last: true,
        deadline: Some(deadline),
    });
    goal_tx.send_replace(Some(goal.clone()));
    rig.slow.goal.send_replace(Some(goal));
    let mut reports: Vec<ClientReport> = Vec::new();
    for c in clients {
        reports.push(
            c.await
                .map_err(|e| err(format!("a client task failed: {e}")))?,
        );
    }
    let converged_in = converge_from.elapsed();
    sample_rss(&lives, &ctx);
    let own_cpu = crate::procfs::cpu_time_of(std::process::id()).unwrap_or_default();
    let end_ms = ctx.ms(Instant::now());
    for h in rig.harks.iter_mut() {
        let pid = h.pid;
        h.stop_or_kill(Duration::from_secs(10)).await;
        end_life(&lives, &ctx, pid, "SIGTERM at the end");
    }
    drop(goal_tx);
    rig.cluster.remove().await;
    let lives = lives.lock().unwrap().clone();
    Ok(report::build(report::Inputs {
        cfg: &cfg,
        writes_ms,
        writes_for: writes_end - writes_at,
        end_ms,
        written,
        slow_fillers: rig.slow_fillers,
        slow_deletes: rig.slow_deletes,
        rows,
        clients: reports,
        faults,
        lives,
        converged_in,
        users: setup.users.len(),
        own_cpu,
        load_at_start,
        load_at_end: loadavg(),
    }))
}

/// The faults, in turn, one per interval (the first half an interval
/// in); one that overruns delays the next. None starts after `end`.
async fn drive(
    mut rig: Rig,
    from: Instant,
    from_ms: u32,
    end: Instant,
    interval: Duration,
) -> (Rig, Vec<FaultRecord>) {
    let mut records = Vec::new();
    let mut not_before = from;
    for i in 0.. {
        let at = (from + interval.mul_f64(i as f64 + 0.5)).max(not_before);
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let kind = FaultKind::ALL[i % FaultKind::ALL.len()];
        println!(
            "[{:>6.1} s] fault {}: {}",
            secs(&rig.ctx, from_ms),
            i + 1,
            kind.name()
        );
        if kind == FaultKind::HarkKilled {
            // The last memory sample of the process about to die.
            sample_rss(&rig.lives, &rig.ctx);
        }
        let r = rig.fault(kind).await;
        println!(
            "[{:>6.1} s] fault {} {}: {}",
            secs(&rig.ctx, from_ms),
            i + 1,
            if r.survived { "over" } else { "FAILED" },
            r.detail
        );
        records.push(r);
        not_before = Instant::now() + Duration::from_secs(2);
    }
    (rig, records)
}
