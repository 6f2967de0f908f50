//! The wire objects of API.md (User, Message) and their one JSON form.
//!
//! A message is serialised once, when it enters hark (catch-up or query),
//! and kept as bytes: the hub hands the same bytes to every poll and stream
//! that delivers it, so fan-out to thousands of waiters never re-encodes.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

/// RFC 3339 in UTC with microseconds, as API.md fixes it.
pub fn format_ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn serialize_ts<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ts(t))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub first_name: String,
    pub last_name: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub id: i64,
    pub room: i64,
    pub sender: User,
    pub content: String,
    #[serde(serialize_with = "serialize_ts")]
    pub created_at: DateTime<Utc>,
    /// The content changed after the insert.
    pub edited: bool,
}

/// Where deletions' paging keys start: below every message id, so
/// positions issued before deletions existed (a message id) keep their
/// meaning.
pub const DELETION_KEYS: i64 = -(1 << 62);

/// The paging key of the tombstone numbered `seq`.
pub fn deletion_key(seq: i64) -> i64 {
    DELETION_KEYS.saturating_add(seq)
}

/// A change to a message as readers get it: its current version, or its
/// deletion from a room (`deleted`: a delete, or a move to another room).
/// What decides who is due it (`txid`, `id`) and the bytes to send.
#[derive(Debug)]
pub struct StoredMessage {
    pub id: i64,
    /// Orders the changes of one batch for paging, uniquely: a message's id
    /// for a version, [`DELETION_KEYS`] plus the tombstone's number for a
    /// deletion (so a batch's deletions come before its messages, and a
    /// message that left one room and entered another in it is two
    /// changes with two positions).
    pub key: i64,
    pub room: i64,
    /// The writing transaction (the row's or the tombstone's `hark_txid`).
    pub txid: u64,
    /// A deletion: `json` is `{"id", "room"}`, not a Message.
    pub deleted: bool,
    /// What an ISO `since` compares: a message's `created_at`, a
    /// deletion's time.
    pub at: DateTime<Utc>,
    /// The Message object (or the deletion) as one line of JSON.
    pub json: Bytes,
}

impl StoredMessage {
    pub fn new(m: &Message, txid: u64) -> StoredMessage {
        // A Message is plain strings and numbers: serialisation cannot fail.
        let json = serde_json::to_vec(m).unwrap_or_default();
        StoredMessage {
            id: m.id,
            key: m.id,
            room: m.room,
            txid,
            deleted: false,
            at: m.created_at,
            json: Bytes::from(json),
        }
    }

    /// Message `id` left `room` in transaction `txid`, at `at`; `key` from
    /// [`deletion_key`].
    pub fn deletion(id: i64, key: i64, room: i64, txid: u64, at: DateTime<Utc>) -> StoredMessage {
        StoredMessage {
            id,
            key,
            room,
            txid,
            deleted: true,
            at,
            json: Bytes::from(format!("{{\"id\":{id},\"room\":{room}}}")),
        }
    }
}

/// What a [`Signal`] says: `event: typing`, `event: presence` or
/// `event: read` on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignalKind {
    Typing,
    Presence,
    Read,
}

impl SignalKind {
    /// The SSE event name.
    pub fn event(self) -> &'static str {
        match self {
            SignalKind::Typing => "typing",
            SignalKind::Presence => "presence",
            SignalKind::Read => "read",
        }
    }
}

/// An ephemeral signal about a user in a room, as streams deliver it:
/// typing `{"room", "user", "is_typing"}`, presence `{"room", "user",
/// "online"}`, a read receipt `{"room", "user", "read_at"}`. Not resumable:
/// a stream that resumes gets the current state, not the history.
#[derive(Debug, Clone)]
pub struct Signal {
    pub room: i64,
    pub user: User,
    pub kind: SignalKind,
    /// Typing, online; always true for a read receipt.
    pub on: bool,
    /// The event's data, serialised once.
    pub json: Bytes,
}

impl Signal {
    pub fn typing(room: i64, user: User, is_typing: bool) -> Signal {
        let json = serde_json::json!({"room": room, "user": &user, "is_typing": is_typing});
        Signal::new(room, user, SignalKind::Typing, is_typing, json)
    }

    pub fn presence(room: i64, user: User, online: bool) -> Signal {
        let json = serde_json::json!({"room": room, "user": &user, "online": online});
        Signal::new(room, user, SignalKind::Presence, online, json)
    }

    pub fn read(room: i64, user: User, read_at: DateTime<Utc>) -> Signal {
        let json = serde_json::json!({"room": room, "user": &user, "read_at": format_ts(&read_at)});
        Signal::new(room, user, SignalKind::Read, true, json)
    }

    fn new(room: i64, user: User, kind: SignalKind, on: bool, json: serde_json::Value) -> Signal {
        Signal {
            room,
            json: Bytes::from(json.to_string()),
            user,
            kind,
            on,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_microseconds_and_z() {
        let t = DateTime::from_timestamp_micros(1_768_471_200_123_000).unwrap();
        assert_eq!(format_ts(&t), "2026-01-15T10:00:00.123000Z");
    }
}
