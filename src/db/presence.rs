//! Presence's SQL (`sql/0005_presence.sql`): this process's heartbeat,
//! the per-user rows it holds, the sweep of dead processes, and who is
//! online in a set of rooms. The policy (when a user is online here, the
//! grace, when to beat and sweep) is `crate::delivery::presence`'s.

use std::time::Duration;

use deadpool_postgres::Object;

use super::DbError;
use crate::message::User;

/// Records that `process` is alive; true when its row had to be created
/// (first beat, or the row was swept or lost with an UNLOGGED table): the
/// rows it held are gone and must be written again.
pub async fn beat(client: &Object, process: &str) -> Result<bool, DbError> {
    let st = client
        .prepare_cached(
            "INSERT INTO hark_process (id) VALUES ($1) \
             ON CONFLICT (id) DO UPDATE SET seen_at = now() \
             RETURNING (xmax = 0) AS created",
        )
        .await?;
    Ok(client.query_one(&st, &[&process]).await?.try_get(0)?)
}

/// Marks `users` online (or not) at `process`; the database NOTIFYs the
/// users whose cluster-wide state changes. Returns how many did.
pub async fn set(
    client: &Object,
    process: &str,
    users: &[i64],
    online: bool,
) -> Result<i32, DbError> {
    let st = client
        .prepare_cached("SELECT hark_presence_set($1, $2::int8[], $3)")
        .await?;
    Ok(client
        .query_one(&st, &[&process, &users, &online])
        .await?
        .try_get(0)?)
}

/// Takes the users of processes silent for `dead_after` offline (unless
/// another process holds them). Returns how many went offline.
pub async fn sweep(client: &Object, dead_after: Duration) -> Result<i32, DbError> {
    let secs = dead_after.as_secs_f64();
    let st = client
        .prepare_cached("SELECT hark_presence_sweep($1::float8 * interval '1 second')")
        .await?;
    Ok(client.query_one(&st, &[&secs]).await?.try_get(0)?)
}

/// A graceful stop: every user `process` holds goes offline unless
/// another process holds them, and the process row goes.
pub async fn leave(client: &Object, process: &str) -> Result<(), DbError> {
    let st = client
        .prepare_cached(
            "SELECT hark_presence_set($1, ARRAY(SELECT user_id FROM hark_presence WHERE process = $1), false)",
        )
        .await?;
    client.query_one(&st, &[&process]).await?;
    client
        .execute("DELETE FROM hark_process WHERE id = $1", &[&process])
        .await?;
    Ok(())
}

/// The participants of `rooms` other than `me` who are online now, by room.
pub async fn online_in(
    client: &Object,
    rooms: &[i64],
    me: i64,
) -> Result<Vec<(i64, User)>, DbError> {
    let st = client
        .prepare_cached(
            "SELECT p.chatroom_id::int8, u.id::int8, u.username::text, u.first_name::text, u.last_name::text \
             FROM chat_chatroom_participants p JOIN users_user u ON u.id = p.user_id \
             WHERE p.chatroom_id = ANY($1::int8[]) AND p.user_id <> $2::int8 \
               AND EXISTS (SELECT 1 FROM hark_presence h WHERE h.user_id = p.user_id) \
             ORDER BY p.chatroom_id, u.id",
        )
        .await?;
    let rows = client.query(&st, &[&rooms, &me]).await?;
    rows.iter().map(super::typing::room_and_user).collect()
}
