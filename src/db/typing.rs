//! Typing state's SQL: the UNLOGGED `hark_typing` table, and the NOTIFY
//! each change sends (the payload carries the user, so streams need no
//! lookup per event). The expiry logic that drives [`sweep`] is
//! `crate::delivery::typing`'s.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Object;

use super::DbError;
use crate::message::User;

/// The SQL of a typing NOTIFY payload for room `$room` and user `$user`
/// (expressions), `{"k":"t","r":…,"on":…,"u":User}`: the user travels in the
/// payload so streams need no lookup per event. Usernames and names are at
/// most a few hundred bytes, far below NOTIFY's 8,000-byte limit.
macro_rules! typing_payload_sql {
    ($room:literal, $user:literal, $on:literal, $exp:literal) => {
        concat!(
            "json_build_object('k', 't', 'r', ",
            $room,
            "::int8, 'on', ",
            $on,
            ", 'exp', ",
            $exp,
            ", 'u', (SELECT json_build_object('id', tu.id, 'username', tu.username, \
               'first_name', tu.first_name, 'last_name', tu.last_name) \
               FROM users_user tu WHERE tu.id = ",
            $user,
            "::int8))::text"
        )
    };
}
pub(crate) use typing_payload_sql;

/// The payload of a `stop` for room and user expressions.
macro_rules! stop_payload_sql {
    ($room:literal, $user:literal) => {
        $crate::db::typing::typing_payload_sql!($room, $user, "false", "0")
    };
}
pub(crate) use stop_payload_sql;

const START: &str = concat!(
    "WITH prev AS (SELECT expires_at > now() AS active FROM hark_typing \
                   WHERE room_id = $1 AND user_id = $2), \
          up AS (INSERT INTO hark_typing (room_id, user_id, expires_at) \
                 VALUES ($1, $2, now() + $3::int8 * interval '1 millisecond') \
                 ON CONFLICT (room_id, user_id) DO UPDATE SET expires_at = EXCLUDED.expires_at \
                 RETURNING expires_at) \
     SELECT (SELECT expires_at FROM up), \
            (SELECT count(pg_notify('hark', ",
    typing_payload_sql!(
        "$1",
        "$2",
        "true",
        "(extract(epoch FROM (SELECT expires_at FROM up)) * 1000)::int8"
    ),
    ")) WHERE NOT coalesce((SELECT active FROM prev), false))"
);

const STOP: &str = concat!(
    "WITH d AS (DELETE FROM hark_typing WHERE room_id = $1 AND user_id = $2 \
                RETURNING expires_at > now() AS was_typing) \
     SELECT count(pg_notify('hark', ",
    stop_payload_sql!("$1", "$2"),
    ")) FROM d WHERE d.was_typing"
);

const SWEEP: &str = concat!(
    "WITH d AS (DELETE FROM hark_typing WHERE expires_at <= now() RETURNING room_id, user_id) \
     SELECT count(pg_notify('hark', ",
    typing_payload_sql!("d.room_id", "d.user_id", "false", "0"),
    ")) FROM d"
);

/// Marks `user` typing in `room` for `ttl`; NOTIFYs a start only if they
/// were not typing already.
pub async fn start(client: &Object, room: i64, user: i64, ttl: Duration) -> Result<(), DbError> {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let st = client.prepare_cached(START).await?;
    client.execute(&st, &[&room, &user, &ttl_ms]).await?;
    Ok(())
}

/// Clears it; NOTIFYs a stop only if they were typing.
pub async fn stop(client: &Object, room: i64, user: i64) -> Result<(), DbError> {
    let st = client.prepare_cached(STOP).await?;
    client.execute(&st, &[&room, &user]).await?;
    Ok(())
}

/// Who is typing in `rooms` now, other than `me`, earliest expiry first.
pub async fn current(client: &Object, rooms: &[i64], me: i64) -> Result<Vec<(i64, User)>, DbError> {
    let st = client
        .prepare_cached(
            "SELECT t.room_id, u.id, u.username::text, u.first_name::text, u.last_name::text \
             FROM hark_typing t JOIN users_user u ON u.id = t.user_id \
             WHERE t.room_id = ANY($1) AND t.user_id <> $2 AND t.expires_at > now() \
             ORDER BY t.expires_at",
        )
        .await?;
    let rows = client.query(&st, &[&rooms, &me]).await?;
    rows.iter().map(room_and_user).collect()
}

/// A row of `room, id, username, first_name, last_name`.
pub(crate) fn room_and_user(r: &tokio_postgres::Row) -> Result<(i64, User), DbError> {
    let user = User {
        id: r.try_get(1)?,
        username: r.try_get(2)?,
        first_name: r.try_get(3)?,
        last_name: r.try_get(4)?,
    };
    Ok((r.try_get(0)?, user))
}

/// Deletes lapsed rows, NOTIFYing a stop for each (whichever process
/// deletes a row sends its one stop); returns the next expiry still there.
pub async fn sweep(client: &Object) -> Result<Option<DateTime<Utc>>, DbError> {
    let st = client.prepare_cached(SWEEP).await?;
    client.execute(&st, &[]).await?;
    let row = client
        .query_one("SELECT min(expires_at) FROM hark_typing", &[])
        .await?;
    Ok(row.try_get(0)?)
}
