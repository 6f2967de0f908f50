-- Losses of access, stamped with the writing transaction like messages
-- are. The listener's catch-up reads the ones of its window in the same
-- statement (the same snapshot) as the messages, so it never hands out a
-- message that committed after its reader lost access, however late the
-- participant NOTIFY arrives. Rows are only needed for the length of one
-- catch-up window; hark deletes those older than a day.
CREATE TABLE IF NOT EXISTS hark_access_revoked (
    room_id    bigint      NOT NULL,
    user_id    bigint      NOT NULL,
    hark_txid  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    revoked_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS hark_access_revoked_room_txid ON hark_access_revoked (room_id, hark_txid);
CREATE INDEX IF NOT EXISTS hark_access_revoked_at ON hark_access_revoked (revoked_at);

-- A participant row deleted, or moved to another room or user (an UPDATE
-- is a loss for its old pair). A deleted room or user deletes these rows
-- too (Django's collector does, and so do hark's ON DELETE CASCADE keys),
-- so every way of losing access passes here.
CREATE OR REPLACE FUNCTION hark_participant_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       OR OLD.chatroom_id IS DISTINCT FROM NEW.chatroom_id
       OR OLD.user_id IS DISTINCT FROM NEW.user_id THEN
        INSERT INTO hark_access_revoked (room_id, user_id) VALUES (OLD.chatroom_id, OLD.user_id);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_participant_revoked ON chat_chatroom_participants;
CREATE TRIGGER hark_participant_revoked
    AFTER UPDATE OR DELETE ON chat_chatroom_participants
    FOR EACH ROW EXECUTE FUNCTION hark_participant_revoked();
