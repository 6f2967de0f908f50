-- Presence (API.md "Presence and read receipts"): who is online, kept per
-- user and per hark process, never per connection. A process writes a row
-- when one of its users goes online there and deletes it when the user has
-- held nothing there for the grace period; the user is online while any
-- process holds a row. Both tables are UNLOGGED like hark_typing: presence
-- is ephemeral, and a process re-writes its rows when it finds its own
-- hark_process row gone (after a crash of the database, or a sweep).
CREATE UNLOGGED TABLE IF NOT EXISTS hark_process (
    id      text        PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE UNLOGGED TABLE IF NOT EXISTS hark_presence (
    user_id bigint NOT NULL,
    process text   NOT NULL,
    PRIMARY KEY (user_id, process)
);
CREATE INDEX IF NOT EXISTS hark_presence_process ON hark_presence (process);

-- One NOTIFY per room of the user, with the user in the payload (as
-- typing's), so a stream needs no lookup per event and each co-participant
-- hears it once per room they share.
CREATE OR REPLACE FUNCTION hark_presence_notify(p_user bigint, p_online boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hark', json_build_object(
                'k', 'o', 'r', p.chatroom_id::int8, 'on', p_online,
                'u', (SELECT json_build_object('id', u.id, 'username', u.username,
                                               'first_name', u.first_name, 'last_name', u.last_name)
                      FROM users_user u WHERE u.id = p_user))::text)
    FROM chat_chatroom_participants p
    WHERE p.user_id = p_user;
END
$$;

-- Marks `p_users` online (or not) at process `p_process`, and NOTIFYs each
-- user whose cluster-wide state this changes: the first process to hold a
-- user, or the last to let go. A per-user advisory lock orders processes
-- changing the same user; users are taken in id order, so two calls never
-- wait on each other in a cycle. Returns how many users changed.
CREATE OR REPLACE FUNCTION hark_presence_set(p_process text, p_users bigint[], p_online boolean) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    u bigint;
    changed integer := 0;
BEGIN
    FOREACH u IN ARRAY ARRAY(SELECT DISTINCT x FROM unnest(p_users) x ORDER BY x) LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('hark_presence ' || u, 0));
        IF p_online THEN
            INSERT INTO hark_presence (user_id, process) VALUES (u, p_process) ON CONFLICT DO NOTHING;
            IF FOUND AND NOT EXISTS (SELECT 1 FROM hark_presence
                                     WHERE user_id = u AND process <> p_process) THEN
                PERFORM hark_presence_notify(u, true);
                changed := changed + 1;
            END IF;
        ELSE
            DELETE FROM hark_presence WHERE user_id = u AND process = p_process;
            IF FOUND AND NOT EXISTS (SELECT 1 FROM hark_presence WHERE user_id = u) THEN
                PERFORM hark_presence_notify(u, false);
                changed := changed + 1;
            END IF;
        END IF;
    END LOOP;
    RETURN changed;
END
$$;

-- Takes the users of processes that stopped beating (or whose row is gone)
-- offline, unless another process holds them. Any process may run it;
-- SKIP LOCKED lets two sweepers share the work.
CREATE OR REPLACE FUNCTION hark_presence_sweep(p_dead_after interval) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    dead text;
    changed integer := 0;
BEGIN
    FOR dead IN SELECT id FROM hark_process WHERE seen_at < now() - p_dead_after
                FOR UPDATE SKIP LOCKED LOOP
        changed := changed + hark_presence_set(
            dead, ARRAY(SELECT user_id FROM hark_presence WHERE process = dead), false);
        DELETE FROM hark_process WHERE id = dead;
    END LOOP;
    FOR dead IN SELECT DISTINCT process FROM hark_presence p
                WHERE NOT EXISTS (SELECT 1 FROM hark_process h WHERE h.id = p.process) LOOP
        changed := changed + hark_presence_set(
            dead, ARRAY(SELECT user_id FROM hark_presence WHERE process = dead), false);
    END LOOP;
    RETURN changed;
END
$$;

-- A read marker moved: the room's other participants' streams hear it.
CREATE OR REPLACE FUNCTION hark_notify_read() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hark', json_build_object(
                'k', 'rd', 'r', NEW.room_id::int8,
                'at', (extract(epoch FROM NEW.read_at) * 1000000)::int8,
                'u', (SELECT json_build_object('id', u.id, 'username', u.username,
                                               'first_name', u.first_name, 'last_name', u.last_name)
                      FROM users_user u WHERE u.id = NEW.user_id))::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS hark_read_marked ON hark_read_marker;
CREATE TRIGGER hark_read_marked
    AFTER INSERT OR UPDATE ON hark_read_marker
    FOR EACH ROW EXECUTE FUNCTION hark_notify_read();
