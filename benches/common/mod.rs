//! Shared support for hark's benchmarks (harness = false): the load
//! generator. Start-up, fixtures, tokens, the raw HTTP client, /metrics
//! and the event-stream decoder come from the kit (`kit/`, the crate
//! `hark_kit`) that the integration tests use too.
//!
//! Every benchmark starts a private PostgreSQL through hark's embedded
//! module (ephemeral: its watchdog stops it and deletes its directory when
//! this process exits, however it exits), runs the *release* `hark` binary
//! against it on 127.0.0.1 and talks to it over real TCP with a tiny
//! HTTP/1.1 client (one request at a time per connection, keep-alive), so
//! that 10,000 connections cost the load generator little memory and CPU.
//!
//! Cleanup: [`Hark`] kills its process on drop and the child gets
//! `PR_SET_PDEATHSIG(SIGKILL)`, so neither an error, a panic nor a Ctrl-C
//! of the benchmark leaves hark running; [`Pg`] stops PostgreSQL on drop.

// Each benchmark is a crate of its own and uses a part of this.
#![allow(dead_code, unused_imports)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use hark_kit::http::parse_head;
pub use hark_kit::metrics::delta;
pub use hark_kit::pg::Cluster;
pub use hark_kit::procfs::{cpu_time_of, status_kib as proc_status_kib};
pub use hark_kit::sse::{SseDecoder, SseEvent, SseItem, SseKind};
pub use hark_kit::{err, BoxError, Conn, Fixture, Hark, Launch, Log, MetricsClient, Resp, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DB_NAME: &str = "hark_bench";

/// The content of the benchmarks' bulk messages, around their number:
/// about as long as a chat line.
pub const BENCH_TEXT: (&str, &str) = ("bench message number ", ", about as long as a chat line");

/// An environment variable parsed as a number, or the default.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit; returns it.
pub fn raise_nofile() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft)
}

/// The load generator's runtime: `BENCH_WORKERS` worker threads (default
/// one per core, like hark's own; every published result uses the
/// default).
pub fn runtime() -> tokio::runtime::Runtime {
    let workers = env_num("BENCH_WORKERS", 0usize);
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    b.enable_all().build().expect("tokio runtime")
}

/// Runs a benchmark's body, printing the error and exiting non-zero on failure.
pub fn main_with(
    name: &str,
    body: impl std::future::Future<Output = Result<()>>,
) -> std::process::ExitCode {
    let nofile = raise_nofile();
    println!("== hark benchmark: {name} ==");
    print_machine();
    println!("load generator: RLIMIT_NOFILE {nofile}");
    println!("load average at start: {}", loadavg());
    let rt = runtime();
    let result = rt.block_on(body);
    println!("load average at end: {}", loadavg());
    // Connection tasks may still be parked on sockets of a hark that is gone.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark {name} failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The hark binary Cargo built for this bench target; refuses a debug build.
///
/// `HARK_BENCH_BINARY` names another release build (a copy of an earlier
/// commit's binary, say) for A/B runs on one machine.
pub fn hark_binary() -> Result<String> {
    let path = std::env::var("HARK_BENCH_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_hark").to_string());
    if !path.contains("/release/") {
        return Err(err(format!(
            "{path} is not a release build: run through `cargo bench` (the bench profile inherits release)"
        )));
    }
    Ok(path)
}

/// /proc/loadavg's first three fields: other work on the machine skews
/// every number here.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!(
        "machine: {cpus} CPUs ({model}), {:.1} GiB RAM; hark and the load generator share them",
        mem_kib as f64 / 1048576.0
    );
}
// ---- PostgreSQL ---------------------------------------------------------

/// A private, ephemeral PostgreSQL cluster with the bench database.
pub struct Pg {
    cluster: Cluster,
    /// tokio-postgres connection string of the bench database.
    pub conn: String,
}

impl Pg {
    /// Starts the cluster; `extra` adds `-c name=value` settings.
    pub async fn start(extra: &[(&str, &str)]) -> Result<Pg> {
        // Durability is not what is measured (the kit turns fsync and
        // synchronous_commit off): commits return as soon as the row is
        // in shared memory (as on a well-provisioned server).
        let mut settings = vec![("max_connections", "200"), ("shared_buffers", "256MB")];
        settings.extend_from_slice(extra);
        let started = Instant::now();
        let cluster = Cluster::start("hark-bench-pg", &settings).await?;
        let conn = cluster.database(DB_NAME).await?;
        println!(
            "postgres: embedded PostgreSQL started in {:.1} s (fsync=off, synchronous_commit=off)",
            started.elapsed().as_secs_f64()
        );
        Ok(Pg { cluster, conn })
    }

    /// Stops the server and removes its directory.
    pub async fn stop(self) {
        self.cluster.stop().await;
    }
}

/// A cluster with pg_stat_statements loaded (and created in the bench
/// database), for benchmarks that count hark's statements.
pub async fn start_counting_statements() -> Result<(Pg, tokio_postgres::Client)> {
    let pg = Pg::start(&[
        ("shared_preload_libraries", "pg_stat_statements"),
        ("pg_stat_statements.track", "top"),
    ])
    .await?;
    let admin = connect_db(&pg.conn).await?;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    Ok((pg, admin))
}

pub async fn connect_db(conn: &str) -> Result<tokio_postgres::Client> {
    hark_kit::pg::try_connect(conn).await
}

/// Runs `body` on a thread of its own with a current-thread runtime, at
/// real-time priority (SCHED_FIFO) so that the instant a COMMIT returns
/// is taken at once even when both cores are saturated (as root; without
/// the right, the thread keeps normal priority). `body` is told whether
/// it got the priority.
pub fn writer_thread<F, Fut>(name: &str, body: F) -> io::Result<()>
where
    F: FnOnce(bool) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("writer runtime");
            let param = libc::sched_param { sched_priority: 10 };
            // SAFETY: sets this thread's own scheduling policy.
            let rt_prio = unsafe {
                libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param)
            } == 0;
            rt.block_on(body(rt_prio));
        })?;
    Ok(())
}

/// RSS, sampled 5 times 50 ms apart (the median).
pub async fn rss_median(hark: &Hark) -> Result<u64> {
    let mut v = Vec::new();
    for _ in 0..5 {
        v.push(hark.rss()?);
        // Sampling: 50 ms apart.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v.sort_unstable();
    Ok(v[2])
}

/// "met" or "MISSED", for a target.
pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// The benchmarks' own statements, as the [`Writer`] sends them (and as
/// `pg_stat_statements` records them).
pub const INSERT_SQL: &str =
    "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) VALUES ($1, $2, $3, now())";
pub const UPDATE_SQL: &str = "UPDATE chat_chatmessage SET content = $2 WHERE id = $1";
pub const DELETE_SQL: &str = "DELETE FROM chat_chatmessage WHERE id = $1";

/// A change the [`Writer`] commits: an insert, an edit of a message's
/// content, or a delete.
enum Change {
    Insert {
        room: i64,
        sender: i64,
        content: String,
    },
    Update {
        id: i64,
        content: String,
    },
    Delete {
        id: i64,
    },
}

type WriterJob = (Change, tokio::sync::oneshot::Sender<Result<Instant>>);

/// A writer on a thread and runtime of its own, so that the instant its
/// COMMIT returns is not delayed by the load generator's tasks (thousands
/// of poll responses arrive at that very moment on the main runtime).
pub struct Writer {
    tx: tokio::sync::mpsc::UnboundedSender<WriterJob>,
}

impl Writer {
    /// `explicit_tx`: BEGIN; the statement; COMMIT (else one autocommit
    /// statement).
    pub async fn start(conn: &str, explicit_tx: bool) -> Result<Writer> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<WriterJob>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let conn = conn.to_string();
        writer_thread("bench-writer", move |rt_prio| async move {
            if !rt_prio {
                eprintln!("note: the writer thread could not get SCHED_FIFO priority");
            }
            let mut client = match connect_db(&conn).await {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Some((change, reply)) = rx.recv().await {
                use tokio_postgres::types::ToSql;
                let (sql, params): (&str, Vec<&(dyn ToSql + Sync)>) = match &change {
                    Change::Insert {
                        room,
                        sender,
                        content,
                    } => (INSERT_SQL, vec![room, sender, content]),
                    Change::Update { id, content } => (UPDATE_SQL, vec![id, content]),
                    Change::Delete { id } => (DELETE_SQL, vec![id]),
                };
                let r = async {
                    let rows = if explicit_tx {
                        let tx = client.transaction().await?;
                        let rows = tx.execute(sql, &params).await?;
                        tx.commit().await?;
                        rows
                    } else {
                        client.execute(sql, &params).await?
                    };
                    let at = Instant::now();
                    if rows != 1 {
                        return Err(err(format!("{sql:?} changed {rows} rows, not 1")));
                    }
                    Ok::<Instant, BoxError>(at)
                }
                .await;
                let _ = reply.send(r);
            }
        })?;
        ready_rx.await.map_err(|_| err("writer thread died"))??;
        Ok(Writer { tx })
    }

    async fn commit(&self, change: Change) -> Result<Instant> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((change, reply))
            .map_err(|_| err("writer thread gone"))?;
        rx.await.map_err(|_| err("writer thread gone"))?
    }

    /// Inserts one message in its own transaction; returns the instant
    /// COMMIT returned (taken on the writer's thread).
    pub async fn insert(&self, room: i64, sender: i64, content: &str) -> Result<Instant> {
        self.commit(Change::Insert {
            room,
            sender,
            content: content.to_string(),
        })
        .await
    }

    /// Sets message `id`'s content, in its own transaction (an edit);
    /// returns the instant COMMIT returned. An error unless exactly one
    /// row changed.
    pub async fn update(&self, id: i64, content: &str) -> Result<Instant> {
        self.commit(Change::Update {
            id,
            content: content.to_string(),
        })
        .await
    }

    /// Deletes message `id` in its own transaction; returns the instant
    /// COMMIT returned. An error unless exactly one row went.
    pub async fn delete(&self, id: i64) -> Result<Instant> {
        self.commit(Change::Delete { id }).await
    }
}
/// A token good for six hours (a long benchmark outlives the kit's hour).
pub fn token(user: i64) -> String {
    hark_kit::token_for(user, chrono::Duration::hours(6))
}

// ---- the hark process ---------------------------------------------------

/// Starts the release hark on `db` at a free port of 127.0.0.1 and waits
/// until it is ready (the pool and the LISTEN connection are up). `env`
/// adds or overrides settings; hark's log (stderr) goes to a file in
/// target/bench-logs/.
pub async fn start_hark(db: &str, name: &str, env: &[(&str, &str)]) -> Result<Hark> {
    let bin = hark_binary()?;
    let log_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    std::fs::create_dir_all(&log_dir)?;
    let log = log_dir.join(format!("{name}-hark-{}.log", std::process::id()));
    let mut launch = Launch::new(&bin, db).env(&[
        ("HARK_LOG", "warn"),
        ("HARK_MAX_CONNECTIONS", "25000"),
        ("HARK_POLL_TIMEOUT_MAX_S", "3600"),
        // The stream benchmarks open up to 19,900 streams as one
        // synthetic user; real streams come from many users.
        ("HARK_MAX_STREAMS_PER_USER", "0"),
    ]);
    // Allocator tuning (glibc's MALLOC_*, jemalloc's _RJEM_MALLOC_CONF)
    // and HARK_DIRECT_WRITES pass through, so their effect can be measured
    // without a rebuild.
    launch.env.extend(std::env::vars().filter(|(k, _)| {
        k.starts_with("MALLOC_") || k == "_RJEM_MALLOC_CONF" || k == "HARK_DIRECT_WRITES"
    }));
    let mut launch = launch.env(env);
    launch.log = Log::File(log.clone());
    launch.die_with_parent = true;
    launch.listen_timeout = Duration::from_secs(60);
    let hark = Hark::launch(launch).await?;
    hark.ready().await?;
    println!(
        "hark: {bin} (pid {}) on http://{}, log {}",
        hark.pid,
        hark.addr,
        log.display()
    );
    Ok(hark)
}

/// SIGTERM, then wait (bounded: 10 s) for the exit; SIGKILL if it hangs.
pub async fn stop_hark(hark: &mut Hark) {
    hark.stop_or_kill(Duration::from_secs(10)).await;
}

/// The unit of the CPU times in `/proc/<pid>/stat`, as a duration.
fn ticks(n: u64) -> Duration {
    hark_kit::procfs::ticks_to_duration(n)
}

/// This process's CPU time (the load generator's).
pub fn own_cpu_time() -> Result<Duration> {
    cpu_time_of(std::process::id())
}

/// Opens `n` connections to hark, `batch` at a time, waiting after each
/// batch until hark has accepted it (hark_open_connections). hark listens
/// with a backlog of 128 (tokio's `TcpListener::bind`): connecting faster
/// than it accepts overflows the accept queue, and the kernel drops SYNs
/// that the client retransmits only after 1 s — connection setup is not
/// what these benchmarks measure.
///
/// `others`: connections to hark the caller keeps open besides these (the
/// metrics connection included).
/// The request each of [`connect_many`]'s connections sends first, from
/// `BENCH_FIRST`: none (unset or empty); `post`, a bodiless `POST` (a 401,
/// as when a browser's pooled connection carried a send before its poll);
/// `put`, a bodiless `PUT` (a 405; a method hark's own HTTP leaves to
/// hyper, which then serves the connection).
pub fn first_request() -> Result<Option<&'static [u8]>> {
    match std::env::var("BENCH_FIRST").unwrap_or_default().as_str() {
        "" => Ok(None),
        "post" => Ok(Some(
            b"POST /api/chat/messages/ HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n",
        )),
        "put" => Ok(Some(
            b"PUT /api/chat/messages/ HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n",
        )),
        other => Err(err(format!("BENCH_FIRST={other:?}: expected post or put"))),
    }
}

/// Opens `n` keep-alive connections, `batch` at a time, each waiting until
/// hark counts it; each sends [`first_request`] first and reads its answer.
pub async fn connect_many(
    mc: &mut MetricsClient,
    n: usize,
    batch: usize,
    others: usize,
) -> Result<Vec<Conn>> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    let addr = mc.addr;
    let first = first_request()?;
    if let Some(first) = first {
        let line = String::from_utf8_lossy(first);
        println!(
            "each connection first sends {:?}",
            line.lines().next().unwrap_or("")
        );
    }
    let open = move |_| async move {
        let mut c = Conn::connect(addr).await?;
        if let Some(req) = first {
            c.send_raw(req).await?;
            let r = c.read_response().await?;
            if r.status != 401 && r.status != 405 {
                return Err(io::Error::other(format!(
                    "first request answered {}",
                    r.status
                )));
            }
        }
        Ok::<_, io::Error>(c)
    };
    let base = others as f64;
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    while conns.len() < n {
        let k = batch.min(n - conns.len());
        let more: Vec<Conn> = stream::iter(0..k)
            .map(open)
            .buffer_unordered(k)
            .try_collect()
            .await?;
        conns.extend(more);
        let want = base + conns.len() as f64;
        if let Err(e) = mc
            .wait_until("hark_open_connections", Duration::from_secs(30), |v| {
                v >= want
            })
            .await
        {
            let ss = std::process::Command::new("ss")
                .args(["-ltn", &format!("sport = :{}", addr.port())])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            return Err(err(format!(
                "{e} (waiting for {want} after opening {} connections); hark's listening socket:\n{ss}",
                conns.len()
            )));
        }
    }
    Ok(conns)
}

/// TcpExt ListenOverflows from /proc/net/netstat (accept-queue overflows,
/// system-wide).
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names = lines[0].split_whitespace();
    let values = lines[1].split_whitespace();
    names
        .zip(values)
        .find(|(k, _)| *k == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
// ---- requests and numbers -----------------------------------------------

/// Path and query of a poll; `token` goes in `access_token`.
pub fn poll_path(room: i64, since: Option<&str>, timeout: u64, token: &str) -> String {
    let mut p = format!("/api/chat/messages/poll/?room_id={room}&timeout={timeout}");
    if let Some(s) = since {
        p.push_str("&since=");
        p.extend(form_urlencoded::byte_serialize(s.as_bytes()));
    }
    p.push_str("&access_token=");
    p.push_str(token);
    p
}

/// A poll response: (number of messages, cursor).
pub fn poll_result(r: &Resp) -> Result<(usize, String)> {
    if r.status != 200 {
        return Err(err(format!(
            "poll answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )));
    }
    // Typed, not a serde_json::Value: the generator shares hark's two
    // cores, so what it spends per response is taken from hark.
    #[derive(serde::Deserialize)]
    struct Body {
        messages: Vec<serde::de::IgnoredAny>,
        cursor: String,
    }
    let b: Body = serde_json::from_slice(&r.body).map_err(|e| {
        err(format!(
            "not a poll answer ({e}): {}",
            String::from_utf8_lossy(&r.body)
        ))
    })?;
    Ok((b.messages.len(), b.cursor))
}

/// What a poll answer carried, read in more detail than [`poll_result`]
/// (which the fan-out benchmarks use, to spend as little as possible per
/// response): each message's `id` and `edited`, and the `deleted` list.
pub struct PollAnswer {
    pub messages: usize,
    /// Messages with `"edited": true`.
    pub edited: usize,
    /// Entries of `deleted`.
    pub deleted: usize,
    /// The first message's id.
    pub first_message: Option<i64>,
    /// The first deletion's (id, room).
    pub first_deleted: Option<(i64, i64)>,
    pub cursor: String,
}

/// A poll response in detail; an error when it is not a 200 or lacks
/// `messages`, `deleted`, `cursor` or a message's `id` or `edited`.
pub fn poll_answer(r: &Resp) -> Result<PollAnswer> {
    if r.status != 200 {
        return Err(err(format!(
            "poll answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )));
    }
    #[derive(serde::Deserialize)]
    struct Message {
        id: i64,
        edited: bool,
    }
    #[derive(serde::Deserialize)]
    struct Deletion {
        id: i64,
        room: i64,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        messages: Vec<Message>,
        deleted: Vec<Deletion>,
        cursor: String,
    }
    let b: Body = serde_json::from_slice(&r.body).map_err(|e| {
        err(format!(
            "not a poll answer with `deleted` and `edited` ({e}): {}",
            String::from_utf8_lossy(&r.body)
        ))
    })?;
    Ok(PollAnswer {
        messages: b.messages.len(),
        edited: b.messages.iter().filter(|m| m.edited).count(),
        deleted: b.deleted.len(),
        first_message: b.messages.first().map(|m| m.id),
        first_deleted: b.deleted.first().map(|d| (d.id, d.room)),
        cursor: b.cursor,
    })
}

/// Nearest-rank percentile of sorted values.
pub fn pct<T: Copy>(sorted: &[T], p: f64) -> T {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub fn kib(bytes: f64) -> String {
    format!("{:.1}", bytes / 1024.0)
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

/// Prints a left-aligned table with a header row.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:>width$}", c, width = w[i]))
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(header.to_vec());
    println!(
        "|{}|",
        w.iter()
            .map(|n| "-".repeat(n + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// /proc/net/sockstat's TCP line (sockets in use, kernel memory in pages).
pub fn tcp_sockstat() -> String {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("TCP:"))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

// ---- groups of long pollers ---------------------------------------------

/// One poll's answer as a poller saw it.
pub struct Sample {
    pub round: usize,
    /// When the response had been fully received.
    pub at: Instant,
    pub messages: usize,
    /// From [`Pollers::spawn_checked`]'s pollers only (else 0 and None):
    /// what [`PollAnswer`] has of the answer.
    pub edited: usize,
    pub deleted: usize,
    pub first_message: Option<i64>,
    pub first_deleted: Option<(i64, i64)>,
    pub error: Option<String>,
}

impl Sample {
    /// What the answer carried, for an error message.
    pub fn describe(&self) -> String {
        format!(
            "{} messages ({} edited, the first {:?}), {} deleted (the first (id, room) {:?})",
            self.messages, self.edited, self.first_message, self.deleted, self.first_deleted
        )
    }
}

/// One round's answers, latencies measured from `t0`.
pub struct Round {
    /// Sorted.
    pub lat: Vec<Duration>,
    pub errors: usize,
    /// Answers that failed the round's check ([`Pollers::collect`]'s:
    /// not exactly one message).
    pub wrong: usize,
    /// The first of those, described.
    pub first_wrong: Option<String>,
    /// Answers received before `t0` (counted as 0 ms).
    pub early: usize,
    pub first_error: Option<String>,
}

/// N long pollers in one room, each on its own connection. Each sends
/// `polls_each` polls in sequence, every one with the cursor of the
/// previous answer, and reports every answer.
pub struct Pollers {
    samples: Arc<SampleList<Sample>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub n: usize,
    go: tokio::sync::watch::Sender<usize>,
}

/// Where load-generator tasks leave what they measured. A channel would
/// wake the collecting task (often on the other worker thread) once per
/// sample, on the two cores hark is measured on; the collector looks
/// every millisecond instead. Samples carry their own timestamps, so that
/// costs no precision.
pub struct SampleList<T>(std::sync::Mutex<Vec<T>>);

impl<T> Default for SampleList<T> {
    fn default() -> Self {
        SampleList(std::sync::Mutex::new(Vec::new()))
    }
}

impl<T> SampleList<T> {
    pub fn push(&self, sample: T) {
        self.0.lock().unwrap().push(sample);
    }

    pub fn extend(&self, samples: impl IntoIterator<Item = T>) {
        self.0.lock().unwrap().extend(samples);
    }

    /// Moves what has arrived into `batch` (which must be empty), waiting
    /// in 1 ms steps until something has; false once `deadline` passed
    /// with nothing.
    pub async fn take(&self, batch: &mut Vec<T>, deadline: tokio::time::Instant) -> bool {
        loop {
            std::mem::swap(batch, &mut *self.0.lock().unwrap());
            if !batch.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Pollers {
    /// Pollers that re-poll as soon as they have an answer.
    pub fn spawn(
        conns: Vec<Conn>,
        room: i64,
        token: &str,
        cursor: &str,
        polls_each: usize,
    ) -> Pollers {
        Pollers::spawn_inner(conns, room, token, cursor, polls_each, false, false)
    }

    /// Pollers that re-poll as soon as they have an answer, and read each
    /// answer in detail ([`poll_answer`]): its samples say which messages
    /// were edited and what was deleted.
    pub fn spawn_checked(
        conns: Vec<Conn>,
        room: i64,
        token: &str,
        cursor: &str,
        polls_each: usize,
    ) -> Pollers {
        Pollers::spawn_inner(conns, room, token, cursor, polls_each, false, true)
    }

    /// `barrier`: each poller sends its poll `k` (k ≥ 1) only after
    /// [`Pollers::release`] has been called with k — so the re-polls do
    /// not compete with the delivery of the previous message.
    pub fn spawn_with(
        conns: Vec<Conn>,
        room: i64,
        token: &str,
        cursor: &str,
        polls_each: usize,
        barrier: bool,
    ) -> Pollers {
        Pollers::spawn_inner(conns, room, token, cursor, polls_each, barrier, false)
    }

    fn spawn_inner(
        conns: Vec<Conn>,
        room: i64,
        token: &str,
        cursor: &str,
        polls_each: usize,
        barrier: bool,
        checked: bool,
    ) -> Pollers {
        let samples = Arc::new(SampleList::default());
        let (go_tx, go_rx) = tokio::sync::watch::channel(0usize);
        let n = conns.len();
        let mut tasks = Vec::with_capacity(n);
        for mut conn in conns {
            let samples = samples.clone();
            let token = token.to_string();
            let mut cursor = cursor.to_string();
            let mut go = go_rx.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..polls_each {
                    if barrier && round > 0 && go.wait_for(|&k| k >= round).await.is_err() {
                        return;
                    }
                    let path = poll_path(room, Some(&cursor), 3600, &token);
                    let resp = match conn.send_get(&path).await {
                        Ok(()) => conn.read_response().await,
                        Err(e) => Err(e),
                    };
                    let at = Instant::now();
                    let mut sample = Sample {
                        round,
                        at,
                        messages: 0,
                        edited: 0,
                        deleted: 0,
                        first_message: None,
                        first_deleted: None,
                        error: None,
                    };
                    let resp = resp.map_err(BoxError::from);
                    if checked {
                        match resp.and_then(|r| poll_answer(&r)) {
                            Ok(a) => {
                                cursor = a.cursor;
                                sample.messages = a.messages;
                                sample.edited = a.edited;
                                sample.deleted = a.deleted;
                                sample.first_message = a.first_message;
                                sample.first_deleted = a.first_deleted;
                            }
                            Err(e) => sample.error = Some(e.to_string()),
                        }
                    } else {
                        match resp.and_then(|r| poll_result(&r)) {
                            Ok((messages, next)) => {
                                cursor = next;
                                sample.messages = messages;
                            }
                            Err(e) => sample.error = Some(e.to_string()),
                        }
                    }
                    let failed = sample.error.is_some();
                    samples.push(sample);
                    if failed {
                        return;
                    }
                }
                // Keep the connection open until the group is dropped:
                // closing 10,000 connections is not part of any round.
                std::future::pending::<()>().await;
                drop(conn);
            }));
        }
        Pollers {
            samples,
            tasks,
            n,
            go: go_tx,
        }
    }

    /// Lets barrier pollers send their poll number `k`.
    pub fn release(&self, k: usize) {
        let _ = self.go.send(k);
    }

    /// Waits (bounded) for every poller's answer of `round`; an answer
    /// without exactly one message counts as wrong.
    pub async fn collect(&mut self, round: usize, t0: Instant, timeout: Duration) -> Result<Round> {
        self.collect_with(round, t0, timeout, |s| s.messages == 1)
            .await
    }

    /// Waits (bounded) for every poller's answer of `round`; an answer
    /// for which `ok` is false counts as wrong.
    pub async fn collect_with(
        &mut self,
        round: usize,
        t0: Instant,
        timeout: Duration,
        ok: impl Fn(&Sample) -> bool,
    ) -> Result<Round> {
        let mut r = Round {
            lat: Vec::with_capacity(self.n),
            errors: 0,
            wrong: 0,
            first_wrong: None,
            early: 0,
            first_error: None,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut batch = Vec::new();
        while r.lat.len() + r.errors < self.n {
            if !self.samples.take(&mut batch, deadline).await {
                return Err(err(format!(
                    "round {round}: only {} of {} polls answered within {:.0} s",
                    r.lat.len(),
                    self.n,
                    timeout.as_secs_f64()
                )));
            }
            for s in batch.drain(..) {
                if s.round != round {
                    return Err(err(format!(
                        "a poller answered round {} during round {round}",
                        s.round
                    )));
                }
                if let Some(e) = s.error {
                    r.errors += 1;
                    r.first_error.get_or_insert(e);
                    continue;
                }
                if !ok(&s) {
                    r.wrong += 1;
                    r.first_wrong.get_or_insert_with(|| s.describe());
                }
                if s.at < t0 {
                    r.early += 1;
                }
                r.lat.push(s.at.saturating_duration_since(t0));
            }
        }
        r.lat.sort_unstable();
        Ok(r)
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---- /events streams (Server-Sent Events) ---------------------------------
/// One open `/events` stream: exactly one socket (one file descriptor),
/// a fixed read buffer and the decoder.
pub struct SseStream {
    stream: TcpStream,
    buf: Box<[u8]>,
    pub dec: SseDecoder,
    /// Bytes read from the socket after the response head (chunk framing
    /// included).
    pub wire_bytes: u64,
}

/// Read buffer per stream in the load generator.
const SSE_BUF: usize = 4096;

impl SseStream {
    /// Connects, sends `GET target`, checks the head (200, chunked
    /// `text/event-stream`) and reads up to the `ready` event; returns the
    /// stream and the ready cursor. Events before `ready` (`reset`) are
    /// skipped.
    ///
    /// With `SSE_REUSED=1` the connection first serves a `GET /healthz`
    /// and then carries the stream, as when a browser reuses a keep-alive
    /// connection for its EventSource (hark's lean connection serves both).
    /// With `SSE_REUSED=2` the first request is a bodiless `PUT` (a 405), a
    /// method hark's own HTTP leaves to hyper, which then serves the
    /// connection, stream included. With `SSE_REUSED=3` it is a bodiless
    /// `POST` (a 401), as when a browser's connection carried a send; the
    /// lean connection serves both.
    pub async fn open(addr: SocketAddr, target: &str) -> Result<(SseStream, String)> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let first: &[u8] = match env_num("SSE_REUSED", 0u8) {
            0 => b"",
            1 => b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
            2 => {
                b"PUT /api/chat/messages/ HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n"
            }
            _ => {
                b"POST /api/chat/messages/ HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n"
            }
        };
        if !first.is_empty() {
            stream.write_all(first).await?;
            read_whole_response(&mut stream).await?;
        }
        let req = format!(
            "GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut s = SseStream {
            stream,
            buf: vec![0u8; SSE_BUF].into_boxed_slice(),
            dec: SseDecoder::default(),
            wire_bytes: 0,
        };
        // The head: read until its end (it fits the buffer).
        let mut have = 0;
        let head = loop {
            if let Some(head) = parse_head(&s.buf[..have])? {
                break head;
            }
            if have == s.buf.len() {
                return Err(err("response head larger than the read buffer"));
            }
            let n = s.stream.read(&mut s.buf[have..]).await?;
            if n == 0 {
                return Err(err("connection closed before the response head"));
            }
            have += n;
        };
        let head_end = head.len;
        if head.status != 200 {
            let text = String::from_utf8_lossy(&s.buf[head_end..have]).into_owned();
            return Err(err(format!("/events answered {}: {text}", head.status)));
        }
        let event_stream = head
            .header("content-type")
            .is_some_and(|v| v.to_ascii_lowercase().contains("text/event-stream"));
        if !head.chunked() || !event_stream {
            return Err(err(format!("not a chunked event stream:\n{head:?}")));
        }
        let mut ready: Option<String> = None;
        let rest = s.buf[head_end..have].to_vec();
        s.wire_bytes += rest.len() as u64;
        s.dec.feed(&rest, &mut |item| {
            if let SseItem::Event(e) = item {
                if e.kind == SseKind::Ready && ready.is_none() {
                    ready = Some(e.id.to_string());
                }
            }
        })?;
        while ready.is_none() {
            s.read_some(&mut |item| {
                if let SseItem::Event(e) = item {
                    if e.kind == SseKind::Ready && ready.is_none() {
                        ready = Some(e.id.to_string());
                    }
                }
            })
            .await?;
        }
        Ok((s, ready.unwrap()))
    }

    /// One read from the socket; every event and comment it completes is
    /// handed to `f`. An error when the connection or the body ended.
    pub async fn read_some(
        &mut self,
        f: &mut (dyn FnMut(SseItem<'_>) + Send),
    ) -> io::Result<usize> {
        let n = self.stream.read(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream closed by hark",
            ));
        }
        self.wire_bytes += n as u64;
        let (buf, dec) = (&self.buf, &mut self.dec);
        dec.feed(&buf[..n], f)?;
        if dec.ended() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ended by hark",
            ));
        }
        Ok(n)
    }
}

/// Reads one content-length framed response (nothing may follow it).
async fn read_whole_response(stream: &mut TcpStream) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(head) = parse_head(&buf)? {
            // The bodiless PUT's and POST's answers, which keep the connection.
            if ![200, 401, 405].contains(&head.status) {
                return Err(err(format!("first request answered {}", head.status)));
            }
            if buf.len() >= head.len + head.content_length()?.unwrap_or(0) {
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(err("connection closed after the first request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `/events` for one room (the token in `access_token`).
pub fn events_path(rooms: &[i64], token: &str) -> String {
    let mut p = String::from("/events?");
    for r in rooms {
        p.push_str(&format!("room_id={r}&"));
    }
    p.push_str("access_token=");
    p.push_str(token);
    p
}

/// Opens `n` streams, `parallel` at a time, stream `i` at `target(i)`; then
/// waits until hark counts `others + n` open streams. Returns each stream
/// with its ready cursor, in order of `i`.
pub async fn open_streams(
    mc: &mut MetricsClient,
    n: usize,
    parallel: usize,
    others: usize,
    target: impl Fn(usize) -> String,
) -> Result<Vec<(SseStream, String)>> {
    use futures::stream::{self, StreamExt};
    let addr = mc.addr;
    let mut out: Vec<Option<(SseStream, String)>> = (0..n).map(|_| None).collect();
    let mut opened = stream::iter(0..n)
        .map(|i| {
            let t = target(i);
            async move { (i, SseStream::open(addr, &t).await) }
        })
        .buffer_unordered(parallel.max(1));
    let mut count = 0;
    while let Some((i, r)) = opened.next().await {
        match r {
            Ok(s) => {
                out[i] = Some(s);
                count += 1;
            }
            Err(e) => {
                return Err(err(format!(
                    "opening stream {i} failed after {count} were open: {e}"
                )))
            }
        }
    }
    let want = (others + n) as f64;
    mc.wait_until("hark_open_streams", Duration::from_secs(60), |v| v >= want)
        .await?;
    Ok(out.into_iter().map(|s| s.unwrap()).collect())
}

// ---- file descriptors and CPU ----------------------------------------------

/// (soft RLIMIT_NOFILE, descriptors open now) of a process.
pub fn fd_usage(pid: u32) -> Result<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| err("no Max open files"))?;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok((soft, open))
}

/// Jiffies of the whole machine from /proc/stat: (busy, total).
pub fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Percent of all CPUs busy between two [`machine_jiffies`] readings.
pub fn machine_busy_pct(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return 0.0;
    }
    100.0 * b.0.saturating_sub(a.0) as f64 / total as f64
}

/// hark's delivery-latency histogram buckets: (`le` label, bound in ms).
const LATENCY_BUCKETS: [(&str, &str); 14] = [
    ("0.0005", "0.5"),
    ("0.001", "1"),
    ("0.0025", "2.5"),
    ("0.005", "5"),
    ("0.01", "10"),
    ("0.025", "25"),
    ("0.05", "50"),
    ("0.1", "100"),
    ("0.25", "250"),
    ("0.5", "500"),
    ("1", "1000"),
    ("2.5", "2500"),
    ("5", "5000"),
    ("10", "10000"),
];

/// The histogram bucket bound (ms) under which quantile `q` (0..1) of the
/// hark_delivery_latency_seconds observations between two scrapes lies,
/// e.g. "≤50"; ">10000" beyond the last bucket, "-" when there were none.
pub fn server_quantile(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    q: f64,
) -> String {
    let count = delta(before, after, "hark_delivery_latency_seconds_count");
    if count <= 0.0 {
        return "-".into();
    }
    for (le, ms) in LATENCY_BUCKETS {
        let key = format!("hark_delivery_latency_seconds_bucket{{le=\"{le}\"}}");
        if delta(before, after, &key) >= q * count {
            return format!("≤{ms}");
        }
    }
    ">10000".into()
}

/// CPU time of every descendant of `root` except `exclude` (and theirs):
/// for a benchmark, the embedded PostgreSQL (its watchdog, postmaster and
/// backends). Processes that already exited are not counted.
pub fn descendants_cpu(root: u32, exclude: &[u32]) -> Duration {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    let mut cpu: HashMap<u32, Duration> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((ppid, n)) = hark_kit::procfs::stat_fields(&stat) else {
            continue;
        };
        parent.insert(pid, ppid);
        cpu.insert(pid, ticks(n));
    }
    let mut total = Duration::ZERO;
    for (&pid, &t) in &cpu {
        let mut p = pid;
        let mut depth = 0;
        while p > 1 && depth < 64 {
            if exclude.contains(&p) {
                break;
            }
            let Some(&pp) = parent.get(&p) else { break };
            if pp == root {
                total += t;
                break;
            }
            p = pp;
            depth += 1;
        }
    }
    total
}

/// A reading of who used how much CPU so far.
#[derive(Clone, Copy)]
pub struct CpuSnap {
    at: Instant,
    hark: Duration,
    bench: Duration,
    pg: Duration,
    machine: (u64, u64),
}

/// CPU used between two [`CpuSnap`]s, each in % of one core.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    pub secs: f64,
    pub hark_ms: f64,
    pub hark: f64,
    pub bench: f64,
    pub pg: f64,
    /// Everything else on the machine (other engineers' builds and tests):
    /// large values mean the numbers are disturbed.
    pub other: f64,
}

impl CpuSnap {
    pub fn take(hark_pid: u32) -> CpuSnap {
        let me = std::process::id();
        CpuSnap {
            at: Instant::now(),
            hark: cpu_time_of(hark_pid).unwrap_or_default(),
            bench: cpu_time_of(me).unwrap_or_default(),
            pg: descendants_cpu(me, &[hark_pid]),
            machine: machine_jiffies(),
        }
    }

    pub fn since(&self, earlier: &CpuSnap) -> CpuUse {
        let secs = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let pct = |a: Duration, b: Duration| 100.0 * a.saturating_sub(b).as_secs_f64() / secs;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let machine = machine_busy_pct(earlier.machine, self.machine) * cpus;
        let hark = pct(self.hark, earlier.hark);
        let bench = pct(self.bench, earlier.bench);
        let pg = pct(self.pg, earlier.pg);
        CpuUse {
            secs,
            hark_ms: self.hark.saturating_sub(earlier.hark).as_secs_f64() * 1000.0,
            hark,
            bench,
            pg,
            other: (machine - hark - bench - pg).max(0.0),
        }
    }
}
