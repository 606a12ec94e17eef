-- Sealed cells: cells no longer write to the database. The dispatcher stores what they emit, checked, and
-- records a refused cell's kill; the LLM manifest runs on the trusted side, after the document succeeded.
ALTER TABLE job_attempts DROP CONSTRAINT job_attempts_kill_reason_check;
ALTER TABLE job_attempts ADD CONSTRAINT job_attempts_kill_reason_check
    CHECK (kill_reason IN ('deadline', 'cancel', 'orphan', 'refused'));

-- Progress: the page count the running attempt declared (pages stored of this).
ALTER TABLE jobs ADD COLUMN pages_total integer CHECK (pages_total >= 0);

ALTER TABLE document_manifests DROP CONSTRAINT document_manifests_status_check;
ALTER TABLE document_manifests ADD CONSTRAINT document_manifests_status_check
    CHECK (status IN ('pending', 'done', 'skipped', 'failed'));
ALTER TABLE document_manifests ADD COLUMN tries integer NOT NULL DEFAULT 0;
ALTER TABLE document_manifests ADD COLUMN next_try_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE document_manifests ADD COLUMN error text;
CREATE INDEX document_manifests_pending ON document_manifests (next_try_at) WHERE status = 'pending';
