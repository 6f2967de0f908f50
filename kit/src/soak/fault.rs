//! The soak's faults, one at a time, in turn: the LISTEN backends killed;
//! PostgreSQL restarted; a hark killed with SIGKILL and started again on
//! its address; a reader that stops reading (cut by hark, resumed with
//! `Last-Event-ID`); a burst of connections over `HARK_MAX_CONNECTIONS`.
//! Each returns what happened, or why it did not recover.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{Goal, Progress, RoomState};
use super::wire::{error_code, retry_after, Wire};
use super::{hark_launch, key_of, Config, Ctx, HarkLife};
use crate::metrics::MetricsClient;
use crate::pg::Restartable;
use crate::{err, Hark, Result};

/// The kinds, in the order they come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    ListenerKilled,
    PostgresRestarted,
    HarkKilled,
    SlowReader,
    ConnectionBurst,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::ListenerKilled,
        FaultKind::PostgresRestarted,
        FaultKind::HarkKilled,
        FaultKind::SlowReader,
        FaultKind::ConnectionBurst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ListenerKilled => "LISTEN backends killed",
            FaultKind::PostgresRestarted => "PostgreSQL restarted",
            FaultKind::HarkKilled => "hark SIGKILLed and restarted",
            FaultKind::SlowReader => "slow reader",
            FaultKind::ConnectionBurst => "connection burst",
        }
    }
}

/// One fault as it happened.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// From the fault's start to the end of its recovery (both harks
    /// ready, the slow reader caught up, the burst closed), ms since t0.
    pub start_ms: u32,
    pub end_ms: u32,
    pub survived: bool,
    pub detail: String,
}

/// The slow reader's two streams (one on each hark) and their goal.
pub(crate) struct SlowRig {
    pub(crate) room: i64,
    pub(crate) sender: i64,
    pub(crate) pause: [watch::Sender<bool>; 2],
    pub(crate) progress: [Arc<Progress>; 2],
    pub(crate) goal: watch::Sender<Option<Arc<Goal>>>,
    pub(crate) gen: u64,
}

/// What the faults act on.
pub(crate) struct Rig {
    pub(crate) cfg: Arc<Config>,
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) cluster: Restartable,
    pub(crate) db: String,
    pub(crate) harks: Vec<Hark>,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) lives: Arc<Mutex<Vec<HarkLife>>>,
    pub(crate) slow: SlowRig,
    pub(crate) counts: [usize; 5],
    /// Messages the slow-reader faults wrote, and deletes of them.
    pub(crate) slow_fillers: u64,
    pub(crate) slow_deletes: u64,
}

const READY_LIMIT: Duration = Duration::from_secs(60);

/// Whether hark at `addr` answers /readyz with 200 within `limit`.
pub(crate) async fn ready(addr: SocketAddr, limit: Duration) -> bool {
    crate::within(limit, || async move {
        let Ok(mut w) = Wire::connect(addr, None).await else {
            return false;
        };
        let req = b"GET /readyz HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n\r\n";
        matches!(
            tokio::time::timeout(Duration::from_secs(5), w.exchange(req)).await,
            Ok(Ok((head, _))) if head.status == 200
        )
    })
    .await
}

async fn metric(addr: SocketAddr, name: &str) -> Result<f64> {
    MetricsClient::new(addr).get(name).await
}

impl Rig {
    fn name(&self, k: usize) -> char {
        (b'A' + k as u8) as char
    }

    async fn all_ready(&self) -> Result<Duration> {
        let began = Instant::now();
        for (k, addr) in self.addrs.iter().enumerate() {
            let left = READY_LIMIT.saturating_sub(began.elapsed());
            if !ready(*addr, left).await {
                return Err(err(format!(
                    "hark {} not ready within {} s",
                    self.name(k),
                    READY_LIMIT.as_secs()
                )));
            }
        }
        Ok(began.elapsed())
    }

    /// Runs the next fault of `kind`; its record.
    pub(crate) async fn fault(&mut self, kind: FaultKind) -> FaultRecord {
        let start = std::time::Instant::now();
        let i = self.counts[kind as usize];
        self.counts[kind as usize] += 1;
        let result = match kind {
            FaultKind::ListenerKilled => self.kill_listeners().await,
            FaultKind::PostgresRestarted => self.restart_postgres().await,
            FaultKind::HarkKilled => self.kill_hark(i % 2).await,
            FaultKind::SlowReader => self.slow_reader(i % 2).await,
            FaultKind::ConnectionBurst => self.burst(i % 2).await,
        };
        // Whatever it was, it is over only once both harks are ready.
        let result = match result {
            Ok(detail) => self.all_ready().await.map(|_| detail),
            Err(e) => Err(e),
        };
        let (survived, detail) = match result {
            Ok(d) => (true, d),
            Err(e) => (false, format!("NOT RECOVERED: {e}")),
        };
        FaultRecord {
            kind,
            start_ms: self.ctx.ms(start),
            end_ms: self.ctx.ms(std::time::Instant::now()),
            survived,
            detail,
        }
    }

    async fn kill_listeners(&mut self) -> Result<String> {
        let mut before = Vec::new();
        for addr in &self.addrs {
            before.push(metric(*addr, "hark_listener_reconnects_total").await?);
        }
        let admin = crate::pg::try_connect(&self.db).await?;
        let began = Instant::now();
        // One LISTEN session per hark; both are up (the last fault ended
        // with both ready), but a kill is retried until both went.
        let mut killed = 0i64;
        while killed < self.addrs.len() as i64 && began.elapsed() < Duration::from_secs(10) {
            let n: i64 = admin
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = 'hark-listener' AND datname = current_database()",
                    &[],
                )
                .await?
                .get(0);
            killed += n;
            if killed < self.addrs.len() as i64 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if killed < self.addrs.len() as i64 {
            return Err(err(format!(
                "{killed} LISTEN backends to kill within 10 s, not {}",
                self.addrs.len()
            )));
        }
        let killed_at = Instant::now();
        for (k, addr) in self.addrs.iter().enumerate() {
            let b = before[k];
            let back = crate::within(READY_LIMIT, || async move {
                metric(*addr, "hark_listener_reconnects_total")
                    .await
                    .is_ok_and(|v| v > b)
            })
            .await;
            if !back {
                return Err(err(format!(
                    "hark {} did not reconnect its LISTEN session within {} s",
                    self.name(k),
                    READY_LIMIT.as_secs()
                )));
            }
        }
        let relisten = killed_at.elapsed();
        let ready = self.all_ready().await?;
        Ok(format!(
            "{killed} LISTEN backends terminated (pg_terminate_backend); both harks \
             listening again within {:.1} s, ready within {:.1} s",
            relisten.as_secs_f64(),
            (relisten + ready).as_secs_f64()
        ))
    }

    async fn restart_postgres(&mut self) -> Result<String> {
        let down = self.cluster.restart().await?;
        let ready = self.all_ready().await?;
        Ok(format!(
            "fast shutdown and start on the same data directory: PostgreSQL away {:.1} s; \
             both harks ready {:.1} s after it was back",
            down.as_secs_f64(),
            ready.as_secs_f64()
        ))
    }

    async fn kill_hark(&mut self, k: usize) -> Result<String> {
        let addr = self.addrs[k];
        let old = self.harks[k].pid;
        let incarnation = {
            let lives = self.lives.lock().unwrap();
            lives.iter().filter(|l| l.slot == k).count()
        };
        let mut launch = self.harks[k].settings().clone();
        launch.bind = addr.to_string();
        launch.log = hark_launch(&self.cfg, &self.db, k, incarnation).log;
        self.harks[k].kill().await;
        let killed = std::time::Instant::now();
        super::end_life(&self.lives, &self.ctx, old, "SIGKILL");
        // The port is free once the process is gone; a start may still
        // lose a race for it, so try a few times.
        crate::within(Duration::from_secs(10), || async move {
            std::net::TcpListener::bind(addr).is_ok()
        })
        .await;
        let mut last = None;
        for _ in 0..5 {
            match Hark::launch(launch.clone()).await {
                Ok(h) => {
                    self.harks[k] = h;
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if let Some(e) = last {
            return Err(err(format!(
                "hark {} did not start again: {e}",
                self.name(k)
            )));
        }
        let listening = killed.elapsed();
        let pid = self.harks[k].pid;
        super::begin_life(&self.lives, &self.ctx, k, pid);
        if !ready(addr, READY_LIMIT).await {
            return Err(err(format!(
                "hark {} (pid {pid}) never ready",
                self.name(k)
            )));
        }
        Ok(format!(
            "hark {} (pid {old}) killed with SIGKILL; pid {pid} listening on the same \
             address {:.1} s later, ready after {:.1} s",
            self.name(k),
            listening.as_secs_f64(),
            killed.elapsed().as_secs_f64()
        ))
    }

    /// The slow room as the table holds it.
    async fn slow_table(&self, db: &tokio_postgres::Client) -> Result<RoomState> {
        let rows = db
            .query(
                "SELECT id, content FROM chat_chatmessage WHERE room_id = $1",
                &[&self.slow.room],
            )
            .await?;
        let mut out = RoomState::new();
        for r in rows {
            let content: String = r.get(1);
            let key = key_of(&content).ok_or_else(|| err("a slow-room row without a key"))?;
            out.insert(r.get(0), key);
        }
        Ok(out)
    }

    /// Gives both slow streams the slow room's table as their goal and
    /// waits (bounded) until both hold it.
    async fn slow_converge(&mut self, db: &tokio_postgres::Client) -> Result<Duration> {
        let state = self.slow_table(db).await?;
        self.slow.gen += 1;
        let gen = self.slow.gen;
        let mut rooms = std::collections::HashMap::new();
        rooms.insert(self.slow.room, state);
        self.slow.goal.send_replace(Some(Arc::new(Goal {
            gen,
            rooms,
            last: false,
            deadline: None,
        })));
        let began = Instant::now();
        let progress = self.slow.progress.clone();
        let reached = crate::within(READY_LIMIT, || {
            let progress = progress.clone();
            async move { progress.iter().all(|p| p.reached.load(Relaxed) >= gen) }
        })
        .await;
        if !reached {
            return Err(err(format!(
                "the slow room's streams did not reach the table within {} s",
                READY_LIMIT.as_secs()
            )));
        }
        Ok(began.elapsed())
    }

    async fn slow_reader(&mut self, k: usize) -> Result<String> {
        let addr = self.addrs[k];
        let db = crate::pg::try_connect(&self.db).await?;
        let connections = self.slow.progress[k].connections.load(Relaxed);
        let cuts_before = metric(addr, "hark_streams_cut_slow_total").await?;
        self.slow.pause[k].send_replace(true);
        // The reader is surely not reading once its pending read returned.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let chars = self.cfg.slow_message_chars as i32;
        let batch = 50i64;
        let mut written = 0i64;
        let mut cut = false;
        let began = Instant::now();
        for _ in 0..self.cfg.slow_max_batches {
            let first = self.ctx.keys(batch as u64);
            self.ctx.committing(first, batch as u64);
            db.execute(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                 SELECT $1, $2, 'v' || ($3::int8 + g) || ' ' || repeat('x', $4::int4), now() \
                 FROM generate_series(0, $5::int8 - 1) g",
                &[
                    &self.slow.room,
                    &self.slow.sender,
                    &(first as i64),
                    &chars,
                    &batch,
                ],
            )
            .await?;
            written += batch;
            self.ctx.live.writes.fetch_add(batch as u64, Relaxed);
            if metric(addr, "hark_streams_cut_slow_total").await? > cuts_before {
                cut = true;
                break;
            }
        }
        if !cut {
            // The last batches may still be on their way to the stream.
            cut = crate::within(Duration::from_secs(5), || async move {
                metric(addr, "hark_streams_cut_slow_total")
                    .await
                    .is_ok_and(|v| v > cuts_before)
            })
            .await;
        }
        let to_cut = began.elapsed();
        self.slow.pause[k].send_replace(false);
        self.slow_fillers += written as u64;
        let caught_up = self.slow_converge(&db).await?;
        let reconnected = self.slow.progress[k].connections.load(Relaxed) > connections;
        // Then the whole room is deleted: as many deletes reach both.
        let deleted = db
            .execute(
                "DELETE FROM chat_chatmessage WHERE room_id = $1",
                &[&self.slow.room],
            )
            .await?;
        self.ctx.live.writes.fetch_add(deleted, Relaxed);
        self.slow_deletes += deleted;
        let deletes_in = self.slow_converge(&db).await?;
        let mb = written as f64 * chars as f64 / 1e6;
        let what = format!(
            "the stream of the slow room on hark {} stopped reading (4 KiB receive buffer); \
             {written} messages of {chars} characters ({mb:.1} MB) written",
            self.name(k)
        );
        if !cut || !reconnected {
            return Err(err(format!(
                "{what}: hark did not cut it (hark_streams_cut_slow_total {}, reconnected: {reconnected})",
                if cut { "rose" } else { "unchanged" }
            )));
        }
        Ok(format!(
            "{what} in {:.1} s until hark cut it; it resumed with Last-Event-ID and held \
             the table {:.1} s after reading again; then {deleted} deletes reached both \
             slow-room streams in {:.1} s",
            to_cut.as_secs_f64(),
            caught_up.as_secs_f64(),
            deletes_in.as_secs_f64()
        ))
    }

    async fn burst(&mut self, k: usize) -> Result<String> {
        let addr = self.addrs[k];
        // Its connection is open before the burst: a new one would be
        // refused while the burst holds every place.
        let mut mc = MetricsClient::new(addr);
        let open_before = mc.get("hark_open_connections").await?;
        let rejected_before = mc.get("hark_rejected_connections_total").await?;
        let n = self.cfg.burst;
        let began = Instant::now();
        let outcomes: Vec<Burst> = futures::stream::iter(0..n)
            .map(|_| burst_one(addr))
            .buffer_unordered(100)
            .collect()
            .await;
        let opened = began.elapsed();
        let mut accepted = Vec::new();
        let (mut refused, mut refused_with_retry, mut other) = (0, 0, Vec::new());
        for o in outcomes {
            match o {
                Burst::Accepted(w) => accepted.push(w),
                Burst::Refused { retry_after, code } => {
                    refused += 1;
                    if retry_after && code == "unavailable" {
                        refused_with_retry += 1;
                    }
                }
                Burst::Failed(e) => other.push(e),
            }
        }
        let rejected = match mc.get("hark_rejected_connections_total").await {
            Ok(v) => format!("{}", v - rejected_before),
            Err(e) => format!("? ({e})"),
        };
        drop(mc);
        tokio::time::sleep(self.cfg.burst_hold).await;
        let held = accepted.len();
        drop(accepted);
        let target = open_before + 20.0;
        let drained = crate::within(Duration::from_secs(30), || async move {
            metric(addr, "hark_open_connections")
                .await
                .is_ok_and(|v| v <= target)
        })
        .await;
        other.sort();
        other.dedup();
        let what = format!(
            "{n} connections opened at once to hark {} ({open_before} open, \
             HARK_MAX_CONNECTIONS={}) in {:.1} s: {held} accepted and held {:.0} s, {refused} \
             refused with 503 ({refused_with_retry} with Retry-After and code `unavailable`), \
             {} failed otherwise{}; hark counted {rejected} rejected",
            self.name(k),
            self.cfg.max_connections,
            opened.as_secs_f64(),
            self.cfg.burst_hold.as_secs_f64(),
            other.len(),
            if other.is_empty() {
                String::new()
            } else {
                format!(" ({})", other.join("; "))
            }
        );
        if refused == 0 || refused_with_retry != refused || !drained {
            return Err(err(format!(
                "{what}: {}",
                if refused == 0 {
                    "nothing was refused".to_string()
                } else if !drained {
                    "its open connections did not come back down within 30 s".to_string()
                } else {
                    "a refusal without Retry-After".to_string()
                }
            )));
        }
        Ok(what)
    }
}

enum Burst {
    Accepted(Wire),
    Refused { retry_after: bool, code: String },
    Failed(String),
}

/// One connection of the burst: `GET /healthz`; kept open when served.
async fn burst_one(addr: SocketAddr) -> Burst {
    let go = async {
        let mut w = Wire::connect(addr, None).await?;
        w.send(b"GET /healthz HTTP/1.1\r\nhost: soak\r\n\r\n")
            .await?;
        let head = w.head().await?;
        let body = w.body(&head).await?;
        Ok::<_, std::io::Error>((w, head, body))
    };
    match tokio::time::timeout(Duration::from_secs(20), go).await {
        Ok(Ok((w, head, _))) if head.status == 200 => Burst::Accepted(w),
        Ok(Ok((_, head, body))) if head.status == 503 => Burst::Refused {
            retry_after: retry_after(&head).is_some(),
            code: error_code(&body),
        },
        Ok(Ok((_, head, _))) => Burst::Failed(format!("answered {}", head.status)),
        Ok(Err(e)) => Burst::Failed(e.kind().to_string()),
        Err(_) => Burst::Failed("no answer within 20 s".into()),
    }
}
