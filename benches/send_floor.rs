//! The machine's floor for a fan-out: N loopback TCP connections, and one
//! write of an event-sized buffer to each, with no HTTP, no hub, no
//! cursor and no async runtime on the sending side: only the `write`
//! syscalls a server cannot avoid, one per client.
//!
//!     cargo bench --bench send_floor
//!
//! The sender is a second process (this binary again, run with
//! `SEND_FLOOR_ROLE=writer`) with one plain thread per core, as hark has
//! one tokio worker per core; the receiving side is the same kind of load
//! generator as in `sse_fanout` (a tokio task per connection on this
//! process's runtime, one read per wake-up, a timestamp when a round's
//! bytes are complete). So the latency it reports, from the moment the
//! sender is told to go to each connection's bytes being read, is about
//! what `sse_fanout` would report for a server whose own work cost
//! nothing. `sse_fanout`'s clock also covers the commit's NOTIFY and one
//! catch-up query, and its reader parses SSE, so the floor is a little
//! low. The difference between the two is hark's share.
//!
//! Settings (environment): SEND_FLOOR_STREAMS (10000), SEND_FLOOR_ROUNDS
//! (20), SEND_FLOOR_GAP_MS (250), SEND_FLOOR_BYTES (227: the chunk of one
//! `event: message` as hark writes it in the fan-out benchmark),
//! SEND_FLOOR_THREADS (sending threads; default one per core).

mod common;

use std::io::{BufRead, Write};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn main() -> std::process::ExitCode {
    if std::env::var_os("SEND_FLOOR_ROLE").is_some() {
        return match writer() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("send_floor writer: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    main_with("send_floor", run())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The sending process. Protocol on stdio: prints `port P`, accepts N
/// connections, prints `ready`; then for each `go` line writes the
/// payload once to every connection and prints `done <thread CPU µs>`.
fn writer() -> Result<()> {
    let n: usize = env_num("SEND_FLOOR_STREAMS", 10_000);
    let bytes: usize = env_num("SEND_FLOOR_BYTES", 227);
    let threads: usize = env_num("SEND_FLOOR_THREADS", cores()).max(1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "port {}", listener.local_addr()?.port())?;
    stdout.flush()?;
    let mut groups: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..n {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        groups[i % threads].push(s);
    }
    writeln!(stdout, "ready")?;
    stdout.flush()?;

    let mut payload = vec![b'x'; bytes];
    if bytes >= 2 {
        payload[bytes - 2..].copy_from_slice(b"\n\n");
    }
    let payload: Arc<[u8]> = payload.into();
    let (done_tx, done_rx) = mpsc::sync_channel::<Result<Duration>>(threads);
    let mut go: Vec<mpsc::SyncSender<()>> = Vec::new();
    for group in groups {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        go.push(tx);
        let done = done_tx.clone();
        let payload = payload.clone();
        std::thread::spawn(move || {
            let mut group = group;
            while rx.recv().is_ok() {
                let c0 = thread_cpu();
                let r = group
                    .iter_mut()
                    .try_for_each(|s| s.write_all(&payload))
                    .map(|()| thread_cpu() - c0)
                    .map_err(BoxError::from);
                if done.send(r).is_err() {
                    return;
                }
            }
        });
    }
    for line in std::io::stdin().lock().lines() {
        if line? != "go" {
            continue;
        }
        for tx in &go {
            tx.send(()).map_err(|_| err("a sending thread is gone"))?;
        }
        let mut cpu = Duration::ZERO;
        for _ in 0..go.len() {
            cpu += done_rx
                .recv()
                .map_err(|_| err("a sending thread is gone"))??;
        }
        writeln!(stdout, "done {}", cpu.as_micros())?;
        stdout.flush()?;
    }
    Ok(())
}

type WriterLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

async fn next_line(lines: &mut WriterLines) -> Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| err("the writer exited"))
}

struct Sample {
    round: usize,
    at: Instant,
    error: Option<String>,
}

async fn run() -> Result<()> {
    let n: usize = env_num("SEND_FLOOR_STREAMS", 10_000);
    let rounds: usize = env_num("SEND_FLOOR_ROUNDS", 20);
    let gap = Duration::from_millis(env_num("SEND_FLOOR_GAP_MS", 250));
    let bytes: usize = env_num("SEND_FLOOR_BYTES", 227).max(1);
    let threads: usize = env_num("SEND_FLOOR_THREADS", cores()).max(1);
    let (soft, open) = fd_usage(std::process::id())?;
    // Both ends live in processes with this limit (the writer inherits it).
    let n = n.min(soft.saturating_sub(open + 32) as usize);
    println!("{n} connections, {bytes} bytes each per round, {threads} sending threads");

    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env("SEND_FLOOR_ROLE", "writer")
        .env("SEND_FLOOR_STREAMS", n.to_string())
        .env("SEND_FLOOR_BYTES", bytes.to_string())
        .env("SEND_FLOOR_THREADS", threads.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let writer_pid = child.id().ok_or_else(|| err("writer exited"))?;
    let mut to_writer = child.stdin.take().ok_or_else(|| err("no stdin"))?;
    let mut from_writer =
        tokio::io::BufReader::new(child.stdout.take().ok_or_else(|| err("no stdout"))?).lines();
    let port: u16 = next_line(&mut from_writer)
        .await?
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| err("no port from the writer"))?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();

    use futures::stream::{self, StreamExt, TryStreamExt};
    let started = Instant::now();
    let conns: Vec<tokio::net::TcpStream> = stream::iter(0..n)
        .map(|_| tokio::net::TcpStream::connect(addr))
        .buffer_unordered(128)
        .try_collect()
        .await?;
    if next_line(&mut from_writer).await? != "ready" {
        return Err(err("the writer did not accept every connection"));
    }
    println!(
        "{n} connections open in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let samples: Arc<SampleList<Sample>> = Arc::default();
    let mut tasks = Vec::with_capacity(n);
    for mut s in conns {
        let tx = samples.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let (mut total, mut round) = (0usize, 0usize);
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        tx.push(Sample {
                            round,
                            at: Instant::now(),
                            error: Some("connection closed".into()),
                        });
                        return;
                    }
                    Ok(k) => total += k,
                }
                let at = Instant::now();
                while total >= (round + 1) * bytes {
                    tx.push(Sample {
                        round,
                        at,
                        error: None,
                    });
                    round += 1;
                }
            }
        }));
    }

    let me = std::process::id();
    let mut rows = Vec::new();
    let mut all: Vec<Duration> = Vec::new();
    let mut batch = Vec::new();
    for round in 0..rounds {
        // Pacing: rounds a gap apart.
        tokio::time::sleep(gap).await;
        let (own0, writer0, machine0) = (
            cpu_time_of(me)?,
            cpu_time_of(writer_pid)?,
            machine_jiffies(),
        );
        let t0 = Instant::now();
        to_writer.write_all(b"go\n").await?;
        to_writer.flush().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            if !samples.take(&mut batch, deadline).await {
                return Err(err(format!(
                    "round {round}: only {} of {n} connections received their bytes within 60 s",
                    lat.len()
                )));
            }
            for s in batch.drain(..) {
                if let Some(e) = s.error {
                    return Err(err(format!("round {round}: {e}")));
                }
                if s.round != round {
                    return Err(err(format!(
                        "round {round}: a connection completed round {}",
                        s.round
                    )));
                }
                lat.push(s.at.saturating_duration_since(t0));
            }
        }
        let writer_threads_us: u64 = next_line(&mut from_writer)
            .await?
            .strip_prefix("done ")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| err("no done line from the writer"))?;
        let busy = machine_busy_pct(machine0, machine_jiffies()) * cores() as f64;
        let secs = t0.elapsed().as_secs_f64();
        let own = cpu_time_of(me)?.saturating_sub(own0);
        let writer_cpu = cpu_time_of(writer_pid)?.saturating_sub(writer0);
        lat.sort_unstable();
        rows.push(vec![
            (round + 1).to_string(),
            ms(lat[0]),
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 90.0)),
            ms(pct(&lat, 99.0)),
            ms(lat[n - 1]),
            format!("{:.1}", writer_threads_us as f64 / 1000.0),
            format!("{:.0}", writer_cpu.as_secs_f64() * 1000.0),
            format!("{:.0}", own.as_secs_f64() * 1000.0),
            format!("{:.0}", busy * secs * 10.0),
        ]);
        all.extend_from_slice(&lat);
    }
    for t in &tasks {
        t.abort();
    }
    drop(to_writer);
    let _ = child.wait().await;
    println!();
    println!(
        "Send floor: one {bytes}-byte write to each of {n} loopback connections per round; latency = `go` sent to the writer -> the connection's bytes read (ms)"
    );
    table(
        &[
            "round",
            "min",
            "p50",
            "p90",
            "p99",
            "max",
            "writer threads CPU ms",
            "writer CPU ms",
            "generator CPU ms",
            "machine busy ms",
        ],
        &rows,
    );
    all.sort_unstable();
    println!(
        "all {rounds} rounds pooled ({} deliveries): p50 {} ms, p99 {} ms, max {} ms",
        all.len(),
        ms(pct(&all, 50.0)),
        ms(pct(&all, 99.0)),
        ms(all[all.len() - 1]),
    );
    println!(
        "(\"writer threads CPU\": the sending threads' own CPU clocks for their writes; \"writer CPU\", \"generator CPU\" and \"machine busy\": user+system over the round from /proc, 10 ms ticks; machine busy covers both cores)"
    );
    Ok(())
}
