-- Dispatcher liveness: each running dispatcher records itself on every heartbeat, so that `submit --wait` and
-- `status` can say when no dispatcher is there to run anything.
CREATE TABLE jobcell_dispatchers (
    id          text PRIMARY KEY,
    pool        text NOT NULL,
    runtime     text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);
