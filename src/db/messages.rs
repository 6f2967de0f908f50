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
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{DbError, Prepared};
use crate::cursor::{Lower, Snapshot};
use crate::message::{Message, StoredMessage, User};

/// Rows of one read and the snapshot they were read with.
#[derive(Debug)]
pub struct Fetched {
    pub head: Arc<Snapshot>,
    /// Changes in ascending paging-key order: deletions, then messages by
    /// id.
    pub rows: Vec<Arc<StoredMessage>>,
    /// Only for [`Read::Batch`]: rows beyond the batch's upper snapshot exist.
    pub beyond: bool,
    /// The byte budget cut the rows short: more were due than returned
    /// (besides any beyond `limit`).
    pub cut: bool,
    /// How many of the rooms read the [`Budget::member`] user participates
    /// in, as of `head`: checked in the same snapshot as the rows, so a
    /// reader who lost access before any of them committed is caught.
    pub member_of: i64,
    /// Only for [`catch_up`]: (room, user) pairs that lost access in the
    /// window read, in the same snapshot as the rows.
    pub revoked: Vec<(i64, i64)>,
    /// The newest transaction whose tombstones were swept: a position that
    /// does not see it may have missed a delete (see [`missed_deletes`]).
    pub horizon: u64,
}

/// Whether a reader at `lower` may have missed a delete whose tombstone
/// was swept: every swept tombstone's transaction is at most `horizon`, and
/// all of them are visible in `lower` when `horizon` is below its xmin.
pub fn missed_deletes(lower: &Snapshot, horizon: u64) -> bool {
    // 0: nothing swept yet.
    horizon != 0 && horizon >= lower.xmin
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

/// Bounds on one read besides its row `limit`, and whose access to check.
#[derive(Clone, Copy)]
pub struct Budget {
    /// About how many bytes of messages one read may return. The first row
    /// is returned whatever its size; beyond the budget the read stops and
    /// says so ([`Fetched::cut`]). Estimated here from the content's length
    /// plus 256 bytes a row (ids, sender, timestamp); the reader cuts
    /// exactly on the encoded bytes.
    pub bytes: usize,
    /// The user whose participation [`Fetched::member_of`] counts.
    pub member: Option<i64>,
}

// Every read is one statement over one snapshot:
// - `s`: the snapshot, which becomes the next cursor;
// - `member_of`: the reader's participation, in the same snapshot;
// - `horizon`: the newest transaction whose tombstones were swept (a
//   cursor that does not see it may have missed a delete);
// - `r`: the changes due, at most $2 in paging-key order (the $order the
//   mode needs): tombstones (kind 0, a delete or a move out of the room;
//   key: their number below every message id), then current message rows
//   (kind 1; key: the id), of which
//   those whose running size stays within the budget $3 are `fits` (the
//   first always is); the first change past the budget comes back with
//   `fits` false, as a marker that the budget cut the read, and changes
//   after it are not read at all.
// Parameters: $1 rooms, $2 limit, $3 budget, $4 member (nullable), then
// the mode's own from $5. `$extra` adds columns (the catch-up's
// revocations); `$m` and `$t` are the mode's conditions on a message `m`
// and a tombstone `t`.
macro_rules! select_changes {
    ($extra:expr, $m:expr, $t:expr, $order:literal) => {
        concat!(
            "WITH s AS MATERIALIZED (SELECT pg_current_snapshot() AS snap) \
             SELECT s.snap::text, \
               (SELECT count(*) FROM chat_chatroom_participants p \
                 WHERE p.chatroom_id = ANY($1::int8[]) AND p.user_id = $4::int8) AS member_of, \
               (SELECT h.swept_txid::text FROM hark_tombstone_horizon h LIMIT 1) AS horizon, ",
            $extra,
            " r.* FROM s LEFT JOIN LATERAL ( \
               SELECT w.id, w.key, w.kind, w.room_id, w.created_at, w.txid, w.edited, w.uid, w.username, \
                      w.first_name, w.last_name, w.body AS content, \
                      (w.rn = 1 OR w.run <= $3::int8) AS fits \
               FROM ( \
                 SELECT lim.*, row_number() OVER (ORDER BY lim.key ",
            $order,
            ") AS rn, \
                        sum(lim.len) OVER (ORDER BY lim.key ",
            $order,
            " ROWS UNBOUNDED PRECEDING) AS run \
                 FROM ( \
                   (SELECT m.id::int8 AS id, m.id::int8 AS key, 1 AS kind, m.room_id::int8 AS room_id, \
                          m.content AS body, \
                          m.created_at, m.hark_txid::text AS txid, m.hark_edited AS edited, \
                          u.id::int8 AS uid, u.username::text AS username, \
                          u.first_name::text AS first_name, u.last_name::text AS last_name, \
                          octet_length(m.content)::int8 + 256 AS len \
                    FROM chat_chatmessage m JOIN users_user u ON u.id = m.sender_id \
                    WHERE m.room_id = ANY($1::int8[]) AND ",
            $m,
            " ORDER BY m.id ",
            $order,
            " LIMIT $2) \
                   UNION ALL \
                   (SELECT t.message_id::int8, t.seq - 4611686018427387904, 0, t.room_id::int8, NULL, \
                          t.deleted_at, t.hark_txid::text, NULL, \
                          NULL, NULL, NULL, NULL, 64::int8 \
                    FROM hark_tombstone t \
                    WHERE t.room_id = ANY($1::int8[]) AND ",
            $t,
            " ORDER BY t.seq ",
            $order,
            " LIMIT $2) \
                   ORDER BY key ",
            $order,
            " LIMIT $2) lim \
               ) w WHERE w.rn <= 2 OR w.run - w.len <= $3::int8 \
             ) r ON true ORDER BY r.key"
        )
    };
}

// `txid >= xmin(S)` is the index-friendly half of "not visible in S": every
// transaction below xmin is visible, so only changes at or above it can be
// new.
macro_rules! new_since {
    ($col:literal, $s:literal) => {
        concat!(
            $col,
            " >= pg_snapshot_xmin(",
            $s,
            "::text::pg_snapshot) AND NOT pg_visible_in_snapshot(",
            $col,
            ", ",
            $s,
            "::text::pg_snapshot)"
        )
    };
}

const NEW_SINCE: &str = select_changes!(
    "",
    new_since!("m.hark_txid", "$5"),
    new_since!("t.hark_txid", "$5"),
    "ASC"
);
// The latest page is history: no deletes.
const LATEST: &str = select_changes!("", "true", "false", "DESC");
// The ISO `since`: messages created after it, and deletes after it.
const CREATED_AFTER: &str = select_changes!("", "m.created_at > $5", "t.deleted_at > $5", "ASC");
/// [`NEW_SINCE`] with the losses of access of the same window.
const CATCH_UP: &str = select_changes!(
    "(SELECT array_agg(a.room_id::int8) FROM hark_access_revoked a \
       WHERE a.room_id = ANY($1::int8[]) AND a.hark_txid >= pg_snapshot_xmin($5::text::pg_snapshot) \
         AND NOT pg_visible_in_snapshot(a.hark_txid, $5::text::pg_snapshot)) AS revoked_rooms, \
     (SELECT array_agg(a.user_id::int8) FROM hark_access_revoked a \
       WHERE a.room_id = ANY($1::int8[]) AND a.hark_txid >= pg_snapshot_xmin($5::text::pg_snapshot) \
         AND NOT pg_visible_in_snapshot(a.hark_txid, $5::text::pg_snapshot)) AS revoked_users,",
    new_since!("m.hark_txid", "$5"),
    new_since!("t.hark_txid", "$5"),
    "ASC"
);

// The rest of a batch: $5 lower, $6 upper, $7 after_id; `beyond` says
// whether changes after the batch's upper snapshot are due too.
macro_rules! batch {
    ($m:expr, $t:expr) => {
        select_changes!(
            "(EXISTS (SELECT 1 FROM chat_chatmessage b WHERE b.room_id = ANY($1::int8[]) \
               AND b.hark_txid >= pg_snapshot_xmin($6::text::pg_snapshot) \
               AND NOT pg_visible_in_snapshot(b.hark_txid, $6::text::pg_snapshot)) \
              OR EXISTS (SELECT 1 FROM hark_tombstone b WHERE b.room_id = ANY($1::int8[]) \
               AND b.hark_txid >= pg_snapshot_xmin($6::text::pg_snapshot) \
               AND NOT pg_visible_in_snapshot(b.hark_txid, $6::text::pg_snapshot))) AS beyond,",
            concat!(
                $m,
                " AND pg_visible_in_snapshot(m.hark_txid, $6::text::pg_snapshot) AND m.id > $7::int8"
            ),
            concat!(
                $t,
                " AND pg_visible_in_snapshot(t.hark_txid, $6::text::pg_snapshot) \
                  AND t.seq - 4611686018427387904 > $7::int8"
            ),
            "ASC"
        )
    };
}

const BATCH_AFTER_SNAPSHOT: &str = batch!(
    new_since!("m.hark_txid", "$5"),
    new_since!("t.hark_txid", "$5")
);
const BATCH_CREATED_AFTER: &str = batch!("m.created_at > $5", "t.deleted_at > $5");

/// Runs one read. `client` may be pooled or the listener's own.
pub async fn read(
    client: &impl Prepared,
    rooms: &[i64],
    read: Read<'_>,
    budget: Budget,
) -> Result<Fetched, DbError> {
    let bytes = i64::try_from(budget.bytes).unwrap_or(i64::MAX);
    let member = budget.member;
    let rows = match read {
        Read::Latest { limit } => {
            let st = client.statement(LATEST).await?;
            client
                .pg()
                .query(&st, &[&rooms, &limit, &bytes, &member])
                .await?
        }
        Read::After { lower, limit } => {
            let st = client.statement(NEW_SINCE).await?;
            client
                .pg()
                .query(&st, &[&rooms, &limit, &bytes, &member, &lower.to_pg()])
                .await?
        }
        Read::CreatedAfter { since, limit } => {
            let st = client.statement(CREATED_AFTER).await?;
            client
                .pg()
                .query(&st, &[&rooms, &limit, &bytes, &member, &since])
                .await?
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
                    let params: [&(dyn ToSql + Sync); 7] = [
                        &rooms,
                        &limit,
                        &bytes,
                        &member,
                        &l.to_pg(),
                        &upper,
                        &after_id,
                    ];
                    client.pg().query(&st, &params).await?
                }
                Lower::CreatedAfter(since) => {
                    let st = client.statement(BATCH_CREATED_AFTER).await?;
                    let params: [&(dyn ToSql + Sync); 7] =
                        [&rooms, &limit, &bytes, &member, since, &upper, &after_id];
                    client.pg().query(&st, &params).await?
                }
            }
        }
    };
    decode(rows)
}

/// The listener's catch-up: every row of `rooms` new relative to `lower`
/// (at most `limit`, within `bytes`), and the losses of access of the same
/// window, read in one snapshot.
pub async fn catch_up(
    client: &impl Prepared,
    rooms: &[i64],
    lower: &Snapshot,
    limit: i64,
    bytes: usize,
) -> Result<Fetched, DbError> {
    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    let member: Option<i64> = None;
    let st = client.statement(CATCH_UP).await?;
    let rows = client
        .pg()
        .query(&st, &[&rooms, &limit, &bytes, &member, &lower.to_pg()])
        .await?;
    decode(rows)
}

/// A column of the first row, when the statement has it.
fn optional<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    name: &str,
) -> Result<Option<T>, DbError> {
    if !row.columns().iter().any(|c| c.name() == name) {
        return Ok(None);
    }
    Ok(row.try_get::<_, Option<T>>(name)?)
}

fn decode(rows: Vec<Row>) -> Result<Fetched, DbError> {
    let first = rows
        .first()
        .ok_or_else(|| DbError::Unavailable("snapshot query returned no row".into()))?;
    let head_text: String = first.try_get(0)?;
    let head = Snapshot::parse_pg(&head_text)
        .ok_or_else(|| DbError::Unavailable(format!("unparsable snapshot {head_text:?}").into()))?;
    let beyond = optional::<bool>(first, "beyond")?.unwrap_or(false);
    let member_of: i64 = first.try_get("member_of")?;
    let revoked_rooms = optional::<Vec<i64>>(first, "revoked_rooms")?.unwrap_or_default();
    let revoked_users = optional::<Vec<i64>>(first, "revoked_users")?.unwrap_or_default();
    let revoked = revoked_rooms.into_iter().zip(revoked_users).collect();
    let horizon = optional::<String>(first, "horizon")?
        .map(|h| parse_xid(&h))
        .transpose()?
        .unwrap_or(0);
    let mut out = Vec::with_capacity(rows.len());
    let mut cut = false;
    for row in &rows {
        let Some(id) = row.try_get::<_, Option<i64>>("id")? else {
            continue;
        };
        // The first change past the budget: a marker, not a change.
        if !row.try_get::<_, bool>("fits")? {
            cut = true;
            continue;
        }
        let room: i64 = row.try_get("room_id")?;
        let txid = parse_xid(&row.try_get::<_, String>("txid")?)?;
        if row.try_get::<_, i32>("kind")? == 0 {
            let key = row.try_get("key")?;
            let at = row.try_get("created_at")?;
            out.push(Arc::new(StoredMessage::deletion(id, key, room, txid, at)));
            continue;
        }
        let msg = Message {
            id,
            room,
            sender: User {
                id: row.try_get("uid")?,
                username: row.try_get("username")?,
                first_name: row.try_get("first_name")?,
                last_name: row.try_get("last_name")?,
            },
            content: row.try_get("content")?,
            created_at: row.try_get("created_at")?,
            edited: row.try_get("edited")?,
        };
        out.push(Arc::new(StoredMessage::new(&msg, txid)));
    }
    Ok(Fetched {
        head: Arc::new(head),
        rows: out,
        beyond,
        cut,
        member_of,
        revoked,
        horizon,
    })
}

/// An `xid8` as PostgreSQL's text gives it.
fn parse_xid(text: &str) -> Result<u64, DbError> {
    text.parse()
        .map_err(|_| DbError::Unavailable(format!("unparsable xid8 {text:?}").into()))
}

/// The current snapshot alone (the listener's first catch-up).
pub async fn current_snapshot(client: &impl Prepared) -> Result<Arc<Snapshot>, DbError> {
    let st = client
        .statement("SELECT pg_current_snapshot()::text")
        .await?;
    let row = client.pg().query_one(&st, &[]).await?;
    let text: String = row.try_get(0)?;
    Snapshot::parse_pg(&text)
        .map(Arc::new)
        .ok_or_else(|| DbError::Unavailable(format!("unparsable snapshot {text:?}").into()))
}

/// The current snapshot and the tombstone horizon (a resumed stream's
/// check, before its `ready`).
pub async fn position_now(client: &impl Prepared) -> Result<(Arc<Snapshot>, u64), DbError> {
    let st = client
        .statement(
            "SELECT pg_current_snapshot()::text, \
                    (SELECT h.swept_txid::text FROM hark_tombstone_horizon h LIMIT 1)",
        )
        .await?;
    let row = client.pg().query_one(&st, &[]).await?;
    let text: String = row.try_get(0)?;
    let snapshot = Snapshot::parse_pg(&text)
        .map(Arc::new)
        .ok_or_else(|| DbError::Unavailable(format!("unparsable snapshot {text:?}").into()))?;
    let horizon = row
        .try_get::<_, Option<String>>(1)?
        .map(|h| parse_xid(&h))
        .transpose()?
        .unwrap_or(0);
    Ok((snapshot, horizon))
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
                super::typing::stop_payload_sql!("$1", "$2"),
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
