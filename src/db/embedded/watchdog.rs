//! The watchdog: a small `sh` that starts `postgres` and ties the server's
//! life to hark's. Its stdin is a pipe whose only writer is hark, so the
//! pipe closing — by [`EmbeddedPg::stop`](super::EmbeddedPg::stop), by
//! drop, or by the kernel when hark dies, even by SIGKILL — shuts the
//! server down and, for an ephemeral cluster, deletes its directories.
//! Its stdout tells hark the server's pid and, later, how it exited.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The watchdog's `$0`, so that a running cluster's owner can be recognised
/// from `/proc` (see [`has_live_watchdog`]).
const WATCHDOG_NAME: &str = "hark-pg-watchdog";

/// The script. Its stdin is a pipe whose only writer is hark; a helper
/// subshell turns end-of-file on it into a fast shutdown (SIGINT), so hark
/// closing the pipe, on purpose or by dying, stops the server. Stdin moves
/// to fd 3 because asynchronous commands get /dev/null as their stdin.
///
/// It reports on stdout: the server's pid, then `exited <status>` when the
/// server is gone (SIGPIPE is ignored for that, in case hark is gone too).
/// An ephemeral cluster's directories are removed only once the pipe is
/// closed as well, so that hark can still read the log of a server that
/// failed to start.
const WATCHDOG_SCRIPT: &str = r#"
exec 3<&0 </dev/null
eph=$HARK_PG_EPHEMERAL rm1=$HARK_PG_RM_1 rm2=$HARK_PG_RM_2 rm3=$HARK_PG_RM_3
unset HARK_PG_EPHEMERAL HARK_PG_RM_1 HARK_PG_RM_2 HARK_PG_RM_3
"$@" 3<&- >&2 &
pid=$!
echo "$pid"
( cat <&3 >/dev/null 2>&1; kill -INT "$pid" 2>/dev/null ) >/dev/null &
guard=$!
wait "$pid"
status=$?
kill "$guard" 2>/dev/null
trap '' PIPE
echo "exited $status"
exec >/dev/null
if [ -n "$eph" ]; then
  cat <&3 >/dev/null 2>&1
  rm -rf -- ${rm1:+"$rm1"} ${rm2:+"$rm2"} ${rm3:+"$rm3"}
fi
exit "$status"
"#;

/// Starts `argv` (the server's command line) under the watchdog, with the
/// server's output going to `log`. `cleanup` is what the watchdog removes
/// once the server is gone, for an ephemeral cluster only.
pub(super) fn spawn(
    argv: &[OsString],
    log: std::fs::File,
    ephemeral: bool,
    cleanup: &[PathBuf],
) -> std::io::Result<Child> {
    let cleanup = |i: usize| -> OsString {
        if ephemeral {
            cleanup.get(i).map(Into::into).unwrap_or_default()
        } else {
            OsString::new()
        }
    };
    Command::new("/bin/sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg(WATCHDOG_NAME)
        .args(argv)
        .current_dir("/")
        .env("LC_ALL", "C")
        .env("HARK_PG_EPHEMERAL", if ephemeral { "1" } else { "" })
        .env("HARK_PG_RM_1", cleanup(0))
        .env("HARK_PG_RM_2", cleanup(1))
        .env("HARK_PG_RM_3", cleanup(2))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        // Its own process group: a Ctrl-C at the terminal reaches hark,
        // which then drains and stops the database last, instead of
        // reaching postgres directly.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
}

/// Reads the postmaster's pid from the watchdog, and hands back a channel
/// that yields the watchdog's `exited <status>` line once the server is
/// gone (or closes if the watchdog itself dies).
pub(super) async fn watch_stdout(
    stdout: Option<ChildStdout>,
) -> Result<(i32, tokio::sync::oneshot::Receiver<String>), String> {
    let stdout = stdout.ok_or("the watchdog has no stdout")?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let pid =
        match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
            Ok(Ok(_)) => line.trim().parse::<i32>().map_err(|_| {
                format!("the watchdog did not report a pid (got {:?})", line.trim())
            })?,
            Ok(Err(e)) => return Err(format!("reading the postgres pid: {e}")),
            Err(_) => return Err("the watchdog did not report a pid within 10 s".into()),
        };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut line = String::new();
        if matches!(reader.read_line(&mut line).await, Ok(n) if n > 0) {
            let _ = tx.send(line.trim().to_owned());
        }
    });
    Ok((pid, rx))
}

/// Whether the server's parent is a hark watchdog, i.e. another hark still
/// owns this cluster.
pub(super) fn has_live_watchdog(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let Some(ppid) = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return false;
    };
    std::fs::read(format!("/proc/{ppid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == WATCHDOG_NAME.as_bytes())
    })
}
