//! Fan-out over `/events`: N streams (default 10,000, each its own TCP
//! connection) on one room, then one INSERT committed per round by a
//! writer on its own thread; for every stream, the time from COMMIT
//! returning to its `event: message` being fully received (the blank line
//! that ends the event read from the socket).
//!
//!     cargo bench --bench sse_fanout
//!
//! Unlike the long-poll fan-out there is no re-poll: a stream stays open
//! and hark writes the next event on the same response.
//!
//! Per round it also reports hark's own delivery-latency histogram delta
//! (NOTIFY reaching hark -> event handed to hyper), the catch-up queries
//! (expect 1) and cold reads (expect 0), and the CPU time of hark, of this
//! load generator and of PostgreSQL during the round.
//!
//! Settings (environment): SSE_FANOUT_STREAMS (10000), SSE_FANOUT_ROUNDS
//! (20), SSE_FANOUT_GAP_MS (250: pause between rounds, so that one round's
//! tail does not overlap the next), SSE_FANOUT_PARALLEL (128: streams
//! opened at a time).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn main() -> std::process::ExitCode {
    main_with("sse_fanout", run())
}

async fn run() -> Result<()> {
    let want: usize = env_num("SSE_FANOUT_STREAMS", 10_000);
    let rounds: usize = env_num("SSE_FANOUT_ROUNDS", 20);
    let gap = Duration::from_millis(env_num("SSE_FANOUT_GAP_MS", 250));
    let parallel: usize = env_num("SSE_FANOUT_PARALLEL", 128);
    let pg = Pg::start(&[]).await?;
    let result = async {
        let mut hark = start_hark(&pg.conn, "sse_fanout", &[]).await?;
        let r = fan_out(&hark, &pg.conn, want, rounds, gap, parallel).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

/// What a stream saw of a round's message.
struct Sample {
    round: usize,
    at: Instant,
    /// The event carried an `id:` (its cursor).
    has_id: bool,
    error: Option<String>,
}

const MARK: &[u8] = b"\"content\":\"sse fan-out round ";

/// The round number in a message event's data.
fn round_of(data: &[u8]) -> Option<usize> {
    let i = memchr::memmem::find(data, MARK)? + MARK.len();
    let digits = data[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[i..i + digits]).ok()?.parse().ok()
}

async fn fan_out(
    hark: &Hark,
    db: &str,
    want: usize,
    rounds: usize,
    gap: Duration,
    parallel: usize,
) -> Result<()> {
    let fx = Fixture::new(db).await;
    let w = Writer::start(db, true).await?;
    let reader = fx.user("reader").await;
    let writer = fx.user("writer").await;
    let room = fx.room("sse-fanout", &[reader, writer]).await;
    let token = token(reader);
    let mut mc = MetricsClient::new(hark.addr);

    let (own_soft, own_open) = fd_usage(std::process::id())?;
    let (hark_soft, hark_open) = fd_usage(hark.pid)?;
    let n = want
        .min(own_soft.saturating_sub(own_open + 16) as usize)
        .min(hark_soft.saturating_sub(hark_open + 32) as usize);
    if n < want {
        println!("fd limit: measuring {n} streams instead of {want}");
    }

    let overflows0 = listen_overflows();
    let started = Instant::now();
    let path = events_path(&[room], &token);
    let streams = open_streams(&mut mc, n, parallel, 0, |_| path.clone()).await?;
    println!(
        "{n} streams open on room {room} in {:.2} s; hark RSS {} MiB, {} threads; ListenOverflows {}; {}",
        started.elapsed().as_secs_f64(),
        mib(hark.rss()?),
        hark.threads()?,
        listen_overflows() - overflows0,
        tcp_sockstat()
    );

    let samples: Arc<SampleList<Sample>> = Arc::default();
    let mut tasks = Vec::with_capacity(n);
    for (mut s, _) in streams {
        let tx = samples.clone();
        tasks.push(tokio::spawn(async move {
            let mut found: Vec<(usize, bool)> = Vec::new();
            loop {
                let r = s
                    .read_some(&mut |item| {
                        if let SseItem::Event(e) = item {
                            if e.kind == SseKind::Message {
                                // usize::MAX: a message of no round.
                                let round = round_of(e.data).unwrap_or(usize::MAX);
                                found.push((round, !e.id.is_empty()));
                            }
                        }
                    })
                    .await;
                // Every event completed by this read was fully received now.
                let at = Instant::now();
                if !found.is_empty() {
                    tx.extend(found.drain(..).map(|(round, has_id)| Sample {
                        round,
                        at,
                        has_id,
                        error: None,
                    }));
                }
                if let Err(e) = r {
                    tx.push(Sample {
                        round: usize::MAX,
                        at,
                        has_id: false,
                        error: Some(e.to_string()),
                    });
                    return;
                }
            }
        }));
    }

    let mut rows = Vec::new();
    let mut all: Vec<Duration> = Vec::new();
    let mut worst_p99 = Duration::ZERO;
    let mut failures = 0usize;
    for round in 0..rounds {
        if round > 0 {
            // Pacing: rounds SSE_FANOUT_GAP_MS apart.
            tokio::time::sleep(gap).await;
        }
        let open = mc.get("hark_open_streams").await?;
        if open as usize != n {
            return Err(err(format!(
                "round {round}: hark_open_streams is {open}, expected {n}"
            )));
        }
        let before = mc.scrape().await?;
        let c0 = CpuSnap::take(hark.pid);
        let t0 = w
            .insert(room, writer, &format!("sse fan-out round {round}"))
            .await?;
        let mut lat = Vec::with_capacity(n);
        let (mut errors, mut wrong, mut early, mut no_id) = (0, 0, 0, 0);
        let mut first_error = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut batch = Vec::new();
        while lat.len() + errors < n {
            if !samples.take(&mut batch, deadline).await {
                return Err(err(format!(
                    "round {round}: only {} of {n} streams received the message within 60 s",
                    lat.len()
                )));
            }
            for s in batch.drain(..) {
                if let Some(e) = s.error {
                    errors += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
                if s.round != round {
                    wrong += 1;
                    continue;
                }
                if !s.has_id {
                    no_id += 1;
                }
                if s.at < t0 {
                    early += 1;
                }
                lat.push(s.at.saturating_duration_since(t0));
            }
        }
        let cpu = CpuSnap::take(hark.pid).since(&c0);
        let after = mc.scrape().await?;
        if let Some(e) = &first_error {
            eprintln!("round {round}: {errors} streams failed, e.g. {e}");
        }
        failures += errors + wrong;
        if lat.is_empty() {
            return Err(err(format!(
                "round {round}: no stream received the message"
            )));
        }
        lat.sort_unstable();
        let k = lat.len();
        let p99 = pct(&lat, 99.0);
        worst_p99 = worst_p99.max(p99);
        let d = |key: &str| delta(&before, &after, key);
        let server_n = d("hark_delivery_latency_seconds_count");
        let server_mean = if server_n > 0.0 {
            format!(
                "{:.1}",
                d("hark_delivery_latency_seconds_sum") / server_n * 1000.0
            )
        } else {
            "-".into()
        };
        let ms_of = |pct: f64| format!("{:.0}", pct * cpu.secs * 10.0);
        rows.push(vec![
            (round + 1).to_string(),
            k.to_string(),
            ms(lat[0]),
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 90.0)),
            ms(p99),
            ms(lat[k - 1]),
            format!("{:.0}", cpu.hark_ms),
            ms_of(cpu.bench),
            ms_of(cpu.pg),
            ms_of(cpu.other),
            d("hark_catchup_queries_total").to_string(),
            d("hark_cold_queries_total").to_string(),
            server_n.to_string(),
            server_mean,
            server_quantile(&before, &after, 0.5),
            server_quantile(&before, &after, 0.99),
            format!("{errors}/{wrong}/{early}/{no_id}"),
        ]);
        all.extend_from_slice(&lat);
    }
    for t in &tasks {
        t.abort();
    }
    println!();
    println!(
        "Fan-out over /events: {n} streams in one room, 1 message committed per round; latency = COMMIT returned -> `event: message` fully received (ms)"
    );
    table(
        &[
            "round",
            "received",
            "min",
            "p50",
            "p90",
            "p99",
            "max",
            "hark CPU ms",
            "bench CPU ms",
            "PG CPU ms",
            "other CPU ms",
            "catch-ups",
            "cold reads",
            "server n",
            "server mean",
            "server p50",
            "server p99",
            "err/wrong/early/no id",
        ],
        &rows,
    );
    all.sort_unstable();
    println!(
        "all {} rounds pooled ({} deliveries): p50 {} ms, p99 {} ms, max {} ms; worst round p99 {} ms (target p99 < 100 ms: {})",
        rounds,
        all.len(),
        ms(pct(&all, 50.0)),
        ms(pct(&all, 99.0)),
        ms(all[all.len() - 1]),
        ms(worst_p99),
        met(worst_p99 < Duration::from_millis(100))
    );
    println!(
        "(\"server\": hark_delivery_latency_seconds delta, NOTIFY reaching hark -> event handed to hyper; p50/p99 are histogram bucket bounds. CPU: user+system during the round, 10 ms ticks; \"bench\" includes the writer thread; \"other\" = rest of the machine)"
    );
    if failures > 0 {
        return Err(err(format!("{failures} stream errors or wrong messages")));
    }
    Ok(())
}
