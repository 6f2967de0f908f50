//! The embedded PostgreSQL cluster: hark's own database when no
//! `DATABASE_URL` is given, and the throwaway cluster every test starts.
//!
//! This module owns the cluster's whole life: finding the binaries,
//! `initdb`, starting `postgres`, waiting until it accepts connections, and
//! stopping it. Three constraints shape it:
//!
//! * **Nothing outside the process may reach it.** The server listens on a
//!   Unix socket only, in a directory only its owner can enter, with `trust`
//!   authentication; TCP is never opened.
//! * **It must never outlive hark**, not even when hark is SIGKILLed or a test
//!   aborts. `postgres` therefore runs under a small `sh` watchdog that reads
//!   a pipe whose only writer is hark: the pipe closing (by [`EmbeddedPg::stop`],
//!   by drop, or by the kernel when hark dies) makes the watchdog shut the
//!   server down and, for an ephemeral cluster, delete its directories.
//! * **PostgreSQL refuses to run as root**, and containers run as root. As
//!   root, every PostgreSQL program runs as the `postgres` system user via
//!   `setpriv`, the cluster's directories belong to that user, and a data
//!   directory it cannot reach (anything under `/root`) is replaced by one
//!   under `/var/tmp`.
//!
//! On-disk layout: `data_dir` is the cluster directory (`PGDATA`) itself
//! (as root with an unreachable `data_dir`: `/var/tmp/hark-pg-<hash>`,
//! `data_dir` staying empty). The socket lives in `<PGDATA>/run` unless that
//! path is too long for a Unix socket address (or has characters that would
//! need quoting), in which case it lives in `/tmp/hark-<hash>`. The server's
//! output goes to `<PGDATA>/postgres.log`; the previous run's log is kept as
//! `postgres.log.1`. Hashes are of the canonical path, so a restart finds
//! the same directories.
//!
//! By concern: `bindir` finds the programs, `runner` runs them as the right
//! user, `layout` decides and prepares the directories, `stale` deals with a
//! server left over from an earlier run, `server` runs `initdb` and starts
//! the server under the `watchdog`, and `tail` cuts program output down for
//! error messages. This file holds the public face: [`EmbeddedPg`] and its
//! options and errors.

mod bindir;
mod layout;
mod runner;
mod server;
mod stale;
mod tail;
mod watchdog;

pub use bindir::find_bindir;

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, ChildStdin};
use tokio_postgres::NoTls;

use runner::Runner;

/// Only the socket file's name depends on it: each cluster has a socket
/// directory of its own, so every cluster can use the default.
const PORT: u16 = 5432;
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run an embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Directory that holds the cluster (created if missing; `PG_VERSION`
    /// inside means already initialised → reuse).
    pub data_dir: PathBuf,
    /// Remove data_dir (and the socket dir) when the cluster stops — tests
    /// use this.
    pub ephemeral: bool,
    /// Extra `-c name=value` settings, e.g. fsync=off for tests. The socket
    /// settings (`listen_addresses`, `unix_socket_directories`, `port`) are
    /// applied after these and cannot be overridden.
    pub settings: Vec<(String, String)>,
}

/// Why the embedded cluster could not be set up, started, stopped or used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL is not installed: install it (e.g. `apt-get install postgresql`) \
         or set DATABASE_URL to an existing database."
    )]
    NotInstalled,
    /// Running as root, but there is no `postgres` account to run the
    /// server as (PostgreSQL refuses to run as root).
    #[error(
        "PostgreSQL refuses to run as root and there is no `postgres` system user to run \
         it as: create one (e.g. `useradd --system postgres`), run hark as an \
         unprivileged user, or set DATABASE_URL to an existing database."
    )]
    NoPostgresUser,
    /// The data directory holds something other than a cluster.
    #[error(
        "{} is not empty but holds no PostgreSQL cluster (no PG_VERSION): \
         point the data directory at a new or empty directory",
        .0.display()
    )]
    DataDirNotEmpty(PathBuf),
    /// A filesystem or process operation failed; the string says which.
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    /// `initdb` failed; the tail of its output.
    #[error("initdb failed:\n{0}")]
    Init(String),
    /// The server did not come up; the reason and the tail of its log.
    #[error("embedded PostgreSQL did not start: {0}")]
    Start(String),
    /// The server did not shut down cleanly.
    #[error("embedded PostgreSQL did not stop cleanly: {0}")]
    Stop(String),
    /// A statement against the running cluster failed.
    #[error("embedded PostgreSQL: {}", server_message(.0))]
    Db(#[source] tokio_postgres::Error),
}

/// The server's own words when it answered; the client's otherwise.
fn server_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let context = context.into();
    move |e| EmbeddedError::Io(context, e)
}

/// A running cluster. Dropping it shuts the server down in the background;
/// [`EmbeddedPg::stop`] does the same and waits for it.
#[derive(Debug)]
pub struct EmbeddedPg {
    /// The watchdog; `None` once stopped.
    watchdog: Option<Child>,
    /// The write end of the watchdog's pipe: closing it stops the server.
    lifeline: Option<ChildStdin>,
    /// The postmaster, for the SIGKILL of last resort.
    postmaster_pid: i32,
    socket_dir: PathBuf,
    ephemeral: bool,
    /// Removed on stop when ephemeral (normally by the watchdog already).
    cleanup: Vec<PathBuf>,
}

impl EmbeddedPg {
    /// Initialises the cluster if needed, starts the server and returns
    /// once it accepts connections.
    pub async fn start(opts: EmbeddedOptions) -> Result<EmbeddedPg, EmbeddedError> {
        let bindir = find_bindir().ok_or(EmbeddedError::NotInstalled)?;
        let runner = Runner::detect()?;
        let layout = layout::prepare(&runner, &opts).await?;
        if layout.initialised {
            stale::stop_stale_server(&runner, &bindir, &layout.pgdata).await?;
        }
        // From here on the directories are known to be ours (empty, or a
        // cluster), so an ephemeral cluster may remove them on failure.
        match server::launch(&runner, &bindir, &opts, &layout).await {
            Ok(pg) => Ok(pg),
            Err(e) => {
                if opts.ephemeral {
                    layout::remove_dirs(layout.cleanup.clone()).await;
                }
                Err(e)
            }
        }
    }

    /// tokio-postgres key=value connection string for database `dbname`
    /// over the Unix socket, as user `postgres`.
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host={} port={PORT} user=postgres dbname={}",
            conn_value(&self.socket_dir.to_string_lossy()),
            conn_value(dbname)
        )
    }

    /// The directory holding the server's socket (`.s.PGSQL.5432`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Creates database `name` unless it exists. Safe to call concurrently.
    pub async fn ensure_database(&self, name: &str) -> Result<(), EmbeddedError> {
        let (client, connection) =
            tokio_postgres::connect(&self.connection_string("postgres"), NoTls)
                .await
                .map_err(EmbeddedError::Db)?;
        let conn_task = tokio::spawn(connection);
        let result = async {
            if database_exists(&client, name).await? {
                return Ok(());
            }
            let create = format!("CREATE DATABASE {}", quote_ident(name));
            match client.batch_execute(&create).await {
                Ok(()) => Ok(()),
                // Someone else may have created it between the check and
                // the CREATE; that is success too.
                Err(e) => match database_exists(&client, name).await {
                    Ok(true) => Ok(()),
                    _ => Err(e),
                },
            }
        }
        .await;
        // Dropping the client makes the connection say goodbye and end.
        drop(client);
        let _ = conn_task.await;
        result.map_err(EmbeddedError::Db)
    }

    /// Fast shutdown: waits (bounded) for the server to exit, kills it if
    /// it does not, and removes the directories if the cluster is
    /// ephemeral.
    pub async fn stop(mut self) -> Result<(), EmbeddedError> {
        let result = self.shut_down().await;
        if self.ephemeral {
            // The watchdog has removed them unless it was killed.
            layout::remove_dirs(std::mem::take(&mut self.cleanup)).await;
        }
        match result {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(EmbeddedError::Stop(format!(
                "postgres exited with {status}"
            ))),
            Err(e) => Err(e),
        }
    }

    async fn shut_down(&mut self) -> Result<ExitStatus, EmbeddedError> {
        drop(self.lifeline.take());
        let Some(mut watchdog) = self.watchdog.take() else {
            return Ok(ExitStatus::default());
        };
        if let Ok(waited) = tokio::time::timeout(STOP_TIMEOUT, watchdog.wait()).await {
            return waited.map_err(io_err("waiting for postgres to stop"));
        }
        tracing::warn!(
            pid = self.postmaster_pid,
            "embedded PostgreSQL did not shut down within {} s; killing it",
            STOP_TIMEOUT.as_secs()
        );
        // A pid of 0 (never reported) or below would signal a whole group.
        if self.postmaster_pid > 0 {
            let _ = kill(Pid::from_raw(self.postmaster_pid), Signal::SIGKILL);
        }
        if let Ok(waited) = tokio::time::timeout(Duration::from_secs(5), watchdog.wait()).await {
            waited.map_err(io_err("waiting for postgres to stop"))?;
        } else {
            let _ = watchdog.start_kill();
            let _ = watchdog.wait().await;
        }
        Err(EmbeddedError::Stop(format!(
            "it did not shut down within {} s and was killed",
            STOP_TIMEOUT.as_secs()
        )))
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        // Closing the pipe is the whole shutdown: the watchdog stops the
        // server and cleans up on its own, so nothing here blocks. The
        // unwaited child is reaped by tokio.
        drop(self.lifeline.take());
    }
}

async fn database_exists(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?;
    Ok(row.is_some())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A value in a key=value connection string, quoted when it would not
/// survive unquoted.
fn conn_value(value: &str) -> String {
    if !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_do_and_keep_their_source() {
        use std::error::Error as _;
        assert_eq!(
            EmbeddedError::NotInstalled.to_string(),
            "PostgreSQL is not installed: install it (e.g. `apt-get install postgresql`) \
             or set DATABASE_URL to an existing database."
        );
        assert_eq!(
            EmbeddedError::DataDirNotEmpty(PathBuf::from("/srv/x")).to_string(),
            "/srv/x is not empty but holds no PostgreSQL cluster (no PG_VERSION): \
             point the data directory at a new or empty directory"
        );
        let io = io::Error::from(io::ErrorKind::PermissionDenied);
        let e = io_err("creating /srv/x")(io);
        assert_eq!(e.to_string(), "creating /srv/x: permission denied");
        assert!(e.source().is_some_and(|s| s.is::<io::Error>()));
        assert!(EmbeddedError::Init("boom".into()).source().is_none());
    }

    #[test]
    fn connection_values_are_quoted_only_when_needed() {
        assert_eq!(conn_value("/tmp/hark-1"), "/tmp/hark-1");
        assert_eq!(conn_value("a b"), "'a b'");
        assert_eq!(conn_value("it's"), r"'it\'s'");
        assert_eq!(conn_value(""), "''");
    }

    #[test]
    fn connection_string_parses() {
        let pg = EmbeddedPg {
            watchdog: None,
            lifeline: None,
            postmaster_pid: 0,
            socket_dir: PathBuf::from("/tmp/hark-0123"),
            ephemeral: false,
            cleanup: Vec::new(),
        };
        let s = pg.connection_string("my db");
        assert_eq!(
            s,
            "host=/tmp/hark-0123 port=5432 user=postgres dbname='my db'"
        );
        let cfg: tokio_postgres::Config = s.parse().expect("parses");
        assert_eq!(cfg.get_dbname(), Some("my db"));
        assert_eq!(cfg.get_user(), Some("postgres"));
    }
}
