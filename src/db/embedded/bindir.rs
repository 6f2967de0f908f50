//! Finding PostgreSQL's programs (`initdb`, `postgres`, `pg_ctl`): they are
//! often not on PATH (Debian keeps them in `/usr/lib/postgresql/<v>/bin`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

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

pub(super) fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
