//! Hot path: polls answered at once from the hub's memory — a cursor for
//! which messages are due in the hub, `timeout=0`, the token in
//! `access_token=` — under closed-loop load on keep-alive connections.
//!
//!     cargo bench --bench hot_path
//!
//! The room is kept in the hub by one open `/events` stream on it (a hub
//! forgets a room nobody watches, and then every poll of it is a database
//! read). The bench checks that one poll moves
//! hark_polls_answered_from_memory_total and not hark_cold_queries_total,
//! prints the exact `oha` command and runs it when `oha` is on PATH (or in
//! ~/.cargo/bin), then runs its own Rust load generator on the same URL,
//! and reports how both runs moved the counters.
//!
//! Settings (environment): HOT_CONNECTIONS (50), HOT_SECONDS (10),
//! HOT_MESSAGES due per poll (10), HOT_HARK_LOG (hark's HARK_LOG, "warn";
//! "info" logs one line per request), HOT_SKIP_OHA (unset).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

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

struct Run {
    tool: &'static str,
    connections: usize,
    seconds: f64,
    requests: u64,
    rps: f64,
    /// p50, p90, p99, p99.9, max in seconds.
    lat: [f64; 5],
    not_ok: u64,
    /// Requests that did not complete (oha: aborted at the deadline).
    errors: String,
    from_memory: f64,
    cold: f64,
    cpu: Duration,
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
    let connections: usize = env_num("HOT_CONNECTIONS", 50);
    let seconds: u64 = env_num("HOT_SECONDS", 10);
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
    let (_, cursor) = poll_result(&c.get(&poll_path(room, None, 0, &token)).await?)?;
    fx.insert_many_around(room, writer, due, BENCH_TEXT.0, BENCH_TEXT.1)
        .await;
    let path = poll_path(room, Some(&cursor), 0, &token);
    // Until one request is proven to be the memory path: the database
    // answers a poll with the same messages while the hub has not caught
    // up with the insert yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body_len = loop {
        let m0 = mc.scrape().await?;
        let r = c.get(&path).await?;
        let m1 = mc.scrape().await?;
        let d = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
        let (memory, cold) = (
            d("hark_polls_answered_from_memory_total"),
            d("hark_cold_queries_total"),
        );
        if poll_result(&r)?.0 == due as usize && memory == 1.0 && cold == 0.0 {
            break r.body.len();
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "the request is not answered from memory (last try: from_memory +{memory}, cold +{cold})"
            )));
        }
        // A bounded wait (above) on what the metrics announce.
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    drop(c);
    let url = format!("http://{}{}", hark.addr, path);
    println!(
        "request: GET {} -> 200, {due} messages due, {body_len}-byte body, answered from memory (checked)",
        path.replace(&token, "<token>")
    );

    let mut runs = Vec::new();
    let oha = find_oha();
    let skip_oha = std::env::var_os("HOT_SKIP_OHA").is_some();
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    let json_path = out_dir.join("hot_path-oha.json");
    println!();
    println!("oha command (the token is a real one, valid 6 h, for user {reader}):");
    println!(
        "  oha --no-tui -z {seconds}s -c {connections} --output-format json -o {} '{url}'",
        json_path.display()
    );
    match (&oha, skip_oha) {
        (Some(oha), false) => {
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
            let d = |k: &str| {
                after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0)
            };
            runs.push(Run {
                tool: "oha",
                connections,
                seconds: f(&s["total"]),
                requests: all,
                rps: f(&s["requestsPerSec"]),
                lat: [
                    f(&p["p50"]),
                    f(&p["p90"]),
                    f(&p["p99"]),
                    f(&p["p99.9"]),
                    f(&s["slowest"]),
                ],
                not_ok: all - ok,
                errors: if errors.is_empty() {
                    "0".into()
                } else {
                    errors.join(", ")
                },
                from_memory: d("hark_polls_answered_from_memory_total"),
                cold: d("hark_cold_queries_total"),
                cpu,
            });
            println!("oha's JSON report: {}", json_path.display());
        }
        (None, _) => println!("oha is not on PATH: install it with `cargo install oha --locked`"),
        (_, true) => println!("HOT_SKIP_OHA is set: oha not run"),
    }

    // The same request from this process.
    let before = mc.scrape().await?;
    let cpu0 = hark.cpu_time()?;
    let conns = connect_many(&mut mc, connections, 64, 2).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").into_bytes();
    let request = std::sync::Arc::new(request);
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for mut conn in conns {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut not_ok = 0u64;
            let mut failed = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                if conn.send_raw(&request).await.is_err() {
                    failed += 1;
                    break;
                }
                match conn.read_response().await {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed().as_micros() as u32),
                    Ok(_) => not_ok += 1,
                    Err(_) => {
                        failed += 1;
                        break;
                    }
                }
            }
            (lat, not_ok, failed)
        }));
    }
    let mut lat = Vec::new();
    let mut not_ok = 0;
    let mut failed = 0;
    for t in tasks {
        let (l, n, f) = t.await?;
        lat.extend(l);
        not_ok += n;
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = hark.cpu_time()? - cpu0;
    let after = mc.scrape().await?;
    lat.sort_unstable();
    if lat.is_empty() {
        return Err(err("no request succeeded"));
    }
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let s = |us: u32| us as f64 / 1e6;
    runs.push(Run {
        tool: "bench (Rust)",
        connections,
        seconds: elapsed,
        requests: lat.len() as u64 + not_ok,
        errors: format!("{failed} transport errors"),
        rps: lat.len() as f64 / elapsed,
        lat: [
            s(pct(&lat, 50.0)),
            s(pct(&lat, 90.0)),
            s(pct(&lat, 99.0)),
            s(pct(&lat, 99.9)),
            s(lat[lat.len() - 1]),
        ],
        not_ok,
        from_memory: d("hark_polls_answered_from_memory_total"),
        cold: d("hark_cold_queries_total"),
        cpu,
    });
    stream_task.abort();

    println!();
    println!(
        "Hot path: poll answered from memory ({due} messages, {body_len} B body), timeout=0, keep-alive; latency in ms"
    );
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let m = |s: f64| format!("{:.3}", s * 1000.0);
            vec![
                r.tool.to_string(),
                r.connections.to_string(),
                format!("{:.1}", r.seconds),
                r.requests.to_string(),
                format!("{:.0}", r.rps),
                m(r.lat[0]),
                m(r.lat[1]),
                m(r.lat[2]),
                m(r.lat[3]),
                m(r.lat[4]),
                r.not_ok.to_string(),
                r.errors.clone(),
                format!("{:.0}", r.from_memory),
                format!("{:.0}", r.cold),
                format!("{:.0}%", 100.0 * r.cpu.as_secs_f64() / r.seconds),
            ]
        })
        .collect();
    table(
        &[
            "load generator",
            "conns",
            "s",
            "requests",
            "req/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "not 200",
            "not completed",
            "+from memory",
            "+cold reads",
            "hark CPU",
        ],
        &rows,
    );
    println!("(requests: completed responses; hark CPU: hark's user+system time over the run's wall time, 200% = both cores)");
    Ok(())
}
