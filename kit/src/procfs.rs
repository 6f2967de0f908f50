//! What /proc tells about a process: CPU time, memory, threads.

use std::net::SocketAddr;
use std::time::Duration;

use nix::unistd::{sysconf, SysconfVar};

use crate::{err, Result};

/// CPU time (user + system) of a process so far.
pub fn cpu_time_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, ticks) = stat_fields(&stat).ok_or_else(|| err("bad stat"))?;
    Ok(ticks_to_duration(ticks))
}

/// (parent pid, user + system ticks) from a `/proc/<pid>/stat` line.
pub fn stat_fields(stat: &str) -> Option<(u32, u64)> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() < 13 {
        return None;
    }
    let ppid = f[1].parse().ok()?;
    let ticks = f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?;
    Some((ppid, ticks))
}

/// Clock ticks (`USER_HZ`, the unit of `/proc/<pid>/stat`) as time.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    // sysconf does not fail for it on Linux; 100 is Linux's USER_HZ.
    let hz = match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as u64,
        _ => 100,
    };
    Duration::from_micros(ticks * 1_000_000 / hz)
}

pub fn threads_of(pid: u32) -> Result<u64> {
    status_kib(pid, "Threads:")
}

/// A number from `/proc/<pid>/status` (the first word after `key`).
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| err(format!("no {key} in /proc/{pid}/status")))
}

/// The send and receive queues (bytes) of the TCP socket whose own end is
/// `local` and whose peer is `remote`, from `/proc/net/tcp`: what it has
/// sent that the peer has not taken yet, and what it has received that
/// its process has not read yet. None if there is no such socket (IPv4
/// only).
pub fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (l, r) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[1] != l || f[2] != r {
            return None;
        }
        let (tx, rx) = f[4].split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}
