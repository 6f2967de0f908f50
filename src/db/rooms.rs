//! Room queries: the rooms list and detail (with participants, last
//! message, unread count, who is typing, who is online and the others' read
//! markers) and the read marker.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{DbError, Prepared};
use crate::message::{serialize_ts, Message, User};

#[derive(Serialize)]
pub struct Room {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
    /// Null where Django's model allows it (`null=True`, common for direct
    /// chats), as DRF would send it.
    pub name: Option<String>,
    pub participants: Vec<User>,
    pub last_message: Option<Message>,
    pub unread_count: i64,
    #[serde(serialize_with = "serialize_ts")]
    pub updated_at: DateTime<Utc>,
    #[serde(serialize_with = "serialize_ts")]
    pub created_at: DateTime<Utc>,
    pub typing_user: Option<User>,
    pub typing_users: Vec<User>,
    /// Participants other than the requester who are online now.
    pub online_users: Vec<User>,
    /// Other participants' read markers ("seen").
    pub read_markers: Vec<ReadMarker>,
}

#[derive(Serialize)]
pub struct ReadMarker {
    pub user: i64,
    #[serde(serialize_with = "serialize_ts")]
    pub read_at: DateTime<Utc>,
}

macro_rules! user_json {
    ($u:literal) => {
        concat!(
            "json_build_object('id', ",
            $u,
            ".id, 'username', ",
            $u,
            ".username, 'first_name', ",
            $u,
            ".first_name, 'last_name', ",
            $u,
            ".last_name)"
        )
    };
}

// Typing users: still within their window, other than the requester, and
// still participants; the most recent `true` (latest expiry) first.
// Ids are cast to int8 (and `$1` typed so) because Django's tables may have
// `integer` keys (AutoField) as well as `bigint` ones.
const ROOMS: &str = concat!(
    "SELECT r.id::int8 AS id, r.type::text AS kind, r.name::text AS name, r.created_at, r.updated_at, \
       coalesce((SELECT json_agg(", user_json!("u"), " ORDER BY u.id) \
                 FROM chat_chatroom_participants p JOIN users_user u ON u.id = p.user_id \
                 WHERE p.chatroom_id = r.id), '[]'::json) AS participants, \
       lm.id::int8 AS lm_id, lm.content AS lm_content, lm.created_at AS lm_created_at, lm.sender AS lm_sender, \
       lm.hark_edited AS lm_edited, \
       (SELECT count(*) FROM chat_chatmessage c \
         WHERE c.room_id = r.id AND c.sender_id <> $1::int8 \
           AND (rm.read_at IS NULL OR c.created_at > rm.read_at)) AS unread, \
       coalesce((SELECT json_agg(", user_json!("u"), " ORDER BY t.expires_at DESC, u.id) \
                 FROM hark_typing t JOIN users_user u ON u.id = t.user_id \
                 JOIN chat_chatroom_participants tp ON tp.chatroom_id = t.room_id AND tp.user_id = t.user_id \
                 WHERE t.room_id = r.id AND t.user_id <> $1::int8 AND t.expires_at > now()), '[]'::json) AS typing, \
       coalesce((SELECT json_agg(", user_json!("u"), " ORDER BY u.id) \
                 FROM chat_chatroom_participants op JOIN users_user u ON u.id = op.user_id \
                 WHERE op.chatroom_id = r.id AND op.user_id <> $1::int8 \
                   AND EXISTS (SELECT 1 FROM hark_presence h WHERE h.user_id = op.user_id)), '[]'::json) AS online, \
       ARRAY(SELECT m.user_id::int8 FROM hark_read_marker m \
               JOIN chat_chatroom_participants mp ON mp.chatroom_id = m.room_id AND mp.user_id = m.user_id \
             WHERE m.room_id = r.id AND m.user_id <> $1::int8 ORDER BY m.user_id) AS marker_users, \
       ARRAY(SELECT m.read_at FROM hark_read_marker m \
               JOIN chat_chatroom_participants mp ON mp.chatroom_id = m.room_id AND mp.user_id = m.user_id \
             WHERE m.room_id = r.id AND m.user_id <> $1::int8 ORDER BY m.user_id) AS marker_times \
     FROM chat_chatroom r \
     JOIN chat_chatroom_participants me ON me.chatroom_id = r.id AND me.user_id = $1::int8 \
     LEFT JOIN hark_read_marker rm ON rm.room_id = r.id AND rm.user_id = $1::int8 \
     LEFT JOIN LATERAL (SELECT m.id, m.content, m.created_at, m.hark_edited, ", user_json!("su"), " AS sender \
                        FROM chat_chatmessage m JOIN users_user su ON su.id = m.sender_id \
                        WHERE m.room_id = r.id ORDER BY m.id DESC LIMIT 1) lm ON true \
     WHERE ($2::int8 IS NULL OR r.id = $2) \
     ORDER BY r.updated_at DESC, r.id DESC"
);

/// The requester's rooms, newest `updated_at` first (or just `only`).
pub async fn list(
    client: &impl Prepared,
    user: i64,
    only: Option<i64>,
) -> Result<Vec<Room>, DbError> {
    let st = client.statement(ROOMS).await?;
    let rows = client.pg().query(&st, &[&user, &only]).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("id")?;
        let users = |col: &str| -> Result<Vec<User>, DbError> {
            let v: serde_json::Value = row.try_get(col)?;
            Ok(serde_json::from_value(v).unwrap_or_default())
        };
        let typing_users = users("typing")?;
        let last_message = match row.try_get::<_, Option<i64>>("lm_id")? {
            Some(mid) => {
                let sender: serde_json::Value = row.try_get("lm_sender")?;
                serde_json::from_value::<User>(sender)
                    .ok()
                    .map(|sender| Message {
                        id: mid,
                        room: id,
                        sender,
                        content: row.try_get("lm_content").unwrap_or_default(),
                        created_at: row.try_get("lm_created_at").unwrap_or_default(),
                        edited: row.try_get("lm_edited").unwrap_or_default(),
                    })
            }
            None => None,
        };
        out.push(Room {
            id,
            kind: row.try_get("kind")?,
            name: row.try_get("name")?,
            participants: users("participants")?,
            last_message,
            unread_count: row.try_get("unread")?,
            updated_at: row.try_get("updated_at")?,
            created_at: row.try_get("created_at")?,
            typing_user: typing_users.first().cloned(),
            typing_users,
            online_users: users("online")?,
            read_markers: {
                let ids: Vec<i64> = row.try_get("marker_users")?;
                let times: Vec<DateTime<Utc>> = row.try_get("marker_times")?;
                ids.into_iter()
                    .zip(times)
                    .map(|(user, read_at)| ReadMarker { user, read_at })
                    .collect()
            },
        });
    }
    Ok(out)
}

/// Moves `user`'s read marker in `room` to now.
pub async fn mark_read(client: &impl Prepared, room: i64, user: i64) -> Result<(), DbError> {
    let st = client
        .statement(
            "INSERT INTO hark_read_marker (room_id, user_id, read_at) VALUES ($1, $2, now()) \
             ON CONFLICT (room_id, user_id) DO UPDATE SET read_at = greatest(hark_read_marker.read_at, now())",
        )
        .await?;
    client.pg().execute(&st, &[&room, &user]).await?;
    Ok(())
}
