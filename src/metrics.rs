//! Process metrics in Prometheus text format (`GET /metrics`).
//!
//! Plain atomics: every hot path (a message fanned out to thousands of
//! waiters) updates them without a lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (seconds) of the delivery-latency histogram.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The form of a poll's `since`, as `hark_poll_answers_total` labels it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PollSince {
    /// A cursor.
    Cursor = 0,
    /// None: the latest page.
    Absent = 1,
    /// An ISO timestamp.
    Time = 2,
}

const POLL_SINCE: [&str; 3] = ["cursor", "none", "time"];

/// All of hark's metrics. Shared as `Arc<Metrics>`.
#[derive(Default)]
pub(crate) struct Metrics {
    pub waiting_polls: AtomicI64,
    pub open_streams: AtomicI64,
    /// Changed only through [`Metrics::connection_opened`] and
    /// [`Metrics::connection_closed`], which keep the high-water mark.
    pub open_connections: AtomicI64,
    /// The most connections open at once since [`crate::trim`] last looked
    /// (not exported).
    pub connections_high_water: AtomicI64,
    pub notifications: AtomicU64,
    pub catchup_queries: AtomicU64,
    /// Reads on the cold path (a cursor the hub could not answer).
    pub cold_queries: AtomicU64,
    pub listener_reconnects: AtomicU64,
    pub polls_answered_from_memory: AtomicU64,
    /// Poll answers by [`PollSince`] and source (0: memory, 1: database).
    poll_answers: [[AtomicU64; 2]; 3],
    pub streams_cut_slow: AtomicU64,
    pub streams_expired: AtomicU64,
    /// Pages a catch-up wrote straight to a parked stream's socket.
    pub stream_direct_writes: AtomicU64,
    pub poll_direct_answers: AtomicU64,
    pub rejected_connections: AtomicU64,
    /// Writes refused with 429 over a user's write limit.
    pub rate_limited: AtomicU64,
    /// Streams refused with 429 over HARK_MAX_STREAMS_PER_USER.
    pub streams_over_quota: AtomicU64,
    /// Times freed heap memory was handed back after connections dropped.
    pub memory_trims: AtomicU64,
    /// Users this process wrote online or offline to `hark_presence`.
    pub presence_writes: AtomicU64,
    /// From the NOTIFY's arrival (the commit, as seen by hark) to the
    /// response or event being handed to the connection.
    pub delivery_latency: Histogram,
}

impl Metrics {
    pub(crate) fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub(crate) fn connection_opened(&self) {
        let open = self.open_connections.fetch_add(1, Relaxed) + 1;
        self.connections_high_water.fetch_max(open, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Relaxed);
    }

    /// A poll answered; `from_db`: its answer needed a database read.
    pub(crate) fn poll_answered(&self, since: PollSince, from_db: bool) {
        self.poll_answers[since as usize][usize::from(from_db)].fetch_add(1, Relaxed);
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let gauges: [(&str, &str, &AtomicI64); 3] = [
            (
                "hark_waiting_polls",
                "Long polls waiting for a message.",
                &self.waiting_polls,
            ),
            (
                "hark_open_streams",
                "Open /events streams.",
                &self.open_streams,
            ),
            (
                "hark_open_connections",
                "Open client connections.",
                &self.open_connections,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
            );
        }
        let counters: [(&str, &str, &AtomicU64); 14] = [
            (
                "hark_notifications_total",
                "NOTIFY messages received on the LISTEN connection.",
                &self.notifications,
            ),
            (
                "hark_catchup_queries_total",
                "Catch-up queries run by the hub after a wake-up.",
                &self.catchup_queries,
            ),
            (
                "hark_cold_queries_total",
                "Message reads for cursors the hub could not answer from memory.",
                &self.cold_queries,
            ),
            (
                "hark_listener_reconnects_total",
                "Times the LISTEN connection was re-established.",
                &self.listener_reconnects,
            ),
            (
                "hark_polls_answered_from_memory_total",
                "Polls answered from the hub without a database query (parked ones included).",
                &self.polls_answered_from_memory,
            ),
            (
                "hark_streams_cut_slow_total",
                "Event streams disconnected for falling behind.",
                &self.streams_cut_slow,
            ),
            (
                "hark_streams_expired_total",
                "Event streams ended because the token they were opened with expired.",
                &self.streams_expired,
            ),
            (
                "hark_stream_direct_writes_total",
                "Event pages written by the listener straight to an idle stream's socket.",
                &self.stream_direct_writes,
            ),
            (
                "hark_poll_direct_answers_total",
                "Waiting polls answered by the listener straight to their sockets.",
                &self.poll_direct_answers,
            ),
            (
                "hark_rejected_connections_total",
                "Connections refused over HARK_MAX_CONNECTIONS.",
                &self.rejected_connections,
            ),
            (
                "hark_rate_limited_total",
                "Writes refused with 429 over a user's HARK_WRITE_RATE / HARK_WRITE_BURST.",
                &self.rate_limited,
            ),
            (
                "hark_streams_over_quota_total",
                "Event streams refused with 429 over HARK_MAX_STREAMS_PER_USER.",
                &self.streams_over_quota,
            ),
            (
                "hark_memory_trims_total",
                "Times freed heap memory was returned to the OS after connections closed.",
                &self.memory_trims,
            ),
            (
                "hark_presence_writes_total",
                "Users this process wrote online or offline (per user, not per connection).",
                &self.presence_writes,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let name = "hark_poll_answers_total";
        let _ = writeln!(
            out,
            "# HELP {name} Polls answered, by the form of `since` and whether the answer came from memory or needed a database read.\n# TYPE {name} counter"
        );
        for (since, label) in POLL_SINCE.iter().enumerate() {
            for (source, source_label) in ["memory", "database"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{since=\"{label}\",source=\"{source_label}\"}} {}",
                    self.poll_answers[since][source].load(Relaxed)
                );
            }
        }
        self.delivery_latency.render(
            &mut out,
            "hark_delivery_latency_seconds",
            "From the commit's NOTIFY reaching hark to the message being written to a client.",
        );
        out
    }
}
