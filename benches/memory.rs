//! Memory per waiting poll: hark's RSS (/proc/PID/status VmRSS) idle, with
//! N open (idle, keep-alive) connections, and with N long polls waiting in
//! one room, over two cycles (the second shows whether freed memory is
//! reused).
//!
//!     cargo bench --bench memory
//!
//! After each release the benchmark waits (up to 20 s) for hark to return
//! the freed memory (`hark_memory_trims_total` rises; see src/trim.rs).
//! "KiB per waiting poll" is against the idle RSS after warm-up, so a
//! later cycle shows what memory that was freed and not reused costs.
//!
//! Settings (environment): MEMORY_POLLS (10000), MEMORY_CYCLES (3),
//! MEMORY_CONNECT_BATCH (64), MEMORY_TRIM (1; 0 starts hark with
//! HARK_TRIM_AFTER_CONNECTIONS=0 and does not wait).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn main() -> std::process::ExitCode {
    main_with("memory", run())
}

async fn run() -> Result<()> {
    let polls: usize = env_num("MEMORY_POLLS", 10_000);
    let cycles: usize = env_num("MEMORY_CYCLES", 3);
    let trim = env_num::<usize>("MEMORY_TRIM", 1) != 0;
    let parallel: usize = env_num("MEMORY_CONNECT_BATCH", 64);
    let pg = Pg::start(&[]).await?;
    let result = async {
        let env: &[(&str, &str)] = if trim {
            &[]
        } else {
            &[("HARK_TRIM_AFTER_CONNECTIONS", "0")]
        };
        let mut hark = start_hark(&pg.conn, "memory", env).await?;
        let r = measure(&hark, &pg.conn, polls, cycles, parallel, trim).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

async fn measure(
    hark: &Hark,
    db: &str,
    polls: usize,
    cycles: usize,
    parallel: usize,
    trim: bool,
) -> Result<()> {
    let fx = Fixture::new(db).await;
    let w = Writer::start(db, true).await?;
    let reader = fx.user("reader").await;
    let writer = fx.user("writer").await;
    let room = fx.room("memory", &[reader, writer]).await;
    let token = token(reader);
    let mut mc = MetricsClient::new(hark.addr);

    // Warm up: token check, user and room caches, the pool, the hub.
    let mut c = Conn::connect(hark.addr).await?;
    let (_, mut cursor) = poll_result(&c.get(&poll_path(room, None, 0, &token)).await?)?;
    for _ in 0..20 {
        poll_result(&c.get(&poll_path(room, Some(&cursor), 0, &token)).await?)?;
    }
    drop(c);
    mc.wait_until("hark_open_connections", Duration::from_secs(10), |v| {
        v <= 1.0
    })
    .await?;
    let idle0 = rss_median(hark).await?;
    println!("hark idle RSS after warm-up: {} MiB", mib(idle0));

    let mut rows = Vec::new();
    let mut per_poll = Vec::new();
    for cycle in 0..cycles {
        let idle = rss_median(hark).await?;
        let started = Instant::now();
        let mut conns = connect_many(&mut mc, polls, parallel, 1).await?;
        // hark counts a connection once its task runs.
        mc.wait_until("hark_open_connections", Duration::from_secs(30), |v| {
            v as usize > polls
        })
        .await?;
        let connected = rss_median(hark).await?;
        let connect_s = started.elapsed().as_secs_f64();
        if connect_s > 8.0 {
            eprintln!(
                "warning: connecting took {connect_s:.1} s; hark's 10 s header-read timeout may close idle connections"
            );
        }
        // Every connection sends one long poll.
        let path = poll_path(room, Some(&cursor), 3600, &token);
        for c in conns.iter_mut() {
            c.send_get(&path).await?;
        }
        mc.wait_until("hark_waiting_polls", Duration::from_secs(120), |v| {
            v as usize >= polls
        })
        .await?;
        let waiting = rss_median(hark).await?;
        let sockstat = tcp_sockstat();
        // Counted before the release: the trim may come as soon as the
        // connections close.
        let trims_before = mc
            .scrape()
            .await?
            .get("hark_memory_trims_total")
            .copied()
            .unwrap_or(0.0);
        // Release them: one message answers every poll.
        w.insert(room, writer, &format!("memory cycle {cycle}"))
            .await?;
        let mut tasks = Vec::with_capacity(polls);
        for mut c in conns {
            tasks.push(tokio::spawn(async move {
                c.read_response().await.map(|r| (r, c))
            }));
        }
        let mut answered = 0;
        let mut next = None;
        for t in tasks {
            if let Ok(Ok((r, _c))) = t.await {
                if let Ok((1, cur)) = poll_result(&r) {
                    answered += 1;
                    next = Some(cur);
                }
            }
        }
        if answered != polls {
            return Err(err(format!(
                "cycle {cycle}: {answered} of {polls} polls answered"
            )));
        }
        cursor = next.unwrap();
        mc.wait_until("hark_open_connections", Duration::from_secs(30), |v| {
            v <= 1.0
        })
        .await?;
        let after = rss_median(hark).await?;
        let trimmed = if trim {
            mc.wait_until("hark_memory_trims_total", Duration::from_secs(20), |v| {
                v > trims_before
            })
            .await?;
            mib(rss_median(hark).await?)
        } else {
            "-".to_string()
        };
        let d = |a: u64, b: u64| a as f64 - b as f64;
        rows.push(vec![
            (cycle + 1).to_string(),
            mib(idle),
            mib(connected),
            mib(waiting),
            mib(after),
            trimmed,
            kib(d(connected, idle) / polls as f64),
            kib(d(waiting, connected) / polls as f64),
            kib(d(waiting, idle0) / polls as f64),
        ]);
        per_poll.push(d(waiting, idle0) / polls as f64);
        println!("cycle {}: {sockstat}", cycle + 1);
    }
    println!();
    println!(
        "Memory: hark VmRSS (MiB) and bytes per connection / waiting poll (KiB), {polls} polls"
    );
    table(
        &[
            "cycle",
            "idle",
            "N connected",
            "N polls waiting",
            "after release",
            "after trim",
            "KiB/conn",
            "KiB/poll on top",
            "KiB per waiting poll (vs warm idle)",
        ],
        &rows,
    );
    let worst = per_poll.iter().cloned().fold(0.0, f64::max);
    println!(
        "worst bytes per waiting poll: {} KiB (target < 16 KiB: {})",
        kib(worst),
        met(worst < 16.0 * 1024.0)
    );
    println!("(kernel socket buffers are not in VmRSS; /proc/net/sockstat above counts both ends)");
    Ok(())
}
