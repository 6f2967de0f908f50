//! A server left over from an earlier run. Its watchdog normally stops it
//! when hark dies, but a SIGKILL to the whole process group takes the
//! watchdog too, and the orphaned server keeps the data directory locked.
//! Before starting, such a server is stopped — unless another live hark
//! still owns it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::runner::Runner;
use super::tail::output_tail;
use super::watchdog::has_live_watchdog;
use super::{io_err, EmbeddedError};

/// A server left running by an earlier run whose watchdog died with it
/// (say, a SIGKILL to the whole process group) would hold the data
/// directory; stop it. A dead pid needs nothing: postgres replaces a stale
/// `postmaster.pid` itself.
pub(super) async fn stop_stale_server(
    runner: &Runner,
    bindir: &Path,
    pgdata: &Path,
) -> Result<(), EmbeddedError> {
    let pidfile = pgdata.join("postmaster.pid");
    let Ok(text) = tokio::fs::read_to_string(&pidfile).await else {
        return Ok(());
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0)
    else {
        return Ok(());
    };
    if !process_alive(pid) {
        return Ok(());
    }
    match proc_comm(pid) {
        Some(comm) if comm != "postgres" && comm != "postmaster" => {
            // The pid was reused by an unrelated process after a crash
            // (common in containers, where pids are small); postgres would
            // refuse to start because of it.
            tracing::info!(pid, %comm, "removing a stale postmaster.pid");
            return tokio::fs::remove_file(&pidfile)
                .await
                .map_err(io_err(format!("removing {}", pidfile.display())));
        }
        _ => {}
    }
    if has_live_watchdog(pid) {
        return Err(EmbeddedError::Start(format!(
            "{} is in use by another running hark (postgres pid {pid})",
            pgdata.display()
        )));
    }
    tracing::info!(pid, pgdata = %pgdata.display(), "stopping a PostgreSQL server left over from an earlier run");
    let mut cmd = runner.command(&bindir.join("pg_ctl"));
    cmd.args(["stop", "-m", "fast", "-w", "-t", "30", "-D"])
        .arg(pgdata)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = match tokio::time::timeout(Duration::from_secs(40), cmd.output()).await {
        Ok(out) => out.map_err(io_err("running pg_ctl stop"))?,
        Err(_) => {
            return Err(EmbeddedError::Start(format!(
                "the leftover server (pid {pid}) in {} did not stop",
                pgdata.display()
            )))
        }
    };
    if !out.status.success() && process_alive(pid) {
        return Err(EmbeddedError::Start(format!(
            "could not stop the leftover server (pid {pid}) in {}:\n{}",
            pgdata.display(),
            output_tail(&out.stdout, &out.stderr)
        )));
    }
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // No signal only checks that the process exists; EPERM means it does
    // but belongs to someone else (as root's child, say, the postgres user).
    matches!(kill(Pid::from_raw(pid), None), Ok(()) | Err(Errno::EPERM))
}

fn proc_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}
