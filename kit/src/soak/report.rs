//! The soak's summary: what was written and delivered, what was lost or
//! duplicated, every 5xx by cause, the faults, the delivery latency
//! outside the fault windows, and each hark's memory.

use std::collections::BTreeMap;
use std::time::Duration;

use super::client::ClientReport;
use super::fault::{FaultKind, FaultRecord};
use super::writer::WriterReport;
use super::{Config, HarkLife};

/// Percentiles of the delivery latency, in ms.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    fn of(mut us: Vec<u32>) -> Latency {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        let pct = |p: f64| {
            let rank = ((p / 100.0) * us.len() as f64).ceil() as usize;
            us[rank.clamp(1, us.len()) - 1] as f64 / 1000.0
        };
        Latency {
            n: us.len(),
            p50: pct(50.0),
            p99: pct(99.0),
            p999: pct(99.9),
            max: *us.last().unwrap() as f64 / 1000.0,
        }
    }

    fn line(&self) -> String {
        if self.n == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({} deliveries)",
            self.p50,
            self.p99,
            self.p999,
            self.max,
            thousands(self.n as u64)
        )
    }
}

/// What the soak saw; [`Report::print`] prints it, [`Report::failures`]
/// says what misses the bar.
#[derive(Clone, Debug)]
pub struct Report {
    pub writes_for: Duration,
    pub pollers: usize,
    pub streams: usize,
    pub rooms: usize,
    pub users: usize,
    pub writers: usize,
    pub rate: f64,
    pub fault_interval: Duration,
    pub max_connections: u32,
    pub inserts: u64,
    pub edits: u64,
    pub deletes: u64,
    pub noops: u64,
    pub in_doubt: u64,
    pub failed_changes: u64,
    pub writer_connect_errors: u64,
    pub slow_fillers: u64,
    pub slow_deletes: u64,
    pub rows_at_end: usize,
    /// New versions and new deletes delivered, and every delivery
    /// (duplicates included).
    pub delivered_versions: u64,
    pub delivered_deletes: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub clients_with_loss: usize,
    pub not_converged: usize,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub foreign: u64,
    pub resets: u64,
    pub fivexx: u64,
    pub fivexx_postgres_restart: u64,
    pub fivexx_over_limit: u64,
    pub fivexx_unexpected: u64,
    /// (what, how many) of the unexpected 5xx.
    pub fivexx_unexpected_kinds: Vec<(String, u64)>,
    pub fivexx_without_retry_after: u64,
    /// Answers neither 200 nor 5xx nor a reset (with how many).
    pub other_statuses: Vec<(String, u64)>,
    pub transport_errors: u64,
    pub hung: u64,
    pub stalled: u64,
    pub streams_ended_by_hark: u64,
    pub connections: u64,
    pub signals: u64,
    pub faults: Vec<FaultRecord>,
    pub latency_outside: Latency,
    /// The same, fault interval by fault interval (by COMMIT time).
    pub latency_by_interval: Vec<Latency>,
    pub latency_inside: Latency,
    pub lives: Vec<HarkLife>,
    pub converged_in: Duration,
    /// The load generator's (this process's) CPU time, and the machine's
    /// load average when the writes began and at the end.
    pub own_cpu: Duration,
    pub load_at_start: String,
    pub load_at_end: String,
    /// ms since t0 of the writes' start and of the end (for the times).
    pub writes_ms: u32,
    pub end_ms: u32,
}

pub(crate) struct Inputs<'a> {
    pub(crate) cfg: &'a Config,
    pub(crate) writes_ms: u32,
    pub(crate) writes_for: Duration,
    pub(crate) end_ms: u32,
    pub(crate) written: WriterReport,
    pub(crate) slow_fillers: u64,
    pub(crate) slow_deletes: u64,
    pub(crate) rows: usize,
    pub(crate) clients: Vec<ClientReport>,
    pub(crate) faults: Vec<FaultRecord>,
    pub(crate) lives: Vec<HarkLife>,
    pub(crate) converged_in: Duration,
    pub(crate) users: usize,
    pub(crate) own_cpu: Duration,
    pub(crate) load_at_start: String,
    pub(crate) load_at_end: String,
}

pub(crate) fn build(i: Inputs<'_>) -> Report {
    let settle = i.cfg.settle.as_millis() as u32;
    let windows: Vec<(FaultKind, u32, u32)> = i
        .faults
        .iter()
        .map(|f| (f.kind, f.start_ms, f.end_ms + settle))
        .collect();
    let in_window = |kind: FaultKind, at: u32| {
        windows
            .iter()
            .any(|(k, a, b)| *k == kind && (*a..=*b).contains(&at))
    };
    let label = |at: u32| {
        windows
            .iter()
            .enumerate()
            .find(|(_, (_, a, b))| (*a..=*b).contains(&at))
            .map_or("outside the fault windows".to_string(), |(n, (k, _, _))| {
                format!("in the window of fault {} ({})", n + 1, k.name())
            })
    };
    let w = &i.written;
    let mut r = Report {
        writes_for: i.writes_for,
        pollers: i.cfg.pollers,
        streams: i.cfg.streams,
        rooms: i.cfg.rooms,
        users: i.users,
        writers: i.cfg.writers,
        rate: i.cfg.rate,
        fault_interval: i.cfg.fault_interval,
        max_connections: i.cfg.max_connections,
        inserts: w.inserts,
        edits: w.edits,
        deletes: w.deletes,
        noops: w.noops,
        in_doubt: w.in_doubt,
        failed_changes: w.failed,
        writer_connect_errors: w.connect_errors,
        slow_fillers: i.slow_fillers,
        slow_deletes: i.slow_deletes,
        rows_at_end: i.rows,
        delivered_versions: 0,
        delivered_deletes: 0,
        deliveries: 0,
        lost: 0,
        clients_with_loss: 0,
        not_converged: 0,
        duplicated: 0,
        out_of_order: 0,
        foreign: 0,
        resets: 0,
        fivexx: 0,
        fivexx_postgres_restart: 0,
        fivexx_over_limit: 0,
        fivexx_unexpected: 0,
        fivexx_unexpected_kinds: Vec::new(),
        fivexx_without_retry_after: 0,
        other_statuses: Vec::new(),
        transport_errors: 0,
        hung: 0,
        stalled: 0,
        streams_ended_by_hark: 0,
        connections: 0,
        signals: 0,
        faults: i.faults.clone(),
        latency_outside: Latency::default(),
        latency_by_interval: Vec::new(),
        latency_inside: Latency::default(),
        lives: i.lives,
        converged_in: i.converged_in,
        own_cpu: i.own_cpu,
        load_at_start: i.load_at_start,
        load_at_end: i.load_at_end,
        writes_ms: i.writes_ms,
        end_ms: i.end_ms,
    };
    let mut unexpected: BTreeMap<String, u64> = BTreeMap::new();
    let mut others: BTreeMap<String, u64> = BTreeMap::new();
    let (mut outside, mut inside) = (Vec::new(), Vec::new());
    let interval = (i.cfg.fault_interval.as_millis() as u32).max(1);
    // COMMITs sent in the writes' last instant go with the last interval.
    let last = (i.writes_for.as_millis() as u32).saturating_sub(1) / interval;
    let mut by_interval: Vec<Vec<u32>> = Vec::new();
    for c in &i.clients {
        r.delivered_versions += c.messages;
        r.delivered_deletes += c.deletes;
        r.deliveries += c.messages + c.deletes + c.duplicated + c.out_of_order;
        r.lost += c.lost;
        r.clients_with_loss += usize::from(c.lost > 0);
        r.not_converged += usize::from(!c.converged);
        r.duplicated += c.duplicated;
        r.out_of_order += c.out_of_order;
        r.foreign += c.foreign;
        r.resets += c.resets;
        r.transport_errors += c.transport_errors;
        r.hung += c.hung;
        r.stalled += c.stalled;
        r.streams_ended_by_hark += c.ended_by_hark;
        r.connections += c.connections;
        r.signals += c.signals;
        for s in &c.statuses {
            let who = if s.poll { "poll" } else { "stream" };
            if s.status >= 500 {
                r.fivexx += 1;
                if !s.retry_after {
                    r.fivexx_without_retry_after += 1;
                }
                if s.status == 503
                    && s.code == "database_unavailable"
                    && in_window(FaultKind::PostgresRestarted, s.at_ms)
                {
                    r.fivexx_postgres_restart += 1;
                } else if s.status == 503
                    && s.code == "unavailable"
                    && in_window(FaultKind::ConnectionBurst, s.at_ms)
                {
                    r.fivexx_over_limit += 1;
                } else {
                    r.fivexx_unexpected += 1;
                    *unexpected
                        .entry(format!(
                            "{} `{}` to a {who}, {}",
                            s.status,
                            s.code,
                            label(s.at_ms)
                        ))
                        .or_default() += 1;
                }
            } else {
                *others
                    .entry(format!(
                        "{} `{}` to a {who}, {}",
                        s.status,
                        s.code,
                        label(s.at_ms)
                    ))
                    .or_default() += 1;
            }
        }
        for &(commit, us) in &c.latencies {
            let arrival = commit + us / 1000;
            let hit = windows
                .iter()
                .any(|(_, a, b)| commit <= *b && arrival >= *a);
            if hit {
                inside.push(us);
            } else {
                outside.push(us);
                let k = (commit.saturating_sub(i.writes_ms) / interval).min(last) as usize;
                if by_interval.len() <= k {
                    by_interval.resize_with(k + 1, Vec::new);
                }
                by_interval[k].push(us);
            }
        }
    }
    r.fivexx_unexpected_kinds = unexpected.into_iter().collect();
    r.other_statuses = others.into_iter().collect();
    r.latency_outside = Latency::of(outside);
    r.latency_by_interval = by_interval.into_iter().map(Latency::of).collect();
    r.latency_inside = Latency::of(inside);
    r
}

/// 1234567 → "1,234,567".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

impl Report {
    fn t(&self, ms: u32) -> String {
        let s = (ms as f64 - self.writes_ms as f64) / 1000.0;
        let sign = if s < 0.0 { "-" } else { "" };
        let a = s.abs();
        format!("{sign}{}:{:04.1}", (a / 60.0).floor() as u64, a % 60.0)
    }

    pub fn faults_survived(&self) -> usize {
        self.faults.iter().filter(|f| f.survived).count()
    }

    /// What misses the bar: nothing lost, duplicated or out of order, no
    /// reset, no unexpected 5xx or other answer, every fault survived,
    /// every kind of fault done at least once, no request left unanswered.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                f.push(what);
            }
        };
        check(self.lost == 0, format!("lost {}", self.lost));
        check(
            self.not_converged == 0,
            format!("{} clients did not reach the table", self.not_converged),
        );
        check(
            self.duplicated == 0,
            format!("duplicated {}", self.duplicated),
        );
        check(
            self.out_of_order == 0,
            format!("out of order {}", self.out_of_order),
        );
        check(
            self.foreign == 0,
            format!("{} deliveries of another room or unreadable", self.foreign),
        );
        check(self.resets == 0, format!("{} cursor resets", self.resets));
        check(
            self.fivexx_unexpected == 0,
            format!("{} unexpected 5xx", self.fivexx_unexpected),
        );
        check(
            self.fivexx_without_retry_after == 0,
            format!(
                "{} 5xx without Retry-After",
                self.fivexx_without_retry_after
            ),
        );
        check(
            self.other_statuses.is_empty(),
            format!("other answers: {:?}", self.other_statuses),
        );
        check(
            self.hung == 0,
            format!("{} requests without an answer in time", self.hung),
        );
        check(
            self.faults_survived() == self.faults.len(),
            format!(
                "{} of {} faults not survived",
                self.faults.len() - self.faults_survived(),
                self.faults.len()
            ),
        );
        for kind in FaultKind::ALL {
            check(
                self.faults.iter().any(|x| x.kind == kind),
                format!("no {} fault ran", kind.name()),
            );
        }
        f
    }

    /// The summary, as printed.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let mut line = |s: String| {
            o.push_str(&s);
            o.push('\n');
        };
        let n = thousands;
        line("== soak summary ==".into());
        line(format!(
            "setup: 2 hark processes on one PostgreSQL; {} writers at {} changes/s for {:.1} min; \
             {} long pollers and {} streams (+2 slow-room streams), {} users in {} rooms; \
             a fault every {} s; HARK_MAX_CONNECTIONS={} each",
            self.writers,
            self.rate,
            self.writes_for.as_secs_f64() / 60.0,
            n(self.pollers as u64),
            n(self.streams as u64),
            n(self.users as u64),
            self.rooms,
            self.fault_interval.as_secs(),
            self.max_connections
        ));
        line(format!(
            "messages written: {} inserts, {} edits, {} deletes committed \
             (+ {} large messages and {} deletes by the slow-reader faults); \
             {} edits/deletes found their message gone, {} in doubt (connection lost during \
             COMMIT), {} failed before COMMIT; {} rows at the end",
            n(self.inserts),
            n(self.edits),
            n(self.deletes),
            n(self.slow_fillers),
            n(self.slow_deletes),
            n(self.noops),
            n(self.in_doubt),
            n(self.failed_changes),
            n(self.rows_at_end as u64)
        ));
        line(format!(
            "deliveries: {} ({} message versions and {} deletes new to their client)",
            n(self.deliveries),
            n(self.delivered_versions),
            n(self.delivered_deletes)
        ));
        line(format!(
            "lost: {} (messages, over all clients, where a view differs from the table at the \
             end; {} clients with a loss; {} clients did not reach the table; the last client \
             was done {:.1} s after the writers stopped)",
            n(self.lost),
            self.clients_with_loss,
            self.not_converged,
            self.converged_in.as_secs_f64()
        ));
        line(format!(
            "duplicated: {} (a version or delete given twice to one client); out of order: {}; \
             cursor resets: {}; other room or unreadable: {}",
            n(self.duplicated),
            n(self.out_of_order),
            n(self.resets),
            n(self.foreign)
        ));
        line(format!(
            "5xx: {} seen by the soak's clients: {} × 503 `database_unavailable` while \
             PostgreSQL restarted (expected), {} × 503 `unavailable` over \
             HARK_MAX_CONNECTIONS during a burst (expected), {} unexpected; {} without Retry-After",
            n(self.fivexx),
            n(self.fivexx_postgres_restart),
            n(self.fivexx_over_limit),
            n(self.fivexx_unexpected),
            n(self.fivexx_without_retry_after)
        ));
        for (what, count) in &self.fivexx_unexpected_kinds {
            line(format!("  unexpected: {count} × {what}"));
        }
        for (what, count) in &self.other_statuses {
            line(format!("  other answer: {count} × {what}"));
        }
        line(format!(
            "clients: {} connections; {} refused or broken on the wire (hark killed or \
             restarting), {} requests unanswered in time, {} streams silent 45 s, {} streams \
             ended by hark; {} typing/presence/read events",
            n(self.connections),
            n(self.transport_errors),
            n(self.hung),
            n(self.stalled),
            n(self.streams_ended_by_hark),
            n(self.signals)
        ));
        line(format!(
            "faults survived: {} of {}",
            self.faults_survived(),
            self.faults.len()
        ));
        for (i, f) in self.faults.iter().enumerate() {
            line(format!(
                "  {:>2}. {}–{} {}: {}",
                i + 1,
                self.t(f.start_ms),
                self.t(f.end_ms),
                f.kind.name(),
                f.detail
            ));
        }
        line(format!(
            "delivery latency (writer's COMMIT sent → client parsed), outside the fault windows: {}",
            self.latency_outside.line()
        ));
        line(format!(
            "  outside the fault windows, p99 interval by interval ({} s each, by COMMIT time): {} ms",
            self.fault_interval.as_secs(),
            self.latency_by_interval
                .iter()
                .map(|l| if l.n == 0 { "-".into() } else { format!("{:.0}", l.p99) })
                .collect::<Vec<_>>()
                .join(", ")
        ));
        line(format!(
            "  inside the fault windows (for reference): {}",
            self.latency_inside.line()
        ));
        line(format!(
            "machine: load average {} when the writes began, {} at the end; the load \
             generator (this process) used {:.0} s of CPU",
            self.load_at_start,
            self.load_at_end,
            self.own_cpu.as_secs_f64()
        ));
        line("RSS (VmRSS) and CPU time of each hark process:".into());
        for l in &self.lives {
            let rss = |s: Option<(u32, u64)>| {
                s.map_or("-".to_string(), |(at, b)| {
                    format!("{} at {}", mib(b), self.t(at))
                })
            };
            line(format!(
                "  hark {} pid {}: from {} to {} ({}): RSS start {}, end {}, max {}; CPU {:.0} s",
                (b'A' + l.slot as u8) as char,
                l.pid,
                self.t(l.from_ms),
                l.to_ms.map_or("-".into(), |t| self.t(t)),
                if l.ended.is_empty() {
                    "running"
                } else {
                    &l.ended
                },
                rss(l.rss_first),
                rss(l.rss_last),
                mib(l.rss_max),
                l.cpu.as_secs_f64()
            ));
        }
        let failures = self.failures();
        line(if failures.is_empty() {
            format!(
                "verdict: PASS — 0 lost, 0 duplicated, 0 unexpected 5xx ({} 5xx in all, each \
                 inside the window of the fault that explains it), {} of {} faults survived",
                n(self.fivexx),
                self.faults_survived(),
                self.faults.len()
            )
        } else {
            format!("verdict: FAIL — {}", failures.join("; "))
        });
        o
    }

    pub fn print(&self) {
        print!("{}", self.text());
    }
}
