//! Running PostgreSQL's programs as the right user. PostgreSQL refuses to
//! run as root, and containers run as root: then every program runs as the
//! `postgres` system user through `setpriv`, and the files the cluster
//! needs are given to that user.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::unistd::{geteuid, User};
use tokio::process::Command;

use super::bindir::is_executable;
use super::{io_err, EmbeddedError};

/// Who PostgreSQL's programs run as: ourselves, or — when we are root —
/// the `postgres` user through `setpriv`.
pub(super) struct Runner {
    /// `(setpriv, uid, gid)` when running as root.
    drop_to: Option<(PathBuf, u32, u32)>,
    /// The uid that owns the cluster's files.
    pub(super) owner_uid: u32,
}

impl Runner {
    pub(super) fn detect() -> Result<Runner, EmbeddedError> {
        let euid = geteuid().as_raw();
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

    pub(super) fn is_root(&self) -> bool {
        self.drop_to.is_some()
    }

    /// The command line that runs `program` as the cluster's user.
    pub(super) fn argv(&self, program: &Path) -> Vec<OsString> {
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

    pub(super) fn command(&self, program: &Path) -> Command {
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
    pub(super) async fn own(&self, path: &Path, recursive: bool) -> Result<(), EmbeddedError> {
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
    pub(super) async fn can_enter(&self, dir: &Path) -> bool {
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

/// `(uid, gid)` of a user account; `None` also when the lookup fails, as
/// for a missing account: either way there is no one to run as.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let user = User::from_name(name).ok().flatten()?;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_absolute() && is_executable(p))
}
