-- What a running attempt holds now, as its runtime last measured it (heartbeats write it): the live memory
-- operators watch in `jobcell status` and the dashboard. Its peak stays in peak_memory_bytes, at its end.
ALTER TABLE job_attempts ADD COLUMN memory_now bigint;
ALTER TABLE job_attempts ADD COLUMN memory_seen_at timestamptz;
