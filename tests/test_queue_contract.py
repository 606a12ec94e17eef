"""One contract, two Queue adapters: Postgres (the real one) and the in-memory one the unit tests stand on. If the
memory adapter drifted from Postgres, the dispatcher's unit tests would prove the wrong thing; these keep
both honest with the same assertions."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from dispatcher.errors import NotFound
from dispatcher.memory import MemoryQueue
from dispatcher.models import MIB, Exit, JobState, NewJob, Outcome
from dispatcher.ports import Completed, Finish
from job_image.contract import PageResult

from .conftest import sql


@dataclass
class Backend:
    queue: Any
    expire: Callable[[int], None]  # make a running job's lease expire now


@pytest.fixture(params=["postgres", "memory"])
def any_queue(request: pytest.FixtureRequest, table: Any) -> Iterator[Backend]:
    if request.param == "postgres":
        q, db_url = request.getfixturevalue("queue"), request.getfixturevalue("db_url")
        yield Backend(q, lambda job: sql(db_url, "UPDATE jobs SET lease_expires_at = now() - interval '1 s'"
                                                 " WHERE id = %s", job))
    else:
        m = MemoryQueue(table, lease_ttl_s=4.0)
        yield Backend(m, lambda job: m._set(job, lease_expires_at=m.now() - timedelta(seconds=1)))


def submit(q: Any, size_class: str = "small", key: str | None = None) -> int:
    job_id, _ = q.submit(NewJob("diag:", 0, key or f"k:{uuid.uuid4()}", size_class, workload="diag"))
    return int(job_id)


def finish(q: Any, owner: str, job: int, attempt: int, state: str = "succeeded", **kw: Any) -> bool:
    return bool(q.finish(owner, Finish(job, attempt, Outcome(kw.pop("outcome", "succeeded")), Exit(0), 1.0, state,
                                       "small", 0.0, None, **kw)))


def page(n: int) -> PageResult:
    return PageResult(job=0, attempt=0, page=n, dpi=200, width=1, height=1, text=f"p{n}", words=[], ocr_seconds=0)


def test_a_document_submitted_twice_is_one_job(any_queue):
    q = any_queue.queue
    first = q.submit(NewJob("diag:", 0, "same-bytes", "small", workload="diag"))
    assert first[1] is True and q.submit(NewJob("diag:", 0, "same-bytes", "small", workload="diag")) == (first[0],
                                                                                                         False)


def test_claims_respect_tier_slots_and_the_budget(any_queue):
    q = any_queue.queue
    for _ in range(5):
        submit(q, "small")  # 3 slots of 64 MiB
    submit(q, "large")  # 256 MiB
    claimed = q.claim("d", "p", 256 * MIB, 10)
    assert sorted(c.spec.tier for c in claimed) == ["small", "small", "small"]  # 192 MiB: no room for large
    assert q.claim("d", "p", 256 * MIB, 10) == []


def test_finishing_is_fenced_on_the_lease_owner(any_queue):
    q = any_queue.queue
    job = submit(q)
    q.claim("owner", "p", 4096 * MIB, 1)
    assert not finish(q, "someone-else", job, 1)
    assert q.get(job).state is JobState.RUNNING
    assert finish(q, "owner", job, 1, completed=Completed("application/pdf", 2))
    assert q.get(job).state is JobState.SUCCEEDED and not finish(q, "owner", job, 1)


def test_adoption_takes_only_our_own_or_an_expired_lease(any_queue):
    q = any_queue.queue
    job = submit(q)
    q.claim("first", "p", 4096 * MIB, 1)
    assert q.adopt("second", "p", job, 1) is None
    assert q.attempt_is_current(job, 1)
    any_queue.expire(job)
    adopted = q.adopt("second", "p", job, 1)
    assert adopted is not None and adopted.job.lease_owner == "second"
    assert q.attempts(job)[0].dispatcher == "second"
    assert q.heartbeat("first", [job]) == (set(), set()) and q.heartbeat("second", [job])[0] == {job}


def test_an_expired_lease_without_a_unit_is_reaped_as_lost(any_queue):
    q = any_queue.queue
    kept, lost = submit(q), submit(q)
    q.claim("gone", "p", 4096 * MIB, 2)
    any_queue.expire(kept)
    any_queue.expire(lost)
    assert q.reap("p", [kept]) == [lost]
    assert q.get(lost).state is JobState.QUEUED and q.attempts(lost)[0].outcome == "lost"
    assert q.get(kept).state is JobState.RUNNING


def test_cancel_ends_a_queued_job_and_flags_a_running_one(any_queue):
    q = any_queue.queue
    running, queued = submit(q), submit(q)
    assert [c.job.id for c in q.claim("d", "p", 4096 * MIB, 1)] == [running]  # oldest first
    assert q.cancel(queued) == "cancelled" and q.get(queued).state is JobState.CANCELLED
    assert q.cancel(running) == "running" and q.heartbeat("d", [running]) == ({running}, {running})


def test_pages_are_taken_only_from_the_running_attempt_and_once(any_queue):
    q = any_queue.queue
    job = submit(q)
    q.claim("d", "p", 4096 * MIB, 1)
    assert q.put_page(job, 1, page(1)) and q.put_page(job, 1, page(1))
    assert not q.put_page(job, 2, page(2))  # not its running attempt
    finish(q, "d", job, 1, state="queued", outcome="oom")
    assert not q.put_page(job, 1, page(2))  # the attempt has ended
    assert q.done_pages(job, 2) == [1] and q.done_pages(job, 1) == []


def test_a_paused_class_is_not_claimed_until_resumed_and_running_jobs_are_untouched(any_queue):
    q = any_queue.queue
    running = submit(q, "small")
    [c] = q.claim("d", "p", 4096 * MIB, 1)
    small, medium = submit(q, "small"), submit(q, "medium")
    p = q.pause("small", "maintenance")
    assert (p.scope, p.reason) == ("small", "maintenance") and q.pause("small").reason == "maintenance"
    assert [x.job.id for x in q.claim("d", "p", 4096 * MIB, 10)] == [medium]
    assert q.get(c.job.id).state is JobState.RUNNING and q.get(small).state is JobState.QUEUED
    q.pause("*")
    assert [p.scope for p in q.paused()] == ["*", "small"]
    assert q.resume("small") is True and q.resume("small") is False
    assert q.claim("d", "p", 4096 * MIB, 10) == []  # the whole queue is still paused
    assert q.resume("*") is True and q.paused() == []
    assert [x.job.id for x in q.claim("d", "p", 4096 * MIB, 10)] == [small]
    assert running == c.job.id


def test_only_a_known_class_or_the_whole_queue_can_be_paused(any_queue):
    with pytest.raises(NotFound, match="no class 'huge' to pause or resume; known: small, medium, large"):
        any_queue.queue.pause("huge")
    with pytest.raises(NotFound):
        any_queue.queue.resume("huge")
