//! The real `hark` binary as a child process.
//!
//! [`Hark::launch`] starts it with a clean environment, reads its address
//! from its first line (`hark is listening on http://…`) and keeps its log
//! (stderr) in memory or in a file. The child is killed on drop; with
//! [`Launch::die_with_parent`] also when this process dies (a benchmark's
//! Ctrl-C).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Method, StatusCode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{err, Result};

/// Where hark's log (stderr) goes.
#[derive(Clone, Debug)]
pub enum Log {
    /// Kept in memory: [`Hark::logs`].
    Memory,
    /// Written to this file.
    File(PathBuf),
}

/// How to start hark.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The binary: the caller's `env!("CARGO_BIN_EXE_hark")`.
    pub bin: PathBuf,
    /// `DATABASE_URL`.
    pub db: String,
    /// `HARK_BIND`.
    pub bind: String,
    /// Settings on top of `PATH`, `DATABASE_URL`, `HARK_BIND` and
    /// `HARK_JWT_SECRET` (later ones win).
    pub env: Vec<(String, String)>,
    pub log: Log,
    /// `PR_SET_PDEATHSIG(SIGKILL)`: the child dies with the thread that
    /// started it.
    pub die_with_parent: bool,
    /// How long to wait for the address line.
    pub listen_timeout: Duration,
}

impl Launch {
    /// `bin` on `db` at a free port of 127.0.0.1, log in memory.
    pub fn new(bin: impl Into<PathBuf>, db: &str) -> Launch {
        Launch {
            bin: bin.into(),
            db: db.to_string(),
            bind: "127.0.0.1:0".into(),
            env: Vec::new(),
            log: Log::Memory,
            die_with_parent: false,
            listen_timeout: Duration::from_secs(30),
        }
    }

    /// Adds settings.
    pub fn env<K: ToString, V: ToString>(mut self, env: &[(K, V)]) -> Launch {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }
}

/// A running `hark` process.
pub struct Hark {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub pid: u32,
    /// Its `DATABASE_URL`.
    pub db: String,
    logs: Arc<Mutex<String>>,
    launch: Launch,
}

impl Hark {
    /// Starts hark; fails (with its log) if it exits or prints no address
    /// within [`Launch::listen_timeout`].
    pub async fn launch(launch: Launch) -> Result<Hark> {
        let mut cmd = Command::new(&launch.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &launch.db)
            .env("HARK_BIND", &launch.bind)
            .env("HARK_JWT_SECRET", crate::SECRET)
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        match &launch.log {
            Log::Memory => cmd.stderr(Stdio::piped()),
            Log::File(path) => cmd.stderr(Stdio::from(std::fs::File::create(path)?)),
        };
        if launch.die_with_parent {
            // SAFETY: pre_exec runs between fork and exec, where only
            // async-signal-safe calls are allowed; set_pdeathsig is one
            // prctl system call (no allocation, no locks), which only asks
            // the kernel to SIGKILL the child when the spawning thread dies.
            unsafe {
                cmd.pre_exec(|| {
                    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("spawn {}: {e}", launch.bin.display())))?;
        let pid = child.id().ok_or_else(|| err("hark exited at once"))?;
        let logs = Arc::new(Mutex::new(String::new()));
        // The log is read to its end (the child's exit), so that a failed
        // start's panic message below has all of it.
        let log_done = child.stderr.take().map(|stderr| {
            let sink = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut l = sink.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            })
        });
        let stdout = child.stdout.take().ok_or_else(|| err("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(launch.listen_timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("hark is listening on http://") {
                    return rest.trim().parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            if let Some(done) = log_done {
                let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
            }
            let log = match &launch.log {
                Log::Memory => logs.lock().unwrap().clone(),
                Log::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
            };
            return Err(err(format!("hark did not start; its log:\n{log}")));
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Hark {
            child: Some(child),
            addr,
            pid,
            db: launch.db.clone(),
            logs,
            launch,
        })
    }

    /// How it was started (to start it again, say on the same address).
    pub fn settings(&self) -> &Launch {
        &self.launch
    }

    /// SIGKILL: no shutdown at all, as a crash or the OOM killer would
    /// end it; returns once the process is gone (reaped).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // tokio's kill is SIGKILL, then a wait.
            let _ = child.kill().await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The log so far (with [`Log::Memory`]).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    /// SIGTERM, then wait for the exit; panics unless it exits with
    /// success within 15 s. Returns how long it took.
    pub async fn stop(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .expect("hark did not exit within 15 s of SIGTERM")
                .expect("wait");
            assert!(
                status.success(),
                "hark exited with {status}; log:\n{}",
                self.logs()
            );
        }
        started.elapsed()
    }

    /// SIGTERM, then wait (bounded) for the exit; SIGKILL if it hangs. A
    /// failure is a warning, not a panic.
    pub async fn stop_or_kill(&mut self, wait: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            match tokio::time::timeout(wait, child.wait()).await {
                Ok(Ok(status)) if !status.success() => {
                    eprintln!("warning: hark exited with {status}")
                }
                Ok(_) => {}
                Err(_) => {
                    eprintln!("warning: hark did not exit within {wait:?} of SIGTERM; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }

    /// Stops and starts again on the same address and settings.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut launch = self.launch.clone();
        launch.bind = self.addr.to_string();
        // The port may linger briefly in the kernel: wait until it can be
        // bound, then start; retry (bounded) should another take it first.
        for _ in 0..20 {
            let addr = self.addr;
            crate::within(Duration::from_secs(10), || async move {
                std::net::TcpListener::bind(addr).is_ok()
            })
            .await;
            if let Ok(Ok(h)) =
                tokio::time::timeout(Duration::from_secs(40), Hark::launch(launch.clone())).await
            {
                *self = h;
                return;
            }
        }
        panic!("hark did not restart on {}", self.addr);
    }

    /// Waits until /readyz says 200 (bounded: 30 s); panics with hark's
    /// log if it does not.
    pub async fn wait_ready(&self) {
        self.ready().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits until /readyz says 200 (bounded: 30 s).
    pub async fn ready(&self) -> Result<()> {
        let url = self.url("/readyz");
        let ready = crate::within(Duration::from_secs(30), || async {
            matches!(
                crate::try_request(Method::GET, &url, None, None, &[]).await,
                Ok((StatusCode::OK, _, _))
            )
        })
        .await;
        if ready {
            Ok(())
        } else {
            Err(err(format!(
                "hark never became ready; log:\n{}",
                self.logs()
            )))
        }
    }

    /// Polls /metrics until `name` equals `value` (bounded: 10 s).
    pub async fn wait_for_metric(&self, name: &str, value: f64) {
        let reached = crate::within(Duration::from_secs(10), || async {
            self.metric(name).await == value
        })
        .await;
        if !reached {
            panic!(
                "{name} never reached {value} (now {})",
                self.metric(name).await
            );
        }
    }

    /// Polls /metrics until `name` is at least `min`, for at most
    /// `limit`; returns whether it got there.
    pub async fn metric_reaches(&self, name: &str, min: f64, limit: Duration) -> bool {
        crate::within(limit, || async { self.metric(name).await >= min }).await
    }

    /// A metric's value from /metrics (its name with labels, as printed).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, _, body) = crate::request(Method::GET, &self.url("/metrics"), None, None).await;
        let text = String::from_utf8_lossy(&body);
        crate::metrics::parse(&text)
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    /// Resident set size (VmRSS) in bytes.
    pub fn rss(&self) -> Result<u64> {
        crate::procfs::status_kib(self.pid, "VmRSS:").map(|k| k * 1024)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        crate::procfs::cpu_time_of(self.pid)
    }

    pub fn threads(&self) -> Result<u64> {
        crate::procfs::threads_of(self.pid)
    }
}

impl Drop for Hark {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Reap it; the runtime may be gone, so do it synchronously.
            let _ = nix::sys::wait::waitpid(Pid::from_raw(self.pid as i32), None);
        }
    }
}
