//! The soak with faults, short form (about a minute; `benches/soak.rs`
//! runs the same soak for 10 minutes or an hour): two hark processes on
//! one private PostgreSQL, 8 writers inserting, editing and deleting, 100
//! long pollers and 100 streams following their cursors, and every kind
//! of fault once, in turn — the LISTEN backends killed, PostgreSQL
//! restarted, one hark killed with SIGKILL and started again, a reader
//! that stops reading until hark cuts it, a burst of connections over
//! `HARK_MAX_CONNECTIONS`. What is counted, and how, is
//! `hark_kit::soak`'s doc. It fails on any loss, duplicate, out-of-order
//! delivery, cursor reset, 5xx outside the window of the fault that
//! explains it, or a fault hark did not recover from.

use crate::kit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_every_fault_loses_and_duplicates_nothing() {
    let logs = fresh_temp_dir("hark-soak-logs");
    let cfg = soak::Config {
        log_dir: logs.clone(),
        ..soak::Config::short(HARK)
    };
    let report = soak::run(cfg).await.unwrap_or_else(|e| panic!("{e}"));
    report.print();
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{}\nhark's logs: {}",
        report.text(),
        logs.display()
    );
    let _ = std::fs::remove_dir_all(&logs);
}
