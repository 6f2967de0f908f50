-- What hark adds to the chat tables, whoever created them: the writing
-- transaction on every message (the cursor's key), its indexes, the
-- NOTIFY triggers that wake the listeners, and hark's own tables.

-- Existing rows get a constant 1 (visible in every snapshot: they are
-- history, never "new"); only then does the volatile default apply, so the
-- column is added without rewriting a large table.
ALTER TABLE chat_chatmessage ADD COLUMN IF NOT EXISTS hark_txid xid8 NOT NULL DEFAULT '1';
ALTER TABLE chat_chatmessage ALTER COLUMN hark_txid SET DEFAULT pg_current_xact_id();

CREATE INDEX IF NOT EXISTS hark_chatmessage_room_txid ON chat_chatmessage (room_id, hark_txid);
CREATE INDEX IF NOT EXISTS hark_chatmessage_room_id ON chat_chatmessage (room_id, id);
CREATE INDEX IF NOT EXISTS hark_participants_user ON chat_chatroom_participants (user_id, chatroom_id);

-- One NOTIFY per room per statement; PostgreSQL also merges identical
-- payloads within a transaction, so a bulk insert wakes each listener once.
-- The payload stays tiny: an oversize pg_notify would abort the writer.
CREATE OR REPLACE FUNCTION hark_notify_message() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hark', json_build_object('k', 'm', 'r', room_id)::text)
    FROM (SELECT DISTINCT room_id FROM hark_new_rows) AS rooms;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_message_inserted ON chat_chatmessage;
CREATE TRIGGER hark_message_inserted
    AFTER INSERT ON chat_chatmessage
    REFERENCING NEW TABLE AS hark_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hark_notify_message();

-- Membership changes invalidate the participant cache and re-target
-- "all my rooms" event streams.
CREATE OR REPLACE FUNCTION hark_notify_participant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('hark', json_build_object('k', 'p', 'r', OLD.chatroom_id, 'u', OLD.user_id)::text);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        PERFORM pg_notify('hark', json_build_object('k', 'p', 'r', NEW.chatroom_id, 'u', NEW.user_id)::text);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_participant_changed ON chat_chatroom_participants;
CREATE TRIGGER hark_participant_changed
    AFTER INSERT OR UPDATE OR DELETE ON chat_chatroom_participants
    FOR EACH ROW EXECUTE FUNCTION hark_notify_participant();

-- A deleted room or a renamed/deleted user invalidates cached lookups.
CREATE OR REPLACE FUNCTION hark_notify_room_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hark', json_build_object('k', 'r', 'r', OLD.id)::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_room_deleted ON chat_chatroom;
CREATE TRIGGER hark_room_deleted
    AFTER DELETE ON chat_chatroom
    FOR EACH ROW EXECUTE FUNCTION hark_notify_room_deleted();

CREATE OR REPLACE FUNCTION hark_notify_user_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hark', json_build_object('k', 'u', 'u', OLD.id)::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_user_changed ON users_user;
CREATE TRIGGER hark_user_changed
    AFTER UPDATE OR DELETE ON users_user
    FOR EACH ROW EXECUTE FUNCTION hark_notify_user_changed();

-- Typing state is ephemeral but shared by every hark process: UNLOGGED
-- (no WAL; emptied after a crash, which is the right answer for it).
CREATE UNLOGGED TABLE IF NOT EXISTS hark_typing (
    room_id    bigint      NOT NULL,
    user_id    bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX IF NOT EXISTS hark_typing_expires ON hark_typing (expires_at);

CREATE TABLE IF NOT EXISTS hark_read_marker (
    room_id bigint      NOT NULL REFERENCES chat_chatroom (id) ON DELETE CASCADE,
    user_id bigint      NOT NULL REFERENCES users_user (id) ON DELETE CASCADE,
    read_at timestamptz NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

-- Statistics for the new column now: until autovacuum analyzes a large
-- Django table (after ~10% of it changes), the planner knows nothing of
-- hark_txid and may answer a catch-up by walking the primary key through
-- the whole table instead of reading the (room_id, hark_txid) index.
ANALYZE chat_chatmessage;
