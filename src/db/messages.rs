//! Message queries: the catch-up the hub runs on a wake-up, the cold path of
//! polls and streams whose cursor the hub cannot answer, and sending.
//!
//! Every read is one statement that also returns `pg_current_snapshot()`.
//! In one statement PostgreSQL reads with one snapshot and that function
//! returns it, so the rows and the new cursor agree exactly — the property
//! DESIGN §1 gets from a REPEATABLE READ transaction, in one round trip.
//! The visibility test here is the SQL twin of
//! [`crate::cursor::Snapshot::is_visible`]. Keys are cast to int8 because a
//! Django project may have `integer` (AutoField) keys.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::{DbError, Prepared};
use crate::cursor::{Lower, Snapshot};
use crate::message::{Message, StoredMessage, User};

/// Rows of one read and the snapshot they were read with.
#[derive(Debug)]
pub struct Fetched {
    pub head: Arc<Snapshot>,
    /// Ascending id order.
    pub rows: Vec<Arc<StoredMessage>>,
    /// Only for [`Read::Batch`]: rows beyond the batch's upper snapshot exist.
    pub beyond: bool,
}

/// What to read, per room set.
pub enum Read<'a> {
    /// The newest `limit` messages (a client without a cursor).
    Latest { limit: i64 },
    /// Messages not visible in `lower`: what is due after `At(lower)`.
    After { lower: &'a Snapshot, limit: i64 },
    /// Messages created after an instant (the ISO `since` mode).
    CreatedAfter { since: DateTime<Utc>, limit: i64 },
    /// The rest of a batch: new relative to `lower`, visible in `upper`,
    /// id above `after_id`.
    Batch {
        lower: &'a Lower,
        upper: &'a Snapshot,
        after_id: i64,
        limit: i64,
    },
}

macro_rules! select_messages {
    ($where:literal, $order:literal) => {
        concat!(
            "WITH s AS MATERIALIZED (SELECT pg_current_snapshot() AS snap) \
             SELECT s.snap::text, r.* FROM s LEFT JOIN LATERAL ( \
               SELECT m.id::int8 AS id, m.room_id::int8 AS room_id, m.content, m.created_at, \
                      m.hark_txid::text AS txid, u.id::int8 AS uid, u.username::text AS username, \
                      u.first_name::text AS first_name, u.last_name::text AS last_name \
               FROM chat_chatmessage m JOIN users_user u ON u.id = m.sender_id \
               WHERE m.room_id = ANY($1::int8[]) AND ",
            $where,
            " ORDER BY m.id ",
            $order,
            " LIMIT $2) r ON true ORDER BY r.id"
        )
    };
}

// `txid >= xmin(S)` is the index-friendly half of "not visible in S": every
// transaction below xmin is visible, so only rows at or above it can be new.
const NEW_SINCE: &str = select_messages!(
    "m.hark_txid >= pg_snapshot_xmin($3::text::pg_snapshot) \
     AND NOT pg_visible_in_snapshot(m.hark_txid, $3::text::pg_snapshot)",
    "ASC"
);
const LATEST: &str = select_messages!("true", "DESC");
const CREATED_AFTER: &str = select_messages!("m.created_at > $3", "ASC");

macro_rules! batch {
    ($lower:literal) => {
        concat!(
            "WITH s AS MATERIALIZED (SELECT pg_current_snapshot() AS snap) \
             SELECT s.snap::text, r.*, EXISTS ( \
                 SELECT 1 FROM chat_chatmessage b WHERE b.room_id = ANY($1::int8[]) \
                   AND b.hark_txid >= pg_snapshot_xmin($4::text::pg_snapshot) \
                   AND NOT pg_visible_in_snapshot(b.hark_txid, $4::text::pg_snapshot)) AS beyond \
             FROM s LEFT JOIN LATERAL ( \
               SELECT m.id::int8 AS id, m.room_id::int8 AS room_id, m.content, m.created_at, \
                      m.hark_txid::text AS txid, u.id::int8 AS uid, u.username::text AS username, \
                      u.first_name::text AS first_name, u.last_name::text AS last_name \
               FROM chat_chatmessage m JOIN users_user u ON u.id = m.sender_id \
               WHERE m.room_id = ANY($1::int8[]) AND ",
            $lower,
            " AND pg_visible_in_snapshot(m.hark_txid, $4::text::pg_snapshot) AND m.id > $5::int8 \
               ORDER BY m.id LIMIT $2) r ON true ORDER BY r.id"
        )
    };
}

const BATCH_AFTER_SNAPSHOT: &str = batch!(
    "m.hark_txid >= pg_snapshot_xmin($3::text::pg_snapshot) \
     AND NOT pg_visible_in_snapshot(m.hark_txid, $3::text::pg_snapshot)"
);
const BATCH_CREATED_AFTER: &str = batch!("m.created_at > $3");

/// Runs one read. `client` may be pooled or the listener's own.
pub async fn read(
    client: &impl Prepared,
    rooms: &[i64],
    read: Read<'_>,
) -> Result<Fetched, DbError> {
    let rows = match read {
        Read::Latest { limit } => {
            let st = client.statement(LATEST).await?;
            client.pg().query(&st, &[&rooms, &limit]).await?
        }
        Read::After { lower, limit } => {
            let st = client.statement(NEW_SINCE).await?;
            client
                .pg()
                .query(&st, &[&rooms, &limit, &lower.to_pg()])
                .await?
        }
        Read::CreatedAfter { since, limit } => {
            let st = client.statement(CREATED_AFTER).await?;
            client.pg().query(&st, &[&rooms, &limit, &since]).await?
        }
        Read::Batch {
            lower,
            upper,
            after_id,
            limit,
        } => {
            let upper = upper.to_pg();
            match lower {
                Lower::Snapshot(l) => {
                    let st = client.statement(BATCH_AFTER_SNAPSHOT).await?;
                    client
                        .pg()
                        .query(&st, &[&rooms, &limit, &l.to_pg(), &upper, &after_id])
                        .await?
                }
                Lower::CreatedAfter(since) => {
                    let st = client.statement(BATCH_CREATED_AFTER).await?;
                    client
                        .pg()
                        .query(&st, &[&rooms, &limit, since, &upper, &after_id])
                        .await?
                }
            }
        }
    };
    decode(rows)
}

fn decode(rows: Vec<Row>) -> Result<Fetched, DbError> {
    let first = rows
        .first()
        .ok_or_else(|| DbError::Unavailable("snapshot query returned no row".into()))?;
    let head_text: String = first.try_get(0)?;
    let head = Snapshot::parse_pg(&head_text)
        .ok_or_else(|| DbError::Unavailable(format!("unparsable snapshot {head_text:?}")))?;
    let beyond = first
        .columns()
        .iter()
        .any(|c| c.name() == "beyond")
        .then(|| first.try_get::<_, bool>("beyond"))
        .transpose()?
        .unwrap_or(false);
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(id) = row.try_get::<_, Option<i64>>("id")? else {
            continue;
        };
        let txid: String = row.try_get("txid")?;
        let msg = Message {
            id,
            room: row.try_get("room_id")?,
            sender: User {
                id: row.try_get("uid")?,
                username: row.try_get("username")?,
                first_name: row.try_get("first_name")?,
                last_name: row.try_get("last_name")?,
            },
            content: row.try_get("content")?,
            created_at: row.try_get("created_at")?,
        };
        let txid = txid
            .parse()
            .map_err(|_| DbError::Unavailable(format!("unparsable xid8 {txid:?}")))?;
        out.push(Arc::new(StoredMessage::new(&msg, txid)));
    }
    Ok(Fetched {
        head: Arc::new(head),
        rows: out,
        beyond,
    })
}

/// The current snapshot alone (a fresh event stream's `ready`).
pub async fn current_snapshot(client: &impl Prepared) -> Result<Arc<Snapshot>, DbError> {
    let st = client
        .statement("SELECT pg_current_snapshot()::text")
        .await?;
    let row = client.pg().query_one(&st, &[]).await?;
    let text: String = row.try_get(0)?;
    Snapshot::parse_pg(&text)
        .map(Arc::new)
        .ok_or_else(|| DbError::Unavailable(format!("unparsable snapshot {text:?}")))
}

/// Inserts a message, moves the room's `updated_at` and clears the sender's
/// typing state, in one statement (one round trip, one transaction). The
/// NOTIFYs (message trigger, typing stop) go out at its commit.
pub async fn send(
    client: &impl Prepared,
    room: i64,
    sender: i64,
    content: &str,
) -> Result<(i64, DateTime<Utc>), DbError> {
    const SEND: &str = concat!(
                "WITH ins AS (INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                              VALUES ($1::int8, $2::int8, $3::text, now()) RETURNING id::int8, created_at), \
                      upd AS (UPDATE chat_chatroom SET updated_at = now() WHERE id = $1::int8 RETURNING 1), \
                      stop AS (DELETE FROM hark_typing WHERE room_id = $1::int8 AND user_id = $2::int8 \
                               RETURNING expires_at > now() AS was_typing) \
                 SELECT ins.id, ins.created_at, \
                        (SELECT count(*) FROM upd) AS touched, \
                        (SELECT count(pg_notify('hark', ",
                crate::typing::stop_payload_sql!("$1", "$2"),
                ")) FROM stop WHERE stop.was_typing) AS stopped \
                 FROM ins"
    );
    let st = client.statement(SEND).await?;
    let row = client
        .pg()
        .query_one(&st, &[&room, &sender, &content])
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
