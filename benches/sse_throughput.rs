//! Throughput over `/events`: 1,000 streams spread over 100 rooms (10 per
//! room, `/events?room_id=R`), and a writer inserting messages at
//! increasing rates, round-robin over the rooms, for a fixed time each.
//!
//!     cargo bench --bench sse_throughput
//!
//! The writer runs on its own thread (SCHED_FIFO when allowed), in two
//! modes, one after the other on the same streams (single first):
//!
//! * `batched`: every tick (10 ms) one autocommit
//!   `INSERT … SELECT … FROM unnest($rooms, $contents)` with every message
//!   due by then (rate × elapsed − sent so far): 100 commits per second
//!   carrying rate/100 messages each, across rate/100 rooms; a commit that
//!   takes longer than a tick makes the next batch larger, so the offered
//!   rate holds.
//! * `single`: one autocommit `INSERT … VALUES` per message (its own
//!   transaction, as a web app writes), the messages due every 1 ms tick
//!   pipelined on the writer's one connection.
//!
//! Each message carries its sequence number; every delivery's latency runs
//! from its own COMMIT returning (its batch's, when batched) to its
//! `event: message` being fully received.
//!
//! Per rate: messages committed per second, events delivered per second
//! (received inside the writing window / its length), latency p50/p99/max,
//! the backlog (deliveries due but not yet received) at half-time and at
//! the end of the window, the time to drain it after the writer stopped,
//! streams cut as too slow, catch-up queries and NOTIFYs per second, and
//! CPU. A rate counts as sustained when the streams received ≥ 95% of
//! what was committed during the window, the backlog drained within 1 s,
//! nothing was lost and no stream was cut, and the writer committed ≥ 98%
//! of the offered rate (else "writer behind": PostgreSQL and the writer,
//! on the same 2 cores, did not offer that rate).
//!
//! A mode's ramp stops at its first rate not sustained.
//!
//! Settings (environment): SSE_TP_SINGLE_RATES (messages/s,
//! "200,500,1000,2000,5000,10000,20000"; empty to skip), SSE_TP_RATES
//! (batched, the same default), SSE_TP_SECONDS (10), SSE_TP_ROOMS (100),
//! SSE_TP_PER_ROOM (10), SSE_TP_TICK_MS (10), SSE_TP_DRAIN_S (20: longest
//! wait for the backlog after a step), SSE_TP_HISTORY (100000: messages inserted into
//! the rooms before the streams open, as a chat database has history),
//! SSE_TP_ANALYZE (1: ANALYZE chat_chatmessage after inserting them; 0
//! leaves the statistics to autovacuum).
//!
//! PostgreSQL runs with pg_stat_statements, for the catch-up statement's
//! mean execution time per step.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn main() -> std::process::ExitCode {
    main_with("sse_throughput", run())
}

struct Settings {
    rates: Vec<f64>,
    single_rates: Vec<f64>,
    secs: f64,
    rooms: usize,
    per_room: usize,
    tick: Duration,
    drain: Duration,
    history: i64,
    analyze: bool,
}

async fn run() -> Result<()> {
    let s = Settings {
        rates: rates("SSE_TP_RATES", "200,500,1000,2000,5000,10000,20000")?,
        single_rates: rates("SSE_TP_SINGLE_RATES", "200,500,1000,2000,5000,10000,20000")?,
        secs: env_num("SSE_TP_SECONDS", 10.0),
        rooms: env_num("SSE_TP_ROOMS", 100usize).max(1),
        per_room: env_num("SSE_TP_PER_ROOM", 10usize).max(1),
        tick: Duration::from_millis(env_num("SSE_TP_TICK_MS", 10u64).max(1)),
        drain: Duration::from_secs(env_num("SSE_TP_DRAIN_S", 20)),
        history: env_num("SSE_TP_HISTORY", 100_000),
        analyze: env_num("SSE_TP_ANALYZE", 1) != 0,
    };
    let (pg, admin) = start_counting_statements().await?;
    let result = async {
        let mut hark = start_hark(&pg.conn, "sse_throughput", &[]).await?;
        let r = measure(&hark, &pg.conn, &admin, &s).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

/// A comma-separated list of rates; empty for none.
fn rates(var: &str, default: &str) -> Result<Vec<f64>> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(format!("{var}: {e}")))
}

// ---- the paced writer -----------------------------------------------------

struct Commit {
    first_seq: u64,
    n: u64,
    at: Instant,
}

struct WriterRun {
    start: Instant,
    end: Instant,
    commits: Vec<Commit>,
}

const INSERT_ONE: &str = "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
     VALUES ($1, $2, $3, now())";

const INSERT: &str = "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
     SELECT r, $2, c, now() FROM unnest($1::bigint[], $3::text[]) AS t(r, c)";

/// Writes `rate` messages/s for `secs` from sequence number `seq0`, on a
/// thread and runtime of its own.
#[allow(clippy::too_many_arguments)]
async fn paced_write(
    conn: &str,
    rooms: &[i64],
    sender: i64,
    rate: f64,
    secs: f64,
    tick: Duration,
    single: bool,
    seq0: u64,
) -> Result<WriterRun> {
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<WriterRun>>();
    let conn = conn.to_string();
    let rooms = rooms.to_vec();
    writer_thread("bench-paced-writer", move |_| async move {
        let r = async move {
            let client = connect_db(&conn).await?;
            let stmt = client.prepare(INSERT).await?;
            let one = client.prepare(INSERT_ONE).await?;
            let total = (rate * secs).round() as u64;
            let mut commits = Vec::new();
            let mut sent = 0u64;
            let start = Instant::now();
            let tstart = tokio::time::Instant::from_std(start);
            let mut k = 1u32;
            while sent < total {
                let due_at = tick * k;
                // Pacing: the send rate.
                tokio::time::sleep_until(tstart + due_at).await;
                let due = ((rate * start.elapsed().as_secs_f64()) as u64).min(total);
                k += 1;
                if due <= sent {
                    continue;
                }
                if single {
                    // One autocommit INSERT per message, pipelined on
                    // the connection: each is its own transaction.
                    use futures::stream::{FuturesUnordered, StreamExt};
                    let mut pending: FuturesUnordered<_> = (seq0 + sent..seq0 + due)
                        .map(|seq| {
                            let room = rooms[(seq % rooms.len() as u64) as usize];
                            let content = format!(
                                "tp {seq} a benchmark message about as long as a chat line"
                            );
                            let (client, one) = (&client, &one);
                            async move {
                                client.execute(one, &[&room, &sender, &content]).await?;
                                Ok::<_, BoxError>((seq, Instant::now()))
                            }
                        })
                        .collect();
                    while let Some(r) = pending.next().await {
                        let (seq, at) = r?;
                        commits.push(Commit {
                            first_seq: seq,
                            n: 1,
                            at,
                        });
                    }
                    sent = due;
                    continue;
                }
                let mut room_ids = Vec::with_capacity((due - sent) as usize);
                let mut contents = Vec::with_capacity((due - sent) as usize);
                for seq in seq0 + sent..seq0 + due {
                    room_ids.push(rooms[(seq % rooms.len() as u64) as usize]);
                    contents.push(format!(
                        "tp {seq} a benchmark message about as long as a chat line"
                    ));
                }
                client
                    .execute(&stmt, &[&room_ids, &sender, &contents])
                    .await?;
                commits.push(Commit {
                    first_seq: seq0 + sent,
                    n: due - sent,
                    at: Instant::now(),
                });
                sent = due;
            }
            Ok::<_, BoxError>(WriterRun {
                start,
                end: Instant::now(),
                commits,
            })
        }
        .await;
        let _ = tx.send(r);
    })?;
    rx.await.map_err(|_| err("writer thread died"))?
}

// ---- readers ----------------------------------------------------------------

struct Delivery {
    seq: u64,
    at: Instant,
}

const MARK: &[u8] = b"\"content\":\"tp ";

fn seq_of(data: &[u8]) -> Option<u64> {
    let i = data.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let digits = data[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[i..i + digits]).ok()?.parse().ok()
}

enum Report {
    Got(Delivery),
    Ended(String),
}

// ---- the benchmark ------------------------------------------------------------

/// (calls, total execution ms) of hark's catch-up statement (the
/// "new since snapshot" read; cold reads use it too and are reported).
async fn catchup_stats(admin: &tokio_postgres::Client) -> Result<(i64, f64)> {
    let row = admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8, coalesce(sum(total_exec_time), 0)::float8 \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query LIKE '%pg_visible_in_snapshot%' AND query NOT LIKE '%beyond%' \
               AND query NOT LIKE '%pg_stat_statements%'",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

async fn measure(
    hark: &Hark,
    db: &str,
    admin: &tokio_postgres::Client,
    s: &Settings,
) -> Result<()> {
    let fx = Fixture::new(db).await;
    let reader = fx.user("reader").await;
    let writer = fx.user("writer").await;
    let mut rooms = Vec::with_capacity(s.rooms);
    for i in 0..s.rooms {
        rooms.push(fx.room(&format!("tp-{i}"), &[reader, writer]).await);
    }
    if s.history > 0 {
        // Older messages in the same rooms, as a chat database has.
        let t = Instant::now();
        let per_room = (s.history / s.rooms as i64).max(1);
        for &room in &rooms {
            fx.insert_many_around(room, writer, per_room, BENCH_TEXT.0, BENCH_TEXT.1)
                .await;
        }
        if s.analyze {
            admin.batch_execute("ANALYZE chat_chatmessage").await?;
        }
        println!(
            "history: {} messages inserted ({per_room} per room){} in {:.1} s",
            per_room * s.rooms as i64,
            if s.analyze {
                " and analyzed"
            } else {
                ", not analyzed"
            },
            t.elapsed().as_secs_f64()
        );
    }
    let token = token(reader);
    let mut mc = MetricsClient::new(hark.addr);
    let n = s.rooms * s.per_room;
    let streams = open_streams(&mut mc, n, 128, 0, |i| {
        events_path(&[rooms[i % rooms.len()]], &token)
    })
    .await?;
    println!(
        "{n} streams open ({} per room, {} rooms); hark RSS {} MiB",
        s.per_room,
        s.rooms,
        mib(hark.rss()?)
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let mut tasks = Vec::with_capacity(n);
    for (mut st, _) in streams {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut got: Vec<u64> = Vec::new();
            loop {
                let r = st
                    .read_some(&mut |item| {
                        if let SseItem::Event(e) = item {
                            if e.kind == SseKind::Message {
                                got.push(seq_of(e.data).unwrap_or(u64::MAX));
                            }
                        }
                    })
                    .await;
                let at = Instant::now();
                for seq in got.drain(..) {
                    let _ = tx.send(Report::Got(Delivery { seq, at }));
                }
                if let Err(e) = r {
                    let _ = tx.send(Report::Ended(e.to_string()));
                    return;
                }
            }
        }));
    }
    drop(tx);

    let mut rows = Vec::new();
    let mut headline: Option<f64> = None;
    let mut seq = 0u64;
    let mut headline_single: Option<f64> = None;
    // (mode, label, rate, seconds)
    let mut steps: Vec<(&str, String, f64, f64)> = vec![("batched", "warm-up".into(), 100.0, 2.0)];
    steps.extend(
        s.single_rates
            .iter()
            .map(|&r| ("single", format!("{r}"), r, s.secs)),
    );
    steps.extend(
        s.rates
            .iter()
            .map(|&r| ("batched", format!("{r}"), r, s.secs)),
    );
    let mut failed_mode: Option<&str> = None;
    for (mode, label, rate, secs) in steps {
        if failed_mode == Some(mode) {
            continue; // a lower rate of this mode was not sustained
        }
        let single = mode == "single";
        let tick = if single {
            Duration::from_millis(1)
        } else {
            s.tick
        };
        let table_rows: i64 = admin
            .query_one("SELECT count(*) FROM chat_chatmessage", &[])
            .await?
            .get(0);
        let sql0 = catchup_stats(admin).await?;
        let before = mc.scrape().await?;
        let c0 = CpuSnap::take(hark.pid);
        let run = paced_write(db, &rooms, writer, rate, secs, tick, single, seq).await?;
        let cpu = CpuSnap::take(hark.pid).since(&c0);
        let msgs: u64 = run.commits.iter().map(|c| c.n).sum();
        let seq0 = seq;
        seq += msgs;
        // Commit instant of every message of this step.
        let mut committed_at: Vec<Instant> = vec![run.start; msgs as usize];
        for c in &run.commits {
            for k in 0..c.n {
                committed_at[(c.first_seq + k - seq0) as usize] = c.at;
            }
        }
        let expected = msgs * s.per_room as u64;

        // Collect until everything due has arrived (or the drain limit).
        let mut got: Vec<Delivery> = Vec::with_capacity(expected as usize);
        let mut per_seq = vec![0u16; msgs as usize];
        let (mut stray, mut dup, mut ended) = (0u64, 0u64, Vec::new());
        let drain_deadline = tokio::time::Instant::now() + s.drain;
        while (got.len() as u64) < expected {
            match tokio::time::timeout_at(drain_deadline, rx.recv()).await {
                Err(_) => break,
                Ok(None) => break,
                Ok(Some(Report::Ended(e))) => ended.push(e),
                Ok(Some(Report::Got(d))) => {
                    if d.seq < seq0 || d.seq >= seq {
                        stray += 1;
                        continue;
                    }
                    let k = &mut per_seq[(d.seq - seq0) as usize];
                    *k += 1;
                    if *k as usize > s.per_room {
                        dup += 1;
                    }
                    got.push(d);
                }
            }
            if !ended.is_empty() {
                break;
            }
        }
        let after = mc.scrape().await?;
        let sql1 = catchup_stats(admin).await?;
        let sql_calls = sql1.0 - sql0.0;
        let sql_mean = if sql_calls > 0 {
            format!("{:.2}", (sql1.1 - sql0.1) / sql_calls as f64)
        } else {
            "-".into()
        };
        let window = run.end.duration_since(run.start).as_secs_f64();
        let in_window = got.iter().filter(|d| d.at <= run.end).count() as f64;
        let due_at = |t: Instant| -> i64 {
            let exp: u64 = run
                .commits
                .iter()
                .filter(|c| c.at <= t)
                .map(|c| c.n * s.per_room as u64)
                .sum();
            exp as i64 - got.iter().filter(|d| d.at <= t).count() as i64
        };
        let mid = run.start + run.end.duration_since(run.start) / 2;
        let (due_mid, due_end) = (due_at(mid), due_at(run.end));
        let last = got.iter().map(|d| d.at).max();
        let drain_s = last.map_or(0.0, |l| l.saturating_duration_since(run.end).as_secs_f64());
        let mut lat: Vec<Duration> = got
            .iter()
            .map(|d| {
                d.at.saturating_duration_since(committed_at[(d.seq - seq0) as usize])
            })
            .collect();
        lat.sort_unstable();
        let missing = expected - got.len() as u64;
        let d = |k: &str| delta(&before, &after, k);
        let cut = d("hark_streams_cut_slow_total");
        let committed_rate = msgs as f64 / window;
        let delivered_rate = in_window / window;
        // Why a rate is not sustained, the first reason that applies.
        let verdict = if !ended.is_empty() || cut > 0.0 {
            "NO: streams cut"
        } else if missing > 0 || dup > 0 {
            "NO: lost/duplicate"
        } else if delivered_rate < 0.95 * committed_rate * s.per_room as f64 || drain_s > 1.0 {
            "NO: backlog"
        } else if committed_rate < 0.98 * rate {
            "NO: writer behind"
        } else {
            "yes"
        };
        let sustained = verdict == "yes";
        if sustained && label != "warm-up" {
            let h = if single {
                &mut headline_single
            } else {
                &mut headline
            };
            *h = Some(h.map_or(rate, |h: f64| h.max(rate)));
        }
        if !sustained && label != "warm-up" {
            failed_mode = Some(mode);
        }
        let q = |p: f64| {
            if lat.is_empty() {
                "-".to_string()
            } else {
                ms(pct(&lat, p))
            }
        };
        rows.push(vec![
            mode.to_string(),
            label.clone(),
            format!("{window:.1}"),
            format!("{committed_rate:.0}"),
            format!("{:.0}", run.commits.len() as f64 / window),
            format!("{delivered_rate:.0}"),
            q(50.0),
            q(99.0),
            lat.last().map_or("-".into(), |m| ms(*m)),
            format!("{due_mid}"),
            format!("{due_end}"),
            format!("{:.0}", drain_s * 1000.0),
            format!("{missing}"),
            format!("{cut}"),
            table_rows.to_string(),
            format!("{:.0}", d("hark_catchup_queries_total") / window),
            sql_mean,
            format!("{:.0}", d("hark_notifications_total") / window),
            d("hark_cold_queries_total").to_string(),
            server_quantile(&before, &after, 0.99),
            format!("{:.0}", cpu.hark),
            format!("{:.0}", cpu.bench),
            format!("{:.0}", cpu.pg),
            format!("{:.0}", cpu.other),
            verdict.into(),
        ]);
        println!(
            "step {mode} {label}: {msgs} messages in {} commits over {window:.1} s; {} deliveries of {expected} ({stray} stray, {dup} duplicate); drained {drain_s:.2} s after the writer stopped",
            run.commits.len(),
            got.len()
        );
        if !ended.is_empty() {
            println!(
                "{} streams ended (e.g. {}); stopping the ramp",
                ended.len(),
                ended[0]
            );
            break;
        }
        if missing > 0 {
            println!(
                "{missing} deliveries still missing after {:.0} s; stopping the ramp",
                s.drain.as_secs_f64()
            );
            break;
        }
    }
    for t in &tasks {
        t.abort();
    }
    println!();
    println!(
        "Throughput over /events: {n} streams, {} rooms x {} streams; writer round-robin over the rooms; {}-s steps. \"batched\": one INSERT of every message due per {} ms tick (one transaction); \"single\": one autocommit INSERT per message, pipelined on one connection (1 ms ticks)",
        s.rooms,
        s.per_room,
        s.secs,
        s.tick.as_millis(),
    );
    table(
        &[
            "commits",
            "offered msg/s",
            "window s",
            "committed msg/s",
            "commits/s",
            "delivered events/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "due @half",
            "due @end",
            "drain ms",
            "lost",
            "cut slow",
            "table rows",
            "catch-ups/s",
            "catch-up SQL ms",
            "NOTIFYs/s",
            "cold reads",
            "server p99 ms",
            "hark CPU %",
            "bench CPU %",
            "PG CPU %",
            "other CPU %",
            "sustained",
        ],
        &rows,
    );
    println!(
        "(latency: batch COMMIT returned -> `event: message` fully received; \"due\": deliveries committed but not yet received at half-time / end of the window; \"drain\": last delivery after the writer stopped; CPU in % of one core over the writing window; \"bench\" includes the writer thread; \"server p99\": bucket bound of hark_delivery_latency_seconds; \"table rows\": chat_chatmessage rows when the step began; \"catch-up SQL ms\": mean execution time of the catch-up statement from pg_stat_statements)"
    );
    for (mode, h, tried) in [
        ("batched commits", headline, &s.rates),
        ("one commit per message", headline_single, &s.single_rates),
    ] {
        if tried.is_empty() {
            continue;
        }
        match h {
            Some(r) => println!(
                "{mode}: highest rate sustained without growing backlog: {r:.0} messages/s ({:.0} events/s delivered){}",
                r * s.per_room as f64,
                if tried.iter().all(|&t| t <= r) { " — the top of the ramp" } else { "" }
            ),
            None => println!("{mode}: no rate was sustained"),
        }
    }
    Ok(())
}
