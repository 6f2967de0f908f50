//! Chat fixtures written with plain SQL, as Django or psql would.

use std::time::{Duration, Instant};

/// A connection to the chat database with the statements tests and
/// benchmarks write with. Each panics on a database error.
pub struct Fixture {
    pub db: tokio_postgres::Client,
}

impl Fixture {
    pub async fn new(conn: &str) -> Fixture {
        Fixture {
            db: crate::connect(conn).await,
        }
    }

    pub async fn user(&self, username: &str) -> i64 {
        self.db
            .query_one(
                "INSERT INTO users_user (username, first_name, last_name) VALUES ($1::text, initcap($1::text), 'Test') RETURNING id",
                &[&username],
            )
            .await
            .expect("insert user")
            .get(0)
    }

    pub async fn room(&self, name: &str, members: &[i64]) -> i64 {
        let id: i64 = self
            .db
            .query_one(
                "INSERT INTO chat_chatroom (type, name) VALUES ('group', $1) RETURNING id",
                &[&name],
            )
            .await
            .expect("insert room")
            .get(0);
        for m in members {
            self.join(id, *m).await;
        }
        id
    }

    pub async fn join(&self, room: i64, user: i64) {
        self.db
            .execute(
                "INSERT INTO chat_chatroom_participants (chatroom_id, user_id) VALUES ($1, $2)",
                &[&room, &user],
            )
            .await
            .expect("insert participant");
    }

    /// Every message id in `room`, ascending.
    pub async fn message_ids(&self, room: i64) -> Vec<i64> {
        self.db
            .query(
                "SELECT id FROM chat_chatmessage WHERE room_id = $1 ORDER BY id",
                &[&room],
            )
            .await
            .expect("read message ids")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// How many rows `table` has.
    pub async fn count(&self, table: &str) -> i64 {
        self.db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("count {table}: {e}"))
            .get(0)
    }

    /// How many messages `room` has (committed ones).
    pub async fn message_count(&self, room: i64) -> i64 {
        self.db
            .query_one(
                "SELECT count(*) FROM chat_chatmessage WHERE room_id = $1",
                &[&room],
            )
            .await
            .expect("count messages")
            .get(0)
    }

    /// A plain SQL insert, as any writer would do it.
    pub async fn insert(&self, room: i64, sender: i64, content: &str) -> i64 {
        self.db
            .query_one(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) VALUES ($1, $2, $3, now()) RETURNING id",
                &[&room, &sender, &content],
            )
            .await
            .expect("insert message")
            .get(0)
    }

    /// One message in its own explicit transaction; returns once COMMIT
    /// has returned, and that instant.
    pub async fn insert_committed(&mut self, room: i64, sender: i64, content: &str) -> Instant {
        let tx = self.db.transaction().await.expect("begin");
        tx.execute(
            "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) VALUES ($1, $2, $3, now())",
            &[&room, &sender, &content],
        )
        .await
        .expect("insert message");
        tx.commit().await.expect("commit");
        Instant::now()
    }

    /// `n` messages in one statement, so one commit: readers see all or
    /// none. Their content is `tag` and their number. Returns their ids in
    /// order.
    pub async fn insert_many(&self, room: i64, sender: i64, n: i64, tag: &str) -> Vec<i64> {
        let rows = self
            .db
            .query(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                 SELECT $1, $2, $3 || g, now() FROM generate_series(1, $4::int8) g RETURNING id",
                &[&room, &sender, &tag, &n],
            )
            .await
            .expect("insert messages");
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        ids
    }

    /// `n` messages in one statement, each `prefix`, its number and
    /// `suffix` (say, to make them as long as a chat line); returns how
    /// many, not their ids (a benchmark's history can be large).
    pub async fn insert_many_around(
        &self,
        room: i64,
        sender: i64,
        n: i64,
        prefix: &str,
        suffix: &str,
    ) -> u64 {
        self.db
            .execute(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                 SELECT $1, $2, $3 || g || $5, now() FROM generate_series(1, $4::int8) g",
                &[&room, &sender, &prefix, &n, &suffix],
            )
            .await
            .expect("insert messages")
    }
}

/// Terminates the LISTEN backend(s) of hark processes on `db`'s database,
/// first waiting (bounded) until one is connected — after an earlier kill
/// the replacement may still be on its way. Returns how many were killed.
pub async fn kill_listener(db: &tokio_postgres::Client) -> i64 {
    let killed = std::cell::Cell::new(0);
    let killed_ref = &killed;
    crate::within(Duration::from_secs(10), || async move {
        let n: i64 = db
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'hark-listener' AND datname = current_database()",
                &[],
            )
            .await
            .expect("terminate the listener")
            .get(0);
        killed_ref.set(n);
        n > 0
    })
    .await;
    killed.get()
}
