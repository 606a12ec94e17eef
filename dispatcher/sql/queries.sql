-- Named queries, loaded by dispatcher/sql/__init__.py. Every value is a bound parameter.

-- name: submit
INSERT INTO jobs (unique_key, document_uri, source, document_bytes, workload, params, size_class, tier, priority,
                  max_attempts, metadata, webhook_url)
VALUES (%(unique_key)s, %(document_uri)s, %(source)s, %(document_bytes)s, %(workload)s, %(params)s, %(size_class)s,
        %(size_class)s, %(priority)s, %(max_attempts)s, %(metadata)s, %(webhook_url)s)
ON CONFLICT (unique_key) DO NOTHING
RETURNING id;

-- name: id_by_unique_key
SELECT id FROM jobs WHERE unique_key = %(unique_key)s;

-- name: lock_pool
-- Serialises admission within one pool, so that concurrent dispatchers cannot both spend the same budget.
SELECT pg_advisory_xact_lock(hashtext('jobcell-pool:' || %(pool)s));

-- name: running_in_pool
SELECT id, tier, memory_limit_bytes FROM jobs WHERE state = 'running' AND pool = %(pool)s;

-- name: claimable
-- Up to per_tier candidates of each tier: a backlog of one class never hides another's jobs.
SELECT *, extract(epoch FROM now() - scheduled_at) AS waited_s FROM jobs
WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY tier ORDER BY priority DESC, scheduled_at, id) AS n
        FROM jobs WHERE state = 'queued' AND scheduled_at <= now() AND NOT cancel_requested
          AND NOT EXISTS (SELECT 1 FROM paused p WHERE p.scope IN ('*', jobs.tier))) ranked
    WHERE n <= %(per_tier)s)
ORDER BY priority DESC, scheduled_at, id
FOR UPDATE SKIP LOCKED;

-- name: take
UPDATE jobs
SET state = 'running', attempt = attempt + 1, lease_owner = %(owner)s,
    lease_expires_at = now() + make_interval(secs => %(ttl)s), pool = %(pool)s,
    memory_limit_bytes = %(memory_limit_bytes)s, updated_at = now()
WHERE id = %(id)s AND state = 'queued'
RETURNING *;

-- name: insert_attempt
INSERT INTO job_attempts (job_id, attempt, dispatcher, pool, tier, memory_limit_bytes)
VALUES (%(job_id)s, %(attempt)s, %(dispatcher)s, %(pool)s, %(tier)s, %(memory_limit_bytes)s);

-- name: started
UPDATE job_attempts SET runtime = %(runtime)s, handle = %(handle)s, started_at = now()
WHERE job_id = %(job_id)s AND attempt = %(attempt)s;

-- name: heartbeat
UPDATE jobs SET lease_expires_at = now() + make_interval(secs => %(ttl)s)
WHERE lease_owner = %(owner)s AND state = 'running' AND id = ANY(%(ids)s)
RETURNING id, cancel_requested;

-- name: mark_killing
UPDATE job_attempts SET kill_reason = %(reason)s
WHERE job_id = %(job_id)s AND attempt = %(attempt)s AND kill_reason IS NULL;

-- name: kill_reason
SELECT kill_reason FROM job_attempts WHERE job_id = %(job_id)s AND attempt = %(attempt)s;

-- name: finish_job
-- Fenced: only the holder of this attempt's lease may finish it.
UPDATE jobs
SET state = %(state)s, tier = %(tier)s, reason = %(reason)s, lease_owner = NULL, lease_expires_at = NULL,
    pool = NULL, memory_limit_bytes = NULL, updated_at = now(),
    scheduled_at = CASE WHEN %(state)s = 'queued' THEN now() + make_interval(secs => %(delay_s)s)
                        ELSE scheduled_at END,
    finished_at = CASE WHEN %(state)s IN ('succeeded', 'failed', 'cancelled') THEN now() END
WHERE id = %(job_id)s AND attempt = %(attempt)s AND lease_owner = %(owner)s AND state = 'running'
RETURNING id;

-- name: finish_attempt
UPDATE job_attempts
SET finished_at = now(), outcome = %(outcome)s, exit_code = %(exit_code)s, oom_killed = %(oom_killed)s,
    peak_memory_bytes = %(peak_memory_bytes)s, duration_s = %(duration_s)s, error = %(error)s,
    log_tail = %(log_tail)s, need_bytes = %(need_bytes)s
WHERE job_id = %(job_id)s AND attempt = %(attempt)s AND outcome IS NULL;

-- name: adopt
UPDATE jobs
SET lease_owner = %(owner)s, lease_expires_at = now() + make_interval(secs => %(ttl)s), updated_at = now()
WHERE id = %(job_id)s AND attempt = %(attempt)s AND state = 'running' AND pool = %(pool)s
  AND (lease_owner = %(owner)s OR lease_expires_at < now())
RETURNING *;

-- name: adopted
UPDATE job_attempts SET dispatcher = %(owner)s WHERE job_id = %(job_id)s AND attempt = %(attempt)s;

-- name: attempt_is_current
SELECT 1 FROM jobs WHERE id = %(job_id)s AND attempt = %(attempt)s AND state = 'running';

-- name: reap
-- One guarded UPDATE: only leases still expired at the moment it runs are taken back.
UPDATE jobs
SET state = CASE WHEN cancel_requested THEN 'cancelled'
                 WHEN attempt >= max_attempts THEN 'failed' ELSE 'queued' END,
    reason = CASE WHEN cancel_requested THEN 'cancelled by request'
                  WHEN attempt >= max_attempts
                  THEN 'its dispatcher vanished (lost); gave up after ' || attempt || ' attempts'
                  ELSE 'its dispatcher vanished (lost); will retry' END,
    finished_at = CASE WHEN cancel_requested OR attempt >= max_attempts THEN now() END,
    lease_owner = NULL, lease_expires_at = NULL, pool = NULL, memory_limit_bytes = NULL,
    scheduled_at = now(), updated_at = now()
WHERE state = 'running' AND pool = %(pool)s AND lease_expires_at < now() AND NOT (id = ANY(%(keep)s))
RETURNING id, attempt;

-- name: lose_attempts
UPDATE job_attempts SET outcome = 'lost', finished_at = now(), error = 'lease expired with no unit left'
WHERE (job_id, attempt) IN (SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[])) AND outcome IS NULL;

-- name: release
UPDATE jobs SET lease_expires_at = now() WHERE lease_owner = %(owner)s AND state = 'running';

-- name: cancel
UPDATE jobs
SET cancel_requested = true, updated_at = now(),
    state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
    reason = CASE WHEN state = 'queued' THEN 'cancelled by request' ELSE reason END,
    finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END
WHERE id = %(job_id)s
RETURNING state;

-- name: get
SELECT * FROM jobs WHERE id = %(job_id)s;

-- name: jobs_by_ids
SELECT * FROM jobs WHERE id = ANY(%(ids)s) ORDER BY id;

-- name: attempts
SELECT * FROM job_attempts WHERE job_id = %(job_id)s ORDER BY attempt;

-- name: counts
SELECT state, size_class, count(*) AS n FROM jobs GROUP BY state, size_class ORDER BY state, size_class;

-- name: job_metrics
-- Read at every /metrics scrape: jobs by state and class, and the memory limits the pool's running jobs hold.
SELECT state, size_class, count(*) AS n,
       coalesce(sum(memory_limit_bytes) FILTER (WHERE state = %(running)s AND pool = %(pool)s), 0) AS pool_bytes
FROM jobs GROUP BY state, size_class;

-- name: running_jobs
SELECT j.id, j.tier, j.memory_limit_bytes, j.pool, j.lease_owner, j.attempt, a.started_at, j.document_uri,
       j.pages_total, (SELECT count(*) FROM document_pages p WHERE p.job_id = j.id) AS pages_stored,
       a.memory_now, a.memory_seen_at
FROM jobs j JOIN job_attempts a ON a.job_id = j.id AND a.attempt = j.attempt
WHERE j.state = 'running' ORDER BY j.id;

-- name: summary
SELECT j.id, coalesce(j.source, j.document_uri) AS source, j.state, j.tier, j.attempt, j.reason, r.page_count,
       (SELECT a.peak_memory_bytes FROM job_attempts a WHERE a.job_id = j.id AND a.attempt = j.attempt) AS peak,
       (SELECT sum(a.duration_s) FROM job_attempts a WHERE a.job_id = j.id) AS duration_s,
       (SELECT string_agg(a.tier || ' ' || coalesce(a.outcome, 'running'), ' -> ' ORDER BY a.attempt)
        FROM job_attempts a WHERE a.job_id = j.id) AS path
FROM jobs j LEFT JOIN document_results r ON r.job_id = j.id
WHERE j.id = ANY(%(ids)s)
ORDER BY j.id;

-- name: pages
SELECT page, attempt, dpi, width, height, text, words, mean_confidence, ocr_seconds
FROM document_pages WHERE job_id = %(job_id)s ORDER BY page;

-- name: result
SELECT r.media_type, r.page_count, r.completed_at, m.status AS manifest_status, m.model, m.manifest
FROM jobs j
LEFT JOIN document_results r ON r.job_id = j.id
LEFT JOIN document_manifests m ON m.job_id = j.id
WHERE j.id = %(job_id)s;

-- name: queue_id
SELECT value FROM jobcell_meta WHERE key = 'queue_id';

-- name: now
SELECT now();

-- name: done_pages
SELECT page FROM document_pages WHERE job_id = %(job_id)s AND attempt < %(before_attempt)s ORDER BY page;

-- name: put_page
-- Accepted only while (job, attempt) is the job's running attempt; a page already stored stays as it is.
WITH current AS (
    SELECT id FROM jobs WHERE id = %(job_id)s AND attempt = %(attempt)s AND state = 'running'
), stored AS (
    INSERT INTO document_pages (job_id, page, attempt, dpi, width, height, text, words, mean_confidence,
                                ocr_seconds)
    SELECT id, %(page)s, %(attempt)s, %(dpi)s, %(width)s, %(height)s, %(text)s, %(words)s, %(mean_confidence)s,
           %(ocr_seconds)s
    FROM current
    ON CONFLICT (job_id, page) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM current) AS current;

-- name: declare_pages
UPDATE jobs SET pages_total = %(pages)s
WHERE id = %(job_id)s AND attempt = %(attempt)s AND state = 'running';

-- name: complete
INSERT INTO document_results (job_id, media_type, page_count) VALUES (%(job_id)s, %(media_type)s, %(page_count)s)
ON CONFLICT (job_id) DO UPDATE SET media_type = EXCLUDED.media_type, page_count = EXCLUDED.page_count;

-- name: manifest_due
INSERT INTO document_manifests (job_id, status) VALUES (%(job_id)s, %(status)s)
ON CONFLICT (job_id) DO NOTHING;

-- name: pending_manifests
-- Taken by pushing their next try out, in one statement: no two workers summarise the same document.
UPDATE document_manifests SET next_try_at = now() + make_interval(secs => %(hold_s)s)
WHERE job_id IN (SELECT job_id FROM document_manifests WHERE status = 'pending' AND next_try_at <= now()
                 ORDER BY next_try_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING job_id, tries;

-- name: page_texts
SELECT page, text FROM document_pages WHERE job_id = %(job_id)s ORDER BY page;

-- name: put_manifest
UPDATE document_manifests
SET status = %(status)s, model = %(model)s, manifest = %(manifest)s, error = %(error)s, tries = tries + 1,
    next_try_at = now() + make_interval(secs => %(delay_s)s)
WHERE job_id = %(job_id)s;

-- name: pause
INSERT INTO paused (scope, reason) VALUES (%(scope)s, %(reason)s)
ON CONFLICT (scope) DO UPDATE SET reason = coalesce(EXCLUDED.reason, paused.reason)
RETURNING scope, paused_at, reason;

-- name: resume
DELETE FROM paused WHERE scope = %(scope)s RETURNING scope;

-- name: paused
SELECT scope, paused_at, reason FROM paused ORDER BY scope;

-- name: progress
SELECT j.id, j.pages_total, (SELECT count(*) FROM document_pages p WHERE p.job_id = j.id) AS pages_stored
FROM jobs j WHERE j.id = ANY(%(ids)s);

-- name: retry
-- A failed or cancelled job runs again, keeping its attempts: it gets as many more as it had.
UPDATE jobs
SET state = 'queued', reason = NULL, finished_at = NULL, cancel_requested = false, scheduled_at = now(),
    max_attempts = attempt + %(more)s, updated_at = now()
WHERE id = %(job_id)s AND state IN ('failed', 'cancelled')
RETURNING *;

-- name: prunable
-- Finished jobs older than the cutoff: never one that is queued or running, whatever its age.
SELECT j.id, j.document_uri, (SELECT count(*) FROM document_pages p WHERE p.job_id = j.id) AS pages,
       (SELECT count(*) FROM job_attempts a WHERE a.job_id = j.id) AS attempts
FROM jobs j
WHERE j.state IN ('succeeded', 'failed', 'cancelled') AND j.finished_at < now() - make_interval(secs => %(age_s)s)
ORDER BY j.id;

-- name: prune
-- Attempts, pages, results and manifests go with their job (ON DELETE CASCADE).
DELETE FROM jobs
WHERE id = ANY(%(ids)s) AND state IN ('succeeded', 'failed', 'cancelled')
  AND finished_at < now() - make_interval(secs => %(age_s)s)
RETURNING id, document_uri;

-- name: documents_in_use
SELECT DISTINCT document_uri FROM jobs WHERE document_uri = ANY(%(uris)s);

-- name: alive
INSERT INTO jobcell_dispatchers (id, pool, runtime) VALUES (%(owner)s, %(pool)s, %(runtime)s)
ON CONFLICT (id) DO UPDATE SET seen_at = now(), pool = EXCLUDED.pool, runtime = EXCLUDED.runtime;

-- name: dispatchers
SELECT id, pool, runtime, started_at, seen_at, extract(epoch FROM now() - seen_at) AS silent_s
FROM jobcell_dispatchers ORDER BY seen_at DESC;

-- name: list_jobs
-- Newest first; each filter applies only when given (NULL: any).
SELECT * FROM jobs
WHERE (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(size_class)s::text IS NULL OR size_class = %(size_class)s::text)
  AND (%(since_s)s::float8 IS NULL OR created_at >= now() - make_interval(secs => %(since_s)s::float8))
ORDER BY id DESC
LIMIT %(limit)s;

-- name: budget_history
-- The dashboard's memory-over-time chart: every attempt that held memory in the last window_s seconds, with its
-- pool, its limit and the span it held it (from its claim, when admission spends the budget, to its end).
SELECT pool, memory_limit_bytes, claimed_at, finished_at FROM job_attempts
WHERE finished_at IS NULL OR finished_at >= now() - make_interval(secs => %(window_s)s)
ORDER BY claimed_at
LIMIT %(limit)s;

-- name: recent_timings
-- The dashboard's wait-and-run chart: the latest jobs that have had an attempt, with the seconds their attempts
-- ran (a running one: so far) and the seconds since submit (to the end, or now).
SELECT j.id, j.state, j.size_class,
       sum(coalesce(a.duration_s, extract(epoch FROM now() - coalesce(a.started_at, a.claimed_at))))::float8 AS run_s,
       extract(epoch FROM coalesce(j.finished_at, now()) - j.created_at)::float8 AS total_s
FROM jobs j JOIN job_attempts a ON a.job_id = j.id
GROUP BY j.id
ORDER BY j.id DESC
LIMIT %(limit)s;

-- name: observe_memory
UPDATE job_attempts a SET memory_now = m.used, memory_seen_at = now()
FROM unnest(%(jobs)s::bigint[], %(attempts)s::int[], %(used)s::bigint[]) AS m(job_id, attempt, used)
WHERE a.job_id = m.job_id AND a.attempt = m.attempt AND a.outcome IS NULL;

-- webhooks (dispatcher/webhooks.py) ----------------------------------------------------------------------------

-- name: webhooks_claim
-- Due events, claimed for lease_s (at least once: a deliverer that dies mid-way leaves them due again then).
UPDATE webhook_outbox o SET next_at = now() + make_interval(secs => %(lease_s)s), tries = o.tries + 1
FROM jobs j
WHERE o.id IN (SELECT id FROM webhook_outbox WHERE next_at <= now() ORDER BY next_at, id LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED)
  AND j.id = o.job_id
RETURNING o.id, o.event_id, o.job_id, o.state, o.attempt, o.tier, o.url, o.created_at, o.tries, j.size_class,
          j.reason, j.metadata, j.created_at AS submitted_at, j.finished_at,
          (SELECT count(*) FROM document_pages p WHERE p.job_id = o.job_id) AS pages;

-- name: webhook_delivered
DELETE FROM webhook_outbox WHERE id = %(id)s;

-- name: webhook_failed
UPDATE webhook_outbox SET next_at = now() + make_interval(secs => %(delay_s)s), last_error = %(error)s
WHERE id = %(id)s;


-- name: peak_samples
-- `jobcell classes --recommend`: every attempt that ran to its own end in the window, with the memory it was
-- given, what it peaked at and what its cell estimated it needs.
SELECT a.tier, a.outcome, a.memory_limit_bytes, a.peak_memory_bytes, a.need_bytes
FROM job_attempts a
WHERE a.finished_at > now() - make_interval(secs => %(window_s)s)
  AND a.outcome IN ('succeeded', 'oom', 'needs_more')
ORDER BY a.finished_at
LIMIT %(limit)s;
