-- A cell estimates the memory it needs once it has validated its document (contract.Need). An estimate above its
-- cap ends the attempt at once as 'needs_more' and the job moves to a tier that holds it, with no OOM on the way;
-- estimates kept beside peaks let `jobcell classes --recommend` judge them.
ALTER TABLE job_attempts ADD COLUMN need_bytes bigint;
ALTER TABLE job_attempts DROP CONSTRAINT job_attempts_outcome_check;
ALTER TABLE job_attempts ADD CONSTRAINT job_attempts_outcome_check
    CHECK (outcome IN ('succeeded', 'oom', 'needs_more', 'bad_input', 'timeout', 'error', 'lost', 'cancelled'));
