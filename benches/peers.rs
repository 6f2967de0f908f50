//! Peers: hark against Nchan (nginx's pub/sub module) and against the
//! machine's floor, on this machine, in one sitting, alternating.
//!
//!     cargo bench --bench peers
//!
//! One command from a fresh clone. Besides what every benchmark here
//! needs (the PostgreSQL server binaries), it installs Nchan into a
//! private prefix: `apt-get download nginx libnginx-mod-nchan` (Debian's
//! packages; as root, when the download fails, it runs `apt-get update`
//! once and tries again) and `dpkg-deb -x` of both into
//! `target/peers/nchan/`. Nothing is installed system-wide and no system
//! nginx is used or started; later runs reuse the prefix (delete
//! `target/peers/` to download again). `benches/peers/nginx.conf` is the
//! configuration (in memory, one worker per core, a publisher, long-poll
//! and EventSource subscribers); each nginx runs under
//! `target/peers/run/` with `-p <dir> -c <dir>/nginx.conf -g 'daemon off;'`.
//!
//! The three systems, each sent one message per round (about as long as
//! a chat line; the floor writes 512 bytes per long poll, about hark's
//! whole answer, and 227 per stream, hark's event chunk):
//!
//! - **hark**: the release binary on a private PostgreSQL, as in the other
//!   benchmarks. A change is an INSERT committed by a writer on its own
//!   thread; the clock starts when COMMIT returns.
//! - **Nchan**: nginx 1.22 with Nchan 1.3 from Debian, `worker_processes`
//!   one per core. A change is `POST /pub?id=<channel>` from a publisher
//!   on its own thread; the clock starts just before the POST is written.
//! - **floor**: a second process (this binary, `PEERS_ROLE=floor`) that
//!   writes one buffer to each of N loopback connections from one plain
//!   thread per core, as in `send_floor`: the `write` calls no server can
//!   avoid. The clock starts when it is told to go. For the hot path the
//!   floor is a bare hyper server answering a fixed body (hark's answer),
//!   as `hot_path`'s ceiling.
//!
//! Every receiver is the same kind of load generator (a tokio task per
//! connection on this process's runtime) and stamps the instant a
//! message's bytes are complete.
//!
//! The measurements (`PEERS_PARTS`):
//!
//! - `lp`: fan-out to N waiting long polls (`PEERS_SIZES`). Each round
//!   starts once all N are waiting (hark's `hark_waiting_polls`, Nchan's
//!   channel info) and `PEERS_GAP_MS` later; every poller re-polls with
//!   its new cursor (hark) or Last-Modified/Etag (Nchan) only once all
//!   have their answer, so a round is the fan-out alone (`fanout`'s
//!   barrier mode). p50, p99 and max of the latencies pooled over the
//!   rep's measured rounds, from the change to the whole response read.
//! - `sse`: the same to N open streams (hark's `/events`, Nchan's
//!   EventSource), to the event's blank line read.
//! - `memory`: idle long polls and idle streams (`PEERS_MEMORY` of each):
//!   RSS with them waiting minus RSS before, per connection. hark: its
//!   VmRSS; Nchan: the sum of its workers' VmRSS; floor: the writer
//!   process's VmRSS with the connections accepted. Each rep starts a
//!   fresh hark and a fresh nginx (freed memory kept by an allocator would
//!   otherwise be reused). nginx allocates a structure per
//!   `worker_connections` slot when a worker starts, before any client
//!   connects; the bench measures that once (idle RSS with its slots,
//!   the fd limit less 100, against 1,024) and shows Nchan both without
//!   and with it.
//! - `hot`: the hot path, `PEERS_HOT_CONNECTIONS` keep-alive connections
//!   for `PEERS_HOT_SECONDS`, one request at a time each: hark answers a
//!   poll with an older cursor from memory (10 messages due, the token in
//!   `access_token`); Nchan answers a long poll at once with the 10 same
//!   messages its channel holds (multipart); the floor is the bare hyper
//!   server with hark's body. Requests per second, p50 and p99.
//!
//! Alternation: each rep of each measurement runs the three systems one
//! after the other, in an order that rotates from rep to rep (floor, hark,
//! Nchan; then hark, Nchan, floor; then Nchan, floor, hark), so that each
//! sees the same phases of a shared machine. Every fan-out rep opens fresh
//! connections and begins with one warm-up round that is not counted.
//!
//! Output: per measurement, each rep's numbers and the ratios hark/Nchan
//! and hark/floor (a ratio is hark's value over the other's: below 1 hark
//! is faster or smaller; for requests per second above 1 hark serves
//! more), then a summary of medians over the reps.
//!
//! What Nchan does not do that hark does (so read the ratios with it):
//! Nchan here checks no token and no room membership, keeps messages in
//! memory only (they are gone when nginx stops, and a channel keeps its
//! last 10), and its message ids are only good while the message is in
//! that buffer. hark reads every change from PostgreSQL (durable, any
//! writer), checks a JWT and the user's rooms on every request, and its
//! cursor gets every message, edit and delete exactly once after any gap.
//!
//! Settings (environment): PEERS_REPS (3), PEERS_SIZES ("1000,10000"),
//! PEERS_ROUNDS (5 measured rounds per fan-out rep, after 1 warm-up),
//! PEERS_GAP_MS (250), PEERS_MEMORY (10000), PEERS_HOT_SECONDS (5),
//! PEERS_HOT_CONNECTIONS (50), PEERS_PARTS ("lp,sse,memory,hot"),
//! PEERS_SYSTEMS ("floor,hark,nchan"), PEERS_NGINX_WORKERS (one per
//! core), PEERS_PARALLEL (128: connections opened at a time). Sizes are
//! capped by RLIMIT_NOFILE (raised to the hard limit; this process holds
//! one descriptor per client, and each server inherits the limit).

mod common;

use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::stream::{self, StreamExt, TryStreamExt};
use hark_kit::http::Head;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() -> std::process::ExitCode {
    if std::env::var_os("PEERS_ROLE").is_some() {
        return match floor_writer() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("peers floor writer: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    main_with("peers", run())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---- settings and systems ---------------------------------------------------

struct Settings {
    reps: usize,
    sizes: Vec<usize>,
    rounds: usize,
    gap: Duration,
    memory: usize,
    hot_seconds: u64,
    hot_connections: usize,
    parts: Vec<String>,
    systems: Vec<Sys>,
    workers: usize,
    parallel: usize,
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let sizes = env_list("PEERS_SIZES", "1000,10000")
            .iter()
            .map(|s| {
                s.parse::<usize>()
                    .map_err(|e| err(format!("PEERS_SIZES entry {s:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let parts = env_list("PEERS_PARTS", "lp,sse,memory,hot");
        for p in &parts {
            if !["lp", "sse", "memory", "hot"].contains(&p.as_str()) {
                return Err(err(format!(
                    "PEERS_PARTS entry {p:?}: lp, sse, memory or hot"
                )));
            }
        }
        let systems = env_list("PEERS_SYSTEMS", "floor,hark,nchan")
            .iter()
            .map(|s| Sys::parse(s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Settings {
            reps: env_num("PEERS_REPS", 3usize).max(1),
            sizes,
            rounds: env_num("PEERS_ROUNDS", 5usize).max(1),
            gap: Duration::from_millis(env_num("PEERS_GAP_MS", 250)),
            memory: env_num("PEERS_MEMORY", 10_000),
            hot_seconds: env_num("PEERS_HOT_SECONDS", 5u64).max(1),
            hot_connections: env_num("PEERS_HOT_CONNECTIONS", 50usize).max(1),
            parts,
            systems,
            workers: env_num("PEERS_NGINX_WORKERS", cores()).max(1),
            parallel: env_num("PEERS_PARALLEL", 128usize).max(1),
        })
    }

    fn part(&self, p: &str) -> bool {
        self.parts.iter().any(|x| x == p)
    }

    fn runs(&self, s: Sys) -> bool {
        self.systems.contains(&s)
    }

    /// The systems of rep `rep` (0-based), in the order they run.
    fn order(&self, rep: usize) -> Vec<Sys> {
        let mut o = SYSTEMS;
        o.rotate_left(rep % SYSTEMS.len());
        o.into_iter().filter(|s| self.runs(*s)).collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sys {
    Floor,
    Hark,
    Nchan,
}

const SYSTEMS: [Sys; 3] = [Sys::Floor, Sys::Hark, Sys::Nchan];

impl Sys {
    fn name(self) -> &'static str {
        match self {
            Sys::Floor => "floor",
            Sys::Hark => "hark",
            Sys::Nchan => "Nchan",
        }
    }

    fn parse(s: &str) -> Result<Sys> {
        match s.to_ascii_lowercase().as_str() {
            "floor" => Ok(Sys::Floor),
            "hark" => Ok(Sys::Hark),
            "nchan" => Ok(Sys::Nchan),
            other => Err(err(format!(
                "PEERS_SYSTEMS entry {other:?}: floor, hark or nchan"
            ))),
        }
    }
}

// ---- results ------------------------------------------------------------------

/// One measurement: per rep, per system, the values of `cols`.
struct Part {
    title: String,
    short: String,
    cols: Vec<&'static str>,
    reps: Vec<[Option<Vec<f64>>; 3]>,
}

impl Part {
    fn new(title: String, short: String, cols: &[&'static str]) -> Part {
        Part {
            title,
            short,
            cols: cols.to_vec(),
            reps: Vec::new(),
        }
    }

    fn record(&mut self, rep: usize, sys: Sys, vals: Vec<f64>) {
        while self.reps.len() <= rep {
            self.reps.push([None, None, None]);
        }
        let shown: Vec<String> = self
            .cols
            .iter()
            .zip(&vals)
            .map(|(c, v)| format!("{c} {}", num(*v)))
            .collect();
        println!(
            "  {} rep {} {}: {}",
            self.short,
            rep + 1,
            sys.name(),
            shown.join(", ")
        );
        self.reps[rep][sys as usize] = Some(vals);
    }

    fn value(&self, rep: usize, sys: Sys, col: usize) -> Option<f64> {
        self.reps.get(rep)?[sys as usize]
            .as_ref()?
            .get(col)
            .copied()
    }

    /// hark's value over `den`'s, per rep where both were measured.
    fn ratios(&self, col: usize, den: Sys) -> Vec<f64> {
        (0..self.reps.len())
            .filter_map(|r| {
                let h = self.value(r, Sys::Hark, col)?;
                let d = self.value(r, den, col)?;
                (d > 0.0).then_some(h / d)
            })
            .collect()
    }

    fn median_value(&self, sys: Sys, col: usize) -> Option<f64> {
        let v: Vec<f64> = (0..self.reps.len())
            .filter_map(|r| self.value(r, sys, col))
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    fn print(&self) {
        println!();
        println!("{}", self.title);
        let mut header = vec!["rep", "system"];
        header.extend(self.cols.iter().copied());
        let mut rows = Vec::new();
        for (r, systems) in self.reps.iter().enumerate() {
            for sys in SYSTEMS {
                if let Some(v) = &systems[sys as usize] {
                    let mut row = vec![(r + 1).to_string(), sys.name().to_string()];
                    row.extend(v.iter().map(|x| num(*x)));
                    rows.push(row);
                }
            }
        }
        table(&header, &rows);
        let names: Vec<String> = [Sys::Nchan, Sys::Floor]
            .iter()
            .flat_map(|d| {
                self.cols
                    .iter()
                    .map(move |c| format!("hark/{} {c}", d.name()))
            })
            .collect();
        let mut header = vec!["rep"];
        header.extend(names.iter().map(String::as_str));
        let mut rows = Vec::new();
        for r in 0..self.reps.len() {
            let mut row = vec![(r + 1).to_string()];
            for d in [Sys::Nchan, Sys::Floor] {
                for c in 0..self.cols.len() {
                    row.push(match (self.value(r, Sys::Hark, c), self.value(r, d, c)) {
                        (Some(h), Some(x)) if x > 0.0 => format!("{:.2}", h / x),
                        _ => "-".into(),
                    });
                }
            }
            rows.push(row);
        }
        let mut row = vec!["median".to_string()];
        for d in [Sys::Nchan, Sys::Floor] {
            for c in 0..self.cols.len() {
                let v = self.ratios(c, d);
                row.push(if v.is_empty() {
                    "-".into()
                } else {
                    format!("{:.2}", median(&v))
                });
            }
        }
        rows.push(row);
        table(&header, &rows);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A number with a precision that suits its size.
fn num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// "median (min–max)" of ratios.
fn ratio_range(v: &[f64]) -> String {
    match v.len() {
        0 => "-".into(),
        1 => format!("{:.2}", v[0]),
        _ => {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.2} ({min:.2}–{max:.2})", median(v))
        }
    }
}

fn print_summary(parts: &[Part], reps: usize) {
    println!();
    println!(
        "Summary: medians over {reps} reps; ratios are hark's value over the other's, median of the reps' ratios (min–max)"
    );
    let mut rows = Vec::new();
    for p in parts {
        for (c, col) in p.cols.iter().enumerate() {
            let v = |s: Sys| p.median_value(s, c).map_or("-".into(), num);
            rows.push(vec![
                format!("{} {col}", p.short),
                v(Sys::Floor),
                v(Sys::Hark),
                v(Sys::Nchan),
                ratio_range(&p.ratios(c, Sys::Nchan)),
                ratio_range(&p.ratios(c, Sys::Floor)),
            ]);
        }
    }
    table(
        &[
            "measure",
            "floor",
            "hark",
            "Nchan",
            "hark/Nchan",
            "hark/floor",
        ],
        &rows,
    );
}

/// [p50, p99, max] in ms of latencies.
fn lat_cols(mut lat: Vec<Duration>) -> Vec<f64> {
    lat.sort_unstable();
    let m = |d: Duration| d.as_secs_f64() * 1000.0;
    vec![
        m(pct(&lat, 50.0)),
        m(pct(&lat, 99.0)),
        m(lat[lat.len() - 1]),
    ]
}

// ---- the message ------------------------------------------------------------------

/// What every round's message contains, before its round number.
const MARK: &[u8] = b"peers fan-out round ";

/// The content of round `round`'s message (hark's INSERT).
fn content(round: usize) -> String {
    format!("peers fan-out round {round}, about as long as a chat line")
}

/// Round `round`'s message as Nchan publishes it: a JSON object shaped
/// and sized like the one hark sends for the INSERT.
fn nchan_message(round: usize) -> String {
    format!(
        r#"{{"id":{},"room":1,"sender":{{"id":2,"username":"writer","first_name":"Writer","last_name":"Test"}},"content":"{}","created_at":"2026-12-07T00:00:00.000000Z","edited":false}}"#,
        1000 + round,
        content(round)
    )
}

/// The round number after [`MARK`] in a message.
fn round_of(data: &[u8]) -> Option<usize> {
    let i = memchr::memmem::find(data, MARK)? + MARK.len();
    let digits = data[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[i..i + digits]).ok()?.parse().ok()
}

/// Bytes the floor writes per connection and round: about what hark
/// writes for one message, a whole poll answer (head and body) for a long
/// poll, one `event: message` chunk for a stream.
const FLOOR_LP_BYTES: usize = 512;
const FLOOR_SSE_BYTES: usize = 227;

/// A message as a receiver saw it.
struct Got {
    round: usize,
    at: Instant,
    ok: bool,
    error: Option<String>,
}

/// Waits (bounded: 60 s) for `n` receipts of `round`; their latencies
/// from `t0`. Any error or wrong message fails the round.
async fn collect(
    samples: &SampleList<Got>,
    what: &str,
    round: usize,
    n: usize,
    t0: Instant,
) -> Result<Vec<Duration>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut lat = Vec::with_capacity(n);
    let mut batch = Vec::new();
    let mut wrong = 0;
    while lat.len() + wrong < n {
        if !samples.take(&mut batch, deadline).await {
            return Err(err(format!(
                "{what}, round {round}: only {} of {n} received the message within 60 s",
                lat.len()
            )));
        }
        for s in batch.drain(..) {
            if let Some(e) = s.error {
                return Err(err(format!("{what}, round {round}: {e}")));
            }
            if s.round != round || !s.ok {
                wrong += 1;
                continue;
            }
            lat.push(s.at.saturating_duration_since(t0));
        }
    }
    if wrong > 0 {
        return Err(err(format!(
            "{what}, round {round}: {wrong} answers were not this round's message"
        )));
    }
    Ok(lat)
}

/// Splits a raw `text/event-stream` body into events (at each blank line).
#[derive(Default)]
struct EventSplit {
    pending: Vec<u8>,
}

impl EventSplit {
    fn feed(&mut self, bytes: &[u8], mut f: impl FnMut(&[u8])) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(i) = memchr::memmem::find(&self.pending[start..], b"\n\n") {
            f(&self.pending[start..start + i]);
            start += i + 2;
        }
        self.pending.drain(..start);
    }
}

// ---- a small HTTP/1.1 client that keeps the response head ----------------------

/// One keep-alive connection, one request at a time; unlike the kit's
/// `Conn` it hands out the response head (Nchan's long-poll protocol is in
/// its Last-Modified and Etag).
struct HConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HConn {
    async fn connect(addr: SocketAddr) -> std::io::Result<HConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HConn {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    async fn send(&mut self, req: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(req).await
    }

    async fn fill(&mut self) -> Result<()> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(4096);
        }
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(err("connection closed by the server"));
        }
        Ok(())
    }

    /// Reads a response head; the bytes after it stay in the buffer.
    async fn head(&mut self) -> Result<Head> {
        loop {
            if let Some(head) = parse_head(&self.buf)? {
                self.buf.drain(..head.len);
                return Ok(head);
            }
            self.fill().await?;
        }
    }

    /// Reads a whole Content-Length framed response.
    async fn response(&mut self) -> Result<(Head, Vec<u8>)> {
        let head = self.head().await?;
        let need = head
            .content_length()?
            .ok_or_else(|| err(format!("no content-length: {head:?}")))?;
        while self.buf.len() < need {
            self.fill().await?;
        }
        let body = self.buf.drain(..need).collect();
        Ok((head, body))
    }
}

// ---- Nchan: the private install and the nginx process ---------------------------

fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/peers")
}

struct NchanInstall {
    nginx: PathBuf,
    module: PathBuf,
    /// LD_LIBRARY_PATH, when nginx's libraries had to be extracted too.
    ld_path: Option<String>,
}

impl NchanInstall {
    fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.nginx);
        if let Some(p) = &self.ld_path {
            c.env("LD_LIBRARY_PATH", p);
        }
        c
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `apt-get download` of `pkgs` into `dir` (emptied of .deb files first),
/// then `dpkg-deb -x` of each into `prefix`.
fn apt_extract(dir: &Path, pkgs: &[&str], prefix: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.path().extension().is_some_and(|x| x == "deb") {
            std::fs::remove_file(e.path())?;
        }
    }
    let download = || {
        let mut c = std::process::Command::new("apt-get");
        c.current_dir(dir);
        if is_root() {
            // apt's download sandbox user cannot write into target/.
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c.arg("download").args(pkgs).output()
    };
    let mut out = download().map_err(|e| err(format!("apt-get: {e}")))?;
    if !out.status.success() && is_root() {
        println!("apt-get download {pkgs:?} failed; running `apt-get update` once");
        let update = std::process::Command::new("apt-get")
            .args(["update", "-qq"])
            .status()?;
        if !update.success() {
            return Err(err(format!("apt-get update failed: {update}")));
        }
        out = download()?;
    }
    if !out.status.success() {
        return Err(err(format!(
            "`apt-get download {}` failed: {}\nNchan comes from Debian's packages nginx and libnginx-mod-nchan: run this bench on Debian (12) with apt, as root or after `apt-get update`",
            pkgs.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::create_dir_all(prefix)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "deb") {
            let st = std::process::Command::new("dpkg-deb")
                .arg("-x")
                .arg(&p)
                .arg(prefix)
                .status()?;
            if !st.success() {
                return Err(err(format!("dpkg-deb -x {} failed", p.display())));
            }
            println!(
                "nchan: extracted {}",
                p.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
    Ok(())
}

/// Libraries `ldd` does not find for `bin`.
fn missing_libraries(bin: &Path, ld_path: Option<&str>) -> Result<Vec<String>> {
    let mut c = std::process::Command::new("ldd");
    c.arg(bin);
    if let Some(p) = ld_path {
        c.env("LD_LIBRARY_PATH", p);
    }
    let out = c.output().map_err(|e| err(format!("ldd: {e}")))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("not found"))
        .map(|l| l.trim().to_string())
        .collect())
}

/// The nginx binary and the Nchan module, extracted from Debian's packages
/// into target/peers/nchan/ (downloaded the first time).
fn install_nchan() -> Result<NchanInstall> {
    let root = peers_dir();
    let prefix = root.join("nchan");
    let nginx = prefix.join("usr/sbin/nginx");
    let module = prefix.join("usr/lib/nginx/modules/ngx_nchan_module.so");
    if nginx.is_file() && module.is_file() {
        println!("nchan: reusing {}", prefix.display());
    } else {
        println!(
            "nchan: downloading Debian's nginx and libnginx-mod-nchan into {}",
            prefix.display()
        );
        apt_extract(
            &root.join("debs"),
            &["nginx", "libnginx-mod-nchan"],
            &prefix,
        )?;
        if !(nginx.is_file() && module.is_file()) {
            return Err(err(format!(
                "the packages did not give {} and {}",
                nginx.display(),
                module.display()
            )));
        }
    }
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    let ld_path = || {
        let dirs: Vec<String> = [
            prefix.join("lib").join(&triplet),
            prefix.join("usr/lib").join(&triplet),
        ]
        .iter()
        .filter(|d| d.is_dir())
        .map(|d| d.display().to_string())
        .collect();
        (!dirs.is_empty()).then(|| dirs.join(":"))
    };
    let mut ld = ld_path();
    let missing = missing_libraries(&nginx, ld.as_deref())?;
    if !missing.is_empty() {
        println!("nchan: nginx lacks {missing:?}; extracting its libraries into the prefix too");
        apt_extract(
            &root.join("debs/libs"),
            &["libpcre2-8-0", "libssl3", "zlib1g", "libcrypt1"],
            &prefix,
        )?;
        ld = ld_path();
        let missing = missing_libraries(&nginx, ld.as_deref())?;
        if !missing.is_empty() {
            return Err(err(format!("nginx still lacks {missing:?}")));
        }
    }
    let inst = NchanInstall {
        nginx,
        module,
        ld_path: ld,
    };
    let v = inst.command().arg("-v").output()?;
    println!(
        "nchan: {} with {}",
        String::from_utf8_lossy(&v.stderr).trim(),
        inst.module.display()
    );
    Ok(inst)
}

/// A free port on 127.0.0.1 (bound, then released for nginx to take).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running nginx with Nchan: the master and its workers.
struct Nginx {
    child: Option<tokio::process::Child>,
    pid: u32,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx with `workers` workers of `connections` slots each and
    /// waits until it answers and every worker runs.
    async fn start(
        inst: &NchanInstall,
        name: &str,
        workers: usize,
        connections: u64,
    ) -> Result<Nginx> {
        let (nofile, _) = fd_usage(std::process::id())?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = peers_dir()
            .join("run")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let conf = include_str!("peers/nginx.conf")
            .replace("{{MODULE}}", &inst.module.display().to_string())
            .replace("{{USER}}", if is_root() { "user root;" } else { "" })
            .replace("{{WORKERS}}", &workers.to_string())
            .replace("{{NOFILE}}", &nofile.to_string())
            .replace("{{CONNECTIONS}}", &connections.to_string())
            .replace("{{DIR}}", &dir.display().to_string())
            .replace("{{LISTEN}}", &addr.to_string());
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let error_log = dir.join("error.log");
        let args = |c: &mut std::process::Command| {
            c.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(&error_log);
        };
        let mut test = inst.command();
        args(&mut test);
        let out = test.args(["-t", "-q"]).output()?;
        if !out.status.success() {
            return Err(err(format!(
                "nginx -t failed for {}: {}",
                conf_path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut std_cmd = inst.command();
        args(&mut std_cmd);
        std_cmd
            .args(["-g", "daemon off;"])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log"))?)
            .stderr(std::fs::File::create(dir.join("stderr.log"))?);
        let mut cmd = tokio::process::Command::from(std_cmd);
        // SAFETY: pre_exec runs between fork and exec; set_pdeathsig is
        // one prctl system call. The master gets SIGTERM (and stops its
        // workers) when the thread that started it dies: a Ctrl-C or a
        // panic of the bench leaves no nginx behind.
        unsafe {
            cmd.pre_exec(|| {
                let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id().ok_or_else(|| err("nginx exited at once"))?;
        let mut ng = Nginx {
            child: Some(child),
            pid,
            addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if ng.stub().await.is_ok() && ng.worker_pids().len() >= workers {
                return Ok(ng);
            }
            let exited = ng.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(ng.dir.join("error.log")).unwrap_or_default();
                return Err(err(format!(
                    "nginx did not come up on {addr} ({exited:?}); error.log:\n{log}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn worker_pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| hark_kit::procfs::stat_fields(&s))
                    .is_some_and(|(ppid, _)| ppid == self.pid)
            })
            .collect()
    }

    /// The sum of the workers' VmRSS, bytes.
    fn workers_rss(&self) -> Result<u64> {
        let pids = self.worker_pids();
        if pids.is_empty() {
            return Err(err("nginx has no workers"));
        }
        let mut sum = 0;
        for pid in pids {
            sum += proc_status_kib(pid, "VmRSS:")? * 1024;
        }
        Ok(sum)
    }

    /// [`Nginx::workers_rss`], sampled 5 times 50 ms apart (the median).
    async fn rss_median(&self) -> Result<u64> {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(self.workers_rss()?);
            // Sampling: 50 ms apart, as common::rss_median.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        v.sort_unstable();
        Ok(v[2])
    }

    async fn get(&self, target: &str, accept: &str) -> Result<(Head, Vec<u8>)> {
        let mut c = HConn::connect(self.addr).await?;
        c.send(
            format!("GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: {accept}\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        c.response().await
    }

    /// `subscribers` of nchan_stub_status: every worker's.
    async fn stub(&self) -> Result<u64> {
        let (head, body) = self.get("/stub", "text/plain").await?;
        if head.status != 200 {
            return Err(err(format!("/stub answered {}", head.status)));
        }
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("subscribers:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| err("no subscribers line in nchan_stub_status"))
    }

    /// A channel's subscribers (its info from the publisher location).
    async fn channel_subscribers(&self, ch: &str) -> Result<u64> {
        let (head, body) = self.get(&format!("/pub?id={ch}"), "text/json").await?;
        if head.status == 404 {
            return Ok(0);
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            err(format!(
                "channel info ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        })?;
        v["subscribers"]
            .as_u64()
            .ok_or_else(|| err(format!("no subscribers in {v}")))
    }

    /// Waits (bounded) until channel `ch` has at least `n` subscribers.
    async fn wait_channel(&self, ch: &str, n: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let k = self.channel_subscribers(ch).await?;
            if k as usize >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "Nchan channel {ch}: {k} of {n} subscribers after {:.0} s",
                    limit.as_secs_f64()
                )));
            }
            // The poll interval of this bounded wait, as MetricsClient's.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (bounded) until no subscriber is left (the previous rep's
    /// connections are gone).
    async fn wait_idle(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let k = self.stub().await?;
            if k == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!("Nchan still counts {k} subscribers")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM to the master (nginx's fast shutdown: it stops its
    /// workers), bounded; then SIGKILL to whatever is left.
    async fn stop(&mut self) {
        let workers = self.worker_pids();
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        for w in workers {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(w as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.child.is_some() {
            for w in self.worker_pids() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(w as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if let Some(mut c) = self.child.take() {
                let _ = c.start_kill();
            }
        }
    }
}

/// Publishes to Nchan from a thread and runtime of its own (real-time
/// priority when allowed), as hark's [`Writer`] commits: the instant taken
/// just before the POST is written is not delayed by the receivers.
struct Publisher {
    tx: tokio::sync::mpsc::UnboundedSender<PubJob>,
}

type PubJob = (
    SocketAddr,
    Vec<u8>,
    tokio::sync::oneshot::Sender<Result<Instant>>,
);

impl Publisher {
    fn start() -> Result<Publisher> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PubJob>();
        writer_thread("peers-publisher", move |rt_prio| async move {
            if !rt_prio {
                eprintln!("note: the publisher thread could not get SCHED_FIFO priority");
            }
            let mut conn: Option<(SocketAddr, Conn)> = None;
            while let Some((addr, req, reply)) = rx.recv().await {
                let mut result = Err(err("not sent"));
                // A kept connection may have been closed: one retry on a
                // fresh one.
                for _ in 0..2 {
                    if conn.as_ref().map(|c| c.0) != Some(addr) {
                        match Conn::connect(addr).await {
                            Ok(c) => conn = Some((addr, c)),
                            Err(e) => {
                                result = Err(e.into());
                                continue;
                            }
                        }
                    }
                    let Some((_, c)) = conn.as_mut() else {
                        continue;
                    };
                    let t0 = Instant::now();
                    let r = match c.send_raw(&req).await {
                        Ok(()) => c.read_response().await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(r) if r.status == 201 || r.status == 202 => {
                            result = Ok(t0);
                            break;
                        }
                        Ok(r) => {
                            result = Err(err(format!(
                                "publish answered {}: {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            )));
                            break;
                        }
                        Err(e) => {
                            conn = None;
                            result = Err(e.into());
                        }
                    }
                }
                let _ = reply.send(result);
            }
        })?;
        Ok(Publisher { tx })
    }

    /// POSTs `body` to channel `ch`; the instant just before it was written.
    async fn publish(&self, addr: SocketAddr, ch: &str, body: &str) -> Result<Instant> {
        let req = format!(
            "POST /pub?id={ch} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((addr, req.into_bytes(), reply))
            .map_err(|_| err("publisher thread gone"))?;
        rx.await.map_err(|_| err("publisher thread gone"))?
    }
}

// ---- the floor: a bare writer in a second process --------------------------------

/// The floor's sending process. Protocol on stdio: prints `port P`,
/// accepts PEERS_FLOOR_N connections, prints `ready`; then for each `go`
/// line writes PEERS_FLOOR_BYTES bytes once to every connection (one plain
/// thread per core) and prints `done`.
fn floor_writer() -> Result<()> {
    let n: usize = env_num("PEERS_FLOOR_N", 1000);
    let bytes: usize = env_num("PEERS_FLOOR_BYTES", FLOOR_SSE_BYTES).max(2);
    let threads = cores();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "port {}", listener.local_addr()?.port())?;
    stdout.flush()?;
    let mut groups: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..n {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        groups[i % threads].push(s);
    }
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut payload = vec![b'x'; bytes];
    payload[bytes - 2..].copy_from_slice(b"\n\n");
    let payload: Arc<[u8]> = payload.into();
    let (done_tx, done_rx) = mpsc::sync_channel::<std::io::Result<()>>(threads);
    let mut go: Vec<mpsc::SyncSender<()>> = Vec::new();
    for mut group in groups {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        go.push(tx);
        let done = done_tx.clone();
        let payload = payload.clone();
        std::thread::spawn(move || {
            while rx.recv().is_ok() {
                let r = group.iter_mut().try_for_each(|s| s.write_all(&payload));
                if done.send(r).is_err() {
                    return;
                }
            }
        });
    }
    for line in std::io::stdin().lock().lines() {
        if line? != "go" {
            continue;
        }
        for tx in &go {
            tx.send(()).map_err(|_| err("a sending thread is gone"))?;
        }
        for _ in 0..go.len() {
            done_rx
                .recv()
                .map_err(|_| err("a sending thread is gone"))??;
        }
        writeln!(stdout, "done")?;
        stdout.flush()?;
    }
    Ok(())
}

/// The floor's process, seen from here.
struct Floor {
    child: tokio::process::Child,
    to: tokio::process::ChildStdin,
    from: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    pid: u32,
    addr: SocketAddr,
}

impl Floor {
    async fn spawn(n: usize, bytes: usize) -> Result<Floor> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .env("PEERS_ROLE", "floor")
            .env("PEERS_FLOOR_N", n.to_string())
            .env("PEERS_FLOOR_BYTES", bytes.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or_else(|| err("floor writer exited"))?;
        let to = child.stdin.take().ok_or_else(|| err("no stdin"))?;
        let mut from =
            tokio::io::BufReader::new(child.stdout.take().ok_or_else(|| err("no stdout"))?).lines();
        let port: u16 = next_line(&mut from)
            .await?
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| err("no port from the floor writer"))?;
        Ok(Floor {
            child,
            to,
            from,
            pid,
            addr: ([127, 0, 0, 1], port).into(),
        })
    }

    /// Opens the `n` connections it waits for.
    async fn connect(&mut self, n: usize, parallel: usize) -> Result<Vec<TcpStream>> {
        let addr = self.addr;
        let conns: Vec<TcpStream> = stream::iter(0..n)
            .map(|_| TcpStream::connect(addr))
            .buffer_unordered(parallel)
            .try_collect()
            .await?;
        if next_line(&mut self.from).await? != "ready" {
            return Err(err("the floor writer did not accept every connection"));
        }
        Ok(conns)
    }

    async fn go(&mut self) -> Result<()> {
        self.to.write_all(b"go\n").await?;
        self.to.flush().await?;
        Ok(())
    }

    async fn done(&mut self) -> Result<()> {
        if next_line(&mut self.from).await? != "done" {
            return Err(err("no done line from the floor writer"));
        }
        Ok(())
    }

    async fn rss_median(&self) -> Result<u64> {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(proc_status_kib(self.pid, "VmRSS:")? * 1024);
            // Sampling: 50 ms apart, as common::rss_median.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        v.sort_unstable();
        Ok(v[2])
    }

    /// Closes its stdin (it exits) and reaps it (bounded).
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

async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| err("the floor writer exited"))
}

// ---- the bare hyper server (the hot path's floor) ---------------------------------

/// A hyper 1 `http1` server on 127.0.0.1:0 with a runtime of its own (one
/// worker per core, as hark's) answering every request with a fixed JSON
/// body, keep-alive: `hot_path`'s ceiling.
struct Ceiling {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ceiling {
    fn start(body: Bytes) -> Result<Ceiling> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("ceiling")
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ceiling-main".into())
            .spawn(move || {
                rt.spawn(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let body = body.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |_req| {
                                let mut resp = hyper::Response::new(Full::new(body.clone()));
                                let h = resp.headers_mut();
                                h.insert(
                                    CONTENT_TYPE,
                                    HeaderValue::from_static("application/json"),
                                );
                                h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                                async move { Ok::<_, Infallible>(resp) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                });
                rt.block_on(async {
                    let _ = stopped.await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Ceiling {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Closed-loop load: every connection sends `request` and reads the
/// answer, again and again, for `seconds`. (requests per second, latencies
/// of the 200 answers in µs sorted, answers not 200, failed connections).
async fn load(
    conns: Vec<Conn>,
    request: &Arc<Vec<u8>>,
    seconds: u64,
) -> Result<(f64, Vec<u32>, u64, u64)> {
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(conns.len());
    for mut conn in conns {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 15);
            let mut not_ok = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                if conn.send_raw(&request).await.is_err() {
                    return (lat, not_ok, 1u64);
                }
                match conn.read_response().await {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed().as_micros() as u32),
                    Ok(_) => not_ok += 1,
                    Err(_) => return (lat, not_ok, 1),
                }
            }
            (lat, not_ok, 0)
        }));
    }
    let (mut lat, mut not_ok, mut failed) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, n, f) = t.await?;
        lat.extend(l);
        not_ok += n;
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    if lat.is_empty() {
        return Err(err("no request succeeded"));
    }
    Ok((lat.len() as f64 / secs, lat, not_ok, failed))
}

// ---- hark's side ------------------------------------------------------------------

/// The long-lived hark of the fan-out and hot-path measurements, and what
/// its rounds need.
struct HarkSide {
    hark: Hark,
    fx: Fixture,
    w: Writer,
    reader: i64,
    writer: i64,
    token: String,
}

// ---- fan-out -------------------------------------------------------------------------

/// Receivers of the floor's bytes: a round is complete on a connection
/// once `(round + 1) * bytes` have arrived.
fn floor_readers(
    conns: Vec<TcpStream>,
    bytes: usize,
    samples: &Arc<SampleList<Got>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    conns
        .into_iter()
        .map(|mut s| {
            let tx = samples.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let (mut total, mut round) = (0usize, 0usize);
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            tx.push(Got {
                                round,
                                at: Instant::now(),
                                ok: false,
                                error: Some("floor connection closed".into()),
                            });
                            return;
                        }
                        Ok(k) => total += k,
                    }
                    let at = Instant::now();
                    while total >= (round + 1) * bytes {
                        tx.push(Got {
                            round,
                            at,
                            ok: true,
                            error: None,
                        });
                        round += 1;
                    }
                }
            })
        })
        .collect()
}

/// The floor's fan-out to `n` connections; the latencies of the measured
/// rounds.
async fn fanout_floor(s: &Settings, n: usize, bytes: usize) -> Result<Vec<Duration>> {
    let mut f = Floor::spawn(n, bytes).await?;
    let conns = f.connect(n, s.parallel).await?;
    let samples: Arc<SampleList<Got>> = Arc::default();
    let tasks = floor_readers(conns, bytes, &samples);
    let r = async {
        let mut all = Vec::new();
        for round in 0..=s.rounds {
            // Pacing: rounds PEERS_GAP_MS apart.
            tokio::time::sleep(s.gap).await;
            let t0 = Instant::now();
            f.go().await?;
            let lat = collect(&samples, "floor", round, n, t0).await?;
            f.done().await?;
            if round > 0 {
                all.extend(lat);
            }
        }
        Ok::<_, BoxError>(all)
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    f.stop().await;
    r
}

/// hark's fan-out to `n` waiting long polls (barrier re-polls).
async fn fanout_hark_lp(h: &HarkSide, s: &Settings, n: usize, rep: usize) -> Result<Vec<Duration>> {
    let room =
        h.fx.room(&format!("peers-lp-{n}-{rep}"), &[h.reader, h.writer])
            .await;
    let mut mc = MetricsClient::new(h.hark.addr);
    mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
        v <= 1.0
    })
    .await?;
    let mut c = Conn::connect(h.hark.addr).await?;
    let (_, cursor0) = poll_result(&c.get(&poll_path(room, None, 0, &h.token)).await?)?;
    drop(c);
    let conns = connect_many(&mut mc, n, 64, 1).await?;
    let mut pollers = Pollers::spawn_with(conns, room, &h.token, &cursor0, s.rounds + 1, true);
    let mut all = Vec::new();
    for round in 0..=s.rounds {
        if round > 0 {
            pollers.release(round);
        }
        mc.wait_until("hark_waiting_polls", Duration::from_secs(120), |v| {
            v as usize >= n
        })
        .await?;
        // Pacing: rounds PEERS_GAP_MS apart.
        tokio::time::sleep(s.gap).await;
        let t0 = h.w.insert(room, h.writer, &content(round)).await?;
        let r = pollers.collect(round, t0, Duration::from_secs(60)).await?;
        if r.errors + r.wrong > 0 {
            return Err(err(format!(
                "hark long polls, round {round}: {} errors (e.g. {:?}), {} wrong answers",
                r.errors, r.first_error, r.wrong
            )));
        }
        if round > 0 {
            all.extend(r.lat);
        }
    }
    drop(pollers);
    mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
        v <= 1.0
    })
    .await?;
    Ok(all)
}

/// hark's fan-out to `n` `/events` streams.
async fn fanout_hark_sse(
    h: &HarkSide,
    s: &Settings,
    n: usize,
    rep: usize,
) -> Result<Vec<Duration>> {
    let room =
        h.fx.room(&format!("peers-sse-{n}-{rep}"), &[h.reader, h.writer])
            .await;
    let mut mc = MetricsClient::new(h.hark.addr);
    mc.wait_until("hark_open_streams", Duration::from_secs(60), |v| v <= 0.0)
        .await?;
    let path = events_path(&[room], &h.token);
    let streams = open_streams(&mut mc, n, s.parallel, 0, |_| path.clone()).await?;
    let samples: Arc<SampleList<Got>> = Arc::default();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|(mut st, _)| {
            let tx = samples.clone();
            tokio::spawn(async move {
                let mut found: Vec<usize> = Vec::new();
                loop {
                    let r = st
                        .read_some(&mut |item| {
                            if let SseItem::Event(e) = item {
                                if e.kind == SseKind::Message {
                                    if let Some(k) = round_of(e.data) {
                                        found.push(k);
                                    }
                                }
                            }
                        })
                        .await;
                    // Every event completed by this read was fully received now.
                    let at = Instant::now();
                    tx.extend(found.drain(..).map(|round| Got {
                        round,
                        at,
                        ok: true,
                        error: None,
                    }));
                    if let Err(e) = r {
                        tx.push(Got {
                            round: usize::MAX,
                            at,
                            ok: false,
                            error: Some(e.to_string()),
                        });
                        return;
                    }
                }
            })
        })
        .collect();
    let r = async {
        let mut all = Vec::new();
        for round in 0..=s.rounds {
            // Pacing: rounds PEERS_GAP_MS apart.
            tokio::time::sleep(s.gap).await;
            let t0 = h.w.insert(room, h.writer, &content(round)).await?;
            let lat = collect(&samples, "hark streams", round, n, t0).await?;
            if round > 0 {
                all.extend(lat);
            }
        }
        Ok::<_, BoxError>(all)
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    mc.wait_until("hark_open_streams", Duration::from_secs(60), |v| v <= 0.0)
        .await?;
    r
}

/// A long poll of Nchan's channel `ch`, with the id of the last answer.
fn nchan_lp_request(ch: &str, last: Option<&(String, String)>) -> String {
    match last {
        None => format!("GET /lp?id={ch} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"),
        Some((modified, etag)) => format!(
            "GET /lp?id={ch} HTTP/1.1\r\nhost: 127.0.0.1\r\nif-modified-since: {modified}\r\nif-none-match: {etag}\r\n\r\n"
        ),
    }
}

/// Nchan's fan-out to `n` waiting long polls (barrier re-polls).
async fn fanout_nchan_lp(
    ng: &Nginx,
    pb: &Publisher,
    s: &Settings,
    n: usize,
    ch: &str,
) -> Result<Vec<Duration>> {
    ng.wait_idle(Duration::from_secs(60)).await?;
    let conns: Vec<HConn> = stream::iter(0..n)
        .map(|_| HConn::connect(ng.addr))
        .buffer_unordered(s.parallel)
        .try_collect()
        .await?;
    let samples: Arc<SampleList<Got>> = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel(0usize);
    let polls_each = s.rounds + 1;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let tx = samples.clone();
            let sent = sent.clone();
            let mut go = go_rx.clone();
            let ch = ch.to_string();
            tokio::spawn(async move {
                let mut last: Option<(String, String)> = None;
                for round in 0..polls_each {
                    if round > 0 && go.wait_for(|&k| k >= round).await.is_err() {
                        return;
                    }
                    let req = nchan_lp_request(&ch, last.as_ref());
                    let r = async {
                        c.send(req.as_bytes()).await?;
                        sent.fetch_add(1, Ordering::Relaxed);
                        c.response().await
                    }
                    .await;
                    let at = Instant::now();
                    match r {
                        Ok((head, body)) => {
                            let ok = head.status == 200 && round_of(&body) == Some(round);
                            if let (Some(m), Some(e)) =
                                (head.header("last-modified"), head.header("etag"))
                            {
                                last = Some((m.to_string(), e.to_string()));
                            }
                            tx.push(Got {
                                round,
                                at,
                                ok,
                                error: None,
                            });
                        }
                        Err(e) => {
                            tx.push(Got {
                                round,
                                at,
                                ok: false,
                                error: Some(e.to_string()),
                            });
                            return;
                        }
                    }
                }
                // Keep the connection until the rep ends.
                std::future::pending::<()>().await;
            })
        })
        .collect();
    let r = async {
        let mut all = Vec::new();
        for round in 0..=s.rounds {
            if round > 0 {
                let _ = go_tx.send(round);
            }
            // Every poll of the round sent, then counted by Nchan.
            let deadline = Instant::now() + Duration::from_secs(60);
            while sent.load(Ordering::Relaxed) < n * (round + 1) {
                if Instant::now() > deadline {
                    return Err(err(format!(
                        "Nchan long polls, round {round}: not every poll was sent within 60 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            ng.wait_channel(ch, n, Duration::from_secs(120)).await?;
            // Pacing: rounds PEERS_GAP_MS apart.
            tokio::time::sleep(s.gap).await;
            let t0 = pb.publish(ng.addr, ch, &nchan_message(round)).await?;
            let lat = collect(&samples, "Nchan long polls", round, n, t0).await?;
            if round > 0 {
                all.extend(lat);
            }
        }
        Ok::<_, BoxError>(all)
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    r
}

/// Opens an EventSource subscription to Nchan's channel `ch` (the head
/// read and checked).
async fn nchan_stream(addr: SocketAddr, ch: &str) -> Result<HConn> {
    let mut c = HConn::connect(addr).await?;
    c.send(
        format!("GET /es?id={ch} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let head = c.head().await?;
    let es = head
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if head.status != 200 || !es {
        return Err(err(format!("Nchan's /es answered {head:?}")));
    }
    Ok(c)
}

/// Nchan's fan-out to `n` EventSource streams.
async fn fanout_nchan_sse(
    ng: &Nginx,
    pb: &Publisher,
    s: &Settings,
    n: usize,
    ch: &str,
) -> Result<Vec<Duration>> {
    ng.wait_idle(Duration::from_secs(60)).await?;
    let addr = ng.addr;
    let conns: Vec<HConn> = stream::iter(0..n)
        .map(|_| nchan_stream(addr, ch))
        .buffer_unordered(s.parallel)
        .try_collect()
        .await?;
    ng.wait_channel(ch, n, Duration::from_secs(120)).await?;
    let samples: Arc<SampleList<Got>> = Arc::default();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let tx = samples.clone();
            tokio::spawn(async move {
                let HConn {
                    mut stream,
                    buf: rest,
                } = c;
                let mut split = EventSplit::default();
                let mut found: Vec<usize> = Vec::new();
                // What came with the head (Nchan's `: hi` comment).
                split.feed(&rest, |ev| found.extend(round_of(ev)));
                let mut buf = vec![0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            tx.push(Got {
                                round: usize::MAX,
                                at: Instant::now(),
                                ok: false,
                                error: Some("Nchan closed a stream".into()),
                            });
                            return;
                        }
                        Ok(k) => split.feed(&buf[..k], |ev| found.extend(round_of(ev))),
                    }
                    // Every event completed by this read was fully received now.
                    let at = Instant::now();
                    tx.extend(found.drain(..).map(|round| Got {
                        round,
                        at,
                        ok: true,
                        error: None,
                    }));
                }
            })
        })
        .collect();
    let r = async {
        let mut all = Vec::new();
        for round in 0..=s.rounds {
            // Pacing: rounds PEERS_GAP_MS apart.
            tokio::time::sleep(s.gap).await;
            let t0 = pb.publish(addr, ch, &nchan_message(round)).await?;
            let lat = collect(&samples, "Nchan streams", round, n, t0).await?;
            if round > 0 {
                all.extend(lat);
            }
        }
        Ok::<_, BoxError>(all)
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    r
}

// ---- memory -------------------------------------------------------------------------

/// KiB per connection: the floor writer's RSS with `n` accepted
/// connections against before.
async fn memory_floor(s: &Settings, n: usize) -> Result<f64> {
    let mut f = Floor::spawn(n, FLOOR_SSE_BYTES).await?;
    let before = f.rss_median().await?;
    let conns = f.connect(n, s.parallel).await?;
    let with = f.rss_median().await?;
    drop(conns);
    f.stop().await;
    Ok((with as f64 - before as f64) / n as f64 / 1024.0)
}

/// KiB per idle long poll (`stream` false) or stream, on a fresh hark.
async fn memory_hark(
    db: &str,
    ids: (i64, i64, &str),
    s: &Settings,
    n: usize,
    sse: bool,
    rep: usize,
) -> Result<f64> {
    let (reader, writer, token) = ids;
    let fx = Fixture::new(db).await;
    let kind = if sse { "sse" } else { "lp" };
    let room = fx
        .room(&format!("peers-memory-{kind}-{rep}"), &[reader, writer])
        .await;
    let mut hark = start_hark(db, "peers-memory", &[]).await?;
    let r = async {
        let mut mc = MetricsClient::new(hark.addr);
        // Warm up (as `memory`): token check, caches, the pool, the hub.
        let mut c = Conn::connect(hark.addr).await?;
        let (_, cursor) = poll_result(&c.get(&poll_path(room, None, 0, token)).await?)?;
        for _ in 0..20 {
            poll_result(&c.get(&poll_path(room, Some(&cursor), 0, token)).await?)?;
        }
        drop(c);
        mc.wait_until("hark_open_connections", Duration::from_secs(10), |v| {
            v <= 1.0
        })
        .await?;
        let before = rss_median(&hark).await?;
        let with = if sse {
            let path = events_path(&[room], token);
            let streams = open_streams(&mut mc, n, s.parallel, 0, |_| path.clone()).await?;
            let with = rss_median(&hark).await?;
            drop(streams);
            with
        } else {
            let mut conns = connect_many(&mut mc, n, 64, 1).await?;
            let path = poll_path(room, Some(&cursor), 3600, token);
            for c in conns.iter_mut() {
                c.send_get(&path).await?;
            }
            mc.wait_until("hark_waiting_polls", Duration::from_secs(120), |v| {
                v as usize >= n
            })
            .await?;
            let with = rss_median(&hark).await?;
            drop(conns);
            with
        };
        Ok::<_, BoxError>((with as f64 - before as f64) / n as f64 / 1024.0)
    }
    .await;
    stop_hark(&mut hark).await;
    r
}

/// KiB per idle long poll or stream on a fresh nginx: the sum of its
/// workers' RSS with them against before.
async fn memory_nchan(
    inst: &NchanInstall,
    s: &Settings,
    slots: u64,
    n: usize,
    sse: bool,
    rep: usize,
) -> Result<f64> {
    let mut ng = Nginx::start(inst, "peers-memory", s.workers, slots).await?;
    let r = async {
        // Warm up: a publish, and long polls answered at once.
        let warm = format!("warm-{rep}");
        let mut c = HConn::connect(ng.addr).await?;
        let body = nchan_message(0);
        c.send(
            format!(
                "POST /pub?id={warm} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        c.response().await?;
        for _ in 0..20 {
            c.send(format!("GET /hot?id={warm} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").as_bytes())
                .await?;
            let (head, _) = c.response().await?;
            if head.status != 200 {
                return Err(err(format!("Nchan warm-up answered {}", head.status)));
            }
        }
        drop(c);
        let before = ng.rss_median().await?;
        let kind = if sse { "es" } else { "lp" };
        let ch = format!("memory-{kind}-{rep}");
        let addr = ng.addr;
        let conns: Vec<HConn> = if sse {
            stream::iter(0..n)
                .map(|_| nchan_stream(addr, &ch))
                .buffer_unordered(s.parallel)
                .try_collect()
                .await?
        } else {
            let req = nchan_lp_request(&ch, None);
            stream::iter(0..n)
                .map(|_| {
                    let req = req.as_bytes();
                    async move {
                        let mut c = HConn::connect(addr).await?;
                        c.send(req).await?;
                        Ok::<_, BoxError>(c)
                    }
                })
                .buffer_unordered(s.parallel)
                .try_collect()
                .await?
        };
        ng.wait_channel(&ch, n, Duration::from_secs(120)).await?;
        let with = ng.rss_median().await?;
        drop(conns);
        Ok::<_, BoxError>((with as f64 - before as f64) / n as f64 / 1024.0)
    }
    .await;
    ng.stop().await;
    r
}

/// What a `worker_connections` slot costs nginx before any client comes:
/// KiB per slot, from the idle workers' RSS with `slots` against 1,024.
async fn nginx_slot_kib(inst: &NchanInstall, workers: usize, slots: u64) -> Result<f64> {
    let idle = |k: u64| async move {
        let mut ng = Nginx::start(inst, "peers-slots", workers, k).await?;
        let r = ng.rss_median().await;
        ng.stop().await;
        r
    };
    let small = idle(1024).await?;
    let large = idle(slots).await?;
    let per = (large as f64 - small as f64) / (workers as f64 * (slots - 1024) as f64) / 1024.0;
    println!(
        "nginx's preallocated slots: idle workers' RSS {} MiB with {slots} worker_connections, {} MiB with 1024: {:.3} KiB per slot per worker",
        mib(large),
        mib(small),
        per
    );
    Ok(per)
}

// ---- the hot path ----------------------------------------------------------------------

/// What the hot path measures on each system.
struct Hot {
    hark_req: Arc<Vec<u8>>,
    nchan_req: Arc<Vec<u8>>,
    ceiling: Ceiling,
    stream_task: tokio::task::JoinHandle<()>,
}

/// Sets the hot path up: hark's room with 10 messages due after an older
/// cursor (kept in the hub by an open stream), Nchan's channel with the
/// same 10 messages, and the bare hyper server with hark's answer.
async fn hot_setup(h: &HarkSide, ng: Option<&Nginx>) -> Result<Hot> {
    const DUE: i64 = 10;
    let room = h.fx.room("peers-hot", &[h.reader, h.writer]).await;
    let mut stream = Conn::connect(h.hark.addr).await?;
    stream
        .send_get(&format!("/events?room_id={room}&access_token={}", h.token))
        .await?;
    if stream.read_head().await? != 200 {
        return Err(err("hark's /events did not answer 200"));
    }
    tokio::time::timeout(Duration::from_secs(10), stream.read_until(b"event: ready"))
        .await
        .map_err(|_| err("no `ready` event on the stream"))??;
    let stream_task = tokio::spawn(stream.drain());
    let mut c = Conn::connect(h.hark.addr).await?;
    let (_, older) = poll_result(&c.get(&poll_path(room, None, 0, &h.token)).await?)?;
    h.fx.insert_many_around(room, h.writer, DUE, BENCH_TEXT.0, BENCH_TEXT.1)
        .await;
    let path = poll_path(room, Some(&older), 0, &h.token);
    // Warm up until the answer carries every message, from the hub's memory.
    let mut mc = MetricsClient::new(h.hark.addr);
    let key = "hark_poll_answers_total{since=\"cursor\",source=\"memory\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let m0 = mc.scrape().await?;
        let r = c.get(&path).await?;
        let m1 = mc.scrape().await?;
        let (k, _) = poll_result(&r)?;
        let memory =
            delta(&m0, &m1, key) == 1.0 && delta(&m0, &m1, "hark_cold_queries_total") == 0.0;
        if k == DUE as usize && memory {
            break r.body;
        }
        if Instant::now() > deadline {
            println!("WARNING: hark's hot-path poll is not answered from memory after 10 s ({k} messages); measured anyway");
            break r.body;
        }
        // A bounded wait for the hub to catch up with the insert.
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    drop(c);
    let hark_req = Arc::new(format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").into_bytes());
    let messages: Vec<String> = serde_json::from_slice::<serde_json::Value>(&body)?["messages"]
        .as_array()
        .ok_or_else(|| err("no messages in hark's answer"))?
        .iter()
        .map(|m| m.to_string())
        .collect();
    println!(
        "hot path: hark answers {} messages in a {}-byte body (the floor answers the same bytes)",
        messages.len(),
        body.len()
    );
    let ch = format!("hot-{}", std::process::id());
    let nchan_req =
        Arc::new(format!("GET /hot?id={ch} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").into_bytes());
    if let Some(ng) = ng {
        let mut c = HConn::connect(ng.addr).await?;
        for m in &messages {
            c.send(
                format!(
                    "POST /pub?id={ch} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{m}",
                    m.len()
                )
                .as_bytes(),
            )
            .await?;
            let (head, _) = c.response().await?;
            if head.status != 201 && head.status != 202 {
                return Err(err(format!("Nchan publish answered {}", head.status)));
            }
        }
        c.send(&nchan_req).await?;
        let (head, nbody) = c.response().await?;
        let text = String::from_utf8_lossy(&nbody);
        let all = messages.iter().all(|m| text.contains(m.as_str()));
        if head.status != 200 || !all {
            return Err(err(format!(
                "Nchan's hot-path long poll answered {} without every message: {text}",
                head.status
            )));
        }
        println!(
            "hot path: Nchan answers the same {} messages in a {}-byte multipart body",
            messages.len(),
            nbody.len()
        );
    }
    let ceiling = Ceiling::start(Bytes::from(body))?;
    Ok(Hot {
        hark_req,
        nchan_req,
        ceiling,
        stream_task,
    })
}

/// One hot-path window: [req/s, p50 ms, p99 ms].
async fn hot_window(
    conns: Vec<Conn>,
    req: &Arc<Vec<u8>>,
    seconds: u64,
    what: &str,
) -> Result<Vec<f64>> {
    let (rps, lat, not_ok, failed) = load(conns, req, seconds).await?;
    if not_ok + failed > 0 {
        println!("WARNING: {what}: {not_ok} answers not 200, {failed} connections failed");
    }
    let ms = |us: u32| us as f64 / 1000.0;
    Ok(vec![rps, ms(pct(&lat, 50.0)), ms(pct(&lat, 99.0))])
}

// ---- the run -----------------------------------------------------------------------------

async fn run() -> Result<()> {
    let s = Settings::from_env()?;
    println!(
        "reps {}, fan-out sizes {:?}, {} measured rounds (+1 warm-up) {} ms apart, memory {} connections, hot path {} connections × {} s; parts {:?}; systems {:?}",
        s.reps,
        s.sizes,
        s.rounds,
        s.gap.as_millis(),
        s.memory,
        s.hot_connections,
        s.hot_seconds,
        s.parts,
        s.systems.iter().map(|x| x.name()).collect::<Vec<_>>()
    );
    let inst = if s.runs(Sys::Nchan) {
        Some(install_nchan()?)
    } else {
        None
    };
    let (nofile, open) = fd_usage(std::process::id())?;
    // nginx's slots per worker: every connection can land on one worker.
    let slots = nofile.saturating_sub(100).max(2048);
    // Each client is one descriptor here and one in the server.
    let most = nofile.saturating_sub(open + 200) as usize;
    let mut s = s;
    for n in s.sizes.iter_mut().chain(std::iter::once(&mut s.memory)) {
        if *n > most {
            println!("RLIMIT_NOFILE {nofile}: measuring {most} connections instead of {n}");
            *n = most;
        }
    }
    let pg = Pg::start(&[]).await?;
    let result = async {
        let hark = start_hark(&pg.conn, "peers", &[]).await?;
        let fx = Fixture::new(&pg.conn).await;
        let w = Writer::start(&pg.conn, true).await?;
        let reader = fx.user("peers-reader").await;
        let writer = fx.user("peers-writer").await;
        let h = HarkSide {
            hark,
            fx,
            w,
            reader,
            writer,
            token: token(reader),
        };
        let mut ng = match &inst {
            Some(inst) => {
                let ng = Nginx::start(inst, "peers", s.workers, slots).await?;
                println!(
                    "nginx: pid {} on http://{}, {} workers ({:?}), {slots} worker_connections, directory {}",
                    ng.pid,
                    ng.addr,
                    ng.worker_pids().len(),
                    ng.worker_pids(),
                    ng.dir.display()
                );
                Some(ng)
            }
            None => None,
        };
        let pb = Publisher::start()?;
        let r = measure(&s, &pg.conn, &h, ng.as_ref(), inst.as_ref(), &pb, slots).await;
        if let Some(ng) = ng.as_mut() {
            ng.stop().await;
        }
        let HarkSide { mut hark, .. } = h;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

async fn measure(
    s: &Settings,
    db: &str,
    h: &HarkSide,
    ng: Option<&Nginx>,
    inst: Option<&NchanInstall>,
    pb: &Publisher,
    slots: u64,
) -> Result<()> {
    let mut parts: Vec<Part> = Vec::new();
    let lat_cols_names = ["p50 ms", "p99 ms", "max ms"];
    for (kind, stream) in [("lp", false), ("sse", true)] {
        if !s.part(kind) {
            continue;
        }
        for &n in &s.sizes {
            let (title, short) = if stream {
                (
                    format!("Fan-out to {n} streams: {} measured rounds per rep pooled; latency from COMMIT returned (hark), POST written (Nchan), `go` (floor) to the event's blank line read (ms)", s.rounds),
                    format!("streams {n}"),
                )
            } else {
                (
                    format!("Fan-out to {n} waiting long polls (barrier re-polls): {} measured rounds per rep pooled; latency from COMMIT returned (hark), POST written (Nchan), `go` (floor) to the whole response read (ms)", s.rounds),
                    format!("long polls {n}"),
                )
            };
            println!();
            println!("-- {short} (load average {}) --", loadavg());
            let mut part = Part::new(title, short, &lat_cols_names);
            for rep in 0..s.reps {
                for sys in s.order(rep) {
                    let lat = match (sys, stream) {
                        (Sys::Floor, false) => fanout_floor(s, n, FLOOR_LP_BYTES).await?,
                        (Sys::Floor, true) => fanout_floor(s, n, FLOOR_SSE_BYTES).await?,
                        (Sys::Hark, false) => fanout_hark_lp(h, s, n, rep).await?,
                        (Sys::Hark, true) => fanout_hark_sse(h, s, n, rep).await?,
                        (Sys::Nchan, _) => {
                            let ng = ng.ok_or_else(|| err("no nginx"))?;
                            let ch = format!("{kind}-{n}-{rep}");
                            if stream {
                                fanout_nchan_sse(ng, pb, s, n, &ch).await?
                            } else {
                                fanout_nchan_lp(ng, pb, s, n, &ch).await?
                            }
                        }
                    };
                    part.record(rep, sys, lat_cols(lat));
                }
            }
            part.print();
            parts.push(part);
        }
    }

    if s.part("memory") && s.memory > 0 {
        let n = s.memory;
        println!();
        println!(
            "-- memory, {n} idle connections (load average {}) --",
            loadavg()
        );
        let slot = match inst {
            Some(inst) => nginx_slot_kib(inst, s.workers, slots).await?,
            None => 0.0,
        };
        for (stream, what) in [(false, "long poll"), (true, "stream")] {
            let mut part = Part::new(
                format!(
                    "Memory per idle {what}, {n} of them (KiB): RSS with them minus before, over {n}; hark's VmRSS, the sum of Nchan's workers' VmRSS, the floor writer's VmRSS. \"+slot\" adds nginx's preallocated worker_connections slot ({slot:.3} KiB)"
                ),
                format!("memory per idle {what}"),
                &["KiB", "KiB +slot"],
            );
            for rep in 0..s.reps {
                for sys in s.order(rep) {
                    let (kib, extra) = match sys {
                        Sys::Floor => (memory_floor(s, n).await?, 0.0),
                        Sys::Hark => (
                            memory_hark(db, (h.reader, h.writer, &h.token), s, n, stream, rep)
                                .await?,
                            0.0,
                        ),
                        Sys::Nchan => {
                            let inst = inst.ok_or_else(|| err("no nchan install"))?;
                            (memory_nchan(inst, s, slots, n, stream, rep).await?, slot)
                        }
                    };
                    part.record(rep, sys, vec![kib, kib + extra]);
                }
            }
            part.print();
            parts.push(part);
        }
    }

    if s.part("hot") {
        println!();
        println!("-- hot path (load average {}) --", loadavg());
        let hot = hot_setup(h, ng).await?;
        let mut part = Part::new(
            format!(
                "Hot path: {} keep-alive connections, {} s per window, one request at a time each; hark: a poll with an older cursor (10 messages due, from memory); Nchan: a long poll answered at once with the same 10 messages; floor: bare hyper with hark's body",
                s.hot_connections, s.hot_seconds
            ),
            "hot path".into(),
            &["req/s", "p50 ms", "p99 ms"],
        );
        let c = s.hot_connections;
        let r = async {
            for rep in 0..s.reps {
                for sys in s.order(rep) {
                    let vals = match sys {
                        Sys::Floor => {
                            let conns = futures::future::try_join_all(
                                (0..c).map(|_| Conn::connect(hot.ceiling.addr)),
                            )
                            .await?;
                            hot_window(conns, &hot.hark_req, s.hot_seconds, "floor").await?
                        }
                        Sys::Hark => {
                            let mut mc = MetricsClient::new(h.hark.addr);
                            // Others: the metrics connection and the stream.
                            let conns = connect_many(&mut mc, c, 64, 2).await?;
                            hot_window(conns, &hot.hark_req, s.hot_seconds, "hark").await?
                        }
                        Sys::Nchan => {
                            let ng = ng.ok_or_else(|| err("no nginx"))?;
                            let conns = futures::future::try_join_all(
                                (0..c).map(|_| Conn::connect(ng.addr)),
                            )
                            .await?;
                            hot_window(conns, &hot.nchan_req, s.hot_seconds, "Nchan").await?
                        }
                    };
                    part.record(rep, sys, vals);
                }
            }
            Ok::<_, BoxError>(())
        }
        .await;
        hot.stream_task.abort();
        drop(hot.ceiling);
        r?;
        part.print();
        parts.push(part);
    }

    print_summary(&parts, s.reps);
    println!(
        "(latency: hark's clock starts when COMMIT returns on the writer's thread, Nchan's just before its POST is written, the floor's when it is told to go; memory: VmRSS deltas, kernel socket buffers not included; the machine is shared: see the load averages)"
    );
    println!(
        "(what Nchan does not do here and hark does: no token or membership check, messages in memory only and only its last 10 per channel, no cursor that survives a gap; hark reads every change from PostgreSQL and its cursor is lossless)"
    );
    Ok(())
}
