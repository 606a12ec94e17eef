"""One behaviour suite for every runtime: succeeded, oom (with escalation), bad_input, error, timeout, cancelled
and adoption after a dispatcher restart mean the same thing on each. Real units hit real memory limits: Docker
containers, and capped subprocesses of this host."""

from __future__ import annotations

from dispatcher.classes import load_table
from dispatcher.models import MIB, JobState
from dispatcher.queue import PostgresQueue

from .conftest import TEST_CLASSES, diag, sql, wait_final, wait_for, wait_removed

# Render's API exposes neither a job's logs nor its memory: no reason line and no peak to read there.
SEES_LOGS = {"docker", "process", "kubernetes", "memory"}


def outcomes(queue: PostgresQueue, job_id: int) -> list[tuple[str, str, int | None]]:
    return [(a.tier, a.outcome, a.exit_code) for a in queue.attempts(job_id)]


def test_success_records_the_peak(queue, start_dispatcher, any_runtime):
    job = diag(queue, alloc_mib=20)
    start_dispatcher(rt=any_runtime)
    [j] = wait_final(queue, [job])
    assert j.state is JobState.SUCCEEDED
    [a] = queue.attempts(job)
    assert (a.outcome, a.exit_code, a.runtime) == ("succeeded", 0, any_runtime.name)
    if any_runtime.name in SEES_LOGS:
        assert 20 * MIB < a.peak_memory_bytes <= 64 * MIB
    wait_removed(any_runtime)


def test_oom_on_small_is_retried_on_medium_and_succeeds(queue, start_dispatcher, any_runtime):
    job = diag(queue, alloc_mib=100, sleep_s=0.2)
    start_dispatcher(rt=any_runtime)
    [j] = wait_final(queue, [job])
    assert j.state is JobState.SUCCEEDED, j.reason
    attempts = queue.attempts(job)
    assert [(a.tier, a.outcome) for a in attempts] == [("small", "oom"), ("medium", "succeeded")]
    assert attempts[0].oom_killed is True
    assert attempts[0].memory_limit_bytes == 64 * MIB
    assert attempts[0].peak_memory_bytes >= 64 * MIB
    # the successful attempt reports its own peak: above what it allocated, within its cap
    if any_runtime.name in SEES_LOGS:
        assert 100 * MIB < attempts[1].peak_memory_bytes <= 160 * MIB


def test_a_cell_that_needs_more_moves_to_the_tier_that_holds_it_with_no_oom(queue, start_dispatcher, any_runtime):
    job = diag(queue, need_mib=200, alloc_mib=120)  # medium (160 MiB) would not hold it: straight to large
    start_dispatcher(rt=any_runtime)
    [j] = wait_final(queue, [job])
    assert j.state is JobState.SUCCEEDED, j.reason
    attempts = queue.attempts(job)
    assert [(a.tier, a.outcome, a.exit_code) for a in attempts] == [("small", "needs_more", 87),
                                                                    ("large", "succeeded", 0)]
    assert attempts[0].oom_killed is False and attempts[0].need_bytes == 200 * MIB


def test_oom_on_the_top_tier_fails_with_the_limit_in_the_reason(queue, start_dispatcher, any_runtime):
    job = diag(queue, alloc_mib=400)
    start_dispatcher(rt=any_runtime)
    [j] = wait_final(queue, [job])
    assert j.state is JobState.FAILED
    assert "needs more than 256 MiB" in (j.reason or "")
    assert [(t, o) for t, o, _ in outcomes(queue, job)] == [("small", "oom"), ("medium", "oom"), ("large", "oom")]


def test_bad_input_fails_after_one_attempt_with_the_jobs_reason(queue, start_dispatcher, any_runtime):
    job = diag(queue, exit_code=65, message="page 3 is not a valid JPEG stream")
    start_dispatcher(rt=any_runtime)
    [j] = wait_final(queue, [job])
    assert j.state is JobState.FAILED
    if any_runtime.name in SEES_LOGS:
        assert j.reason == "page 3 is not a valid JPEG stream"
    assert outcomes(queue, job) == [("small", "bad_input", 65)]


def test_tempfail_is_retried_on_the_same_tier_until_max_attempts(queue, start_dispatcher, any_runtime):
    job = diag(queue, exit_code=75, message="object store unreachable", max_attempts=3)
    start_dispatcher(rt=any_runtime)
    [j] = wait_final(queue, [job])
    assert j.state is JobState.FAILED
    assert outcomes(queue, job) == [("small", "error", 75)] * 3
    assert "gave up after 3 attempts" in (j.reason or "")


def test_other_exit_codes_are_retried_and_may_then_succeed(queue, start_dispatcher, db_url, any_runtime):
    # attempt 1 exits 3; while it waits out its backoff the cause goes away, and attempt 2 succeeds
    job = diag(queue, exit_code=3, max_attempts=2)
    d = start_dispatcher(rt=any_runtime)
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0].outcome, what="first attempt")
    d.stop()
    sql(db_url, "UPDATE jobs SET params = '{}'::jsonb WHERE id = %s", job)
    start_dispatcher(rt=any_runtime)
    [j] = wait_final(queue, [job])
    assert outcomes(queue, job) == [("small", "error", 3), ("small", "succeeded", 0)]
    assert j.state is JobState.SUCCEEDED


def test_a_job_past_its_deadline_is_killed_as_timeout(queue, start_dispatcher, any_runtime):
    short = load_table([dict(c, timeout_s=2) if c["name"] == "small" else c for c in TEST_CLASSES])
    job = diag(queue, sleep_s=60)
    start_dispatcher(classes=short, rt=any_runtime)
    [j] = wait_final(queue, [job], timeout=60)
    assert j.state is JobState.FAILED
    [(tier, outcome, code)] = outcomes(queue, job)
    assert (tier, outcome) == ("small", "timeout") and code in (137, None)  # None: the Job itself was deleted
    # killed by the dispatcher at the deadline, or (Kubernetes) by activeDeadlineSeconds, whichever came first
    assert queue.attempts(job)[0].kill_reason in ("deadline", None)
    wait_removed(any_runtime)


def test_cancel_kills_a_running_job_within_seconds(queue, start_dispatcher, any_runtime):
    job = diag(queue, sleep_s=120)
    start_dispatcher(rt=any_runtime)
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0].started_at, what="a started unit")
    assert queue.cancel(job) == "running"
    [j] = wait_final(queue, [job], timeout=15)
    assert j.state is JobState.CANCELLED
    assert outcomes(queue, job)[0][1] == "cancelled"
    wait_removed(any_runtime)


def test_a_restarted_dispatcher_adopts_running_units(queue, start_dispatcher, any_runtime):
    ids = [diag(queue, sleep_s=4) for _ in range(2)]
    first = start_dispatcher(rt=any_runtime, owner="first")
    wait_for(lambda: all(a and a[0].started_at for a in map(queue.attempts, ids)), what="started units")
    first.stop()  # no drain: the units keep running and the leases are released
    assert len(any_runtime.owned()) == 2
    start_dispatcher(rt=any_runtime, owner="second")
    jobs = wait_final(queue, ids, timeout=60)
    assert [(j.state, j.attempt) for j in jobs] == [(JobState.SUCCEEDED, 1)] * 2
    wait_removed(any_runtime)


def test_cancel_of_a_queued_job_never_starts_it(queue):
    job = diag(queue, sleep_s=120)
    assert queue.cancel(job) == "cancelled"
    assert queue.get(job).state is JobState.CANCELLED
    assert queue.claim("d", "p", 4096 * MIB, 10) == []
