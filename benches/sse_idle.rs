//! Idle `/events` streams: hark's memory per open stream, and the CPU its
//! heartbeats (`: ping`) cost when nothing else happens.
//!
//!     cargo bench --bench sse_idle
//!
//! N streams (default 20,000, or fewer when the fd limit does not leave
//! room: each stream is one descriptor in hark and one here), spread
//! evenly over 100 rooms (`/events?room_id=R`, one room per stream), all
//! of one user. For each ping interval (default 15000 ms, hark's default,
//! then 1000 ms) a fresh hark is started on the same database:
//!
//! * RSS (/proc/PID/status VmRSS, median of 5 samples): idle after a
//!   warm-up, with N streams open, after closing them; the first hark
//!   opens N streams twice (waves), the others once.
//! * CPU (utime + stime from /proc/PID/stat) over a window with no
//!   streams, then over a window with N idle streams; pings and bytes
//!   received by the load generator in that window.
//!
//! * For comparison, on one more fresh hark: N plain connections that
//!   have sent no request (the connection's share of a stream's cost).
//!
//! Waits are conditions on /metrics (hark_open_streams,
//! hark_open_connections); the only timed sleeps are the CPU windows.
//!
//! Settings (environment): SSE_IDLE_STREAMS (20000), SSE_IDLE_ROOMS (100),
//! SSE_IDLE_PINGS ("15000,1000"), SSE_IDLE_WINDOW_S (15),
//! SSE_IDLE_BASELINE_S (5), SSE_IDLE_WAVES (2), SSE_IDLE_PARALLEL (128),
//! SSE_IDLE_CONNECTIONS_ONLY (1; 0 skips the comparison), and SSE_REUSED
//! (0; 1 sends each connection a `GET /healthz` before its stream, as for
//! a browser that reuses a keep-alive connection for its EventSource; 2
//! sends a bodiless `PUT` instead, so that hyper serves the stream; 3 a
//! bodiless `POST`, which the lean connection serves too).

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn main() -> std::process::ExitCode {
    main_with("sse_idle", run())
}

struct Settings {
    want: usize,
    rooms: usize,
    window: Duration,
    baseline: Duration,
    waves: usize,
    parallel: usize,
    conn_only: bool,
}

async fn run() -> Result<()> {
    let s = Settings {
        want: env_num("SSE_IDLE_STREAMS", 20_000),
        rooms: env_num("SSE_IDLE_ROOMS", 100usize).max(1),
        window: Duration::from_secs(env_num("SSE_IDLE_WINDOW_S", 15)),
        baseline: Duration::from_secs(env_num("SSE_IDLE_BASELINE_S", 5)),
        waves: env_num("SSE_IDLE_WAVES", 2usize).max(1),
        parallel: env_num("SSE_IDLE_PARALLEL", 128),
        conn_only: env_num("SSE_IDLE_CONNECTIONS_ONLY", 1) != 0,
    };
    let pings: Vec<u64> = std::env::var("SSE_IDLE_PINGS")
        .unwrap_or_else(|_| "15000,1000".into())
        .split(',')
        .map(|p| p.trim().parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(format!("SSE_IDLE_PINGS: {e}")))?;
    match env_num("SSE_REUSED", 0u8) {
        0 => {}
        1 => println!("SSE_REUSED=1: each stream's connection served a GET /healthz first"),
        2 => println!("SSE_REUSED=2: each stream's connection served a PUT first (hyper's path)"),
        _ => println!("SSE_REUSED=3: each stream's connection served a POST first"),
    }
    let pg = Pg::start(&[]).await?;
    let result = async {
        let mut rooms: Vec<i64> = Vec::with_capacity(s.rooms);
        let mut token = String::new();
        let mut n = 0;
        let mut mem_rows = Vec::new();
        let mut cpu_rows = Vec::new();
        let mut per_stream: Vec<(u64, usize, f64)> = Vec::new();
        for (i, &ping) in pings.iter().enumerate() {
            let ping_s = ping.to_string();
            let mut hark = start_hark(
                &pg.conn,
                &format!("sse_idle-ping{ping}"),
                &[("HARK_PING_INTERVAL_MS", ping_s.as_str())],
            )
            .await?;
            if i == 0 {
                // hark has created the tables.
                let fx = Fixture::new(&pg.conn).await;
                let reader = fx.user("reader").await;
                let writer = fx.user("writer").await;
                for r in 0..s.rooms {
                    rooms.push(fx.room(&format!("idle-{r}"), &[reader, writer]).await);
                }
                token = common::token(reader);
            }
            let waves = if i == 0 { s.waves } else { 1 };
            let r = measure(
                &hark,
                &s,
                ping,
                waves,
                &rooms,
                &token,
                &mut mem_rows,
                &mut cpu_rows,
                &mut per_stream,
            )
            .await;
            stop_hark(&mut hark).await;
            n = n.max(r?);
        }
        if s.conn_only {
            let mut hark = start_hark(&pg.conn, "sse_idle-connections", &[]).await?;
            // Connections that send nothing are closed after hark's 10 s
            // header-read timeout, and opening 19,900 of them took 9.3 s on
            // one host and longer than that in the runs after it; half as
            // many give the same cost per connection.
            let conns = n.min(10_000);
            let r = connections_only(&hark, &s, conns, &rooms, &token, &mut mem_rows).await;
            stop_hark(&mut hark).await;
            r?;
        }
        println!();
        println!(
            "Memory: hark VmRSS (MiB) with N idle /events streams over {} rooms; KiB per stream",
            s.rooms
        );
        table(
            &[
                "ping ms",
                "wave",
                "streams",
                "idle (warm)",
                "before wave",
                "N open",
                "after close",
                "KiB/stream vs idle",
                "KiB/stream vs before",
                "open s",
                "close->0 s",
                "sockstat with N open",
            ],
            &mem_rows,
        );
        println!();
        println!(
            "CPU at idle: user+system time over the window (10 ms ticks), % of one core; pings and bytes as received by the load generator; \"other\" = rest of the machine (not hark, this process or its PostgreSQL)"
        );
        table(
            &[
                "ping ms",
                "streams",
                "window s",
                "hark CPU ms",
                "% of one core",
                "pings",
                "pings/s",
                "µs hark CPU/ping",
                "SSE bytes/s",
                "wire bytes/s",
                "bench CPU %",
                "PG CPU %",
                "other CPU %",
            ],
            &cpu_rows,
        );
        for (ping, wave, b) in &per_stream {
            println!(
                "ping {ping} ms, wave {wave}: {} KiB per stream vs idle (target < 8 KiB: {})",
                kib(*b),
                met(*b < 8.0 * 1024.0)
            );
        }
        println!(
            "(kernel socket buffers are not in VmRSS; sockstat counts both ends' sockets and TCP memory in pages)"
        );
        Ok::<(), BoxError>(())
    }
    .await;
    pg.stop().await;
    result
}

#[derive(Default)]
struct Counters {
    pings: AtomicU64,
    other_comments: AtomicU64,
    events: AtomicU64,
    body: AtomicU64,
    wire: AtomicU64,
    ended: AtomicU64,
}

/// Reads every stream until aborted, counting what arrives.
fn spawn_readers(
    streams: Vec<(SseStream, String)>,
    c: &Arc<Counters>,
) -> Vec<tokio::task::JoinHandle<()>> {
    streams
        .into_iter()
        .map(|(mut s, _)| {
            let c = c.clone();
            tokio::spawn(async move {
                loop {
                    let (b0, w0) = (s.dec.body_bytes, s.wire_bytes);
                    let r = s
                        .read_some(&mut |item| match item {
                            SseItem::Comment(t) if t.trim_ascii() == b"ping" => {
                                c.pings.fetch_add(1, Relaxed);
                            }
                            SseItem::Comment(_) => {
                                c.other_comments.fetch_add(1, Relaxed);
                            }
                            SseItem::Event(_) => {
                                c.events.fetch_add(1, Relaxed);
                            }
                        })
                        .await;
                    c.body.fetch_add(s.dec.body_bytes - b0, Relaxed);
                    c.wire.fetch_add(s.wire_bytes - w0, Relaxed);
                    if r.is_err() {
                        c.ended.fetch_add(1, Relaxed);
                        return;
                    }
                }
            })
        })
        .collect()
}

struct Window {
    cpu: CpuUse,
    pings: u64,
    body: u64,
    wire: u64,
}

/// CPU and counters over `d` (a measurement window, not a wait).
async fn cpu_window(hark: &Hark, c: &Counters, d: Duration) -> Result<Window> {
    let (p0, b0, w0) = (
        c.pings.load(Relaxed),
        c.body.load(Relaxed),
        c.wire.load(Relaxed),
    );
    let s0 = CpuSnap::take(hark.pid);
    tokio::time::sleep(d).await;
    let cpu = CpuSnap::take(hark.pid).since(&s0);
    Ok(Window {
        cpu,
        pings: c.pings.load(Relaxed) - p0,
        body: c.body.load(Relaxed) - b0,
        wire: c.wire.load(Relaxed) - w0,
    })
}

fn cpu_row(ping: u64, streams: usize, w: &Window) -> Vec<String> {
    let secs = w.cpu.secs;
    let cpu_ms = w.cpu.hark_ms;
    vec![
        ping.to_string(),
        streams.to_string(),
        format!("{secs:.1}"),
        format!("{cpu_ms:.0}"),
        format!("{:.2}", w.cpu.hark),
        w.pings.to_string(),
        format!("{:.0}", w.pings as f64 / secs),
        if w.pings > 0 {
            format!("{:.1}", cpu_ms * 1000.0 / w.pings as f64)
        } else {
            "-".into()
        },
        format!("{:.0}", w.body as f64 / secs),
        format!("{:.0}", w.wire as f64 / secs),
        format!("{:.1}", w.cpu.bench),
        format!("{:.1}", w.cpu.pg),
        format!("{:.1}", w.cpu.other),
    ]
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    hark: &Hark,
    s: &Settings,
    ping: u64,
    waves: usize,
    rooms: &[i64],
    token: &str,
    mem_rows: &mut Vec<Vec<String>>,
    cpu_rows: &mut Vec<Vec<String>>,
    per_stream: &mut Vec<(u64, usize, f64)>,
) -> Result<usize> {
    let mut mc = MetricsClient::new(hark.addr);
    let target = |i: usize| events_path(&[rooms[i % rooms.len()]], token);

    // Warm-up: token and participant caches, every room in the hub, the
    // database pool filled by concurrent stream setups.
    let warm = open_streams(&mut mc, 400.min(s.want), s.parallel, 0, target).await?;
    drop(warm);
    mc.wait_until("hark_open_streams", Duration::from_secs(60), |v| v <= 0.0)
        .await?;
    mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
        v <= 1.0
    })
    .await?;

    // How many streams fit: one descriptor per stream on each side.
    let (own_soft, own_open) = fd_usage(std::process::id())?;
    let (hark_soft, hark_open) = fd_usage(hark.pid)?;
    let own_room = own_soft.saturating_sub(own_open + 16) as usize;
    let hark_room = hark_soft.saturating_sub(hark_open + 16) as usize;
    let mut n = s.want.min(own_room).min(hark_room);
    if n < s.want {
        n -= n % rooms.len();
        println!(
            "fd limit: asked for {} streams; load generator {own_open} of {own_soft} fds in use, hark {hark_open} of {hark_soft}; measuring {n} streams (16 fds kept spare on each side)",
            s.want
        );
    }
    if n == 0 {
        return Err(err("no file descriptors left for streams"));
    }

    let idle = rss_median(hark).await?;
    println!(
        "hark (ping {ping} ms) idle RSS after warm-up: {} MiB, {} fds open",
        mib(idle),
        fd_usage(hark.pid)?.1
    );
    let counters = Arc::new(Counters::default());
    let w = cpu_window(hark, &counters, s.baseline).await?;
    cpu_rows.push(cpu_row(ping, 0, &w));

    for wave in 1..=waves {
        let before = rss_median(hark).await?;
        let t = Instant::now();
        let streams = open_streams(&mut mc, n, s.parallel, 0, target).await?;
        let open_s = t.elapsed().as_secs_f64();
        let tasks = spawn_readers(streams, &counters);
        let with_n = rss_median(hark).await?;
        let sockstat = tcp_sockstat();
        println!(
            "ping {ping} ms, wave {wave}: {n} streams open in {open_s:.1} s; RSS {} MiB, {} threads, {} fds; load generator RSS {} MiB; {sockstat}",
            mib(with_n),
            hark.threads()?,
            fd_usage(hark.pid)?.1,
            mib(proc_status_kib(std::process::id(), "VmRSS:")? * 1024),
        );
        if wave == 1 {
            let w = cpu_window(hark, &counters, s.window).await?;
            cpu_rows.push(cpu_row(ping, n, &w));
            let ended = counters.ended.load(Relaxed);
            if ended > 0 {
                return Err(err(format!("{ended} streams ended during the window")));
            }
            let open = mc.get("hark_open_streams").await?;
            if open as usize != n {
                return Err(err(format!("hark_open_streams is {open} after the window")));
            }
        }
        // Close every stream (the sockets close with their tasks).
        let t = Instant::now();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        mc.wait_until("hark_open_streams", Duration::from_secs(120), |v| v <= 0.0)
            .await?;
        mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
            v <= 1.0
        })
        .await?;
        let close_s = t.elapsed().as_secs_f64();
        let after = rss_median(hark).await?;
        let d = |a: u64, b: u64| (a as f64 - b as f64) / n as f64;
        per_stream.push((ping, wave, d(with_n, idle)));
        mem_rows.push(vec![
            ping.to_string(),
            wave.to_string(),
            n.to_string(),
            mib(idle),
            mib(before),
            mib(with_n),
            mib(after),
            kib(d(with_n, idle)),
            kib(d(with_n, before)),
            format!("{open_s:.1}"),
            format!("{close_s:.2}"),
            sockstat.trim_start_matches("TCP: ").to_string(),
        ]);
    }
    Ok(n)
}

/// For comparison: N plain connections that have sent nothing (what a
/// stream costs on top of its connection), on a fresh hark warmed up the
/// same way.
async fn connections_only(
    hark: &Hark,
    s: &Settings,
    n: usize,
    rooms: &[i64],
    token: &str,
    mem_rows: &mut Vec<Vec<String>>,
) -> Result<()> {
    let mut mc = MetricsClient::new(hark.addr);
    let target = |i: usize| events_path(&[rooms[i % rooms.len()]], token);
    let warm = open_streams(&mut mc, 400.min(s.want), s.parallel, 0, target).await?;
    drop(warm);
    mc.wait_until("hark_open_streams", Duration::from_secs(60), |v| v <= 0.0)
        .await?;
    mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
        v <= 1.0
    })
    .await?;
    let idle = rss_median(hark).await?;
    let t = Instant::now();
    let conns = connect_many(&mut mc, n, 64, 1).await?;
    let open_s = t.elapsed().as_secs_f64();
    let with_n = rss_median(hark).await?;
    let sockstat = tcp_sockstat();
    if open_s > 8.0 {
        eprintln!("warning: connecting took {open_s:.1} s; hark's 10 s header-read timeout may close some");
    }
    let t = Instant::now();
    drop(conns);
    mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
        v <= 1.0
    })
    .await?;
    let close_s = t.elapsed().as_secs_f64();
    let after = rss_median(hark).await?;
    let d = |a: u64, b: u64| (a as f64 - b as f64) / n as f64;
    mem_rows.push(vec![
        "15000".into(),
        "conns only".into(),
        n.to_string(),
        mib(idle),
        mib(idle),
        mib(with_n),
        mib(after),
        kib(d(with_n, idle)),
        kib(d(with_n, idle)),
        format!("{open_s:.1}"),
        format!("{close_s:.2}"),
        sockstat.trim_start_matches("TCP: ").to_string(),
    ]);
    Ok(())
}
