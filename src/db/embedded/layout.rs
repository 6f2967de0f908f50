//! Where the cluster's files go: the data directory (or, as root, a
//! fallback the `postgres` user can reach), the socket directory, the log,
//! and what an ephemeral cluster removes. The socket directory is the
//! cluster's only door, so every directory made here is private (0700) and
//! checked against squatters in world-writable places such as /tmp.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::runner::Runner;
use super::{io_err, EmbeddedError, EmbeddedOptions, PORT};

/// `sun_path` is 108 bytes including the terminating NUL.
const SOCKET_PATH_MAX: usize = 107;
const LOG_FILE: &str = "postgres.log";

/// Where things are, decided before anything is started.
pub(super) struct Layout {
    /// The cluster directory (`PGDATA`).
    pub(super) pgdata: PathBuf,
    pub(super) socket_dir: PathBuf,
    pub(super) log: PathBuf,
    /// `PGDATA` already holds a cluster, so `initdb` is skipped.
    pub(super) initialised: bool,
    /// Everything an ephemeral cluster removes (at most three directories:
    /// the watchdog has room for no more).
    pub(super) cleanup: Vec<PathBuf>,
}

/// Resolves and checks the directories; nothing here is removed on failure
/// because the directory may turn out not to be ours.
pub(super) async fn prepare(
    runner: &Runner,
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

impl Layout {
    /// Creates the socket directory: inside `PGDATA` it is ours already and
    /// only needs its owner and mode; elsewhere it is in /tmp, where
    /// someone else may have been first.
    pub(super) async fn create_socket_dir(&self, runner: &Runner) -> Result<(), EmbeddedError> {
        if !self.socket_dir.starts_with(&self.pgdata) {
            return make_private_dir(runner, &self.socket_dir).await;
        }
        match tokio::fs::create_dir(&self.socket_dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(EmbeddedError::Io(
                    format!("creating {}", self.socket_dir.display()),
                    e,
                ))
            }
        }
        runner.own(&self.socket_dir, false).await?;
        tokio::fs::set_permissions(&self.socket_dir, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(io_err(format!("restricting {}", self.socket_dir.display())))
    }

    /// A fresh server log, for the server's stderr.
    pub(super) async fn open_log(&self, runner: &Runner) -> Result<std::fs::File, EmbeddedError> {
        // Keep one previous log: enough to see why the last run ended,
        // without growing forever.
        let _ = tokio::fs::rename(&self.log, self.log.with_extension("log.1")).await;
        let log = std::fs::File::create(&self.log)
            .map_err(io_err(format!("creating {}", self.log.display())))?;
        runner.own(&self.log, false).await?;
        Ok(log)
    }
}

pub(super) async fn remove_dirs(dirs: Vec<PathBuf>) {
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
    fn long_or_odd_socket_dirs_are_rejected() {
        assert!(usable_socket_dir(Path::new("/tmp/x/run")));
        assert!(!usable_socket_dir(&Path::new("/tmp").join("a".repeat(100))));
        assert!(!usable_socket_dir(Path::new("/tmp/a,b/run")));
        assert!(!usable_socket_dir(Path::new("/tmp/a b/run")));
    }
}
