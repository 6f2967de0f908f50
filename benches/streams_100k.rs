//! Up to 100,000 idle `/events` streams on one hark process: what each
//! costs, one message fanned out to all of them against the machine's
//! floor at the same size in the same run, and what breaks first.
//!
//!     cargo bench --bench streams_100k
//!
//! The ramp: BIG_SIZES (10,000, 25,000, 50,000, 100,000) streams, all on
//! one room and of one user (`HARK_MAX_STREAMS_PER_USER=0`; a room of
//! 100,000 members coming online would be a presence storm, not idle
//! streams), `HARK_MAX_CONNECTIONS` the largest size + 10,000. At each
//! size:
//!
//! 1. the new streams are opened, BIG_PARALLEL at a time (a stream is open
//!    at its `ready` event) and hark must count them all open: the time it
//!    took, hark's VmRSS (median of 5) and KiB per stream against hark's
//!    idle RSS after a warm-up, and against its RSS before this size's new
//!    streams; hark's descriptors and threads; the load generator's RSS;
//!    the kernel's `Slab` (machine-wide) and `/proc/net/sockstat`;
//! 2. BIG_IDLE_S with nothing happening: hark's CPU for the streams'
//!    `: ping`s (every `HARK_PING_INTERVAL_MS`, hark's default 15 s);
//! 3. the fan-out: one warm-up round of hark, then of the floor (not
//!    pooled), then BIG_PAIRS pairs of rounds, floor and hark alternating
//!    (floor first in odd pairs, hark first in even ones), BIG_GAP_MS
//!    apart. A hark round is one INSERT committed by a writer on its own
//!    thread, which, and whose PostgreSQL backend, run at SCHED_FIFO (so
//!    that COMMIT's answer is not queued behind the fan-out on two busy
//!    cores); its latency, for each stream, is COMMIT returned → the
//!    `event: message` fully read. A floor round is a second process
//!    (this binary, `STREAMS_100K_ROLE=floor`) that holds as many loopback
//!    connections from the same clients and writes one buffer to each,
//!    from one plain thread per core, as `send_floor` does; the buffer is
//!    a copy of hark's event chunk as the warm-up round received it, and
//!    the clients read and decode it with the same code as a stream's
//!    (`send_floor`'s readers only count bytes, which costs them less than
//!    hark's events cost theirs); its latency is `go` written → the event
//!    read. The floor is the `write` calls no server can avoid; the p99
//!    ratio is hark's share. A hark round in which some stream had the
//!    message before COMMIT returned to the writer (PostgreSQL's answer
//!    to the writer delayed past the fan-out on a saturated machine) is
//!    left out of the pooled figures and of its pair, and counted.
//!
//! It stops at the first failure (a stream that does not open within
//! BIG_OPEN_TIMEOUT_S, an error answer, a connect error, a stream lost, a
//! round not delivered within BIG_ROUND_TIMEOUT_S), reports what broke:
//! hark's descriptors against its limit, its connection counters, the
//! accept queue, its log's warnings; then checks with one more round that
//! the streams still open are served, closes everything and prints the
//! tables so far.
//!
//! Limits the bench deals with itself:
//!
//! - Descriptors: hark raises its soft RLIMIT_NOFILE to the hard one; the
//!   bench first raises its own hard limit to `fs.nr_open` (BIG_NOFILE),
//!   which hark, PostgreSQL, the floor writer and the clients inherit.
//!   That takes CAP_SYS_RESOURCE: without it (a container that drops it,
//!   even as root) every process keeps the hard limit it was started with,
//!   and the bench says so at the start.
//! - One process's descriptors: the load generator is BIG_CLIENTS child
//!   processes (this binary, `STREAMS_100K_ROLE=client`; by default as
//!   many as keep each under BIG_PER_CLIENT connections, hark's streams
//!   and the floor's connections together). Each runs a current-thread
//!   runtime with one task per connection; a task keeps its socket, an SSE
//!   decoder and no read buffer (it reads into one on its stack), so an
//!   idle connection costs the generator little.
//! - Ephemeral ports (`net.ipv4.ip_local_port_range`, 28,232 ports): each
//!   connection binds to one of BIG_SOURCES loopback source addresses
//!   (127.0.0.2, 127.0.0.3, …; all of 127/8 is local) with
//!   `IP_BIND_ADDRESS_NO_PORT`, so its port is picked at connect per
//!   destination: the range applies per source address and destination.
//!   hark's accept queue is 4096 (capped by `somaxconn`).
//!
//! Times: receipt instants are CLOCK_MONOTONIC, the same clock in every
//! process (a Rust `Instant` on Linux), so a client's receipt and the
//! writer thread's COMMIT compare directly.
//!
//! Settings (environment): BIG_SIZES ("10000,25000,50000,100000"),
//! BIG_PAIRS (5), BIG_GAP_MS (500), BIG_IDLE_S (15; 0 skips),
//! BIG_PARALLEL (128), BIG_OPEN_TIMEOUT_S (30), BIG_ROUND_TIMEOUT_S (60),
//! BIG_SOURCES (8), BIG_PER_CLIENT (16000), BIG_CLIENTS (computed),
//! BIG_FLOOR (1; 0 skips the floor), BIG_NOFILE (`fs.nr_open`),
//! BIG_MAX_CONNECTIONS (largest size + 10,000), BIG_PING_MS (hark's
//! default).

mod common;

use std::collections::HashMap;
use std::io::{self as stdio, BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::stream::{self, StreamExt};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout};

const ROLE: &str = "STREAMS_100K_ROLE";
/// The marker before a round's number in the message's content.
const MARK: &[u8] = b"\"content\":\"streams_100k round ";

fn main() -> std::process::ExitCode {
    match std::env::var(ROLE).as_deref() {
        Ok("floor") => exit_with("floor writer", floor_writer()),
        Ok("client") => exit_with("client", client()),
        _ => {
            let fds = raise_hard_nofile();
            main_with("streams_100k", run(fds))
        }
    }
}

fn exit_with(what: &str, r: Result<()>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streams_100k {what}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `Instant` on Linux, and
/// the same in every process.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An `Instant` of this process as [`mono_ns`].
struct Clock {
    at: Instant,
    ns: u64,
}

impl Clock {
    fn new() -> Clock {
        let at = Instant::now();
        Clock { at, ns: mono_ns() }
    }

    fn ns(&self, t: Instant) -> u64 {
        if t >= self.at {
            self.ns + (t - self.at).as_nanos() as u64
        } else {
            self.ns - (self.at - t).as_nanos() as u64
        }
    }
}

fn read_file(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A `/proc/meminfo` value in KiB.
fn meminfo_kib(key: &str) -> u64 {
    read_file("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---- descriptors and ports --------------------------------------------------

/// The hard RLIMIT_NOFILE before and after the bench tried to raise it.
struct FdLimit {
    before: u64,
    wanted: u64,
    after: u64,
    refused: Option<String>,
}

/// Raises this process's hard RLIMIT_NOFILE to BIG_NOFILE (`fs.nr_open`),
/// before anything is started: every child inherits it. `main_with` then
/// raises the soft limit to it.
fn raise_hard_nofile() -> FdLimit {
    let nr_open = read_file("/proc/sys/fs/nr_open")
        .trim()
        .parse()
        .unwrap_or(1 << 20);
    let wanted: u64 = env_num("BIG_NOFILE", nr_open);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
    let mut refused = None;
    if hard < wanted {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, soft, wanted) {
            refused = Some(e.to_string());
        }
    }
    let after = getrlimit(Resource::RLIMIT_NOFILE).map_or(hard, |(_, h)| h);
    FdLimit {
        before: hard,
        wanted,
        after,
        refused,
    }
}

/// The loopback source addresses 127.0.0.2, 127.0.0.3, …
fn sources(n: usize) -> Vec<Ipv4Addr> {
    (0..n.clamp(1, 250))
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
        .collect()
}

/// A connection from `src` (its port picked at connect, per destination).
async fn connect_from(src: Ipv4Addr, dest: SocketAddr) -> stdio::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from `one`, which
    // outlives the call, on the socket's own descriptor.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(stdio::Error::last_os_error());
    }
    sock.bind(SocketAddr::from((src, 0)))?;
    let s = sock.connect(dest).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

// ---- the floor writer (a child process) -------------------------------------

/// The floor's sending process. Protocol on stdio: prints `port P`,
/// accepts BIG_FLOOR_N connections, prints `ready` (or `failed <accepted>
/// <error>`); then for each `go` line writes the bytes of BIG_FLOOR_HEX
/// (hark's event chunk) once to every connection (one plain thread per
/// core) and prints `done <the sending threads' CPU µs>`.
fn floor_writer() -> Result<()> {
    let n: usize = env_num("BIG_FLOOR_N", 0);
    let payload = std::env::var("BIG_FLOOR_HEX")
        .ok()
        .and_then(|h| from_hex(&h))
        .ok_or_else(|| err("BIG_FLOOR_HEX: no payload"))?;
    let threads = cores();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: a second listen() on a listening socket only sets its
    // accept-queue length (hark's is 4096 too).
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let mut out = stdio::stdout();
    writeln!(out, "port {}", listener.local_addr()?.port())?;
    out.flush()?;
    let mut groups: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nodelay(true)?;
                groups[i % threads].push(s);
            }
            Err(e) => {
                writeln!(out, "failed {i} accept: {e}")?;
                out.flush()?;
                return Err(e.into());
            }
        }
    }
    writeln!(out, "ready")?;
    out.flush()?;
    let payload: Arc<[u8]> = payload.into();
    let (done_tx, done_rx) = mpsc::sync_channel::<stdio::Result<Duration>>(threads);
    let mut go: Vec<mpsc::SyncSender<()>> = Vec::new();
    for mut group in groups {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        go.push(tx);
        let done = done_tx.clone();
        let payload = payload.clone();
        std::thread::spawn(move || {
            while rx.recv().is_ok() {
                let c0 = thread_cpu();
                let r = group
                    .iter_mut()
                    .try_for_each(|s| s.write_all(&payload))
                    .map(|()| thread_cpu().saturating_sub(c0));
                if done.send(r).is_err() {
                    return;
                }
            }
        });
    }
    for line in stdio::stdin().lock().lines() {
        if line? != "go" {
            continue;
        }
        for tx in &go {
            tx.send(()).map_err(|_| err("a sending thread is gone"))?;
        }
        let mut cpu = Duration::ZERO;
        for _ in 0..go.len() {
            cpu += done_rx
                .recv()
                .map_err(|_| err("a sending thread is gone"))??;
        }
        writeln!(out, "done {}", cpu.as_micros())?;
        out.flush()?;
    }
    Ok(())
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

type ChildLines = tokio::io::Lines<BufReader<ChildStdout>>;

async fn next_line(lines: &mut ChildLines, who: &str) -> Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| err(format!("the {who} exited")))
}

/// The floor's process, seen from here.
struct Floor {
    child: Child,
    to: ChildStdin,
    from: ChildLines,
    pid: u32,
    port: u16,
}

impl Floor {
    async fn spawn(n: usize, payload: &[u8]) -> Result<Floor> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .env(ROLE, "floor")
            .env("BIG_FLOOR_N", n.to_string())
            .env("BIG_FLOOR_HEX", to_hex(payload))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or_else(|| err("the floor writer exited"))?;
        let to = child.stdin.take().ok_or_else(|| err("no stdin"))?;
        let mut from = BufReader::new(child.stdout.take().ok_or_else(|| err("no stdout"))?).lines();
        let port = next_line(&mut from, "floor writer")
            .await?
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| err("no port from the floor writer"))?;
        Ok(Floor {
            child,
            to,
            from,
            pid,
            port,
        })
    }

    async fn ready(&mut self) -> Result<()> {
        let line = next_line(&mut self.from, "floor writer").await?;
        if line != "ready" {
            return Err(err(format!("floor writer: {line}")));
        }
        Ok(())
    }

    async fn go(&mut self) -> Result<()> {
        self.to.write_all(b"go\n").await?;
        self.to.flush().await?;
        Ok(())
    }

    /// The sending threads' CPU for the round.
    async fn done(&mut self) -> Result<Duration> {
        let line = next_line(&mut self.from, "floor writer").await?;
        line.strip_prefix("done ")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_micros)
            .ok_or_else(|| err(format!("floor writer: {line}")))
    }

    async fn stop(self) {
        let Floor { mut child, to, .. } = self;
        drop(to);
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

// ---- the clients (child processes) ------------------------------------------

const HARK: usize = 0;
const FLOOR: usize = 1;

/// What a client's connection tasks record.
#[derive(Default)]
struct Store {
    /// Receipt instants (ns) by round: hark's, the floor's.
    rounds: [Mutex<HashMap<usize, Vec<u64>>>; 2],
    /// Connections that ended, and the last reason.
    ended: [AtomicUsize; 2],
    last_end: Mutex<[Option<String>; 2]>,
    pings: AtomicU64,
    /// Bytes on the wire of the first `event: message` (its chunk).
    event_wire: AtomicUsize,
    /// That chunk: the floor writes a copy of it.
    first_event: Mutex<Option<Vec<u8>>>,
}

impl Store {
    fn end(&self, kind: usize, why: String) {
        self.ended[kind].fetch_add(1, Relaxed);
        self.last_end.lock().unwrap()[kind] = Some(why);
    }

    fn got(&self, kind: usize, round: usize, at: u64) {
        self.rounds[kind]
            .lock()
            .unwrap()
            .entry(round)
            .or_default()
            .push(at);
    }
}

/// The round number in a message event's data.
fn round_of(data: &[u8]) -> Option<usize> {
    let i = memchr::memmem::find(data, MARK)? + MARK.len();
    let digits = data[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[i..i + digits]).ok()?.parse().ok()
}

/// The wire size of one `event: message` with an id and one data line,
/// as one HTTP/1.1 chunk.
fn event_wire(id: usize, data: usize) -> usize {
    let body = "event: message\n".len() + "id: \n".len() + id + "data: \n".len() + data + 1;
    format!("{body:x}").len() + 2 + body + 2
}

/// One `event: message` as hark writes it, as one HTTP/1.1 chunk.
fn event_chunk(id: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(data.len() + id.len() + 32);
    body.extend_from_slice(b"event: message\nid: ");
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(b"\ndata: ");
    body.extend_from_slice(data);
    body.extend_from_slice(b"\n\n");
    let mut chunk = format!("{:x}\r\n", body.len()).into_bytes();
    chunk.extend_from_slice(&body);
    chunk.extend_from_slice(b"\r\n");
    chunk
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Connects from `src`, sends `GET path` and reads up to `ready`.
async fn open_stream(
    src: Ipv4Addr,
    dest: SocketAddr,
    path: &str,
) -> Result<(TcpStream, SseDecoder)> {
    let mut s = connect_from(src, dest)
        .await
        .map_err(|e| err(format!("connect: {e}")))?;
    let req =
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    let head = loop {
        if let Some(head) = parse_head(&buf[..have])? {
            break head;
        }
        if have == buf.len() {
            return Err(err("response head over 4 KiB"));
        }
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(err("connection closed before the response head"));
        }
        have += n;
    };
    if head.status != 200 {
        return Err(err(format!(
            "/events answered {}: {}",
            head.status,
            String::from_utf8_lossy(&buf[head.len..have]).trim()
        )));
    }
    let sse = head
        .header("content-type")
        .is_some_and(|v| v.contains("text/event-stream"));
    if !head.chunked() || !sse {
        return Err(err("not a chunked event stream"));
    }
    let mut dec = SseDecoder::default();
    let mut ready = false;
    dec.feed(&buf[head.len..have], &mut |item| {
        if let SseItem::Event(e) = item {
            ready |= e.kind == SseKind::Ready;
        }
    })?;
    while !ready {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(err("connection closed before `ready`"));
        }
        dec.feed(&buf[..n], &mut |item| {
            if let SseItem::Event(e) = item {
                ready |= e.kind == SseKind::Ready;
            }
        })?;
    }
    Ok((s, dec))
}

/// Reads a stream until it ends: receipt instants of message events,
/// pings counted. The read buffer lives on the stack during a read only.
async fn read_stream(sock: TcpStream, mut dec: SseDecoder, store: Arc<Store>) {
    loop {
        if let Err(e) = sock.readable().await {
            return store.end(HARK, e.to_string());
        }
        let mut buf = [0u8; 4096];
        let n = match sock.try_read(&mut buf) {
            Ok(0) => return store.end(HARK, "closed by hark".into()),
            Ok(n) => n,
            Err(e) if e.kind() == stdio::ErrorKind::WouldBlock => continue,
            Err(e) => return store.end(HARK, e.to_string()),
        };
        let at = mono_ns();
        let fed = dec.feed(&buf[..n], &mut |item| match item {
            SseItem::Comment(c) if c.trim_ascii() == b"ping" => {
                store.pings.fetch_add(1, Relaxed);
            }
            SseItem::Event(e) if e.kind == SseKind::Message => {
                if store.event_wire.load(Relaxed) == 0 {
                    store
                        .event_wire
                        .store(event_wire(e.id.len(), e.data.len()), Relaxed);
                    *store.first_event.lock().unwrap() = Some(event_chunk(e.id, e.data));
                }
                store.got(HARK, round_of(e.data).unwrap_or(usize::MAX), at);
            }
            _ => {}
        });
        if let Err(e) = fed {
            return store.end(HARK, format!("bad event stream: {e}"));
        }
        if dec.ended() {
            return store.end(HARK, "stream ended by hark".into());
        }
    }
}

/// Reads a floor connection exactly as [`read_stream`] reads a stream
/// (the floor writes a copy of hark's event chunk): each `event: message`
/// completes the connection's next round.
async fn read_floor(sock: TcpStream, store: Arc<Store>) {
    let mut dec = SseDecoder::default();
    let mut round = 0usize;
    loop {
        if let Err(e) = sock.readable().await {
            return store.end(FLOOR, e.to_string());
        }
        let mut buf = [0u8; 4096];
        let n = match sock.try_read(&mut buf) {
            Ok(0) => return store.end(FLOOR, "closed by the floor writer".into()),
            Ok(n) => n,
            Err(e) if e.kind() == stdio::ErrorKind::WouldBlock => continue,
            Err(e) => return store.end(FLOOR, e.to_string()),
        };
        let at = mono_ns();
        let fed = dec.feed(&buf[..n], &mut |item| {
            if let SseItem::Event(e) = item {
                if e.kind == SseKind::Message {
                    // The same parse as a stream's; the round is the count.
                    let _ = std::hint::black_box(round_of(e.data));
                    store.got(FLOOR, round, at);
                    round += 1;
                }
            }
        });
        if let Err(e) = fed {
            return store.end(FLOOR, format!("bad floor bytes: {e}"));
        }
    }
}

/// Aborts connection tasks and waits until they are gone (their sockets
/// closed).
async fn close_all(tasks: &mut Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks.iter() {
        t.abort();
    }
    for t in tasks.drain(..) {
        let _ = t.await;
    }
}

/// A client process: one current-thread runtime, one task per connection.
/// Commands on stdin, one reply line each on stdout:
///
/// - `open <count> <parallel> <timeout_ms> <port> <path>` → `opened <count>`
///   or `failed <opened> <error>`
/// - `floor <count> <parallel> <port>` → `connected <count>` or
///   `failed <connected> <error>`
/// - `collect <hark|floor> <round> <timeout_ms>` (waits until every live
///   connection of that kind has the round) → `got <live> <received>
///   <ended> <ns,ns,…|-> <last end reason>`
/// - `stats` → `stats <pings> <rss KiB> <streams live> <floor live>
///   <event wire bytes>`
/// - `sample` → `sample <hex of the first event chunk received | ->`
/// - `closefloor`, `close` → `ok`
fn client() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(client_loop())
}

async fn client_loop() -> Result<()> {
    let id: usize = env_num("BIG_CLIENT_ID", 0);
    let src = sources(env_num("BIG_SOURCES", 8));
    let store = Arc::new(Store::default());
    let mut tasks: [Vec<tokio::task::JoinHandle<()>>; 2] = [Vec::new(), Vec::new()];
    let mut next = id;
    // Commands arrive on a plain thread (tokio's stdin needs a feature
    // this crate does not enable); replies are short blocking writes.
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in stdio::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut out = stdio::stdout();
    while let Some(line) = commands.recv().await {
        let w: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| -> Result<u64> {
            w.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| err(format!("bad command {line:?}")))
        };
        let reply = match w[0] {
            "open" => {
                let (count, parallel) = (num(1)? as usize, num(2)? as usize);
                let timeout = Duration::from_millis(num(3)?);
                let dest = SocketAddr::from(([127, 0, 0, 1], num(4)? as u16));
                let path = w.get(5).copied().unwrap_or("/events");
                let (mut opened, mut failure) = (0usize, None);
                let src = &src;
                let mut opens = stream::iter(0..count)
                    .map(|i| {
                        let from = src[(next + i) % src.len()];
                        async move {
                            let r = tokio::time::timeout(timeout, open_stream(from, dest, path));
                            (from, r.await)
                        }
                    })
                    .buffer_unordered(parallel.max(1));
                while let Some((from, r)) = opens.next().await {
                    match r {
                        Ok(Ok((sock, dec))) => {
                            tasks[HARK].push(tokio::spawn(read_stream(sock, dec, store.clone())));
                            opened += 1;
                        }
                        Ok(Err(e)) => {
                            failure = Some(format!("from {from}: {e}"));
                            break;
                        }
                        Err(_) => {
                            failure = Some(format!(
                                "from {from}: no `ready` within {} s of connecting",
                                timeout.as_secs()
                            ));
                            break;
                        }
                    }
                }
                drop(opens);
                next += count;
                match failure {
                    None => format!("opened {opened}"),
                    Some(f) => format!("failed {opened} {f}"),
                }
            }
            "floor" => {
                let (count, parallel) = (num(1)? as usize, num(2)? as usize);
                let dest = SocketAddr::from(([127, 0, 0, 1], num(3)? as u16));
                store.rounds[FLOOR].lock().unwrap().clear();
                let (mut connected, mut failure) = (0usize, None);
                let src = &src;
                let mut conns = stream::iter(0..count)
                    .map(|i| {
                        let from = src[(next + i) % src.len()];
                        async move { (from, connect_from(from, dest).await) }
                    })
                    .buffer_unordered(parallel.max(1));
                while let Some((from, r)) = conns.next().await {
                    match r {
                        Ok(s) => {
                            tasks[FLOOR].push(tokio::spawn(read_floor(s, store.clone())));
                            connected += 1;
                        }
                        Err(e) => {
                            failure = Some(format!("from {from}: connect: {e}"));
                            break;
                        }
                    }
                }
                drop(conns);
                next += count;
                match failure {
                    None => format!("connected {connected}"),
                    Some(f) => format!("failed {connected} {f}"),
                }
            }
            "collect" => {
                let kind = if w.get(1) == Some(&"hark") {
                    HARK
                } else {
                    FLOOR
                };
                let round = num(2)? as usize;
                let deadline = tokio::time::Instant::now() + Duration::from_millis(num(3)?);
                let ended0 = store.ended[kind].load(Relaxed);
                let live = tasks[kind].len().saturating_sub(ended0);
                loop {
                    let got = store.rounds[kind]
                        .lock()
                        .unwrap()
                        .get(&round)
                        .map_or(0, Vec::len);
                    let ended = store.ended[kind].load(Relaxed) - ended0;
                    if got + ended >= live || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    // The collector's poll interval; receipts carry their
                    // own instants.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let ats = {
                    let mut m = store.rounds[kind].lock().unwrap();
                    let v = m.remove(&round).unwrap_or_default();
                    m.retain(|&r, _| r > round && r != usize::MAX);
                    v
                };
                let ended = store.ended[kind].load(Relaxed) - ended0;
                let list = if ats.is_empty() {
                    "-".to_string()
                } else {
                    ats.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
                };
                let why = store.last_end.lock().unwrap()[kind]
                    .clone()
                    .unwrap_or_default();
                format!("got {live} {} {ended} {list} {why}", ats.len())
            }
            "stats" => {
                let rss = proc_status_kib(std::process::id(), "VmRSS:").unwrap_or(0);
                format!(
                    "stats {} {rss} {} {} {}",
                    store.pings.load(Relaxed),
                    tasks[HARK].len() - store.ended[HARK].load(Relaxed),
                    tasks[FLOOR].len() - store.ended[FLOOR].load(Relaxed),
                    store.event_wire.load(Relaxed)
                )
            }
            "sample" => match store.first_event.lock().unwrap().as_deref() {
                Some(chunk) => format!("sample {}", to_hex(chunk)),
                None => "sample -".to_string(),
            },
            "closefloor" | "close" => {
                let kind = if w[0] == "close" { HARK } else { FLOOR };
                close_all(&mut tasks[kind]).await;
                store.ended[kind].store(0, Relaxed);
                store.rounds[kind].lock().unwrap().clear();
                "ok".to_string()
            }
            _ => format!("error unknown command {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// One client process, seen from here.
struct Client {
    _child: Child,
    to: ChildStdin,
    from: ChildLines,
    pid: u32,
}

/// The client processes.
struct Clients {
    list: Vec<Client>,
}

/// A client's part (`k` of `of`) of `total` connections.
fn share(total: usize, k: usize, of: usize) -> usize {
    total / of + usize::from(k < total % of)
}

/// A client's stats line.
#[derive(Default, Clone, Copy)]
struct Stats {
    pings: u64,
    rss_kib: u64,
    streams: usize,
    event_wire: usize,
}

impl Clients {
    async fn spawn(k: usize, sources: usize) -> Result<Clients> {
        let mut list = Vec::with_capacity(k);
        for id in 0..k {
            let mut child = tokio::process::Command::new(std::env::current_exe()?)
                .env(ROLE, "client")
                .env("BIG_CLIENT_ID", id.to_string())
                .env("BIG_SOURCES", sources.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let pid = child.id().ok_or_else(|| err("a client exited"))?;
            let to = child.stdin.take().ok_or_else(|| err("no stdin"))?;
            let from = BufReader::new(child.stdout.take().ok_or_else(|| err("no stdout"))?).lines();
            list.push(Client {
                _child: child,
                to,
                from,
                pid,
            });
        }
        Ok(Clients { list })
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    fn pids(&self) -> Vec<u32> {
        self.list.iter().map(|c| c.pid).collect()
    }

    /// Sends client `k` the line `line(k)`.
    async fn send(&mut self, line: impl Fn(usize) -> String) -> Result<()> {
        for (k, c) in self.list.iter_mut().enumerate() {
            c.to.write_all(format!("{}\n", line(k)).as_bytes()).await?;
            c.to.flush().await?;
        }
        Ok(())
    }

    /// One reply line from every client.
    async fn replies(&mut self) -> Result<Vec<String>> {
        let all = futures::future::join_all(
            self.list
                .iter_mut()
                .map(|c| async move { next_line(&mut c.from, "client").await }),
        )
        .await;
        all.into_iter().collect()
    }

    async fn ask(&mut self, line: impl Fn(usize) -> String) -> Result<Vec<String>> {
        self.send(line).await?;
        self.replies().await
    }

    async fn stats(&mut self) -> Result<Vec<Stats>> {
        let replies = self.ask(|_| "stats".into()).await?;
        replies
            .iter()
            .map(|l| {
                let v: Vec<u64> = l
                    .split(' ')
                    .skip(1)
                    .map(|x| x.parse().unwrap_or(0))
                    .collect();
                if v.len() < 5 {
                    return Err(err(format!("bad stats line {l:?}")));
                }
                Ok(Stats {
                    pings: v[0],
                    rss_kib: v[1],
                    streams: v[2] as usize,
                    event_wire: v[4] as usize,
                })
            })
            .collect()
    }

    /// Every client's `ok` to a command.
    async fn all_ok(&mut self, cmd: &str) -> Result<()> {
        for r in self.ask(|_| cmd.to_string()).await? {
            if r != "ok" {
                return Err(err(format!("client: {cmd}: {r}")));
            }
        }
        Ok(())
    }

    /// Opens the connections `from..to` (spread over the clients) with
    /// `cmd(count)`; the number open and the first failure.
    async fn open(
        &mut self,
        from: usize,
        to: usize,
        cmd: impl Fn(usize) -> String,
    ) -> Result<(usize, Option<String>)> {
        let of = self.len();
        let replies = self
            .ask(|k| cmd(share(to, k, of) - share(from, k, of)))
            .await?;
        let (mut open, mut failure) = (0, None);
        for r in replies {
            let mut w = r.splitn(3, ' ');
            let (verb, n) = (w.next().unwrap_or(""), w.next().unwrap_or("0"));
            open += n.parse::<usize>().unwrap_or(0);
            match verb {
                "opened" | "connected" => {}
                "failed" => {
                    failure.get_or_insert(w.next().unwrap_or("").to_string());
                }
                _ => return Err(err(format!("client: {r}"))),
            }
        }
        Ok((open, failure))
    }
}

/// Every client's `got` line for a round: (live, latencies, ended, early,
/// an end reason).
struct Gathered {
    live: usize,
    lat: Vec<Duration>,
    ended: usize,
    early: usize,
    why: Option<String>,
}

fn gather(replies: &[String], t0_ns: u64) -> Result<Gathered> {
    let mut g = Gathered {
        live: 0,
        lat: Vec::new(),
        ended: 0,
        early: 0,
        why: None,
    };
    for r in replies {
        let w: Vec<&str> = r.splitn(6, ' ').collect();
        if w.len() < 5 || w[0] != "got" {
            return Err(err(format!("client: {r}")));
        }
        g.live += w[1].parse::<usize>()?;
        let ended: usize = w[3].parse()?;
        g.ended += ended;
        if w[4] != "-" {
            for v in w[4].split(',') {
                let at: u64 = v.parse()?;
                if at < t0_ns {
                    g.early += 1;
                }
                g.lat.push(Duration::from_nanos(at.saturating_sub(t0_ns)));
            }
        }
        if ended > 0 {
            if let Some(why) = w.get(5).filter(|s| !s.is_empty()) {
                g.why.get_or_insert(why.to_string());
            }
        }
    }
    g.lat.sort_unstable();
    Ok(g)
}

// ---- the writer -----------------------------------------------------------------

type WriteJob = (String, tokio::sync::oneshot::Sender<Result<Instant>>);

/// The writer of the rounds' messages: a thread of its own at SCHED_FIFO
/// ([`writer_thread`], as `common::Writer`), and its PostgreSQL backend
/// made SCHED_FIFO too. With a dozen client processes, hark and the
/// committing backend on two cores, the backend signals hark's LISTEN
/// backend at commit and can then wait its turn for tens of milliseconds
/// before it answers the COMMIT: streams had the message before the clock
/// started. At real-time priority it answers at once; it runs only for
/// the INSERT and COMMIT of each round.
struct RtWriter {
    tx: tokio::sync::mpsc::UnboundedSender<WriteJob>,
    /// (the thread, its backend) got SCHED_FIFO.
    realtime: (bool, bool),
}

impl RtWriter {
    async fn start(db: &str, room: i64, sender: i64) -> Result<RtWriter> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<WriteJob>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(bool, bool)>>();
        let db = db.to_string();
        writer_thread("streams-100k-writer", move |thread_rt| async move {
            let mut client = match connect_db(&db).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let backend_rt = match client.query_one("SELECT pg_backend_pid()", &[]).await {
                Ok(row) => {
                    let pid: i32 = row.get(0);
                    let param = libc::sched_param { sched_priority: 10 };
                    // SAFETY: sets the scheduling policy of the process
                    // `pid` (this connection's backend); reads `param` only.
                    unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) == 0 }
                }
                Err(_) => false,
            };
            let _ = ready_tx.send(Ok((thread_rt, backend_rt)));
            while let Some((content, reply)) = rx.recv().await {
                let r = async {
                    let tx = client.transaction().await?;
                    let rows = tx.execute(INSERT_SQL, &[&room, &sender, &content]).await?;
                    tx.commit().await?;
                    let at = Instant::now();
                    if rows != 1 {
                        return Err(err(format!("the INSERT changed {rows} rows")));
                    }
                    Ok::<Instant, BoxError>(at)
                }
                .await;
                let _ = reply.send(r);
            }
        })?;
        let realtime = ready_rx
            .await
            .map_err(|_| err("the writer thread died"))??;
        Ok(RtWriter { tx, realtime })
    }

    /// Inserts one message in its own transaction; the instant COMMIT
    /// returned.
    async fn insert(&self, content: String) -> Result<Instant> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((content, reply))
            .map_err(|_| err("the writer thread is gone"))?;
        rx.await.map_err(|_| err("the writer thread is gone"))?
    }
}

// ---- CPU ----------------------------------------------------------------------

/// CPU used so far by hark, the load generator (this process and its
/// clients), the floor writer and PostgreSQL (the rest of this process's
/// descendants), and the machine.
#[derive(Clone, Copy)]
struct Snap {
    at: Instant,
    hark: Duration,
    generator: Duration,
    writer: Duration,
    pg: Duration,
    machine: (u64, u64),
}

/// CPU between two [`Snap`]s, in ms.
#[derive(Clone, Copy, Default)]
struct Cpu {
    secs: f64,
    hark: f64,
    generator: f64,
    writer: f64,
    pg: f64,
    /// Everything else on the machine (other people's work).
    other: f64,
}

impl Snap {
    fn take(hark: u32, clients: &[u32], floor: Option<u32>) -> Snap {
        let me = std::process::id();
        let cpu = |p: u32| cpu_time_of(p).unwrap_or_default();
        let mut exclude = clients.to_vec();
        exclude.push(hark);
        exclude.extend(floor);
        Snap {
            at: Instant::now(),
            hark: cpu(hark),
            generator: cpu(me) + clients.iter().map(|&p| cpu(p)).sum::<Duration>(),
            writer: floor.map(cpu).unwrap_or_default(),
            pg: descendants_cpu(me, &exclude),
            machine: machine_jiffies(),
        }
    }

    fn since(&self, a: &Snap) -> Cpu {
        let secs = self.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let ms = |x: Duration, y: Duration| x.saturating_sub(y).as_secs_f64() * 1000.0;
        let machine = machine_busy_pct(a.machine, self.machine) * cores() as f64 * secs * 10.0;
        let c = Cpu {
            secs,
            hark: ms(self.hark, a.hark),
            generator: ms(self.generator, a.generator),
            writer: ms(self.writer, a.writer),
            pg: ms(self.pg, a.pg),
            other: 0.0,
        };
        Cpu {
            other: (machine - c.hark - c.generator - c.writer - c.pg).max(0.0),
            ..c
        }
    }
}

// ---- the run --------------------------------------------------------------------

struct Settings {
    sizes: Vec<usize>,
    pairs: usize,
    gap: Duration,
    idle: Duration,
    parallel: usize,
    open_timeout: Duration,
    round_timeout: Duration,
    sources: usize,
    per_client: usize,
    clients: usize,
    floor: bool,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let mut sizes: Vec<usize> = std::env::var("BIG_SIZES")
            .unwrap_or_else(|_| "10000,25000,50000,100000".into())
            .split(',')
            .map(|v| v.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| err(format!("BIG_SIZES: {e}")))?;
        sizes.retain(|&n| n > 0);
        sizes.sort_unstable();
        sizes.dedup();
        let max = *sizes.last().ok_or_else(|| err("BIG_SIZES is empty"))?;
        let (soft, open) = fd_usage(std::process::id())?;
        // A client holds hark's streams and the floor's connections.
        let room = soft.saturating_sub(open + 64) as usize;
        let per_client = env_num("BIG_PER_CLIENT", 16_000usize).min(room).max(1);
        let need = (2 * max).div_ceil(per_client).max(2);
        Ok(Settings {
            sizes,
            pairs: env_num("BIG_PAIRS", 5usize).max(1),
            gap: Duration::from_millis(env_num("BIG_GAP_MS", 500)),
            idle: Duration::from_secs(env_num("BIG_IDLE_S", 15)),
            parallel: env_num("BIG_PARALLEL", 128usize).max(1),
            open_timeout: Duration::from_secs(env_num("BIG_OPEN_TIMEOUT_S", 30)),
            round_timeout: Duration::from_secs(env_num("BIG_ROUND_TIMEOUT_S", 60)),
            sources: env_num("BIG_SOURCES", 8usize).clamp(1, 250),
            per_client,
            clients: env_num("BIG_CLIENTS", need).max(1),
            floor: env_num("BIG_FLOOR", 1) != 0,
        })
    }
}

/// Everything a round needs.
struct Ctx<'a> {
    s: &'a Settings,
    hark: &'a Hark,
    mc: MetricsClient,
    clients: Clients,
    writer: RtWriter,
    clock: Clock,
    /// The next hark round's number (unique over the run).
    next_round: usize,
}

/// One round's result.
struct Round {
    lat: Vec<Duration>,
    expected: usize,
    ended: usize,
    early: usize,
    why: Option<String>,
    cpu: Cpu,
    catchups: f64,
    cold: f64,
}

impl Round {
    fn complete(&self) -> bool {
        self.lat.len() == self.expected && self.ended == 0
    }

    fn problem(&self, what: &str, timeout: Duration) -> String {
        format!(
            "{what}: {} of {} connections received it within {} s, {} ended{}",
            self.lat.len(),
            self.expected,
            timeout.as_secs(),
            self.ended,
            self.why
                .as_deref()
                .map(|w| format!(" (last: {w})"))
                .unwrap_or_default()
        )
    }
}

impl Ctx<'_> {
    fn snap(&self, floor: Option<&Floor>) -> Snap {
        Snap::take(self.hark.pid, &self.clients.pids(), floor.map(|f| f.pid))
    }

    /// One INSERT fanned out to `expected` streams. `metrics`: check
    /// hark's count of open streams first and count its catch-ups and cold
    /// reads (false when /metrics cannot be reached: hark out of
    /// descriptors).
    async fn hark_round(
        &mut self,
        expected: usize,
        floor: Option<&Floor>,
        metrics: bool,
    ) -> Result<Round> {
        let g = self.next_round;
        self.next_round += 1;
        let mut before = HashMap::new();
        if metrics {
            let open = self.mc.get("hark_open_streams").await?;
            if open as usize != expected {
                return Err(err(format!(
                    "before round {g}: hark counts {open} open streams, not {expected}"
                )));
            }
            before = self.mc.scrape().await?;
        }
        let c0 = self.snap(floor);
        let limit_ms = self.s.round_timeout.as_millis();
        self.clients
            .send(|_| format!("collect hark {g} {limit_ms}"))
            .await?;
        let t0 = self
            .writer
            .insert(format!("streams_100k round {g}"))
            .await?;
        let replies = tokio::time::timeout(
            self.s.round_timeout + Duration::from_secs(30),
            self.clients.replies(),
        )
        .await
        .map_err(|_| err("the clients did not answer"))??;
        let cpu = self.snap(floor).since(&c0);
        let after = if metrics {
            self.mc.scrape().await?
        } else {
            HashMap::new()
        };
        let got = gather(&replies, self.clock.ns(t0))?;
        Ok(Round {
            lat: got.lat,
            expected,
            ended: got.ended,
            early: got.early,
            why: got.why,
            cpu,
            catchups: delta(&before, &after, "hark_catchup_queries_total"),
            cold: delta(&before, &after, "hark_cold_queries_total"),
        })
    }

    async fn floor_round(&mut self, floor: &mut Floor, round: usize, n: usize) -> Result<Round> {
        let c0 = self.snap(Some(floor));
        let limit_ms = self.s.round_timeout.as_millis();
        self.clients
            .send(|_| format!("collect floor {round} {limit_ms}"))
            .await?;
        let t0 = mono_ns();
        floor.go().await?;
        let replies = tokio::time::timeout(
            self.s.round_timeout + Duration::from_secs(30),
            self.clients.replies(),
        )
        .await
        .map_err(|_| err("the clients did not answer"))??;
        floor.done().await?;
        let cpu = self.snap(Some(floor)).since(&c0);
        let g = gather(&replies, t0)?;
        Ok(Round {
            lat: g.lat,
            expected: n,
            ended: g.ended,
            early: g.early,
            why: g.why,
            cpu,
            catchups: 0.0,
            cold: 0.0,
        })
    }
}

/// What broke, where.
struct Broke {
    size: usize,
    open: usize,
    what: String,
}

/// A size's memory and opening figures.
struct StepRow {
    cells: Vec<String>,
}

/// A size's fan-out: pooled measured rounds.
struct FanStep {
    n: usize,
    bytes: usize,
    hark: Vec<Duration>,
    floor: Vec<Duration>,
    pairs: Vec<f64>,
    hark_cpu: Vec<f64>,
    writer_cpu: Vec<f64>,
    other: Vec<f64>,
    /// hark rounds left out: some stream had the message before COMMIT
    /// returned to the writer.
    excluded: usize,
    /// Generator CPU per round (ms): hark's rounds, the floor's.
    gen_cpu: [Vec<f64>; 2],
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn round_row(n: usize, label: &str, sys: &str, r: &Round) -> Vec<String> {
    let k = r.lat.len();
    let q = |p: f64| {
        if k == 0 {
            "-".into()
        } else {
            ms(pct(&r.lat, p))
        }
    };
    vec![
        n.to_string(),
        label.to_string(),
        sys.to_string(),
        format!("{k}/{}", r.expected),
        q(50.0),
        q(99.0),
        q(100.0),
        format!("{:.0}", r.cpu.hark),
        format!("{:.0}", r.cpu.writer),
        format!("{:.0}", r.cpu.generator),
        format!("{:.0}", r.cpu.pg),
        format!("{:.0}", r.cpu.other),
        if sys == "hark" {
            format!("{}/{}", r.catchups, r.cold)
        } else {
            "-".into()
        },
        format!("{}/{}", r.ended, r.early),
    ]
}

/// hark's log: its WARN and ERROR lines, counted by text (time stripped).
fn log_summary(path: &PathBuf) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts: Vec<(String, usize)> = Vec::new();
    for line in text.lines() {
        if !(line.contains(" WARN ") || line.contains(" ERROR ")) {
            continue;
        }
        let body = line.split_once(' ').map_or(line, |(_, b)| b).trim();
        match counts.iter_mut().find(|(t, _)| t == body) {
            Some((_, c)) => *c += 1,
            None => counts.push((body.to_string(), 1)),
        }
    }
    counts
        .into_iter()
        .map(|(t, c)| format!("{c} × {t}"))
        .collect()
}

/// hark's state when something broke.
async fn diagnose(ctx: &mut Ctx<'_>, overflows0: u64, log: &PathBuf) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok((soft, open)) = fd_usage(ctx.hark.pid) {
        out.push(format!(
            "hark descriptors: {open} open of its limit {soft} (RLIMIT_NOFILE soft)"
        ));
    }
    match tokio::time::timeout(Duration::from_secs(5), ctx.mc.scrape()).await {
        Ok(Ok(m)) => {
            let g = |k: &str| m.get(k).copied().unwrap_or(0.0);
            out.push(format!(
                "hark /metrics: open connections {}, open streams {}, rejected connections {}, streams over quota {}",
                g("hark_open_connections"),
                g("hark_open_streams"),
                g("hark_rejected_connections_total"),
                g("hark_streams_over_quota_total")
            ));
        }
        Ok(Err(e)) => out.push(format!("hark /metrics: {e}")),
        Err(_) => out.push("hark /metrics: no answer within 5 s".into()),
    }
    let ss = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", ctx.hark.addr.port())])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out.push(format!(
        "hark's listening socket (ss -ltn: state, accept queue now, its length): {ss}"
    ));
    out.push(format!(
        "ListenOverflows since the start: {}",
        listen_overflows() - overflows0
    ));
    out.push(format!("kernel: {}", tcp_sockstat()));
    let log = log_summary(log);
    if log.is_empty() {
        out.push("hark's log: no WARN or ERROR line".into());
    } else {
        out.push("hark's log (WARN and ERROR lines, counted):".into());
        out.extend(log.into_iter().take(8).map(|l| format!("  {l}")));
    }
    out
}

async fn run(fds: FdLimit) -> Result<()> {
    let s = Settings::from_env()?;
    let max = *s.sizes.last().unwrap();
    match &fds.refused {
        None if fds.after > fds.before => println!(
            "file descriptors: hard RLIMIT_NOFILE raised from {} to {} (inherited by hark, PostgreSQL, the floor writer and the clients)",
            fds.before, fds.after
        ),
        None => println!("file descriptors: hard RLIMIT_NOFILE {}", fds.after),
        Some(e) => println!(
            "file descriptors: raising the hard RLIMIT_NOFILE from {} to {} was refused ({e}: no CAP_SYS_RESOURCE); every process here keeps {}",
            fds.before, fds.wanted, fds.after
        ),
    }
    let range: Vec<u64> = read_file("/proc/sys/net/ipv4/ip_local_port_range")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let ports = match range[..] {
        [lo, hi] if hi >= lo => hi - lo + 1,
        _ => 0,
    };
    println!(
        "ports: ip_local_port_range {range:?} ({ports} per source address and destination) × {} source addresses 127.0.0.2–127.0.0.{} = {} connections per destination; somaxconn {}",
        s.sources,
        s.sources + 1,
        ports * s.sources as u64,
        read_file("/proc/sys/net/core/somaxconn").trim()
    );
    println!(
        "load generator: {} client processes, each under {} connections; sizes {:?}; {} pairs of rounds per size",
        s.clients, s.per_client, s.sizes, s.pairs
    );
    if share(2 * max, 0, s.clients) > s.per_client {
        return Err(err(format!(
            "{} clients cannot hold {} connections at {} each: raise BIG_CLIENTS",
            s.clients,
            2 * max,
            s.per_client
        )));
    }
    let pg = Pg::start(&[]).await?;
    let result = async {
        let max_conns = env_num("BIG_MAX_CONNECTIONS", (max + 10_000).min(1_000_000)).to_string();
        let ping = std::env::var("BIG_PING_MS").ok();
        let mut env = vec![("HARK_MAX_CONNECTIONS", max_conns.as_str())];
        if let Some(p) = &ping {
            env.push(("HARK_PING_INTERVAL_MS", p.as_str()));
        }
        let mut hark = start_hark(&pg.conn, "streams_100k", &env).await?;
        let r = ramp(&hark, &pg.conn, &s, &max_conns).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

async fn ramp(hark: &Hark, db: &str, s: &Settings, max_conns: &str) -> Result<()> {
    let log = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "target/bench-logs/streams_100k-hark-{}.log",
        std::process::id()
    ));
    let fx = Fixture::new(db).await;
    let reader = fx.user("reader").await;
    let writer_user = fx.user("writer").await;
    let room = fx.room("streams-100k", &[reader, writer_user]).await;
    let path = events_path(&[room], &token(reader));
    let (hark_soft, hark_open) = fd_usage(hark.pid)?;
    println!(
        "hark: HARK_MAX_CONNECTIONS {max_conns}; RLIMIT_NOFILE {hark_soft} with {hark_open} descriptors open at start: room for about {} connections",
        hark_soft.saturating_sub(hark_open)
    );
    let mut ctx = Ctx {
        s,
        hark,
        mc: MetricsClient::new(hark.addr),
        clients: Clients::spawn(s.clients, s.sources).await?,
        writer: RtWriter::start(db, room, writer_user).await?,
        clock: Clock::new(),
        next_round: 0,
    };
    match ctx.writer.realtime {
        (true, true) => {}
        (thread, backend) => println!(
            "note: SCHED_FIFO for the writer thread {}, for its PostgreSQL backend {}",
            if thread { "granted" } else { "refused" },
            if backend { "granted" } else { "refused" }
        ),
    }
    let port = hark.addr.port();
    let of = ctx.clients.len();
    let per = s.parallel.div_ceil(of).max(1);
    let open_ms = s.open_timeout.as_millis();
    let open_cmd = |c: usize| format!("open {c} {per} {open_ms} {port} {path}");

    // Warm-up: caches, the pool, the room in the hub; then idle.
    let warm = 400.min(s.sizes[0]);
    let (opened, failure) = ctx.clients.open(0, warm, open_cmd).await?;
    if let Some(f) = failure {
        return Err(err(format!(
            "warm-up: {f} ({opened} of {warm} streams open)"
        )));
    }
    ctx.clients.all_ok("close").await?;
    ctx.mc
        .wait_until("hark_open_streams", Duration::from_secs(60), |v| v <= 0.0)
        .await?;
    ctx.mc
        .wait_until("hark_open_connections", Duration::from_secs(60), |v| {
            v <= 1.0
        })
        .await?;
    let idle = rss_median(hark).await?;
    let gen0: u64 = ctx
        .clients
        .stats()
        .await?
        .iter()
        .map(|s| s.rss_kib)
        .sum::<u64>()
        + proc_status_kib(std::process::id(), "VmRSS:")?;
    println!(
        "hark idle RSS after a warm-up of {warm} streams: {} MiB; load generator {} MiB",
        mib(idle),
        mib(gen0 * 1024)
    );

    let overflows0 = listen_overflows();
    let mut step_rows: Vec<StepRow> = Vec::new();
    let mut fans: Vec<FanStep> = Vec::new();
    let mut rounds: Vec<Vec<String>> = Vec::new();
    let mut broke: Option<Broke> = None;
    let mut open = 0usize;
    let mut rss_prev = idle;
    for &n in &s.sizes {
        // 1. Open the new streams.
        let slab0 = meminfo_kib("Slab:");
        let ov0 = listen_overflows();
        let t = Instant::now();
        let (opened, failure) = ctx.clients.open(open, n, open_cmd).await?;
        let open_s = t.elapsed().as_secs_f64();
        if let Some(f) = failure {
            broke = Some(Broke {
                size: n,
                open: open + opened,
                what: format!(
                    "opening stream {} (of {n}): {f}; {:.1} s after this size's first open",
                    open + opened + 1,
                    open_s
                ),
            });
            break;
        }
        let new = n - open;
        open = n;
        if let Err(e) = ctx
            .mc
            .wait_until("hark_open_streams", Duration::from_secs(60), |v| {
                v >= n as f64
            })
            .await
        {
            broke = Some(Broke {
                size: n,
                open,
                what: format!("hark does not count every stream open: {e}"),
            });
            break;
        }
        let rss = rss_median(hark).await?;
        let (hsoft, hfds) = fd_usage(hark.pid)?;
        let st = ctx.clients.stats().await?;
        let gen: u64 = st.iter().map(|s| s.rss_kib).sum::<u64>()
            + proc_status_kib(std::process::id(), "VmRSS:")?;
        let slab = meminfo_kib("Slab:") as f64 - slab0 as f64;
        let sockstat = tcp_sockstat();
        println!(
            "{n} streams: {new} opened in {open_s:.1} s ({:.0}/s); hark RSS {} MiB ({} KiB/stream vs idle), {} threads, {hfds} of {hsoft} fds; load generator {} MiB; Slab {:+.0} MiB; {sockstat}",
            new as f64 / open_s,
            mib(rss),
            kib((rss as f64 - idle as f64) / n as f64),
            hark.threads()?,
            mib(gen * 1024),
            slab / 1024.0,
        );

        // 2. Idle: the pings' CPU.
        let mut idle_cells = vec!["-".to_string(), "-".to_string()];
        if !s.idle.is_zero() {
            let p0: u64 = st.iter().map(|s| s.pings).sum();
            let c0 = ctx.snap(None);
            // A measurement window, not a wait.
            tokio::time::sleep(s.idle).await;
            let cpu = ctx.snap(None).since(&c0);
            let p1: u64 = ctx.clients.stats().await?.iter().map(|s| s.pings).sum();
            let pings = p1 - p0;
            idle_cells = vec![
                format!("{:.1}", cpu.hark / cpu.secs / 10.0),
                format!("{:.0}", pings as f64 / cpu.secs),
            ];
            println!(
                "  idle {:.1} s: hark {:.0} ms CPU ({:.1}% of a core), {pings} pings ({:.1} µs of hark CPU each); other work on the machine {:.0}% of a core",
                cpu.secs,
                cpu.hark,
                cpu.hark / cpu.secs / 10.0,
                if pings > 0 { cpu.hark * 1000.0 / pings as f64 } else { 0.0 },
                cpu.other / cpu.secs / 10.0
            );
        }
        step_rows.push(StepRow {
            cells: [
                vec![
                    n.to_string(),
                    format!("{open_s:.1}"),
                    format!("{:.0}", new as f64 / open_s),
                    mib(rss),
                    kib((rss as f64 - idle as f64) / n as f64),
                    kib((rss as f64 - rss_prev as f64) / new as f64),
                    format!("{hfds}/{hsoft}"),
                    mib(gen * 1024),
                    kib((gen as f64 - gen0 as f64) * 1024.0 / n as f64),
                    kib(slab * 1024.0 / new as f64),
                    (listen_overflows() - ov0).to_string(),
                ],
                idle_cells,
            ]
            .concat(),
        });

        // 3. The fan-out: hark's warm-up round, then the floor's, then
        // pairs.
        let warm = ctx.hark_round(n, None, true).await?;
        rounds.push(round_row(n, "warm-up", "hark", &warm));
        if !warm.complete() {
            broke = Some(Broke {
                size: n,
                open,
                what: warm.problem("hark's warm-up round", s.round_timeout),
            });
            break;
        }
        let wire = ctx
            .clients
            .stats()
            .await?
            .iter()
            .map(|s| s.event_wire)
            .max()
            .unwrap_or(0);
        let payload = ctx
            .clients
            .ask(|_| "sample".into())
            .await?
            .iter()
            .find_map(|l| from_hex(l.strip_prefix("sample ")?))
            .ok_or_else(|| err("no client kept hark's event"))?;
        if payload.len() != wire {
            return Err(err(format!(
                "the event chunk kept is {} bytes, the wire size {wire}",
                payload.len()
            )));
        }
        let bytes = payload.len();
        let mut fan = FanStep {
            n,
            bytes,
            hark: Vec::new(),
            floor: Vec::new(),
            pairs: Vec::new(),
            hark_cpu: Vec::new(),
            writer_cpu: Vec::new(),
            other: Vec::new(),
            excluded: 0,
            gen_cpu: [Vec::new(), Vec::new()],
        };
        let mut floor = None;
        if s.floor {
            let mut f = Floor::spawn(n, &payload).await?;
            let fport = f.port;
            let (connected, failure) = ctx
                .clients
                .open(0, n, |c| format!("floor {c} {per} {fport}"))
                .await?;
            let ready = match failure {
                Some(e) => Err(err(e)),
                None => f.ready().await,
            };
            if let Err(e) = ready {
                println!("  floor at {n}: {e} ({connected} connected); no floor at this size");
                ctx.clients.all_ok("closefloor").await?;
                f.stop().await;
            } else {
                let r = ctx.floor_round(&mut f, 0, n).await?;
                rounds.push(round_row(n, "warm-up", "floor", &r));
                floor = Some(f);
            }
        }
        let mut failed = None;
        'pairs: for p in 0..s.pairs {
            let mut p99 = [None, None];
            let order = if p % 2 == 0 {
                [FLOOR, HARK]
            } else {
                [HARK, FLOOR]
            };
            for sys in order {
                if sys == FLOOR && floor.is_none() {
                    continue;
                }
                // Pacing: rounds BIG_GAP_MS apart.
                tokio::time::sleep(s.gap).await;
                let r = if sys == HARK {
                    ctx.hark_round(n, floor.as_ref(), true).await?
                } else {
                    let f = floor.as_mut().unwrap();
                    ctx.floor_round(f, p + 1, n).await?
                };
                let name = if sys == HARK { "hark" } else { "floor" };
                rounds.push(round_row(n, &(p + 1).to_string(), name, &r));
                if !r.complete() {
                    failed = Some(
                        r.problem(&format!("{name} round of pair {}", p + 1), s.round_timeout),
                    );
                    break 'pairs;
                }
                if r.early > 0 {
                    // PostgreSQL answered the writer's COMMIT after
                    // streams had the message: the clock started late.
                    fan.excluded += 1;
                    continue;
                }
                p99[sys] = Some(pct(&r.lat, 99.0));
                if sys == HARK {
                    fan.hark.extend_from_slice(&r.lat);
                    fan.hark_cpu.push(r.cpu.hark);
                } else {
                    fan.floor.extend_from_slice(&r.lat);
                    fan.writer_cpu.push(r.cpu.writer);
                }
                fan.other.push(r.cpu.other / r.cpu.secs / 10.0);
                fan.gen_cpu[sys].push(r.cpu.generator);
            }
            if let [Some(h), Some(f)] = p99 {
                fan.pairs.push(h.as_secs_f64() / f.as_secs_f64().max(1e-9));
            }
        }
        if let Some(f) = floor.take() {
            ctx.clients.all_ok("closefloor").await?;
            f.stop().await;
        }
        fan.hark.sort_unstable();
        fan.floor.sort_unstable();
        fans.push(fan);
        rss_prev = rss_median(hark).await?;
        if let Some(what) = failed {
            broke = Some(Broke {
                size: n,
                open,
                what,
            });
            break;
        }
    }

    // What broke, and whether the streams still open are served.
    if let Some(b) = &broke {
        let diag = diagnose(&mut ctx, overflows0, &log).await;
        let live: usize = ctx.clients.stats().await?.iter().map(|s| s.streams).sum();
        let counted =
            match tokio::time::timeout(Duration::from_secs(5), ctx.mc.get("hark_open_streams"))
                .await
            {
                Ok(Ok(v)) => format!("hark counts {v} open streams"),
                Ok(Err(e)) => format!("hark's count of open streams: {e}"),
                Err(_) => "hark's count of open streams: no answer from /metrics".into(),
            };
        let rss = rss_median(hark).await?;
        let memory = format!(
            "hark RSS with {live} streams open: {} MiB ({} KiB per stream vs idle)",
            mib(rss),
            kib((rss as f64 - idle as f64) / live.max(1) as f64)
        );
        // Whether the streams already open are still served: one more
        // round, without /metrics (a new connection may not get in).
        let after_break = match ctx.hark_round(live, None, false).await {
            Ok(r) => {
                rounds.push(round_row(live, "after the break", "hark", &r));
                format!(
                    "{counted}, the clients {live}; one more round to those: {} received it, {} ended (p99 {} ms)",
                    r.lat.len(),
                    r.ended,
                    if r.lat.is_empty() {
                        "-".into()
                    } else {
                        ms(pct(&r.lat, 99.0))
                    }
                )
            }
            Err(e) => format!("{counted}, the clients {live}; one more round to those: {e}"),
        };
        println!(
            "\nBROKE at size {}: {} streams open; {}",
            b.size, b.open, b.what
        );
        for d in &diag {
            println!("  {d}");
        }
        println!("  {memory}");
        println!("  {after_break}");
    }

    // Close everything.
    let t = Instant::now();
    ctx.clients.all_ok("close").await?;
    let closed = ctx
        .mc
        .wait_until("hark_open_streams", Duration::from_secs(300), |v| v <= 0.0)
        .await;
    let close_s = t.elapsed().as_secs_f64();
    let rss_closed = rss_median(hark).await?;
    match closed {
        Ok(_) => println!(
            "closed every stream: hark counted 0 after {close_s:.1} s; RSS {} MiB",
            mib(rss_closed)
        ),
        Err(e) => println!("closing: {e}"),
    }

    println!();
    println!(
        "Idle streams: opening and memory (hark VmRSS median of 5; KiB per stream against hark's idle RSS {} MiB, and for this size's new streams against the RSS after the size before; load generator = this process and its clients; Slab = the kernel's, machine-wide, per new stream, both ends)",
        mib(idle)
    );
    table(
        &[
            "streams",
            "open s",
            "opened/s",
            "hark RSS MiB",
            "KiB/stream",
            "KiB/new stream",
            "hark fds/limit",
            "generator MiB",
            "generator KiB/stream",
            "Slab KiB/new stream",
            "ListenOverflows",
            "idle hark CPU %",
            "pings/s",
        ],
        &step_rows
            .iter()
            .map(|r| r.cells.clone())
            .collect::<Vec<_>>(),
    );
    println!();
    println!("Rounds (latency ms: hark from COMMIT returned, the floor from `go`, to the bytes read; CPU ms over the round; catch-ups/cold reads; ended/early)");
    table(
        &[
            "streams",
            "pair",
            "system",
            "received",
            "p50",
            "p99",
            "max",
            "hark CPU",
            "writer CPU",
            "generator CPU",
            "PG CPU",
            "other CPU",
            "catch-ups/cold",
            "ended/early",
        ],
        &rounds,
    );
    println!();
    println!(
        "Fan-out of one message to every stream, pooled over the measured rounds (ms); floor = the same number of connections, one write of a copy of hark's event chunk to each, read and decoded the same way; ratio = hark / floor"
    );
    let mut fan_rows = Vec::new();
    for f in &fans {
        let q = |v: &[Duration], p: f64| {
            if v.is_empty() {
                "-".to_string()
            } else {
                ms(pct(v, p))
            }
        };
        let mut pairs = f.pairs.clone();
        pairs.sort_by(f64::total_cmp);
        let ratio = if f.hark.is_empty() || f.floor.is_empty() {
            "-".into()
        } else {
            format!(
                "{:.2}",
                pct(&f.hark, 99.0).as_secs_f64() / pct(&f.floor, 99.0).as_secs_f64().max(1e-9)
            )
        };
        fan_rows.push(vec![
            f.n.to_string(),
            f.bytes.to_string(),
            if f.excluded > 0 {
                format!("{} ({} left out)", f.hark.len() / f.n.max(1), f.excluded)
            } else {
                format!("{}", f.hark.len() / f.n.max(1))
            },
            q(&f.hark, 50.0),
            q(&f.hark, 99.0),
            q(&f.hark, 100.0),
            q(&f.floor, 50.0),
            q(&f.floor, 99.0),
            q(&f.floor, 100.0),
            ratio,
            if pairs.is_empty() {
                "-".into()
            } else {
                format!(
                    "{:.2} ({:.2}–{:.2})",
                    pairs[pairs.len() / 2],
                    pairs[0],
                    pairs[pairs.len() - 1]
                )
            },
            format!("{:.0}", mean(&f.hark_cpu)),
            format!("{:.0}", mean(&f.writer_cpu)),
            format!(
                "{:.0} / {:.0}",
                mean(&f.gen_cpu[HARK]),
                mean(&f.gen_cpu[FLOOR])
            ),
            format!("{:.0}", mean(&f.other)),
        ]);
    }
    table(
        &[
            "streams",
            "event bytes",
            "hark rounds",
            "hark p50",
            "hark p99",
            "hark max",
            "floor p50",
            "floor p99",
            "floor max",
            "p99 ratio",
            "per-pair p99 ratio: median (range)",
            "hark CPU ms/round",
            "floor writer CPU ms/round",
            "generator CPU ms/round: hark / floor",
            "other CPU % of a core",
        ],
        &fan_rows,
    );
    println!(
        "(a hark round in which some stream had the message before COMMIT returned to the writer is left out of the pooled figures and its pair: PostgreSQL's answer to the writer came late, so the clock started late)"
    );
    match broke {
        None => {
            println!(
                "\nnothing broke up to {} streams",
                s.sizes.last().copied().unwrap_or(0)
            );
            Ok(())
        }
        Some(b) => {
            println!(
                "\nwhat broke first: at size {}, with {} streams open: {}",
                b.size, b.open, b.what
            );
            Err(err(format!(
                "broke at {} streams open (size {})",
                b.open, b.size
            )))
        }
    }
}
