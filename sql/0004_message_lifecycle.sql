-- The whole life of a message (API.md): an edit makes it due again, a
-- delete (or a move to another room) leaves a tombstone, both stamped with
-- the writing transaction like an insert, so a cursor orders them with the
-- inserts, whatever order writers commit in.

-- A constant default: on PostgreSQL 11 and later this changes only the
-- catalog, however many rows the table has.
ALTER TABLE chat_chatmessage ADD COLUMN IF NOT EXISTS hark_edited boolean NOT NULL DEFAULT false;

-- A change a client sees (content, room, sender, time) restamps the row
-- with the updating transaction, so every cursor that predates it is due
-- the message again, once, as it is now; a changed content marks it
-- edited. A rewrite with identical values (Django's save() writes every
-- column) keeps both as they were, and so do writers that set them.
CREATE OR REPLACE FUNCTION hark_message_changing() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.content IS DISTINCT FROM OLD.content
       OR NEW.room_id IS DISTINCT FROM OLD.room_id
       OR NEW.sender_id IS DISTINCT FROM OLD.sender_id
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        NEW.hark_txid := pg_current_xact_id();
        NEW.hark_edited := OLD.hark_edited OR NEW.content IS DISTINCT FROM OLD.content;
    ELSE
        NEW.hark_txid := OLD.hark_txid;
        NEW.hark_edited := OLD.hark_edited;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS hark_message_changing ON chat_chatmessage;
CREATE TRIGGER hark_message_changing
    BEFORE UPDATE ON chat_chatmessage
    FOR EACH ROW EXECUTE FUNCTION hark_message_changing();

-- A deleted message, or one moved out of a room: what a client needs to
-- drop it (its id and the room it was in), stamped like a message.
-- Swept after HARK_TOMBSTONE_RETENTION_S; the newest transaction swept is
-- kept in hark_tombstone_horizon, so a cursor from before it is refused
-- (cursor_reset) rather than told that nothing was deleted.
CREATE TABLE IF NOT EXISTS hark_tombstone (
    -- Orders a batch's deletes for paging (a message's id orders its
    -- versions): unique, where the same message may leave several rooms.
    seq        bigint      GENERATED ALWAYS AS IDENTITY,
    message_id bigint      NOT NULL,
    room_id    bigint      NOT NULL,
    hark_txid  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    deleted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS hark_tombstone_room_txid ON hark_tombstone (room_id, hark_txid);
CREATE INDEX IF NOT EXISTS hark_tombstone_deleted_at ON hark_tombstone (deleted_at);

CREATE TABLE IF NOT EXISTS hark_tombstone_horizon (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    swept_txid xid8    NOT NULL DEFAULT '0'
);
INSERT INTO hark_tombstone_horizon DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Statement-level, with transition tables: a bulk delete or update writes
-- its tombstones in one INSERT and NOTIFYs each room once.
CREATE OR REPLACE FUNCTION hark_message_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO hark_tombstone (message_id, room_id)
        SELECT o.id, o.room_id FROM hark_old_rows o;
    PERFORM pg_notify('hark', json_build_object('k', 'm', 'r', room_id)::text)
    FROM (SELECT DISTINCT room_id FROM hark_old_rows) AS rooms;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_message_deleted ON chat_chatmessage;
CREATE TRIGGER hark_message_deleted
    AFTER DELETE ON chat_chatmessage
    REFERENCING OLD TABLE AS hark_old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hark_message_deleted();

-- An update: a tombstone in the old room of each message that moved, and
-- a NOTIFY for every room a restamped row is in or left.
CREATE OR REPLACE FUNCTION hark_message_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO hark_tombstone (message_id, room_id)
        SELECT o.id, o.room_id
        FROM hark_old_rows o JOIN hark_new_rows n ON n.id = o.id
        WHERE n.room_id IS DISTINCT FROM o.room_id;
    PERFORM pg_notify('hark', json_build_object('k', 'm', 'r', room_id)::text)
    FROM (SELECT n.room_id FROM hark_new_rows n WHERE n.hark_txid = pg_current_xact_id()
          UNION
          SELECT o.room_id FROM hark_old_rows o JOIN hark_new_rows n ON n.id = o.id
          WHERE n.room_id IS DISTINCT FROM o.room_id) AS rooms;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_message_updated ON chat_chatmessage;
CREATE TRIGGER hark_message_updated
    AFTER UPDATE ON chat_chatmessage
    REFERENCING OLD TABLE AS hark_old_rows NEW TABLE AS hark_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hark_message_updated();
