//! Who exists and who belongs where: users (for auth and for the objects we
//! send) and room participants, cached in memory.
//!
//! The cache is exact, not time-based: triggers on the participants, rooms
//! and users tables NOTIFY every change and the listener calls the
//! `invalidate_*` methods. While the listener is down those notifications
//! would be missed, so the cache is bypassed then and cleared on reconnect.
//! A generation counter keeps a read that raced an invalidation from
//! caching what it read.
//!
//! The queries cast keys to int8: Django's tables may have `integer` keys
//! (AutoField, Django's default without DEFAULT_AUTO_FIELD) as well as
//! `bigint` ones (BigAutoField), and an int4 parameter or column would not
//! take or give an i64.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use deadpool_postgres::Pool;

use crate::db::DbError;
use crate::delivery::hub::Hub;
use crate::message::User;

/// Entries kept before the cache starts over (bounded memory).
const MAX_ENTRIES: usize = 100_000;

/// The requester's standing in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Participant,
    NotParticipant,
    NoSuchRoom,
}

#[derive(Clone)]
pub(crate) struct Directory {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    hub: Hub,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    generation: u64,
    users: HashMap<i64, Arc<User>>,
    /// None: the room does not exist.
    rooms: HashMap<i64, Option<Arc<HashSet<i64>>>>,
}

impl Directory {
    pub(crate) fn new(pool: Pool, hub: Hub) -> Directory {
        Directory {
            inner: Arc::new(Inner {
                pool,
                hub,
                cache: Mutex::new(Cache::default()),
            }),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.inner.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The user, or None when no such user exists.
    pub(crate) async fn user(&self, id: i64) -> Result<Option<Arc<User>>, DbError> {
        self.user_from(id, true).await
    }

    /// [`Directory::user`] from the database, whatever the cache holds (a
    /// deletion whose NOTIFY has not arrived yet).
    pub(crate) async fn user_fresh(&self, id: i64) -> Result<Option<Arc<User>>, DbError> {
        self.user_from(id, false).await
    }

    async fn user_from(&self, id: i64, cached: bool) -> Result<Option<Arc<User>>, DbError> {
        let generation = {
            let c = self.cache();
            if let Some(hit) = c.users.get(&id).filter(|_| cached) {
                return Ok(Some(hit.clone()));
            }
            c.generation
        };
        let client = self.inner.pool.get().await?;
        let st = client
            .prepare_cached(
                "SELECT id::int8, username, first_name, last_name \
                 FROM users_user WHERE id = $1::int8",
            )
            .await?;
        let user = match client.query_opt(&st, &[&id]).await? {
            Some(row) => Some(Arc::new(User {
                id: row.try_get(0)?,
                username: row.try_get(1)?,
                first_name: row.try_get(2)?,
                last_name: row.try_get(3)?,
            })),
            None => None,
        };
        // Only users that exist are cached: a user's creation sends no
        // notification (the trigger covers update and delete), so a cached
        // "no such user" would refuse their valid token for ever.
        if let Some(u) = &user {
            self.store(generation, |c| {
                c.users.insert(id, u.clone());
            });
        }
        Ok(user)
    }

    /// Whether `user` may read and write `room`.
    pub(crate) async fn access(&self, room: i64, user: i64) -> Result<Access, DbError> {
        self.access_from(room, user, true).await
    }

    /// Whether the cache says `user` is a participant of `room`: the
    /// answer [`Directory::access`] gives at once, without a future, for a
    /// poll answered from memory (the hot path); false means "ask".
    pub(crate) fn cached_participant(&self, room: i64, user: i64) -> bool {
        let c = self.cache();
        c.rooms
            .get(&room)
            .is_some_and(|hit| classify(hit.as_deref(), user) == Access::Participant)
    }

    /// [`Directory::access`] from the database, whatever the cache holds
    /// (a change whose NOTIFY has not arrived yet).
    pub(crate) async fn access_fresh(&self, room: i64, user: i64) -> Result<Access, DbError> {
        self.access_from(room, user, false).await
    }

    async fn access_from(&self, room: i64, user: i64, cached: bool) -> Result<Access, DbError> {
        let generation = {
            let c = self.cache();
            // Only a "yes" is answered from the cache. A join committed a
            // moment ago may not have been notified yet, and a client that
            // Django has just added to a room uses it at once: a refusal
            // costs one query rather than a wrong 403 or 404.
            if let Some(hit) = c.rooms.get(&room).filter(|_| cached) {
                if classify(hit.as_deref(), user) == Access::Participant {
                    return Ok(Access::Participant);
                }
            }
            c.generation
        };
        let client = self.inner.pool.get().await?;
        let st = client
            .prepare_cached(
                "SELECT r.id, array_remove(array_agg(p.user_id::int8), NULL) \
                 FROM chat_chatroom r LEFT JOIN chat_chatroom_participants p ON p.chatroom_id = r.id \
                 WHERE r.id = $1::int8 GROUP BY r.id",
            )
            .await?;
        let members: Option<Arc<HashSet<i64>>> = match client.query_opt(&st, &[&room]).await? {
            Some(row) => Some(Arc::new(
                row.try_get::<_, Vec<i64>>(1)?.into_iter().collect(),
            )),
            None => None,
        };
        let access = classify(members.as_deref(), user);
        self.store(generation, |c| {
            c.rooms.insert(room, members);
        });
        Ok(access)
    }

    /// The rooms `user` participates in (not cached: asked once per stream
    /// and after each of its membership changes).
    pub(crate) async fn rooms_of(&self, user: i64) -> Result<Vec<i64>, DbError> {
        let client = self.inner.pool.get().await?;
        let st = client
            .prepare_cached(
                "SELECT chatroom_id::int8 FROM chat_chatroom_participants \
                 WHERE user_id = $1::int8 ORDER BY chatroom_id",
            )
            .await?;
        let rows = client.query(&st, &[&user]).await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(DbError::from))
            .collect()
    }

    fn store(&self, generation: u64, f: impl FnOnce(&mut Cache)) {
        if !self.inner.hub.listener_up() {
            return;
        }
        let mut c = self.cache();
        if c.generation != generation {
            return;
        }
        if c.users.len() + c.rooms.len() >= MAX_ENTRIES {
            c.users.clear();
            c.rooms.clear();
        }
        f(&mut c);
    }

    pub(crate) fn invalidate_room(&self, room: i64) {
        let mut c = self.cache();
        c.generation += 1;
        c.rooms.remove(&room);
    }

    pub(crate) fn invalidate_user(&self, user: i64) {
        let mut c = self.cache();
        c.generation += 1;
        c.users.remove(&user);
    }

    /// Forget everything (the listener reconnected: changes may be missed).
    pub(crate) fn clear(&self) {
        let mut c = self.cache();
        c.generation += 1;
        c.users.clear();
        c.rooms.clear();
    }
}

fn classify(members: Option<&HashSet<i64>>, user: i64) -> Access {
    match members {
        None => Access::NoSuchRoom,
        Some(m) if m.contains(&user) => Access::Participant,
        Some(_) => Access::NotParticipant,
    }
}
