//! Fan-out over `/events`: N streams (default 10,000, each its own TCP
//! connection) on one room, then one change committed per round by a
//! writer on its own thread; for every stream, the time from COMMIT
//! returning to its `event: message` being fully received (the blank line
//! that ends the event read from the socket).
//!
//!     cargo bench --bench sse_fanout
//!
//! Rounds alternate (SSE_FANOUT_KINDS="insert,edit", the default): an
//! insert round INSERTs a message; the edit round after it UPDATEs that
//! message's content, which every stream receives again as
//! `event: message` with `"edited":true`. Alternating spreads the
//! machine's noise over both kinds; the latencies are reported per kind.
//! SSE_FANOUT_KINDS="insert" runs insert rounds only (the benchmark as it
//! was before edits).
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
//! (20, both kinds together), SSE_FANOUT_KINDS ("insert,edit"),
//! SSE_FANOUT_GAP_MS (250: pause between rounds, so that one round's
//! tail does not overlap the next), SSE_FANOUT_PARALLEL (128: streams
//! opened at a time).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn main() -> std::process::ExitCode {
    main_with("sse_fanout", run())
}

/// What a round commits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// An INSERT of a new message.
    Insert,
    /// An UPDATE of the content of the message the previous round inserted.
    Edit,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Insert => "insert",
            Kind::Edit => "edit",
        }
    }
}

/// SSE_FANOUT_KINDS: whether rounds alternate insert and edit.
fn alternate() -> Result<bool> {
    let list = std::env::var("SSE_FANOUT_KINDS").unwrap_or_else(|_| "insert,edit".into());
    let (mut insert, mut edit) = (false, false);
    for k in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        match k {
            "insert" => insert = true,
            "edit" => edit = true,
            other => {
                return Err(err(format!(
                    "bad SSE_FANOUT_KINDS entry {other:?}: insert or edit"
                )))
            }
        }
    }
    if !insert {
        return Err(err(
            "SSE_FANOUT_KINDS: an edit round edits the message of the insert round before it; list insert",
        ));
    }
    Ok(edit)
}

async fn run() -> Result<()> {
    let want: usize = env_num("SSE_FANOUT_STREAMS", 10_000);
    let rounds: usize = env_num("SSE_FANOUT_ROUNDS", 20);
    let alternate = alternate()?;
    let gap = Duration::from_millis(env_num("SSE_FANOUT_GAP_MS", 250));
    let parallel: usize = env_num("SSE_FANOUT_PARALLEL", 128);
    let pg = Pg::start(&[]).await?;
    let result = async {
        let mut hark = start_hark(&pg.conn, "sse_fanout", &[]).await?;
        let r = fan_out(&hark, &pg.conn, want, rounds, alternate, gap, parallel).await;
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
    /// Its data had `"edited":true`.
    edited: bool,
    /// The message's id (0: none found).
    id: i64,
    error: Option<String>,
}

const MARK: &[u8] = b"\"content\":\"sse fan-out round ";
const EDITED: &[u8] = b"\"edited\":true";
const ID: &[u8] = b"{\"id\":";

/// The round number in a message event's data.
fn round_of(data: &[u8]) -> Option<usize> {
    let i = memchr::memmem::find(data, MARK)? + MARK.len();
    let digits = data[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[i..i + digits]).ok()?.parse().ok()
}

/// The message's id: the Message object's first field.
fn id_of(data: &[u8]) -> Option<i64> {
    let rest = data.strip_prefix(ID)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// One kind's rounds, for the summary.
#[derive(Default)]
struct KindStats {
    rounds: usize,
    /// Every delivery of every round of the kind.
    lat: Vec<Duration>,
    p50s: Vec<Duration>,
    p99s: Vec<Duration>,
    hark_ms: f64,
    bench_ms: f64,
    pg_ms: f64,
    other_ms: f64,
    catchups: f64,
    cold: f64,
    /// hark_delivery_latency_seconds deltas, summed over the rounds.
    server: std::collections::HashMap<String, f64>,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    pct(&v, 50.0)
}

#[allow(clippy::too_many_arguments)]
async fn fan_out(
    hark: &Hark,
    db: &str,
    want: usize,
    rounds: usize,
    alternate: bool,
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
            let mut found: Vec<(usize, bool, bool, i64)> = Vec::new();
            loop {
                let r = s
                    .read_some(&mut |item| {
                        if let SseItem::Event(e) = item {
                            if e.kind == SseKind::Message {
                                // usize::MAX: a message of no round.
                                let round = round_of(e.data).unwrap_or(usize::MAX);
                                let edited = memchr::memmem::find(e.data, EDITED).is_some();
                                let id = id_of(e.data).unwrap_or(0);
                                found.push((round, !e.id.is_empty(), edited, id));
                            }
                        }
                    })
                    .await;
                // Every event completed by this read was fully received now.
                let at = Instant::now();
                if !found.is_empty() {
                    tx.extend(found.drain(..).map(|(round, has_id, edited, id)| Sample {
                        round,
                        at,
                        has_id,
                        edited,
                        id,
                        error: None,
                    }));
                }
                if let Err(e) = r {
                    tx.push(Sample {
                        round: usize::MAX,
                        at,
                        has_id: false,
                        edited: false,
                        id: 0,
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
    let mut stats = [KindStats::default(), KindStats::default()];
    // The message the last insert round created (the next edit's target).
    let mut inserted: Option<i64> = None;
    for round in 0..rounds {
        let kind = if alternate && round % 2 == 1 {
            Kind::Edit
        } else {
            Kind::Insert
        };
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
        let target = match kind {
            Kind::Insert => 0,
            Kind::Edit => inserted.ok_or_else(|| {
                err(format!(
                    "round {round}: the insert round before delivered no message id to edit"
                ))
            })?,
        };
        let content = format!("sse fan-out round {round}");
        let before = mc.scrape().await?;
        let c0 = CpuSnap::take(hark.pid);
        let t0 = match kind {
            Kind::Insert => w.insert(room, writer, &content).await?,
            Kind::Edit => w.update(target, &content).await?,
        };
        let mut lat = Vec::with_capacity(n);
        let (mut errors, mut wrong, mut early, mut no_id) = (0, 0, 0, 0);
        let mut first_error = None;
        let mut first_wrong = None;
        let mut ids: Option<i64> = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut batch = Vec::new();
        // One event per stream and round: a wrong one is that stream's.
        while lat.len() + errors + wrong < n {
            if !samples.take(&mut batch, deadline).await {
                return Err(err(format!(
                    "round {round} ({}): only {} of {n} streams received the change within 60 s ({wrong} wrong events, e.g. {first_wrong:?})",
                    kind.name(),
                    lat.len()
                )));
            }
            for s in batch.drain(..) {
                if let Some(e) = s.error {
                    errors += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
                // An insert round: a new message, not edited, the same for
                // every stream; an edit round: the message just inserted,
                // edited.
                let right = s.round == round
                    && s.edited == (kind == Kind::Edit)
                    && match kind {
                        Kind::Insert => s.id > 0 && *ids.get_or_insert(s.id) == s.id,
                        Kind::Edit => s.id == target,
                    };
                if !right {
                    wrong += 1;
                    first_wrong.get_or_insert(format!(
                        "round {}, edited {}, id {}",
                        s.round, s.edited, s.id
                    ));
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
        if let Some(e) = &first_wrong {
            eprintln!(
                "round {round} ({}): {wrong} events not this round's change, e.g. {e}",
                kind.name()
            );
        }
        failures += errors + wrong;
        if lat.is_empty() {
            return Err(err(format!(
                "round {round} ({}): no stream received the change",
                kind.name()
            )));
        }
        if kind == Kind::Insert {
            inserted = ids;
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
        let ms_of = |pct: f64| pct * cpu.secs * 10.0;
        rows.push(vec![
            (round + 1).to_string(),
            kind.name().to_string(),
            k.to_string(),
            ms(lat[0]),
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 90.0)),
            ms(p99),
            ms(lat[k - 1]),
            format!("{:.0}", cpu.hark_ms),
            format!("{:.0}", ms_of(cpu.bench)),
            format!("{:.0}", ms_of(cpu.pg)),
            format!("{:.0}", ms_of(cpu.other)),
            d("hark_catchup_queries_total").to_string(),
            d("hark_cold_queries_total").to_string(),
            server_n.to_string(),
            server_mean,
            server_quantile(&before, &after, 0.5),
            server_quantile(&before, &after, 0.99),
            format!("{errors}/{wrong}/{early}/{no_id}"),
        ]);
        let st = &mut stats[kind as usize];
        st.rounds += 1;
        st.lat.extend_from_slice(&lat);
        st.p50s.push(pct(&lat, 50.0));
        st.p99s.push(p99);
        st.hark_ms += cpu.hark_ms;
        st.bench_ms += ms_of(cpu.bench);
        st.pg_ms += ms_of(cpu.pg);
        st.other_ms += ms_of(cpu.other);
        st.catchups += d("hark_catchup_queries_total");
        st.cold += d("hark_cold_queries_total");
        for key in after.keys() {
            if key.starts_with("hark_delivery_latency_seconds") {
                *st.server.entry(key.clone()).or_insert(0.0) += d(key);
            }
        }
        all.extend_from_slice(&lat);
    }
    for t in &tasks {
        t.abort();
    }
    println!();
    println!(
        "Fan-out over /events: {n} streams in one room, 1 change committed per round ({}); latency = COMMIT returned -> `event: message` fully received (ms)",
        if alternate {
            "insert and edit rounds alternating"
        } else {
            "inserts"
        }
    );
    table(
        &[
            "round",
            "kind",
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
    println!();
    println!("Per kind (latencies in ms; CPU: mean per round; server: the rounds' histogram deltas summed)");
    let empty = std::collections::HashMap::new();
    let mut summary = Vec::new();
    for (kind, st) in [Kind::Insert, Kind::Edit].iter().zip(stats.iter_mut()) {
        if st.rounds == 0 {
            continue;
        }
        st.lat.sort_unstable();
        let r = st.rounds as f64;
        let sn = st
            .server
            .get("hark_delivery_latency_seconds_count")
            .copied()
            .unwrap_or(0.0);
        let s_sum = st
            .server
            .get("hark_delivery_latency_seconds_sum")
            .copied()
            .unwrap_or(0.0);
        let mut p99s = st.p99s.clone();
        p99s.sort_unstable();
        summary.push(vec![
            kind.name().to_string(),
            st.rounds.to_string(),
            st.lat.len().to_string(),
            ms(pct(&st.lat, 50.0)),
            ms(pct(&st.lat, 99.0)),
            ms(st.lat[st.lat.len() - 1]),
            format!(
                "{} / {} / {}",
                ms(p99s[0]),
                ms(median(&p99s)),
                ms(p99s[p99s.len() - 1])
            ),
            format!("{:.0}", st.hark_ms / r),
            format!("{:.0}", st.bench_ms / r),
            format!("{:.0}", st.pg_ms / r),
            format!("{:.0}", st.other_ms / r),
            format!("{:.2}", st.catchups / r),
            st.cold.to_string(),
            sn.to_string(),
            if sn > 0.0 {
                format!("{:.1}", s_sum / sn * 1000.0)
            } else {
                "-".into()
            },
            server_quantile(&empty, &st.server, 0.5),
            server_quantile(&empty, &st.server, 0.99),
        ]);
    }
    table(
        &[
            "kind",
            "rounds",
            "deliveries",
            "pooled p50",
            "pooled p99",
            "max",
            "round p99 min / median / max",
            "hark CPU ms",
            "bench CPU ms",
            "PG CPU ms",
            "other CPU ms",
            "catch-ups/round",
            "cold reads",
            "server n",
            "server mean",
            "server p50",
            "server p99",
        ],
        &summary,
    );
    let [ins, edit] = &stats;
    if ins.rounds > 0 && edit.rounds > 0 {
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        // Each edit round against the insert round just before it.
        let mut pairs: Vec<f64> = ins
            .p99s
            .iter()
            .zip(&edit.p99s)
            .map(|(&i, &e)| ratio(e, i))
            .collect();
        pairs.sort_by(f64::total_cmp);
        println!(
            "edit / insert, same run: pooled p50 {:.2}, pooled p99 {:.2}, median round p99 {:.2}, hark CPU per round {:.2}; per pair (edit round p99 / the insert round's before it): median {:.2}, range {:.2}–{:.2}",
            ratio(pct(&edit.lat, 50.0), pct(&ins.lat, 50.0)),
            ratio(pct(&edit.lat, 99.0), pct(&ins.lat, 99.0)),
            ratio(median(&edit.p99s), median(&ins.p99s)),
            (edit.hark_ms / edit.rounds as f64) / (ins.hark_ms / ins.rounds as f64).max(1e-9),
            pairs[pairs.len() / 2],
            pairs[0],
            pairs[pairs.len() - 1],
        );
    }
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
