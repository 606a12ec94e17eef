-- Operators pause a whole queue ('*') or one tier: no new attempt of a paused tier is claimed; running ones
-- go on, and queued ones wait. A row per paused scope, so pausing twice is harmless and resume is a DELETE.
CREATE TABLE paused (
    scope text PRIMARY KEY,  -- '*' (every tier) or a class name
    paused_at timestamptz NOT NULL DEFAULT now(),
    reason text
);
