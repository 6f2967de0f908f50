//! The soak's writers: each on a connection of its own, inserting,
//! editing and deleting messages with plain SQL, each change in its own
//! transaction committed after a random pause (so commits land out of id
//! order), paced to the configured rate, reconnecting after a lost
//! connection (the PostgreSQL restart).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{content, Ctx, Rng};

/// What one writer did.
#[derive(Default, Clone, Debug)]
pub(crate) struct WriterReport {
    /// Committed (COMMIT returned success).
    pub(crate) inserts: u64,
    pub(crate) edits: u64,
    pub(crate) deletes: u64,
    /// An edit or delete whose message another writer had deleted first.
    pub(crate) noops: u64,
    /// The connection broke during COMMIT: committed or not, the table
    /// says (the final check reads the table, not this count).
    pub(crate) in_doubt: u64,
    /// Changes that failed before COMMIT (rolled back).
    pub(crate) failed: u64,
    /// Connection attempts that failed.
    pub(crate) connect_errors: u64,
}

/// The ids of messages that exist (as far as the writers know), shared by
/// all of them: edits and deletes pick from it.
pub(crate) type Live = Arc<Mutex<Vec<i64>>>;

enum Failure {
    Before,
    AtCommit,
}

type Change = Result<Done, Failure>;

enum Done {
    Insert(i64),
    Edit,
    Delete,
    Noop,
}

pub(crate) struct WriterSpec {
    pub(crate) db: String,
    pub(crate) rooms: Arc<Vec<i64>>,
    pub(crate) sender: i64,
    pub(crate) live: Live,
    /// Changes per second.
    pub(crate) rate: f64,
    pub(crate) n: usize,
}

pub(crate) async fn writer(
    ctx: Arc<Ctx>,
    spec: WriterSpec,
    mut stop: watch::Receiver<bool>,
) -> WriterReport {
    let WriterSpec {
        db,
        rooms,
        sender,
        live,
        rate,
        n,
    } = spec;
    let mut rng = Rng::new(0x5eed_0000 + n as u64);
    let mut rep = WriterReport::default();
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut next = Instant::now() + period.mul_f64(rng.f64());
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        // Poisson-like pacing around the rate; no catching up after a
        // stall (the PostgreSQL restart) beyond a second.
        next += period.mul_f64(0.5 + rng.f64());
        let now = Instant::now();
        if next + Duration::from_secs(1) < now {
            next = now;
        }
        let db_client = match &mut client {
            Some(c) => c,
            None => match crate::pg::try_connect(&db).await {
                Ok(c) => client.insert(c),
                Err(_) => {
                    rep.connect_errors += 1;
                    next = Instant::now() + Duration::from_millis(250);
                    continue;
                }
            },
        };
        let pick = rng.f64();
        let result = if pick < 0.5 {
            let room = rooms[rng.below(rooms.len() as u64) as usize];
            insert(&ctx, db_client, room, sender, n, &mut rng).await
        } else if pick < 0.8 {
            let id = {
                let ids = live.lock().unwrap();
                (!ids.is_empty()).then(|| ids[rng.below(ids.len() as u64) as usize])
            };
            match id {
                Some(id) => edit(&ctx, db_client, id, n, &mut rng).await,
                None => continue,
            }
        } else {
            let id = {
                let mut ids = live.lock().unwrap();
                (!ids.is_empty()).then(|| {
                    let i = rng.below(ids.len() as u64) as usize;
                    ids.swap_remove(i)
                })
            };
            match id {
                Some(id) => delete(db_client, id, &mut rng).await,
                None => continue,
            }
        };
        match result {
            Ok(Done::Insert(id)) => {
                rep.inserts += 1;
                ctx.live.writes.fetch_add(1, Relaxed);
                live.lock().unwrap().push(id);
            }
            Ok(Done::Edit) => {
                rep.edits += 1;
                ctx.live.writes.fetch_add(1, Relaxed);
            }
            Ok(Done::Delete) => {
                rep.deletes += 1;
                ctx.live.writes.fetch_add(1, Relaxed);
            }
            Ok(Done::Noop) => rep.noops += 1,
            Err(f) => {
                match f {
                    Failure::Before => rep.failed += 1,
                    Failure::AtCommit => rep.in_doubt += 1,
                }
                // Whatever broke, start on a fresh connection.
                client = None;
            }
        }
    }
    rep
}

/// The pause between the statement and COMMIT: up to 3 ms, so that
/// commits land out of id order.
async fn pause(rng: &mut Rng) {
    tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
}

async fn insert(
    ctx: &Ctx,
    db: &mut tokio_postgres::Client,
    room: i64,
    sender: i64,
    n: usize,
    rng: &mut Rng,
) -> Change {
    let key = ctx.keys(1);
    let text = content(key, n);
    let tx = db.transaction().await.map_err(|_| Failure::Before)?;
    let id: i64 = tx
        .query_one(
            "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
             VALUES ($1, $2, $3, now()) RETURNING id",
            &[&room, &sender, &text],
        )
        .await
        .map_err(|_| Failure::Before)?
        .get(0);
    pause(rng).await;
    ctx.committing(key, 1);
    tx.commit().await.map_err(|_| Failure::AtCommit)?;
    Ok(Done::Insert(id))
}

/// The row is locked before its version key is taken, so that of two
/// edits of one message the later commit has the larger key.
async fn edit(
    ctx: &Ctx,
    db: &mut tokio_postgres::Client,
    id: i64,
    n: usize,
    rng: &mut Rng,
) -> Change {
    let tx = db.transaction().await.map_err(|_| Failure::Before)?;
    let locked = tx
        .query_opt(
            "SELECT 1 FROM chat_chatmessage WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(|_| Failure::Before)?;
    if locked.is_none() {
        let _ = tx.rollback().await;
        return Ok(Done::Noop);
    }
    let key = ctx.keys(1);
    let text = content(key, n);
    tx.execute(
        "UPDATE chat_chatmessage SET content = $2 WHERE id = $1",
        &[&id, &text],
    )
    .await
    .map_err(|_| Failure::Before)?;
    pause(rng).await;
    ctx.committing(key, 1);
    tx.commit().await.map_err(|_| Failure::AtCommit)?;
    Ok(Done::Edit)
}

async fn delete(db: &mut tokio_postgres::Client, id: i64, rng: &mut Rng) -> Change {
    let tx = db.transaction().await.map_err(|_| Failure::Before)?;
    let n = tx
        .execute("DELETE FROM chat_chatmessage WHERE id = $1", &[&id])
        .await
        .map_err(|_| Failure::Before)?;
    if n == 0 {
        let _ = tx.rollback().await;
        return Ok(Done::Noop);
    }
    pause(rng).await;
    tx.commit().await.map_err(|_| Failure::AtCommit)?;
    Ok(Done::Delete)
}
