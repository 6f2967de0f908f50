//! hark's Prometheus metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::http::Conn;
use crate::{err, Result};

/// The text format parsed: each sample's name (with its labels, as
/// printed) and value; comments skipped.
pub fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Reads /metrics over one kept-alive raw connection (what a benchmark
/// can afford while it measures).
pub struct MetricsClient {
    pub addr: SocketAddr,
    conn: Option<Conn>,
}

impl MetricsClient {
    pub fn new(addr: SocketAddr) -> MetricsClient {
        MetricsClient { addr, conn: None }
    }

    pub async fn scrape(&mut self) -> Result<HashMap<String, f64>> {
        for _ in 0..2 {
            if self.conn.is_none() {
                self.conn = Some(Conn::connect(self.addr).await?);
            }
            let c = self.conn.as_mut().unwrap();
            match c.get("/metrics").await {
                Ok(r) if r.status == 200 => return Ok(parse(&String::from_utf8_lossy(&r.body))),
                Ok(r) => return Err(err(format!("/metrics answered {}", r.status))),
                Err(_) => self.conn = None, // closed while idle: reconnect once
            }
        }
        Err(err("cannot read /metrics"))
    }

    pub async fn get(&mut self, name: &str) -> Result<f64> {
        self.scrape()
            .await?
            .get(name)
            .copied()
            .ok_or_else(|| err(format!("metric {name} not found")))
    }

    /// Polls /metrics (every 10 ms) until `name` satisfies `ok`; fails
    /// after `timeout`.
    pub async fn wait_until(
        &mut self,
        name: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let v = self.get(name).await?;
            if ok(v) {
                return Ok(v);
            }
            if std::time::Instant::now() > deadline {
                return Err(err(format!(
                    "{name} is {v} after {:.0} s",
                    timeout.as_secs_f64()
                )));
            }
            // The poll interval of this bounded wait: finer than the kit's
            // `wait_for`, as connection set-up waits on it batch by batch.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A metrics delta between two scrapes.
pub fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, k: &str) -> f64 {
    after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0)
}
