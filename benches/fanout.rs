//! Fan-out latency: N concurrent long polls waiting in one room (each its
//! own TCP connection), then one INSERT committed from a separate
//! connection; for every poll, the time from COMMIT returning to its
//! response being fully received. Each round re-polls with the new cursor.
//!
//!     cargo bench --bench fanout
//!
//! Two modes, both run by default (FANOUT_MODES="immediate,barrier"):
//! `immediate` — every poller re-polls as soon as it has its answer (what
//! clients do; the re-polls compete with the rest of the fan-out);
//! `barrier` — pollers re-poll only once all have their answer, which
//! isolates the cost of the fan-out itself.
//!
//! Settings (environment): FANOUT_POLLS (10000), FANOUT_ROUNDS (5),
//! FANOUT_CONNECT_BATCH (64).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn main() -> std::process::ExitCode {
    main_with("fanout", run())
}

async fn run() -> Result<()> {
    let polls: usize = env_num("FANOUT_POLLS", 10_000);
    let rounds: usize = env_num("FANOUT_ROUNDS", 5);
    let batch: usize = env_num("FANOUT_CONNECT_BATCH", 64);
    let modes: Vec<String> = std::env::var("FANOUT_MODES")
        .unwrap_or_else(|_| "immediate,barrier".into())
        .split(',')
        .map(|m| m.trim().to_string())
        .collect();
    for m in &modes {
        if m != "immediate" && m != "barrier" {
            return Err(err(format!("unknown FANOUT_MODES entry {m:?}")));
        }
    }
    let pg = Pg::start(&[]).await?;
    let result = async {
        let mut hark = start_hark(&pg.conn, "fanout", &[]).await?;
        let mut r = Ok(());
        for mode in &modes {
            r = fan_out(&hark, &pg.conn, polls, rounds, batch, mode == "barrier").await;
            if r.is_err() {
                break;
            }
        }
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

async fn fan_out(
    hark: &Hark,
    db: &str,
    polls: usize,
    rounds: usize,
    batch: usize,
    barrier: bool,
) -> Result<()> {
    let mode = if barrier { "barrier" } else { "immediate" };
    println!();
    println!("-- mode {mode} --");
    let fx = Fixture::new(db).await;
    let w = Writer::start(db, true).await?;
    let reader = fx.user(&format!("reader-{mode}")).await;
    let writer = fx.user(&format!("writer-{mode}")).await;
    let room = fx.room(&format!("fanout-{mode}"), &[reader, writer]).await;
    let token = token(reader);
    let mut mc = MetricsClient::new(hark.addr);
    mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
        v <= 1.0
    })
    .await?;

    // A cursor at "now".
    let mut c = Conn::connect(hark.addr).await?;
    let (_, cursor0) = poll_result(&c.get(&poll_path(room, None, 0, &token)).await?)?;
    drop(c);

    let overflows0 = listen_overflows();
    let started = Instant::now();
    let conns = connect_many(&mut mc, polls, batch, 1).await?;
    let connect_time = started.elapsed();
    // Immediate pollers re-poll after their last answer too, so that every
    // round (the last included) has the re-polls competing with it.
    let polls_each = if barrier { rounds } else { rounds + 1 };
    let mut pollers = Pollers::spawn_with(conns, room, &token, &cursor0, polls_each, barrier);
    let all_waiting = |v: f64| v as usize >= polls;
    let waiting = mc
        .wait_until("hark_waiting_polls", Duration::from_secs(120), all_waiting)
        .await?;
    println!(
        "{polls} connections opened in {:.2} s; {waiting} polls waiting after {:.2} s; hark RSS {} MiB, {} threads",
        connect_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        mib(hark.rss()?),
        hark.threads()?
    );
    println!(
        "accept-queue overflows (TcpExt ListenOverflows) during setup: {}; {}",
        listen_overflows() - overflows0,
        tcp_sockstat()
    );

    let mut rows = Vec::new();
    let mut worst_p99 = Duration::ZERO;
    for round in 0..rounds {
        if barrier && round > 0 {
            pollers.release(round);
        }
        mc.wait_until("hark_waiting_polls", Duration::from_secs(120), all_waiting)
            .await?;
        let before = mc.scrape().await?;
        let cpu0 = hark.cpu_time()?;
        let own0 = own_cpu_time()?;
        let t0 = w
            .insert(room, writer, &format!("fan-out round {round}"))
            .await?;
        let r = pollers.collect(round, t0, Duration::from_secs(120)).await?;
        let cpu = hark.cpu_time()? - cpu0;
        let own = own_cpu_time()? - own0;
        let after = mc.scrape().await?;
        if let Some(e) = &r.first_error {
            eprintln!("round {round}: {} polls failed, e.g. {e}", r.errors);
        }
        let lat = &r.lat;
        let n = lat.len();
        if n == 0 {
            return Err(err(format!("round {round}: no poll answered")));
        }
        let d =
            |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        let server_n = d("hark_delivery_latency_seconds_count");
        let server_le_100ms = d("hark_delivery_latency_seconds_bucket{le=\"0.1\"}");
        let server_mean = if server_n > 0.0 {
            d("hark_delivery_latency_seconds_sum") / server_n * 1000.0
        } else {
            0.0
        };
        let p99 = pct(lat, 99.0);
        worst_p99 = worst_p99.max(p99);
        rows.push(vec![
            (round + 1).to_string(),
            n.to_string(),
            ms(lat[0]),
            ms(pct(lat, 50.0)),
            ms(pct(lat, 90.0)),
            ms(p99),
            ms(lat[n - 1]),
            format!("{:.0}", cpu.as_secs_f64() * 1000.0),
            format!("{:.0}", own.as_secs_f64() * 1000.0),
            d("hark_catchup_queries_total").to_string(),
            d("hark_cold_queries_total").to_string(),
            format!("{server_mean:.1}"),
            format!("{:.1}%", 100.0 * server_le_100ms / server_n.max(1.0)),
            format!("{}/{}/{}", r.errors, r.wrong, r.early),
        ]);
    }
    drop(pollers);
    println!();
    println!(
        "Fan-out ({mode} re-poll): {polls} waiting polls in one room, 1 message committed per round; latency = COMMIT returned -> response fully received (ms)"
    );
    table(
        &[
            "round",
            "answered",
            "min",
            "p50",
            "p90",
            "p99",
            "max",
            "hark CPU ms",
            "bench CPU ms",
            "catch-ups",
            "cold reads",
            "server mean",
            "server <=100ms",
            "err/wrong/early",
        ],
        &rows,
    );
    println!(
        "worst p99 over {rounds} rounds: {} ms (target < 100 ms: {})",
        ms(worst_p99),
        met(worst_p99 < Duration::from_millis(100))
    );
    println!(
        "(\"server\" columns: hark_delivery_latency_seconds, from the NOTIFY reaching hark to the response handed to hyper; CPU: user+system time during the round, 10 ms ticks, of hark and of this load generator)"
    );
    Ok(())
}
