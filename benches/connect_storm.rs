//! Extra (not one of the four measurements): a reconnect storm — N clients
//! connect at the same moment (as after a restart or a network blip) and
//! each sends one request (GET /healthz) as soon as its connection is up;
//! per client, the time from starting connect() to the response received.
//! It shows what hark's accept queue does with a burst: the listening
//! socket's backlog (ss Send-Q) and TcpExt ListenOverflows are printed.
//!
//!     cargo bench --bench connect_storm
//!
//! Settings (environment): STORM_CLIENTS (10000), STORM_ROUNDS (3).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn main() -> std::process::ExitCode {
    main_with("connect_storm", run())
}

async fn run() -> Result<()> {
    let pg = Pg::start(&[]).await?;
    let result = async {
        let mut hark = start_hark(&pg.conn, "connect_storm", &[]).await?;
        let r = storm(&hark).await;
        stop_hark(&mut hark).await;
        r
    }
    .await;
    pg.stop().await;
    result
}

async fn storm(hark: &Hark) -> Result<()> {
    let clients: usize = env_num("STORM_CLIENTS", 10_000);
    let rounds: usize = env_num("STORM_ROUNDS", 3);
    let ss = std::process::Command::new("ss")
        .args(["-ltn", &format!("sport = :{}", hark.addr.port())])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    println!(
        "hark's listening socket (Send-Q = backlog):\n{}",
        ss.trim_end()
    );
    let mut mc = MetricsClient::new(hark.addr);
    let mut rows = Vec::new();
    for round in 0..rounds {
        mc.wait_until("hark_open_connections", Duration::from_secs(60), |v| {
            v <= 1.0
        })
        .await?;
        let overflows0 = listen_overflows();
        let addr = hark.addr;
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(clients);
        for _ in 0..clients {
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let mut c = Conn::connect(addr).await?;
                let r = c.get("/healthz").await?;
                let e = t.elapsed();
                Ok::<_, std::io::Error>((r.status, e, c))
            }));
        }
        let mut lat = Vec::with_capacity(clients);
        let mut failed = 0;
        let mut conns = Vec::with_capacity(clients);
        for t in tasks {
            match t.await {
                Ok(Ok((200, e, c))) => {
                    lat.push(e);
                    conns.push(c);
                }
                _ => failed += 1,
            }
        }
        let all = started.elapsed();
        let overflows = listen_overflows() - overflows0;
        drop(conns);
        lat.sort_unstable();
        if lat.is_empty() {
            return Err(err("no client got an answer"));
        }
        let over_1s = lat.iter().filter(|d| **d >= Duration::from_secs(1)).count();
        let n = lat.len();
        rows.push(vec![
            (round + 1).to_string(),
            n.to_string(),
            failed.to_string(),
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 90.0)),
            ms(pct(&lat, 99.0)),
            ms(lat[n - 1]),
            format!("{over_1s} ({:.1}%)", 100.0 * over_1s as f64 / n as f64),
            format!("{:.2}", all.as_secs_f64()),
            overflows.to_string(),
        ]);
    }
    println!();
    println!("Connect storm: {clients} clients connect at once, each then GET /healthz; time from connect() to response (ms)");
    table(
        &[
            "round",
            "answered",
            "failed",
            "p50",
            "p90",
            "p99",
            "max",
            ">= 1 s (SYN retransmit)",
            "all done s",
            "ListenOverflows",
        ],
        &rows,
    );
    Ok(())
}
