//! Hot path: polls hark answers at once from the hub's memory, each form
//! in the same sitting as a bare-hyper ceiling, alternating, under
//! closed-loop load on keep-alive connections.
//!
//!     cargo bench --bench hot_path
//!
//! The forms of GET /api/chat/messages/poll/ measured (one room, `due`
//! messages in it, the token in `access_token=` for every form):
//!
//! 1. `since=<older cursor>&timeout=0`: the cursor from before the `due`
//!    messages; answered with all of them.
//! 2. `since=<latest cursor>&timeout=0`: the cursor after them; nothing
//!    is new, answered with an empty list and a cursor.
//! 3. no `since` (the latest page): answered from the hub's window.
//! 4. `since=<ISO-8601 time>&timeout=0`, one second before the messages'
//!    `created_at`: answered with all of them from the hub's window.
//!
//! The ceiling is a tiny hyper 1 `http1` server started inside this
//! process on 127.0.0.1 (its own tokio runtime, one worker per core, as
//! hark's) that answers every request with a fixed 200 JSON body: the
//! bytes of one of hark's answers to form 1, with the same content-type
//! and cache-control. It gets form 1's request bytes.
//!
//! The room is kept in the hub by one open `/events` stream on it (a hub
//! forgets a room nobody watches, and then every poll of it is a database
//! read). Before measuring, each form is warmed: its request is sent (on
//! one connection, one at a time) until one answer moves
//! `hark_poll_answers_total{since=..,source="memory"}` and not
//! `hark_cold_queries_total` — so the one cold read per room, and the
//! catch-up that brings a seeded window to the hub's head, happen outside
//! the measurement. If that does not happen within 10 s, the bench says so
//! (form, URL, counter deltas) and measures the form anyway.
//!
//! Then `HOT_ROUNDS` rounds, each running in turn the ceiling and forms
//! 1–4, each for `HOT_SECONDS` on `HOT_CONNECTIONS` fresh keep-alive
//! connections, with the same Rust load generator (one request at a time
//! per connection). For each window it prints req/s, p50/p99, the
//! server's CPU per request (hark's, or the ceiling's runtime threads'),
//! the CPU the rest of the machine used meanwhile ("other": other work
//! disturbs the window), the ratio to the same round's ceiling, and the
//! deltas of `hark_cold_queries_total` and
//! `hark_poll_answers_total{since,source}` (database queries per request).
//! A final table gives, per form, the ratio's min/median/max across
//! rounds, its median over the quiet rounds (other ≤ 20% of a core in the
//! form's and the ceiling's window), the database queries per request
//! over all rounds, and whether the target (at least half the ceiling's
//! req/s) was met. The bench fails (exits non-zero) when any
//! measured window of a form moved `hark_cold_queries_total` by more than
//! 0.001 per request; it never fails on the ratio (the machine is noisy).
//!
//! When `oha` is on PATH (or in ~/.cargo/bin) and `HOT_SKIP_OHA` is not
//! set, it also runs `oha` once on form 1's URL before the rounds (the
//! alternating comparison uses the Rust generator only).
//!
//! Settings (environment): HOT_ROUNDS (3), HOT_SECONDS (5),
//! HOT_CONNECTIONS (50), HOT_MESSAGES in the room (10; at most 100, the
//! default `limit` and hub window), HOT_HARK_LOG (hark's HARK_LOG,
//! "warn"; "info" logs one line per request), HOT_SKIP_OHA (unset).

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};

fn main() -> std::process::ExitCode {
    main_with("hot_path", run())
}

async fn run() -> Result<()> {
    let pg = Pg::start(&[]).await?;
    let result = async {
        let log = std::env::var("HOT_HARK_LOG").unwrap_or_else(|_| "warn".into());
        let mut hark = start_hark(&pg.conn, "hot_path", &[("HARK_LOG", &log)]).await?;
        println!("hark log level: {log}");
        let r = measure(&hark, &pg.conn).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

/// Most cold reads per request a measured window may cause.
const MAX_COLD_PER_REQUEST: f64 = 0.001;

/// The target: each form at least this share of the ceiling's req/s.
const TARGET_RATIO: f64 = 0.5;

/// A window is quiet when the rest of the machine used at most this much
/// CPU (% of one core) during it.
const QUIET_OTHER: f64 = 20.0;

const COLD: &str = "hark_cold_queries_total";

/// `hark_poll_answers_total` for one form of `since` and one source.
fn answers_key(since: &str, source: &str) -> String {
    format!("hark_poll_answers_total{{since=\"{since}\",source=\"{source}\"}}")
}

/// One poll form.
struct Form {
    name: &'static str,
    /// Its `since` label in `hark_poll_answers_total`.
    since: &'static str,
    /// Path and query (with the token).
    path: String,
    /// Messages each answer carries.
    expect: usize,
}

impl Form {
    fn shown(&self, token: &str) -> String {
        self.path.replace(token, "<token>")
    }
}

/// What a warm-up saw.
struct WarmUp {
    tries: u32,
    body: Bytes,
    cursor: String,
    /// The last request was answered from memory with no cold read.
    memory: bool,
    /// Deltas over the whole warm-up: cold reads, memory and database answers.
    cold: f64,
    mem: f64,
    db: f64,
    /// The last request's deltas and message count.
    last: (f64, f64, f64, usize),
}

/// Sends `form`'s request on one connection until an answer comes from
/// memory with no cold read (bounded: 10 s).
async fn warm(mc: &mut MetricsClient, addr: SocketAddr, form: &Form) -> Result<WarmUp> {
    let mut c = Conn::connect(addr).await?;
    let (mem_k, db_k) = (
        answers_key(form.since, "memory"),
        answers_key(form.since, "database"),
    );
    let start = mc.scrape().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tries = 0;
    loop {
        tries += 1;
        let m0 = mc.scrape().await?;
        let r = c.get(&form.path).await?;
        let m1 = mc.scrape().await?;
        let (n, cursor) = poll_result(&r)?;
        let d = |k: &str| delta(&m0, &m1, k);
        let last = (d(COLD), d(&mem_k), d(&db_k), n);
        let memory = n == form.expect && last.1 == 1.0 && last.0 == 0.0;
        if memory || Instant::now() > deadline {
            return Ok(WarmUp {
                tries,
                body: Bytes::from(r.body),
                cursor,
                memory,
                cold: delta(&start, &m1, COLD),
                mem: delta(&start, &m1, &mem_k),
                db: delta(&start, &m1, &db_k),
                last,
            });
        }
        // A bounded wait (above) on what the metrics announce: the hub
        // catching up with the insert, or a seeded window reaching its head.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`warm`], and what it saw printed; a form not answered from memory is
/// described in `not_memory` (and measured all the same).
async fn warm_up(
    mc: &mut MetricsClient,
    addr: SocketAddr,
    form: &Form,
    token: &str,
    not_memory: &mut Vec<String>,
) -> Result<WarmUp> {
    let w = warm(mc, addr, form).await?;
    println!(
        "form {}: GET {} -> 200, {} messages, {}-byte body; warm-up: {} request(s), cold reads +{}, answers from memory +{}, from the database +{}",
        form.name,
        form.shown(token),
        w.last.3,
        w.body.len(),
        w.tries,
        w.cold,
        w.mem,
        w.db
    );
    if !w.memory {
        let (cold, mem, db, n) = w.last;
        let msg = format!(
            "form {} is NOT answered from memory after {} warm-up requests (10 s): its last request moved hark_cold_queries_total by +{cold}, {} by +{mem}, {} by +{db} and carried {n} messages (expected {}); URL: GET {}",
            form.name,
            w.tries,
            answers_key(form.since, "memory"),
            answers_key(form.since, "database"),
            form.expect,
            form.shown(token)
        );
        println!("WARNING: {msg}");
        not_memory.push(msg);
    }
    Ok(w)
}

// ---- the ceiling: a bare hyper server -------------------------------------

struct Ceiling {
    addr: SocketAddr,
    /// Its runtime's threads (for their CPU time).
    tids: Arc<Mutex<Vec<i32>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ceiling {
    /// A hyper 1 `http1` server on 127.0.0.1:0 with a runtime of its own
    /// (one worker per core, as hark's), answering every request with
    /// `body` as JSON, keep-alive.
    fn start(body: Bytes) -> Result<Ceiling> {
        let tids = Arc::new(Mutex::new(Vec::new()));
        let seen = tids.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("ceiling")
            .on_thread_start(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                seen.lock().unwrap().push(tid);
            })
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ceiling-main".into())
            .spawn(move || {
                rt.spawn(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("ceiling: {e}");
                            return;
                        }
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
            tids,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// CPU time of its runtime's threads so far.
    fn cpu_time(&self) -> Duration {
        let ticks: u64 = self
            .tids
            .lock()
            .unwrap()
            .iter()
            .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok())
            .filter_map(|s| hark_kit::procfs::stat_fields(&s).map(|(_, t)| t))
            .sum();
        hark_kit::procfs::ticks_to_duration(ticks)
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

// ---- the load generator ----------------------------------------------------

struct Load {
    secs: f64,
    /// Latencies of the 200 answers, µs, sorted.
    lat: Vec<u32>,
    not_ok: u64,
    failed: u64,
    /// The connections still open (closed by the caller, after its readings).
    conns: Vec<Conn>,
}

/// Every connection sends `request` and reads the answer, again and again,
/// for `seconds`.
async fn load(conns: Vec<Conn>, request: &Arc<Vec<u8>>, seconds: u64) -> Result<Load> {
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
                    return (None, lat, not_ok, 1u64);
                }
                match conn.read_response().await {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed().as_micros() as u32),
                    Ok(_) => not_ok += 1,
                    Err(_) => return (None, lat, not_ok, 1),
                }
            }
            (Some(conn), lat, not_ok, 0)
        }));
    }
    let mut out = Load {
        secs: 0.0,
        lat: Vec::new(),
        not_ok: 0,
        failed: 0,
        conns: Vec::new(),
    };
    for t in tasks {
        let (c, l, n, f) = t.await?;
        out.conns.extend(c);
        out.lat.extend(l);
        out.not_ok += n;
        out.failed += f;
    }
    out.secs = started.elapsed().as_secs_f64();
    out.lat.sort_unstable();
    if out.lat.is_empty() {
        return Err(err("no request succeeded"));
    }
    Ok(out)
}

/// One measured window: the ceiling (`target` 0) or a form (1–4).
struct Window {
    round: usize,
    target: usize,
    secs: f64,
    ok: u64,
    not_ok: u64,
    failed: u64,
    p50: u32,
    p99: u32,
    /// The server's CPU time over the window.
    cpu: Duration,
    /// CPU used by everything but hark, this process and PostgreSQL, in %
    /// of one core: other work on the machine.
    other: f64,
    /// hark's counters over the window (none for the ceiling): cold
    /// reads, answers from memory, answers that read the database.
    counters: Option<(f64, f64, f64)>,
}

impl Window {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    fn requests(&self) -> u64 {
        self.ok + self.not_ok
    }
    fn cold_per_request(&self) -> Option<f64> {
        self.counters
            .map(|(cold, _, _)| cold / self.requests().max(1) as f64)
    }
}

fn window_of(
    round: usize,
    target: usize,
    l: &Load,
    cpu: Duration,
    other: f64,
    counters: Option<(f64, f64, f64)>,
) -> Window {
    Window {
        round,
        target,
        secs: l.secs,
        ok: l.lat.len() as u64,
        not_ok: l.not_ok,
        failed: l.failed,
        p50: pct(&l.lat, 50.0),
        p99: pct(&l.lat, 99.0),
        cpu,
        other,
        counters,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn find_oha() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(c) = cargo_home {
        dirs.push(c.join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("oha"))
        .find(|p| p.is_file())
}

async fn measure(hark: &Hark, db: &str) -> Result<()> {
    let rounds: usize = env_num("HOT_ROUNDS", 3);
    let connections: usize = env_num("HOT_CONNECTIONS", 50);
    let seconds: u64 = env_num("HOT_SECONDS", 5);
    let due: i64 = env_num("HOT_MESSAGES", 10);
    let fx = Fixture::new(db).await;
    let reader = fx.user("reader").await;
    let writer = fx.user("writer").await;
    let room = fx.room("hot", &[reader, writer]).await;
    let token = token(reader);
    let mut mc = MetricsClient::new(hark.addr);

    // Keep the room in the hub for the whole run.
    let mut stream = Conn::connect(hark.addr).await?;
    stream
        .send_get(&format!("/events?room_id={room}&access_token={token}"))
        .await?;
    let status = stream.read_head().await?;
    if status != 200 {
        return Err(err(format!("/events answered {status}")));
    }
    tokio::time::timeout(Duration::from_secs(10), stream.read_until(b"event: ready"))
        .await
        .map_err(|_| err("no `ready` event on the stream"))??;
    let stream_task = tokio::spawn(stream.drain());

    // A cursor, then `due` messages after it.
    let mut c = Conn::connect(hark.addr).await?;
    let m0 = mc.scrape().await?;
    let (_, older) = poll_result(&c.get(&poll_path(room, None, 0, &token)).await?)?;
    let m1 = mc.scrape().await?;
    drop(c);
    println!(
        "setup: the first poll (no since, the room still empty) for the older cursor: cold reads +{}, answers from the database +{} (it seeds the hub's window of the room)",
        delta(&m0, &m1, COLD),
        delta(&m0, &m1, &answers_key("none", "database"))
    );
    fx.insert_many_around(room, writer, due, BENCH_TEXT.0, BENCH_TEXT.1)
        .await;
    let expect = due.clamp(0, 100) as usize;
    let iso: String = fx
        .db
        .query_one(
            "SELECT to_char((min(created_at) - interval '1 second') AT TIME ZONE 'UTC', \
             'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM chat_chatmessage WHERE room_id = $1",
            &[&room],
        )
        .await?
        .get(0);

    println!(
        "room {room}: {due} messages; the token in access_token= for every form (and in the ceiling's request)"
    );
    let mut not_memory = Vec::new();
    let older = Form {
        name: "1 older cursor",
        since: "cursor",
        path: poll_path(room, Some(&older), 0, &token),
        expect,
    };
    // Form 1's answer gives form 2 its cursor. The setup's first poll
    // seeded the room's window; form 4's first request widens it back to
    // its time (a cold read).
    let first = warm_up(&mut mc, hark.addr, &older, &token, &mut not_memory).await?;
    let forms = [
        older,
        Form {
            name: "2 latest cursor",
            since: "cursor",
            path: poll_path(room, Some(&first.cursor), 0, &token),
            expect: 0,
        },
        // No `since`: `timeout` does not matter; none is sent.
        Form {
            name: "3 no since",
            since: "none",
            path: format!("/api/chat/messages/poll/?room_id={room}&access_token={token}"),
            expect,
        },
        Form {
            name: "4 ISO since",
            since: "time",
            path: poll_path(room, Some(&iso), 0, &token),
            expect,
        },
    ];
    for form in &forms[1..] {
        warm_up(&mut mc, hark.addr, form, &token, &mut not_memory).await?;
    }
    let body = first.body.clone();
    let ceiling = Ceiling::start(body.clone())?;
    println!(
        "ceiling: bare hyper 1 http1 on http://{} (in this process, its own runtime), a fixed {}-byte JSON body (one of hark's form-1 answers), keep-alive",
        ceiling.addr,
        body.len()
    );

    run_oha(hark, &mut mc, &forms[0], connections, seconds, reader).await?;

    let requests: Vec<Arc<Vec<u8>>> = forms
        .iter()
        .map(|f| {
            Arc::new(format!("GET {} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n", f.path).into_bytes())
        })
        .collect();
    let keys: Vec<(String, String)> = forms
        .iter()
        .map(|f| {
            (
                answers_key(f.since, "memory"),
                answers_key(f.since, "database"),
            )
        })
        .collect();
    println!();
    println!(
        "{rounds} rounds, each: ceiling, forms 1-4 in turn, {seconds} s each on {connections} fresh keep-alive connections (Rust generator)"
    );
    let mut windows: Vec<Window> = Vec::new();
    for round in 1..=rounds {
        // The ceiling.
        let conns =
            futures::future::try_join_all((0..connections).map(|_| Conn::connect(ceiling.addr)))
                .await?;
        let snap = CpuSnap::take(hark.pid);
        let cpu0 = ceiling.cpu_time();
        let mut l = load(conns, &requests[0], seconds).await?;
        let cpu = ceiling.cpu_time().saturating_sub(cpu0);
        let other = CpuSnap::take(hark.pid).since(&snap).other;
        l.conns.clear();
        let w = window_of(round, 0, &l, cpu, other, None);
        print_window(&w, w.rps(), "ceiling");
        let ceiling_rps = w.rps();
        windows.push(w);
        for (i, form) in forms.iter().enumerate() {
            let conns = connect_many(&mut mc, connections, 64, 2).await?;
            let m0 = mc.scrape().await?;
            let snap = CpuSnap::take(hark.pid);
            let cpu0 = hark.cpu_time()?;
            let mut l = load(conns, &requests[i], seconds).await?;
            let cpu = hark.cpu_time()?.saturating_sub(cpu0);
            let other = CpuSnap::take(hark.pid).since(&snap).other;
            let m1 = mc.scrape().await?;
            l.conns.clear();
            let counters = (
                delta(&m0, &m1, COLD),
                delta(&m0, &m1, &keys[i].0),
                delta(&m0, &m1, &keys[i].1),
            );
            let w = window_of(round, i + 1, &l, cpu, other, Some(counters));
            print_window(&w, ceiling_rps, form.name);
            windows.push(w);
        }
    }
    stream_task.abort();
    drop(ceiling);

    // Every window.
    let ceiling_window = |round: usize| {
        windows
            .iter()
            .find(|w| w.round == round && w.target == 0)
            .expect("every round measures the ceiling")
    };
    let ceiling_of = |round: usize| ceiling_window(round).rps();
    let name = |t: usize| if t == 0 { "ceiling" } else { forms[t - 1].name };
    println!();
    println!(
        "Every window ({seconds} s, {connections} connections; latency in ms; CPU: the server's, hark's or the ceiling's runtime threads', in % of one core; other CPU: the rest of the machine's, not hark, this process or PostgreSQL)"
    );
    let rows: Vec<Vec<String>> = windows
        .iter()
        .map(|w| window_row(w, ceiling_of(w.round), name(w.target)))
        .collect();
    table(WINDOW_HEADER, &rows);

    // Per form, across rounds.
    println!();
    println!(
        "Summary over {rounds} rounds: ratio = the form's req/s / the same round's ceiling req/s; target: ratio ≥ {TARGET_RATIO}, no database query per request"
    );
    let mut rows = Vec::new();
    let mut cold_failures = Vec::new();
    for t in 0..=forms.len() {
        let ws: Vec<&Window> = windows.iter().filter(|w| w.target == t).collect();
        let mut rps: Vec<f64> = ws.iter().map(|w| w.rps()).collect();
        let mut ratios: Vec<f64> = ws.iter().map(|w| w.rps() / ceiling_of(w.round)).collect();
        let requests: u64 = ws.iter().map(|w| w.requests()).sum();
        let cpu: Duration = ws.iter().map(|w| w.cpu).sum();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let med = median(&mut ratios);
        let met_rounds = ratios.iter().filter(|&&r| r >= TARGET_RATIO).count();
        // Rounds in which both this window and the ceiling's were quiet.
        let mut quiet: Vec<f64> = ws
            .iter()
            .filter(|w| w.other <= QUIET_OTHER && ceiling_window(w.round).other <= QUIET_OTHER)
            .map(|w| w.rps() / ceiling_of(w.round))
            .collect();
        let quiet = match quiet.len() {
            0 => format!("- (0 of {})", ws.len()),
            k => format!("{:.2} ({k} of {})", median(&mut quiet), ws.len()),
        };
        let (cold, mem, db) = ws
            .iter()
            .filter_map(|w| w.counters)
            .fold((0.0, 0.0, 0.0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
        let n = requests.max(1) as f64;
        let mut row = vec![
            name(t).to_string(),
            format!("{:.0}", median(&mut rps)),
            format!("{:.1}", 1e6 * cpu.as_secs_f64() / n),
            format!("{:.0}%", ws.iter().map(|w| w.other).fold(0.0, f64::max)),
        ];
        if t == 0 {
            row.extend(["1", "1", "1", "-", "-", "-", "-", "-"].map(String::from));
        } else {
            row.extend([
                format!("{min:.2}"),
                format!("{med:.2}"),
                format!("{max:.2}"),
                format!(
                    "{} (median), {met_rounds}/{} rounds",
                    met(med >= TARGET_RATIO),
                    ratios.len()
                ),
                quiet,
                format!("{:.4}", mem / n),
                format!("{:.4}", db / n),
                format!("{:.5}", cold / n),
            ]);
            for w in &ws {
                if let Some(per) = w.cold_per_request().filter(|&p| p > MAX_COLD_PER_REQUEST) {
                    let (c, m, d) = w.counters.unwrap_or_default();
                    cold_failures.push(format!(
                        "form {} round {}: hark_cold_queries_total +{c} over {} requests ({per:.4} per request; answers from memory +{m}, from the database +{d}); URL: GET {}",
                        name(t),
                        w.round,
                        w.requests(),
                        forms[t - 1].shown(&token)
                    ));
                }
            }
        }
        rows.push(row);
    }
    table(
        &[
            "form",
            "req/s (median)",
            "server CPU µs/req",
            "other CPU (max)",
            "ratio min",
            "median",
            "max",
            "≥ 0.5 of the ceiling",
            "median ratio, quiet rounds",
            "memory answers/req",
            "database answers/req",
            "db queries/req",
        ],
        &rows,
    );
    println!(
        "(quiet rounds: the form's window and the same round's ceiling window each with other CPU ≤ {QUIET_OTHER:.0}% of one core)"
    );
    println!(
        "(db queries/req: hark_cold_queries_total's delta over every measured window of the form / its requests; memory and database answers: hark_poll_answers_total{{since=<the form's>,source=..}})"
    );
    for m in &not_memory {
        println!("NOT FROM MEMORY at warm-up: {m}");
    }
    if cold_failures.is_empty() {
        println!(
            "no database query per request: every form's measured windows stayed at ≤ {MAX_COLD_PER_REQUEST} cold reads per request"
        );
        Ok(())
    } else {
        for f in &cold_failures {
            println!("DATABASE QUERIES IN THE STEADY STATE: {f}");
        }
        Err(err(format!(
            "{} measured window(s) moved hark_cold_queries_total by more than {MAX_COLD_PER_REQUEST} per request:\n{}",
            cold_failures.len(),
            cold_failures.join("\n")
        )))
    }
}

const WINDOW_HEADER: &[&str] = &[
    "round",
    "target",
    "req/s",
    "p50",
    "p99",
    "not 200",
    "transport errors",
    "CPU µs/req",
    "CPU",
    "other CPU",
    "ratio",
    "+cold",
    "+memory answers",
    "+database answers",
    "db queries/req",
];

fn window_row(w: &Window, ceiling_rps: f64, name: &str) -> Vec<String> {
    let ms = |us: u32| format!("{:.3}", us as f64 / 1000.0);
    let n = w.requests().max(1) as f64;
    let mut row = vec![
        w.round.to_string(),
        name.to_string(),
        format!("{:.0}", w.rps()),
        ms(w.p50),
        ms(w.p99),
        w.not_ok.to_string(),
        w.failed.to_string(),
        format!("{:.1}", 1e6 * w.cpu.as_secs_f64() / n),
        format!("{:.0}%", 100.0 * w.cpu.as_secs_f64() / w.secs),
        format!("{:.0}%", w.other),
        format!("{:.2}", w.rps() / ceiling_rps),
    ];
    match w.counters {
        Some((cold, mem, db)) => row.extend([
            format!("{cold:.0}"),
            format!("{mem:.0}"),
            format!("{db:.0}"),
            format!("{:.5}", cold / n),
        ]),
        None => row.extend(["-", "-", "-", "-"].map(String::from)),
    }
    row
}

/// One line as soon as a window ends.
fn print_window(w: &Window, ceiling_rps: f64, name: &str) {
    let row = window_row(w, ceiling_rps, name);
    let parts: Vec<String> = WINDOW_HEADER
        .iter()
        .zip(&row)
        .map(|(h, v)| format!("{h} {v}"))
        .collect();
    println!("  {}", parts.join(", "));
}

/// `oha` once on form 1's URL, when it is installed and not skipped.
async fn run_oha(
    hark: &Hark,
    mc: &mut MetricsClient,
    form: &Form,
    connections: usize,
    seconds: u64,
    user: i64,
) -> Result<()> {
    let url = format!("http://{}{}", hark.addr, form.path);
    let oha = find_oha();
    let skip_oha = std::env::var_os("HOT_SKIP_OHA").is_some();
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    let json_path = out_dir.join("hot_path-oha.json");
    println!();
    println!("oha command for form 1 (the token is a real one, valid 6 h, for user {user}):");
    println!(
        "  oha --no-tui -z {seconds}s -c {connections} --output-format json -o {} '{url}'",
        json_path.display()
    );
    let oha = match (oha, skip_oha) {
        (Some(oha), false) => oha,
        (None, _) => {
            println!("oha is not on PATH: install it with `cargo install oha --locked`");
            return Ok(());
        }
        (_, true) => {
            println!("HOT_SKIP_OHA is set: oha not run");
            return Ok(());
        }
    };
    let before = mc.scrape().await?;
    let cpu0 = hark.cpu_time()?;
    let status = tokio::process::Command::new(oha)
        .args([
            "--no-tui",
            "-z",
            &format!("{seconds}s"),
            "-c",
            &connections.to_string(),
        ])
        .args(["--output-format", "json", "-o"])
        .arg(&json_path)
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await?;
    let cpu = hark.cpu_time()? - cpu0;
    if !status.success() {
        return Err(err(format!("oha exited with {status}")));
    }
    let after = mc.scrape().await?;
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path)?)?;
    let s = &j["summary"];
    let p = &j["latencyPercentiles"];
    let codes = &j["statusCodeDistribution"];
    let ok = codes["200"].as_u64().unwrap_or(0);
    let all: u64 = codes
        .as_object()
        .map_or(0, |o| o.values().filter_map(|v| v.as_u64()).sum());
    let errors: Vec<String> = j["errorDistribution"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{} {k}", v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let m = |v: &serde_json::Value| format!("{:.3}", f(v) * 1000.0);
    let total = f(&s["total"]);
    let keys: HashMap<&str, String> = [
        ("memory", answers_key(form.since, "memory")),
        ("database", answers_key(form.since, "database")),
    ]
    .into_iter()
    .collect();
    table(
        &[
            "oha, form 1",
            "s",
            "requests",
            "req/s",
            "p50",
            "p99",
            "not 200",
            "not completed",
            "hark CPU µs/req",
            "+cold",
            "+memory answers",
            "+database answers",
        ],
        &[vec![
            format!("{connections} conns"),
            format!("{total:.1}"),
            all.to_string(),
            format!("{:.0}", f(&s["requestsPerSec"])),
            m(&p["p50"]),
            m(&p["p99"]),
            (all - ok).to_string(),
            if errors.is_empty() {
                "0".into()
            } else {
                errors.join(", ")
            },
            format!("{:.1}", 1e6 * cpu.as_secs_f64() / all.max(1) as f64),
            format!("{:.0}", delta(&before, &after, COLD)),
            format!("{:.0}", delta(&before, &after, &keys["memory"])),
            format!("{:.0}", delta(&before, &after, &keys["database"])),
        ]],
    );
    println!("oha's JSON report: {}", json_path.display());
    Ok(())
}
