//! Database cost per change: with 1, 100 and 10,000 long pollers in a
//! room that re-poll (with the new cursor) after each change, how many
//! catch-up queries (hark_catchup_queries_total) and cold reads
//! (hark_cold_queries_total) hark runs per change — and, from
//! PostgreSQL's side, how many statements hark's sessions executed
//! (pg_stat_statements) — for each kind of change: an INSERT, an UPDATE
//! of a message's content (an edit) and a DELETE, each committed alone.
//! The edits and deletes hit the rows the inserts created (or, without
//! inserts, rows written before the pollers connected). Every answer is
//! checked: an insert is one message not edited, an edit is the edited
//! message (`"edited": true`, its id), a delete is its `deleted` entry
//! (id and room) and no message. The target is a flat line: O(1) per
//! change, whatever the number of waiters.
//!
//!     cargo bench --bench db_cost
//!
//! Settings (environment): DB_COST_POLLERS ("1,100,10000"),
//! DB_COST_MESSAGES (20: changes of each kind), DB_COST_KINDS
//! ("insert,update,delete"; measured in that order whatever the order
//! given), DB_COST_CONNECT_BATCH (64).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

fn main() -> std::process::ExitCode {
    main_with("db_cost", run())
}

/// A kind of change the benchmark commits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Insert,
    Update,
    Delete,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Insert, Kind::Update, Kind::Delete];

    fn name(self) -> &'static str {
        match self {
            Kind::Insert => "insert",
            Kind::Update => "update",
            Kind::Delete => "delete",
        }
    }
}

/// DB_COST_KINDS, in the order insert, update, delete (a delete after an
/// update of the same row; an update never of a deleted one).
fn kinds() -> Result<Vec<Kind>> {
    let list = std::env::var("DB_COST_KINDS").unwrap_or_else(|_| "insert,update,delete".into());
    let mut want = Vec::new();
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let k = Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                err(format!(
                    "bad DB_COST_KINDS entry {s:?}: insert, update or delete"
                ))
            })?;
        want.push(k);
    }
    let kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| want.contains(k)).collect();
    if kinds.is_empty() {
        return Err(err("DB_COST_KINDS names no kind of change"));
    }
    Ok(kinds)
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
    let kinds = kinds()?;
    let parallel: usize = env_num("DB_COST_CONNECT_BATCH", 64);
    let (pg, admin) = start_counting_statements().await?;
    let result = async {
        let mut hark = start_hark(&pg.conn, "db_cost", &[]).await?;
        let r = measure(
            &hark, &pg.conn, &admin, &pollers, &kinds, messages, parallel,
        )
        .await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

/// Executions per statement of the bench database, except the benchmark's
/// own (the writer's INSERT, UPDATE and DELETE, and these reads).
async fn statements(admin: &tokio_postgres::Client) -> Result<HashMap<String, i64>> {
    let rows = admin
        .query(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT LIKE '%pg_stat_statements%' \
               AND query <> ALL($1::text[])",
            &[&vec![INSERT_SQL, UPDATE_SQL, DELETE_SQL]],
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

#[allow(clippy::too_many_arguments)]
async fn measure(
    hark: &Hark,
    db: &str,
    admin: &tokio_postgres::Client,
    pollers: &[usize],
    kinds: &[Kind],
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
    let all_waiting_timeout = Duration::from_secs(120);
    for &n in pollers {
        let room = fx.room(&format!("db-cost-{n}"), &[reader, writer]).await;
        // The rows the edits and deletes hit: the inserts' when they run,
        // else these, written before the pollers' cursor.
        let mut targets: Vec<i64> = Vec::new();
        if !kinds.contains(&Kind::Insert) {
            targets = fx
                .insert_many(room, writer, messages as i64, "db cost message ")
                .await;
        }
        let mut c = Conn::connect(hark.addr).await?;
        let (_, cursor) = poll_result(&c.get(&poll_path(room, None, 0, &token)).await?)?;
        drop(c);
        let setup_m = mc.scrape().await?;
        let setup_s = statements(admin).await?;
        let conns = connect_many(&mut mc, n, parallel, 1).await?;
        // One extra poll each: after the last change everyone waits again,
        // so each window holds exactly `messages` answers + re-polls each.
        let mut group =
            Pollers::spawn_checked(conns, room, &token, &cursor, kinds.len() * messages + 1);
        let all_waiting = |v: f64| v as usize == n;
        mc.wait_until("hark_waiting_polls", all_waiting_timeout, all_waiting)
            .await?;
        let m = mc.scrape().await?;
        let s = statements(admin).await?;
        let setup_cold = m.get("hark_cold_queries_total").copied().unwrap_or(0.0)
            - setup_m
                .get("hark_cold_queries_total")
                .copied()
                .unwrap_or(0.0);
        let setup_stmts: i64 = delta(&setup_s, &s).iter().map(|(_, n)| n).sum();
        let mut round = 0;
        for (k, &kind) in kinds.iter().enumerate() {
            mc.wait_until("hark_waiting_polls", all_waiting_timeout, all_waiting)
                .await?;
            let m0 = mc.scrape().await?;
            let s0 = statements(admin).await?;
            let mut last_answer = Vec::with_capacity(messages);
            for i in 0..messages {
                mc.wait_until("hark_waiting_polls", all_waiting_timeout, all_waiting)
                    .await?;
                let target = targets.get(i).copied().unwrap_or(0);
                let t0 = match kind {
                    Kind::Insert => {
                        w.insert(room, writer, &format!("db cost message {i}"))
                            .await?
                    }
                    Kind::Update => {
                        w.update(target, &format!("db cost message {i}, edited"))
                            .await?
                    }
                    Kind::Delete => w.delete(target).await?,
                };
                let check = |s: &Sample| match kind {
                    Kind::Insert => s.messages == 1 && s.edited == 0 && s.deleted == 0,
                    Kind::Update => {
                        s.messages == 1
                            && s.edited == 1
                            && s.first_message == Some(target)
                            && s.deleted == 0
                    }
                    Kind::Delete => {
                        s.messages == 0 && s.deleted == 1 && s.first_deleted == Some((target, room))
                    }
                };
                let r = group
                    .collect_with(round, t0, Duration::from_secs(120), check)
                    .await?;
                if r.errors > 0 || r.wrong > 0 {
                    return Err(err(format!(
                        "{n} pollers, {} {i} (message {target}): {} errors ({:?}), {} answers not the change, the first: {:?}",
                        kind.name(),
                        r.errors,
                        r.first_error,
                        r.wrong,
                        r.first_wrong
                    )));
                }
                last_answer.push(*r.lat.last().unwrap());
                round += 1;
            }
            mc.wait_until("hark_waiting_polls", all_waiting_timeout, all_waiting)
                .await?;
            let m1 = mc.scrape().await?;
            let s1 = statements(admin).await?;
            if kind == Kind::Insert {
                targets = fx.message_ids(room).await;
                if targets.len() != messages {
                    return Err(err(format!(
                        "room {room} holds {} messages after {messages} inserts",
                        targets.len()
                    )));
                }
            }
            let d = |key: &str| {
                m1.get(key).copied().unwrap_or(0.0) - m0.get(key).copied().unwrap_or(0.0)
            };
            let st = delta(&s0, &s1);
            let st_total: i64 = st.iter().map(|(_, n)| n).sum();
            let m = messages as f64;
            last_answer.sort_unstable();
            rows.push(vec![
                n.to_string(),
                kind.name().to_string(),
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
                if k == 0 {
                    format!("{setup_cold} / {setup_stmts}")
                } else {
                    String::new()
                },
            ]);
            breakdowns.push((n, kind, st));
        }
        drop(group);
        mc.wait_until("hark_waiting_polls", Duration::from_secs(60), |v| v == 0.0)
            .await?;
        mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
            v <= 1.0
        })
        .await?;
    }
    println!();
    println!(
        "Database cost: {messages} changes of each kind, one at a time, each re-polled by every poller and checked"
    );
    table(
        &[
            "pollers",
            "change",
            "changes",
            "NOTIFYs",
            "catch-ups",
            "catch-ups/change",
            "cold reads",
            "cold/change",
            "answered from memory",
            "SQL stmts (pg)",
            "stmts/change",
            "last answer p50 ms",
            "setup: cold / stmts",
        ],
        &rows,
    );
    println!("(SQL stmts: pg_stat_statements calls in the bench database, excluding the benchmark's own INSERT, UPDATE, DELETE and reads;");
    println!(" last answer: COMMIT returned -> the last poller's response received, median over the changes;");
    println!(" setup: cold reads and statements while the N pollers connected and sent their first poll)");
    for (n, kind, st) in breakdowns {
        println!(
            "statements hark executed with {n} pollers, {}s:",
            kind.name()
        );
        for (q, calls) in st.iter().take(6) {
            let q: String = q.chars().take(110).collect();
            println!("  {calls:>6}  {q}");
        }
    }
    Ok(())
}
