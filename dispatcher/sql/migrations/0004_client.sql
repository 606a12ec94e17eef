-- What applications need: their own metadata on a job (a tenant, an upload id), and an event on every state
-- change, so that they hear back without polling.
ALTER TABLE jobs ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Channel jobcell_events, payload {"job": id, "state": ..., "attempt": n, "tier": ...} (JSON text). A
-- notification is sent when the transaction commits, and only to sessions listening then: listeners that
-- were away read the state with get() after (re)connecting, as jobcell.Client.wait does.
CREATE FUNCTION jobcell_notify_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobcell_events', json_build_object('job', NEW.id, 'state', NEW.state,
                                                          'attempt', NEW.attempt, 'tier', NEW.tier)::text);
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_state_event_insert AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION jobcell_notify_state();
CREATE TRIGGER jobs_state_event_update AFTER UPDATE OF state ON jobs FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION jobcell_notify_state();
