-- Results written by the job image, one row per page as soon as it is done: a retried job skips the pages
-- already here (checkpoint), and the upsert keeps every page exactly once.
CREATE TABLE document_pages (
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    page        integer NOT NULL CHECK (page >= 1),
    attempt     integer NOT NULL,
    dpi         integer NOT NULL,
    width       integer NOT NULL,
    height      integer NOT NULL,
    text        text NOT NULL,
    words       jsonb NOT NULL,
    mean_confidence double precision,
    ocr_seconds double precision NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, page)
);

CREATE TABLE document_results (
    job_id      bigint PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    media_type  text NOT NULL,
    page_count  integer NOT NULL,
    completed_at timestamptz NOT NULL DEFAULT now()
);

-- The optional LLM pass: 'done' with the manifest, or 'skipped' when no API key was configured.
CREATE TABLE document_manifests (
    job_id      bigint PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    status      text NOT NULL CHECK (status IN ('done', 'skipped')),
    model       text,
    manifest    jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
