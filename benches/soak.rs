//! The soak with faults: hark under a steady chat workload for 10 minutes
//! (or an hour), with a fault every minute, and nothing may be lost.
//!
//!     cargo bench --bench soak                   # 10 minutes
//!     cargo bench --bench soak -- --hour         # 60 minutes
//!     cargo bench --bench soak -- --minutes 30   # or SOAK_MINUTES=30
//!
//! The command sets everything up itself: a private PostgreSQL (one it can
//! restart: stopped and started on the same data directory and socket),
//! two release hark processes on it (`HARK_MAX_CONNECTIONS=1500` each,
//! otherwise defaults, log level warn, logs in target/bench-logs/),
//! 1,000 users in 100 rooms (10 each), and:
//!
//! - 8 writers on connections of their own, 100 changes/s together: 50%
//!   inserts, 30% edits, 20% deletes of random existing messages, each in
//!   its own transaction committed after a random pause of up to 3 ms (so
//!   commits land out of id order);
//! - 1,000 long pollers (`timeout=20`, page sizes 100, 1000, 7 and 25 in
//!   turn) that pass back their cursor, and 1,000 `/events` streams that
//!   resume with `Last-Event-ID` after any end, as EventSource does; each
//!   user has one of each, on different harks; two more streams on a room
//!   of their own for the slow-reader fault;
//! - a fault every minute (the first at 0:30), in turn: the LISTEN
//!   backends killed (`pg_terminate_backend`); PostgreSQL restarted (fast
//!   shutdown, start); one hark killed with SIGKILL and started again on
//!   its address (A, then B); one slow-room stream stops reading (4 KiB
//!   receive buffer) while 50-message batches of 9,000 characters go to
//!   its room until hark cuts it, then reads again and must catch up, and
//!   the room is deleted; 1,500 connections opened at once to one hark.
//!
//! After the last minute the writers stop and every client must reach the
//! table within 120 s. The summary: messages written, deliveries, lost,
//! duplicated, 5xx (by cause), faults survived, the p99 of delivery
//! (COMMIT sent → client parsed) outside the fault windows, RSS of each
//! hark process at its start and end. The exact definitions are the doc
//! of `hark_kit::soak`. It exits non-zero unless 0 lost, 0 duplicated, 0
//! unexpected 5xx and every fault survived.
//!
//! Settings (environment, for experiments; the published run uses the
//! defaults): SOAK_MINUTES (10), SOAK_RATE (100), SOAK_POLLERS (1000),
//! SOAK_STREAMS (1000), SOAK_ROOMS (100), SOAK_FAULT_INTERVAL_S (60).
//! `HARK_BENCH_BINARY` runs another release build.

mod common;

use std::time::Duration;

use common::*;
use hark_kit::soak;

fn main() -> std::process::ExitCode {
    let mut minutes: u64 = env_num("SOAK_MINUTES", 10);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--hour" => minutes = 60,
            "--minutes" => {
                if let Some(m) = args.next().and_then(|m| m.parse().ok()) {
                    minutes = m;
                }
            }
            other => {
                if let Some(m) = other
                    .strip_prefix("--minutes=")
                    .and_then(|m| m.parse().ok())
                {
                    minutes = m;
                }
                // `--bench` (what cargo bench passes) and the rest: ignored.
            }
        }
    }
    main_with("soak", run(minutes.max(1)))
}

async fn run(minutes: u64) -> Result<()> {
    let full = soak::Config::full(hark_binary()?, minutes);
    let cfg = soak::Config {
        rate: env_num("SOAK_RATE", full.rate),
        pollers: env_num("SOAK_POLLERS", full.pollers),
        streams: env_num("SOAK_STREAMS", full.streams),
        rooms: env_num("SOAK_ROOMS", full.rooms),
        fault_interval: Duration::from_secs(env_num(
            "SOAK_FAULT_INTERVAL_S",
            full.fault_interval.as_secs(),
        )),
        log_dir: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs"),
        ..full
    };
    println!(
        "soak: {minutes} min, {} pollers, {} streams, {} rooms, {} writers at {} changes/s, \
         a fault every {} s",
        cfg.pollers,
        cfg.streams,
        cfg.rooms,
        cfg.writers,
        cfg.rate,
        cfg.fault_interval.as_secs()
    );
    let report = soak::run(cfg).await?;
    report.print();
    let failures = report.failures();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(err(format!(
            "the soak missed the bar: {}",
            failures.join("; ")
        )))
    }
}
