-- This queue's identity: job containers carry it as a label, so that two deployments that share a Docker
-- engine and a pool name never adopt or remove each other's containers (their job ids collide).
CREATE TABLE jobcell_meta (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO jobcell_meta (key, value) VALUES ('queue_id', gen_random_uuid()::text);

-- jobs: one row per document; job_attempts: one row per attempt. (job_id, attempt) is the attempt's
-- identity: its primary key is what makes two dispatchers unable to run the same attempt twice.
CREATE TABLE jobs (
    id                 bigserial PRIMARY KEY,
    unique_key         text UNIQUE,
    document_uri       text NOT NULL,
    source             text,  -- what the user submitted (a path or URI), for display
    document_bytes     bigint NOT NULL CHECK (document_bytes >= 0),
    workload           text NOT NULL DEFAULT 'ocr',
    params             jsonb NOT NULL DEFAULT '{}'::jsonb,
    size_class         text NOT NULL,
    tier               text NOT NULL,
    state              text NOT NULL DEFAULT 'queued'
                       CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority           integer NOT NULL DEFAULT 0,
    attempt            integer NOT NULL DEFAULT 0,
    max_attempts       integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    scheduled_at       timestamptz NOT NULL DEFAULT now(),
    lease_owner        text,
    lease_expires_at   timestamptz,
    pool               text,
    memory_limit_bytes bigint,
    cancel_requested   boolean NOT NULL DEFAULT false,
    reason             text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    CHECK ((state = 'running') = (lease_owner IS NOT NULL))
);

CREATE INDEX jobs_claimable ON jobs (priority DESC, scheduled_at, id) WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs (pool, lease_expires_at) WHERE state = 'running';

CREATE TABLE job_attempts (
    job_id             bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt            integer NOT NULL,
    dispatcher         text NOT NULL,
    pool               text NOT NULL,
    runtime            text,
    handle             text,
    tier               text NOT NULL,
    memory_limit_bytes bigint NOT NULL,
    claimed_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    outcome            text CHECK (outcome IN ('succeeded', 'oom', 'bad_input', 'timeout', 'error', 'lost',
                                               'cancelled')),
    exit_code          integer,
    oom_killed         boolean,
    peak_memory_bytes  bigint,
    duration_s         double precision,
    kill_reason        text CHECK (kill_reason IN ('deadline', 'cancel', 'orphan')),
    error              text,
    log_tail           text,
    PRIMARY KEY (job_id, attempt)
);

-- Wake dispatchers on new work without polling; the payload is only a hint.
CREATE FUNCTION jobcell_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobcell_jobs', NEW.id::text);
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION jobcell_notify_job();
CREATE TRIGGER jobs_notify_cancel AFTER UPDATE OF cancel_requested ON jobs
    FOR EACH ROW WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested) EXECUTE FUNCTION jobcell_notify_job();
