//! Bringing the server up: `initdb` for a new cluster, `postgres` under the
//! watchdog on the cluster's private socket, and waiting until it accepts
//! connections.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::layout::Layout;
use super::runner::Runner;
use super::tail::{log_tail, output_tail};
use super::{io_err, watchdog, EmbeddedError, EmbeddedOptions, EmbeddedPg, PORT};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(50);
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything after [`prepare`](super::layout::prepare) and the stale-server
/// check: on failure an ephemeral cluster's directories are removed by the
/// caller.
pub(super) async fn launch(
    runner: &Runner,
    bindir: &Path,
    opts: &EmbeddedOptions,
    layout: &Layout,
) -> Result<EmbeddedPg, EmbeddedError> {
    if !layout.initialised {
        initdb(runner, bindir, &layout.pgdata, opts.ephemeral).await?;
    }
    layout.create_socket_dir(runner).await?;
    let log = layout.open_log(runner).await?;

    let mut argv = runner.argv(&bindir.join("postgres"));
    argv.push("-D".into());
    argv.push(layout.pgdata.clone().into());
    let socket_dir = layout.socket_dir.to_string_lossy();
    let port = PORT.to_string();
    let fixed = [
        ("logging_collector", "off"),
        ("listen_addresses", ""),
        ("unix_socket_directories", &*socket_dir),
        ("port", port.as_str()),
    ];
    let settings = opts
        .settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(fixed);
    for (name, value) in settings {
        argv.push("-c".into());
        argv.push(format!("{name}={value}").into());
    }

    let mut child = watchdog::spawn(&argv, log, opts.ephemeral, &layout.cleanup)
        .map_err(io_err("starting postgres"))?;
    let lifeline = child.stdin.take();
    let stdout = child.stdout.take();

    let mut pg = EmbeddedPg {
        watchdog: Some(child),
        lifeline,
        postmaster_pid: 0,
        socket_dir: layout.socket_dir.clone(),
        ephemeral: opts.ephemeral,
        cleanup: layout.cleanup.clone(),
    };
    let ready = async {
        let (pid, exited) = watchdog::watch_stdout(stdout).await?;
        pg.postmaster_pid = pid;
        wait_ready(&mut pg, exited).await
    }
    .await;
    match ready {
        Ok(()) => {
            tracing::info!(
                pgdata = %layout.pgdata.display(),
                socket_dir = %layout.socket_dir.display(),
                "embedded PostgreSQL is ready"
            );
            Ok(pg)
        }
        Err(why) => {
            // Read the log before stopping: an ephemeral stop deletes it.
            let tail = log_tail(&layout.log).await;
            let _ = pg.stop().await;
            Err(EmbeddedError::Start(format!("{why}\n{tail}")))
        }
    }
}

async fn initdb(
    runner: &Runner,
    bindir: &Path,
    pgdata: &Path,
    ephemeral: bool,
) -> Result<(), EmbeddedError> {
    tracing::info!(pgdata = %pgdata.display(), "initialising the embedded PostgreSQL cluster");
    let mut cmd = runner.command(&bindir.join("initdb"));
    cmd.arg("-D")
        .arg(pgdata)
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if ephemeral {
        // Durability of a cluster that is deleted on stop is worthless;
        // skipping the fsyncs saves most of initdb's time.
        cmd.arg("--no-sync");
    }
    let out = match tokio::time::timeout(INITDB_TIMEOUT, cmd.output()).await {
        Ok(out) => out.map_err(io_err("running initdb"))?,
        Err(_) => {
            return Err(EmbeddedError::Init(format!(
                "initdb did not finish within {} s",
                INITDB_TIMEOUT.as_secs()
            )))
        }
    };
    if !out.status.success() {
        return Err(EmbeddedError::Init(output_tail(&out.stdout, &out.stderr)));
    }
    Ok(())
}

/// Polls with real connections: only a completed startup proves the server
/// accepts them (a socket file may exist before that).
async fn wait_ready(
    pg: &mut EmbeddedPg,
    mut exited: tokio::sync::oneshot::Receiver<String>,
) -> Result<(), String> {
    use tokio::sync::oneshot::error::TryRecvError;
    let conn = pg.connection_string("postgres");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match exited.try_recv() {
            Ok(report) => {
                let status = report.trim_start_matches("exited ");
                return Err(format!("postgres exited during startup (status {status})"));
            }
            Err(TryRecvError::Closed) => return Err("the watchdog died during startup".into()),
            Err(TryRecvError::Empty) => {}
        }
        let last_error = match tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&conn, NoTls),
        )
        .await
        {
            Ok(Ok((client, connection))) => {
                let task = tokio::spawn(connection);
                drop(client);
                let _ = task.await;
                return Ok(());
            }
            Ok(Err(e)) => {
                // "Starting up" and a missing or not yet listening
                // socket are transient; any other answer from the
                // server will not change by waiting.
                if let Some(db) = e.as_db_error() {
                    if *db.code() != SqlState::CANNOT_CONNECT_NOW {
                        return Err(format!("connecting failed: {}", db.message()));
                    }
                }
                e.to_string()
            }
            Err(_) => "connecting timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "not ready after {} s ({last_error})",
                READY_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}
