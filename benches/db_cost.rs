//! Database cost per message: with 1, 100 and 10,000 long pollers in a
//! room that re-poll (with the new cursor) after each message, how many
//! catch-up queries (hark_catchup_queries_total) and cold reads
//! (hark_cold_queries_total) hark runs per message inserted — and, from
//! PostgreSQL's side, how many statements hark's sessions executed
//! (pg_stat_statements). The target is a flat line: O(1) per message,
//! whatever the number of waiters.
//!
//!     cargo bench --bench db_cost
//!
//! Settings (environment): DB_COST_POLLERS ("1,100,10000"),
//! DB_COST_MESSAGES (20), DB_COST_CONNECT_BATCH (64).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

fn main() -> std::process::ExitCode {
    main_with("db_cost", run())
}

async fn run() -> Result<()> {
    let pollers: Vec<usize> = std::env::var("DB_COST_POLLERS")
        .unwrap_or_else(|_| "1,100,10000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| err(format!("bad DB_COST_POLLERS entry {s:?}")))
        })
        .collect::<Result<_>>()?;
    let messages: usize = env_num("DB_COST_MESSAGES", 20);
    let parallel: usize = env_num("DB_COST_CONNECT_BATCH", 64);
    let (pg, admin) = start_counting_statements().await?;
    let result = async {
        let mut hark = start_hark(&pg.conn, "db_cost", &[]).await?;
        let r = measure(&hark, &pg.conn, &admin, &pollers, messages, parallel).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

/// Executions per statement of the bench database, except the benchmark's
/// own (its INSERTs and these reads).
async fn statements(admin: &tokio_postgres::Client) -> Result<HashMap<String, i64>> {
    let rows = admin
        .query(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT LIKE '%pg_stat_statements%' \
               AND query NOT LIKE 'INSERT INTO chat_chatmessage%'",
            &[],
        )
        .await?;
    let mut out = HashMap::new();
    for r in rows {
        *out.entry(r.get::<_, String>(0)).or_insert(0) += r.get::<_, i64>(1);
    }
    Ok(out)
}

fn delta(before: &HashMap<String, i64>, after: &HashMap<String, i64>) -> Vec<(String, i64)> {
    let mut d: Vec<(String, i64)> = after
        .iter()
        .map(|(q, n)| (q.clone(), n - before.get(q).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    d.sort_by_key(|e| std::cmp::Reverse(e.1));
    d
}

async fn measure(
    hark: &Hark,
    db: &str,
    admin: &tokio_postgres::Client,
    pollers: &[usize],
    messages: usize,
    parallel: usize,
) -> Result<()> {
    let fx = Fixture::new(db).await;
    let w = Writer::start(db, false).await?;
    let reader = fx.user("reader").await;
    let writer = fx.user("writer").await;
    let token = token(reader);
    let mut mc = MetricsClient::new(hark.addr);
    let mut rows = Vec::new();
    let mut breakdowns = Vec::new();
    for &n in pollers {
        let room = fx.room(&format!("db-cost-{n}"), &[reader, writer]).await;
        let mut c = Conn::connect(hark.addr).await?;
        let (_, cursor) = poll_result(&c.get(&poll_path(room, None, 0, &token)).await?)?;
        drop(c);
        let setup_m = mc.scrape().await?;
        let setup_s = statements(admin).await?;
        let conns = connect_many(&mut mc, n, parallel, 1).await?;
        // One extra poll each: after the last message everyone waits again,
        // so the window holds exactly `messages` answers + re-polls each.
        let mut group = Pollers::spawn(conns, room, &token, &cursor, messages + 1);
        let all_waiting = |v: f64| v as usize == n;
        mc.wait_until("hark_waiting_polls", Duration::from_secs(120), all_waiting)
            .await?;
        let m0 = mc.scrape().await?;
        let s0 = statements(admin).await?;
        let setup_cold = m0.get("hark_cold_queries_total").copied().unwrap_or(0.0)
            - setup_m
                .get("hark_cold_queries_total")
                .copied()
                .unwrap_or(0.0);
        let setup_stmts: i64 = delta(&setup_s, &s0).iter().map(|(_, n)| n).sum();
        let mut last_answer = Vec::with_capacity(messages);
        for i in 0..messages {
            mc.wait_until("hark_waiting_polls", Duration::from_secs(120), all_waiting)
                .await?;
            let t0 = w
                .insert(room, writer, &format!("db cost message {i}"))
                .await?;
            let r = group.collect(i, t0, Duration::from_secs(120)).await?;
            if r.errors > 0 || r.wrong > 0 {
                return Err(err(format!(
                    "{n} pollers, message {i}: {} errors, {} answers without exactly one message ({:?})",
                    r.errors, r.wrong, r.first_error
                )));
            }
            last_answer.push(*r.lat.last().unwrap());
        }
        mc.wait_until("hark_waiting_polls", Duration::from_secs(120), all_waiting)
            .await?;
        let m1 = mc.scrape().await?;
        let s1 = statements(admin).await?;
        drop(group);
        mc.wait_until("hark_waiting_polls", Duration::from_secs(60), |v| v == 0.0)
            .await?;
        mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
            v <= 1.0
        })
        .await?;
        let d = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
        let st = delta(&s0, &s1);
        let st_total: i64 = st.iter().map(|(_, n)| n).sum();
        let m = messages as f64;
        last_answer.sort_unstable();
        rows.push(vec![
            n.to_string(),
            messages.to_string(),
            d("hark_notifications_total").to_string(),
            d("hark_catchup_queries_total").to_string(),
            format!("{:.2}", d("hark_catchup_queries_total") / m),
            d("hark_cold_queries_total").to_string(),
            format!("{:.2}", d("hark_cold_queries_total") / m),
            d("hark_polls_answered_from_memory_total").to_string(),
            st_total.to_string(),
            format!("{:.2}", st_total as f64 / m),
            ms(pct(&last_answer, 50.0)),
            format!("{setup_cold} / {setup_stmts}"),
        ]);
        breakdowns.push((n, st));
    }
    println!();
    println!("Database cost: {messages} messages, one at a time, each re-polled by every poller");
    table(
        &[
            "pollers",
            "messages",
            "NOTIFYs",
            "catch-ups",
            "catch-ups/msg",
            "cold reads",
            "cold/msg",
            "answered from memory",
            "SQL stmts (pg)",
            "stmts/msg",
            "last answer p50 ms",
            "setup: cold / stmts",
        ],
        &rows,
    );
    println!("(SQL stmts: pg_stat_statements calls in the bench database, excluding the benchmark's own INSERTs and reads;");
    println!(" last answer: COMMIT returned -> the last poller's response received, median over the messages;");
    println!(" setup: cold reads and statements while the N pollers connected and sent their first poll)");
    for (n, st) in breakdowns {
        println!("statements hark executed with {n} pollers:");
        for (q, calls) in st.iter().take(6) {
            let q: String = q.chars().take(110).collect();
            println!("  {calls:>6}  {q}");
        }
    }
    Ok(())
}
