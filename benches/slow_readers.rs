//! Memory held for clients that ask for a large answer and never read it
//! (issue 22, finding 4), and how much of it goes back to the OS after
//! they leave.
//!
//!     cargo bench --bench slow_readers
//!
//! A room is filled with `SLOW_MESSAGES` (1,000) messages of
//! `SLOW_CHARS` (10,000) emoji each (about 40 MB). Then, per scenario,
//! `SLOW_CLIENTS` (25) sockets with a 1 KiB receive buffer each send one
//! request and never read:
//! - `poll`: `GET /api/chat/messages/poll/?room_id=…&limit=1000&timeout=0`
//!   (the latest page, no `since`);
//! - `stream`: `GET /events?room_id=…` resumed with a `Last-Event-ID` from
//!   before the first message.
//!
//! hark's RSS (VmRSS) is sampled every 100 ms: idle before, the peak while
//! the clients hold their requests (`SLOW_HOLD_S`, 5 s), and 1 s and 15 s
//! after every client has closed. Run it against another build with
//! `HARK_BENCH_BINARY=/path/to/release/hark` for a same-run A/B.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

fn main() -> std::process::ExitCode {
    main_with("slow_readers", run())
}

async fn run() -> Result<()> {
    let messages: i64 = env_num("SLOW_MESSAGES", 1000);
    let chars: i64 = env_num("SLOW_CHARS", 10_000);
    let clients: usize = env_num("SLOW_CLIENTS", 25);
    let hold = Duration::from_secs(env_num("SLOW_HOLD_S", 5));
    let pg = Pg::start(&[]).await?;
    let result = async {
        // hark applies the schema.
        let mut hark = start_hark(&pg.conn, "slow_readers", &[]).await?;
        let fx = Fixture::new(&pg.conn).await;
        let reader = fx.user("reader").await;
        let room = fx.room("slow", &[reader]).await;
        let token = token(reader);
        // A cursor from before every message, for the resumed streams.
        let mut c = Conn::connect(hark.addr).await?;
        let (_, cursor) = poll_result(&c.get(&poll_path(room, None, 0, &token)).await?)?;
        drop(c);
        fx.db
            .execute(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                 SELECT $1, $2, repeat('😀', $3::int4), now() FROM generate_series(1, $4::int8)",
                &[&room, &reader, &(chars as i32), &messages],
            )
            .await?;
        println!(
            "room {room}: {messages} messages of {chars} emoji ({} MB), {clients} clients \
             with a 1 KiB receive buffer",
            messages * chars * 4 / 1_000_000
        );
        let poll = format!(
            "GET /api/chat/messages/poll/?room_id={room}&limit=1000&timeout=0 HTTP/1.1\r\n\
             Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let stream = format!(
            "GET /events?room_id={room} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {token}\r\nLast-Event-ID: {cursor}\r\n\r\n"
        );
        let mut rows = Vec::new();
        for (name, req) in [("poll", &poll), ("stream", &stream)] {
            rows.push(scenario(&hark, name, req, clients, hold).await?);
        }
        table(
            &[
                "scenario",
                "idle RSS (MiB)",
                "peak RSS (MiB)",
                "per client (MiB)",
                "1 s after close (MiB)",
                "15 s after close (MiB)",
            ],
            &rows,
        );
        stop_hark(&mut hark).await;
        Ok(())
    }
    .await;
    pg.stop().await;
    result
}

/// Sends `req` on `clients` sockets that never read; returns a table row.
async fn scenario(
    hark: &Hark,
    name: &str,
    req: &str,
    clients: usize,
    hold: Duration,
) -> Result<Vec<String>> {
    // A quiet second before the idle reading (memory settles; nothing
    // announces that).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = hark.rss()?;
    let mut socks: Vec<TcpStream> = Vec::new();
    for _ in 0..clients {
        let s = TcpSocket::new_v4()?;
        // Set before connecting, so the window the kernel offers is small.
        s.set_recv_buffer_size(1024)?;
        let mut s = s.connect(hark.addr).await?;
        s.write_all(req.as_bytes()).await?;
        socks.push(s);
    }
    let mut peak = 0;
    let until = tokio::time::Instant::now() + hold;
    while tokio::time::Instant::now() < until {
        peak = peak.max(hark.rss()?);
        // Sampling: RSS every 100 ms while the clients hold.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(socks);
    // The measurement's schedule: RSS 1 s and 15 s after the close.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_1s = hark.rss()?;
    tokio::time::sleep(Duration::from_secs(14)).await;
    let after_15s = hark.rss()?;
    let per = peak.saturating_sub(idle) / clients as u64;
    println!(
        "{name}: idle {} MiB, peak {} MiB, +{} MiB per client, {} MiB 1 s after close, {} MiB 15 s after",
        mib(idle),
        mib(peak),
        mib(per),
        mib(after_1s),
        mib(after_15s)
    );
    Ok(vec![
        name.to_string(),
        mib(idle),
        mib(peak),
        mib(per),
        mib(after_1s),
        mib(after_15s),
    ])
}
