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

use std::ffi::{CString, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// Only the socket file's name depends on it: each cluster has a socket
/// directory of its own, so every cluster can use the default.
const PORT: u16 = 5432;
/// `sun_path` is 108 bytes including the terminating NUL.
const SOCKET_PATH_MAX: usize = 107;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(50);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const LOG_FILE: &str = "postgres.log";
/// The watchdog's `$0`, so that a running cluster's owner can be recognised
/// from `/proc` (see [`stop_stale_server`]).
const WATCHDOG_NAME: &str = "hark-pg-watchdog";

/// The watchdog. Its stdin is a pipe whose only writer is hark; a helper
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
#[derive(Debug)]
pub enum EmbeddedError {
    /// No PostgreSQL server binaries were found.
    NotInstalled,
    /// Running as root, but there is no `postgres` account to run the
    /// server as (PostgreSQL refuses to run as root).
    NoPostgresUser,
    /// The data directory holds something other than a cluster.
    DataDirNotEmpty(PathBuf),
    /// A filesystem or process operation failed; the string says which.
    Io(String, io::Error),
    /// `initdb` failed; the tail of its output.
    Init(String),
    /// The server did not come up; the reason and the tail of its log.
    Start(String),
    /// The server did not shut down cleanly.
    Stop(String),
    /// A statement against the running cluster failed.
    Db(tokio_postgres::Error),
}

impl fmt::Display for EmbeddedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmbeddedError::NotInstalled => f.write_str(
                "PostgreSQL is not installed: install it (e.g. `apt-get install postgresql`) \
                 or set DATABASE_URL to an existing database.",
            ),
            EmbeddedError::NoPostgresUser => f.write_str(
                "PostgreSQL refuses to run as root and there is no `postgres` system user to run \
                 it as: create one (e.g. `useradd --system postgres`), run hark as an \
                 unprivileged user, or set DATABASE_URL to an existing database.",
            ),
            EmbeddedError::DataDirNotEmpty(dir) => write!(
                f,
                "{} is not empty but holds no PostgreSQL cluster (no PG_VERSION): \
                 point the data directory at a new or empty directory",
                dir.display()
            ),
            EmbeddedError::Io(context, e) => write!(f, "{context}: {e}"),
            EmbeddedError::Init(tail) => write!(f, "initdb failed:\n{tail}"),
            EmbeddedError::Start(why) => write!(f, "embedded PostgreSQL did not start: {why}"),
            EmbeddedError::Stop(why) => {
                write!(f, "embedded PostgreSQL did not stop cleanly: {why}")
            }
            EmbeddedError::Db(e) => match e.as_db_error() {
                Some(db) => write!(f, "embedded PostgreSQL: {}", db.message()),
                None => write!(f, "embedded PostgreSQL: {e}"),
            },
        }
    }
}

impl std::error::Error for EmbeddedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EmbeddedError::Io(_, e) => Some(e),
            EmbeddedError::Db(e) => Some(e),
            _ => None,
        }
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
        let layout = prepare(&runner, &bindir, &opts).await?;
        // From here on the directories are known to be ours (empty, or a
        // cluster), so an ephemeral cluster may remove them on failure.
        match launch(&runner, &bindir, &opts, &layout).await {
            Ok(pg) => Ok(pg),
            Err(e) => {
                if opts.ephemeral {
                    remove_dirs(layout.cleanup.clone()).await;
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
            remove_dirs(std::mem::take(&mut self.cleanup)).await;
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
        send_signal(self.postmaster_pid, libc::SIGKILL);
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

/// Where PostgreSQL's programs are: the directory of `initdb` on PATH, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`
/// (Debian's layout, not on PATH). A directory counts only if it holds
/// both `initdb` and `postgres`.
pub fn find_bindir() -> Option<PathBuf> {
    bindir_from_path()
        .or_else(bindir_from_pg_config)
        .or_else(bindir_from_usr_lib)
}

fn bindir_from_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        let initdb = dir.join("initdb");
        if !is_executable(&initdb) {
            continue;
        }
        // PATH often holds only symlinks (Debian's /usr/local/bin/initdb →
        // /usr/lib/postgresql/15/bin/initdb); the real directory is the one
        // that has postgres and pg_ctl next to initdb.
        if let Some(real) = std::fs::canonicalize(&initdb)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            if is_bindir(&real) {
                return Some(real);
            }
        }
        if let Ok(dir) = std::fs::canonicalize(&dir) {
            if is_bindir(&dir) {
                return Some(dir);
            }
        }
    }
    None
}

fn bindir_from_pg_config() -> Option<PathBuf> {
    // Runs in well under a second; find_bindir is synchronous by design.
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    is_bindir(&dir).then_some(dir)
}

fn bindir_from_usr_lib() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            // Versions compare numerically: 9.6 < 10 < 15.
            let version: Vec<u32> = name
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            is_bindir(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn is_bindir(dir: &Path) -> bool {
    dir.is_absolute() && is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Who PostgreSQL's programs run as: ourselves, or — when we are root —
/// the `postgres` user through `setpriv`.
struct Runner {
    /// `(setpriv, uid, gid)` when running as root.
    drop_to: Option<(PathBuf, u32, u32)>,
    /// The uid that owns the cluster's files.
    owner_uid: u32,
}

impl Runner {
    fn detect() -> Result<Runner, EmbeddedError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Ok(Runner {
                drop_to: None,
                owner_uid: euid,
            });
        }
        let (uid, gid) = lookup_user("postgres").ok_or(EmbeddedError::NoPostgresUser)?;
        if uid == 0 {
            return Err(EmbeddedError::NoPostgresUser);
        }
        let setpriv = find_program("setpriv").ok_or_else(|| {
            EmbeddedError::Start(
                "running as root needs `setpriv` (util-linux) to run PostgreSQL as the \
                 postgres user"
                    .into(),
            )
        })?;
        Ok(Runner {
            drop_to: Some((setpriv, uid, gid)),
            owner_uid: uid,
        })
    }

    fn is_root(&self) -> bool {
        self.drop_to.is_some()
    }

    /// The command line that runs `program` as the cluster's user.
    fn argv(&self, program: &Path) -> Vec<OsString> {
        let mut argv = Vec::new();
        if let Some((setpriv, uid, gid)) = &self.drop_to {
            argv.push(setpriv.into());
            argv.push(format!("--reuid={uid}").into());
            argv.push(format!("--regid={gid}").into());
            argv.push("--init-groups".into());
            argv.push("--".into());
        }
        argv.push(program.into());
        argv
    }

    fn command(&self, program: &Path) -> Command {
        let argv = self.argv(program);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            // The postgres user may not be able to enter our working
            // directory (e.g. /root), and initdb resolves paths against it.
            .current_dir("/")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Makes `path` belong to the cluster's user (as root only; otherwise
    /// everything we create is already ours).
    async fn own(&self, path: &Path, recursive: bool) -> Result<(), EmbeddedError> {
        let Some((_, uid, gid)) = self.drop_to else {
            return Ok(());
        };
        let owned = path.to_path_buf();
        let result = tokio::task::spawn_blocking(move || {
            if recursive {
                chown_tree(&owned, uid, gid)
            } else {
                std::os::unix::fs::lchown(&owned, Some(uid), Some(gid))
            }
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
        result.map_err(io_err(format!(
            "giving {} to the postgres user",
            path.display()
        )))
    }

    /// Whether the cluster's user can enter `dir` — every ancestor must be
    /// searchable by it, which /root (mode 700) is not. Asking the kernel,
    /// rather than reading modes, accounts for groups and ACLs.
    async fn can_enter(&self, dir: &Path) -> bool {
        let mut cmd = self.command(Path::new("/bin/sh"));
        cmd.arg("-c")
            .arg(r#"cd "$1""#)
            .arg("sh")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        matches!(
            tokio::time::timeout(Duration::from_secs(10), cmd.status()).await,
            Ok(Ok(status)) if status.success()
        )
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// `(uid, gid)` of a user account.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero passwd (null pointers, zero ids) is a valid
        // value for getpwnam_r to overwrite.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and
        // `buf.len()` is the size of `buf`; the strings getpwnam_r stores in
        // `buf` are not used, only the ids copied out of `pwd`.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        return Some((pwd.pw_uid, pwd.pw_gid));
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_absolute() && is_executable(p))
}

/// Where things are, decided before anything is started.
struct Layout {
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    initialised: bool,
    /// Everything an ephemeral cluster removes.
    cleanup: Vec<PathBuf>,
}

/// Resolves and checks the directories; nothing here is removed on failure
/// because the directory may turn out not to be ours.
async fn prepare(
    runner: &Runner,
    bindir: &Path,
    opts: &EmbeddedOptions,
) -> Result<Layout, EmbeddedError> {
    let requested = std::path::absolute(&opts.data_dir).map_err(io_err(format!(
        "resolving the data directory {}",
        opts.data_dir.display()
    )))?;
    tokio::fs::create_dir_all(&requested)
        .await
        .map_err(io_err(format!("creating {}", requested.display())))?;
    let requested = tokio::fs::canonicalize(&requested)
        .await
        .map_err(io_err(format!("resolving {}", requested.display())))?;

    let mut cleanup = vec![requested.clone()];
    let pgdata = if runner.is_root() && !runner.can_enter(parent_of(&requested)).await {
        if requested.join("PG_VERSION").exists() {
            return Err(EmbeddedError::Start(format!(
                "{} holds a cluster, but the postgres user cannot reach it because an \
                 ancestor directory is not searchable by it (chmod o+x the ancestors, or \
                 move the directory)",
                requested.display()
            )));
        }
        let fallback = PathBuf::from(format!("/var/tmp/hark-pg-{:016x}", hash_path(&requested)));
        tracing::info!(
            requested = %requested.display(),
            cluster = %fallback.display(),
            "the postgres user cannot reach the data directory; keeping the embedded cluster elsewhere"
        );
        make_private_dir(runner, &fallback).await?;
        cleanup.push(fallback.clone());
        fallback
    } else {
        requested
    };

    let initialised = pgdata.join("PG_VERSION").is_file();
    if !initialised {
        let mut entries = tokio::fs::read_dir(&pgdata)
            .await
            .map_err(io_err(format!("reading {}", pgdata.display())))?;
        let has_entries = entries
            .next_entry()
            .await
            .map_err(io_err(format!("reading {}", pgdata.display())))?
            .is_some();
        if has_entries {
            return Err(EmbeddedError::DataDirNotEmpty(pgdata));
        }
    }
    if runner.is_root() {
        let meta = tokio::fs::metadata(&pgdata)
            .await
            .map_err(io_err(format!("inspecting {}", pgdata.display())))?;
        // Only walk the tree when it is not ours yet (say, a cluster that was
        // created by an unprivileged run); normally this is one chown.
        runner.own(&pgdata, meta.uid() != runner.owner_uid).await?;
    }
    if initialised {
        stop_stale_server(runner, bindir, &pgdata).await?;
    }

    let in_pgdata = pgdata.join("run");
    let socket_dir = if usable_socket_dir(&in_pgdata) {
        in_pgdata
    } else {
        let short = PathBuf::from(format!("/tmp/hark-{:016x}", hash_path(&pgdata)));
        cleanup.push(short.clone());
        short
    };
    Ok(Layout {
        log: pgdata.join(LOG_FILE),
        pgdata,
        socket_dir,
        initialised,
        cleanup,
    })
}

/// The socket's full path must fit in `sun_path`, and the directory is
/// written unquoted into both a server setting (a comma-separated list) and
/// the connection string, so it must be plain text.
fn usable_socket_dir(dir: &Path) -> bool {
    let Some(text) = dir.to_str() else {
        return false;
    };
    let socket_len = text.len() + format!("/.s.PGSQL.{PORT}").len();
    socket_len <= SOCKET_PATH_MAX
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '"' | '\'' | '\\'))
}

/// The parent of a canonical path (`/` for `/`).
fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// FNV-1a: a stable name for a directory derived from another, so a
/// restart finds the same one.
fn hash_path(path: &Path) -> u64 {
    path.as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Creates (or adopts) a 0700 directory in a world-writable place such as
/// /tmp, where someone else may have put a file or symlink first.
async fn make_private_dir(runner: &Runner, dir: &Path) -> Result<(), EmbeddedError> {
    match tokio::fs::symlink_metadata(dir).await {
        Ok(meta) if meta.is_dir() && !meta.file_type().is_symlink() => {
            if meta.uid() != runner.owner_uid {
                if !runner.is_root() {
                    return Err(EmbeddedError::Start(format!(
                        "{} belongs to another user; remove it",
                        dir.display()
                    )));
                }
                runner.own(dir, true).await?;
            }
        }
        Ok(_) => {
            return Err(EmbeddedError::Start(format!(
                "{} exists but is not a directory; remove it",
                dir.display()
            )))
        }
        Err(_) => {
            let mut builder = std::fs::DirBuilder::new();
            builder.mode(0o700);
            builder
                .create(dir)
                .map_err(io_err(format!("creating {}", dir.display())))?;
            runner.own(dir, false).await?;
        }
    }
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(io_err(format!("restricting {}", dir.display())))
}

/// A server left running by an earlier run whose watchdog died with it
/// (say, a SIGKILL to the whole process group) would hold the data
/// directory; stop it. A dead pid needs nothing: postgres replaces a stale
/// `postmaster.pid` itself.
async fn stop_stale_server(
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
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn send_signal(pid: i32, signal: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions; pid > 0 targets
        // exactly one process.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

fn proc_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// Whether the server's parent is a hark watchdog, i.e. another hark still
/// owns this cluster.
fn has_live_watchdog(pid: i32) -> bool {
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

/// Everything after [`prepare`]: on failure an ephemeral cluster's
/// directories are removed by the caller.
async fn launch(
    runner: &Runner,
    bindir: &Path,
    opts: &EmbeddedOptions,
    layout: &Layout,
) -> Result<EmbeddedPg, EmbeddedError> {
    if !layout.initialised {
        initdb(runner, bindir, &layout.pgdata, opts.ephemeral).await?;
    }
    if layout.socket_dir.starts_with(&layout.pgdata) {
        match tokio::fs::create_dir(&layout.socket_dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(EmbeddedError::Io(
                    format!("creating {}", layout.socket_dir.display()),
                    e,
                ))
            }
        }
        runner.own(&layout.socket_dir, false).await?;
        tokio::fs::set_permissions(&layout.socket_dir, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(io_err(format!(
                "restricting {}",
                layout.socket_dir.display()
            )))?;
    } else {
        make_private_dir(runner, &layout.socket_dir).await?;
    }

    // Keep one previous log: enough to see why the last run ended, without
    // growing forever.
    let _ = tokio::fs::rename(&layout.log, layout.log.with_extension("log.1")).await;
    let log = std::fs::File::create(&layout.log)
        .map_err(io_err(format!("creating {}", layout.log.display())))?;
    runner.own(&layout.log, false).await?;

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

    let cleanup = |i: usize| -> OsString {
        if opts.ephemeral {
            layout.cleanup.get(i).map(Into::into).unwrap_or_default()
        } else {
            OsString::new()
        }
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg(WATCHDOG_NAME)
        .args(&argv)
        .current_dir("/")
        .env("LC_ALL", "C")
        .env("HARK_PG_EPHEMERAL", if opts.ephemeral { "1" } else { "" })
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
        .kill_on_drop(false);
    let mut watchdog = cmd.spawn().map_err(io_err("starting postgres"))?;
    let lifeline = watchdog.stdin.take();
    let stdout = watchdog.stdout.take();

    let mut pg = EmbeddedPg {
        watchdog: Some(watchdog),
        lifeline,
        postmaster_pid: 0,
        socket_dir: layout.socket_dir.clone(),
        ephemeral: opts.ephemeral,
        cleanup: layout.cleanup.clone(),
    };
    let ready = async {
        let (pid, exited) = watch_stdout(stdout).await?;
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

/// Reads the postmaster's pid from the watchdog, and hands back a channel
/// that yields the watchdog's `exited <status>` line once the server is
/// gone (or closes if the watchdog itself dies).
async fn watch_stdout(
    stdout: Option<tokio::process::ChildStdout>,
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

const TAIL_LINES: usize = 30;
const TAIL_BYTES: usize = 4000;

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if out.len() > TAIL_BYTES {
        let mut cut = out.len() - TAIL_BYTES;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out.replace_range(..cut, "…");
    }
    out
}

fn output_tail(stdout: &[u8], stderr: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(stdout).into_owned();
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(stderr));
    tail(&text)
}

async fn log_tail(log: &Path) -> String {
    match tokio::fs::read(log).await {
        Ok(bytes) => format!(
            "last lines of {}:\n{}",
            log.display(),
            tail(&String::from_utf8_lossy(&bytes))
        ),
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

async fn remove_dirs(dirs: Vec<PathBuf>) {
    let _ = tokio::task::spawn_blocking(move || {
        for dir in dirs {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove"),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn long_or_odd_socket_dirs_are_rejected() {
        assert!(usable_socket_dir(Path::new("/tmp/x/run")));
        assert!(!usable_socket_dir(&Path::new("/tmp").join("a".repeat(100))));
        assert!(!usable_socket_dir(Path::new("/tmp/a,b/run")));
        assert!(!usable_socket_dir(Path::new("/tmp/a b/run")));
    }

    #[test]
    fn tail_keeps_the_end() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text);
        assert!(t.ends_with("line 99"));
        assert!(!t.contains("line 69\n"));
        assert!(t.contains("line 70"));
    }
}
