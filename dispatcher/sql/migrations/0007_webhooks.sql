-- Webhooks: an application hears of a job's end at a URL of its own (per job) and/or the deployment's
-- (JOBCELL_WEBHOOK_URL). Events are written in the same transaction as the state change, to an outbox that
-- dispatchers deliver from, so no event is lost to a crash; delivered ones are deleted.
ALTER TABLE jobs ADD COLUMN webhook_url text;

CREATE TABLE webhook_outbox (
    id         bigserial PRIMARY KEY,
    event_id   uuid NOT NULL,           -- one per event, the same for each of its targets: receivers dedupe on it
    job_id     bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    state      text NOT NULL,
    attempt    integer NOT NULL,
    tier       text NOT NULL,
    url        text,                    -- the job's own URL; NULL: the deployment's, if one is configured
    created_at timestamptz NOT NULL DEFAULT now(),
    next_at    timestamptz NOT NULL DEFAULT now(),  -- due; while being delivered, the claim's expiry
    tries      integer NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_at);

CREATE FUNCTION jobcell_webhook_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event uuid := gen_random_uuid();
BEGIN
    INSERT INTO webhook_outbox (event_id, job_id, state, attempt, tier, url)
    VALUES (event, NEW.id, NEW.state, NEW.attempt, NEW.tier, NULL);
    IF NEW.webhook_url IS NOT NULL THEN
        INSERT INTO webhook_outbox (event_id, job_id, state, attempt, tier, url)
        VALUES (event, NEW.id, NEW.state, NEW.attempt, NEW.tier, NEW.webhook_url);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_webhook_event AFTER UPDATE OF state ON jobs FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.state IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION jobcell_webhook_event();
