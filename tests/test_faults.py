"""Faults the audits found (issues 8 and 14), each against a real engine and Postgres: a cell created but never
started, names shared by two deployments on one engine, and a SIGKILL that no OOM signal explains."""

from __future__ import annotations

import time

import docker
import pytest
from docker.errors import APIError

from dispatcher.models import JobState
from dispatcher.ports import CellInput
from dispatcher.queue import PostgresQueue
from dispatcher.runtimes.docker import DockerOptions, DockerRuntime
from job_image.contract import Header

from .conftest import diag, pool_containers, sql, wait_final, wait_for


def outcomes(queue: PostgresQueue, job_id: int) -> list[tuple[str, str]]:
    return [(a.tier, a.outcome) for a in queue.attempts(job_id)]


def created_never_started(queue: PostgresQueue, client: docker.DockerClient, pool: str, db_url: str, image: str,
                          grace_s: float) -> tuple[int, DockerRuntime]:
    """A job whose dispatcher died between create and start: its container exists, never started, lease expired."""
    job = diag(queue)
    [claimed] = queue.claim("dead-dispatcher", pool, 4 * 1024**3, 1)
    rt = DockerRuntime(DockerOptions(image=image, pool=pool, queue_id=queue.queue_id(), start_grace_s=grace_s),
                       client=client)
    cfg = rt.container_config(claimed.spec)
    client.api.create_container(host_config=client.api.create_host_config(**cfg.pop("host_config")), **cfg)
    sql(db_url, "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", job)
    return job, rt


def test_a_cell_created_but_never_started_is_lost_and_retried(queue, start_dispatcher, docker_client, pool,
                                                               db_url, job_image):
    """A dispatcher killed between create and start: the next one must not wait on it forever."""
    job, rt = created_never_started(queue, docker_client, pool, db_url, job_image, grace_s=1)
    start_dispatcher(rt=rt)
    [j] = wait_final(queue, [job], timeout=60)
    assert j.state is JobState.SUCCEEDED, j.reason
    attempts = queue.attempts(job)
    assert [a.outcome for a in attempts] == ["lost", "succeeded"]
    assert "never started" in attempts[0].error
    wait_for(lambda: pool_containers(docker_client, pool) == [], timeout=30, what="its containers removed")


def test_cancel_of_a_cell_that_never_started_takes_effect(queue, start_dispatcher, docker_client, pool, db_url,
                                                         job_image):
    job, rt = created_never_started(queue, docker_client, pool, db_url, job_image, grace_s=3600)
    start_dispatcher(rt=rt)
    wait_for(lambda: queue.get(job).lease_owner not in (None, "dead-dispatcher"), what="adoption")
    queue.cancel(job)
    [j] = wait_final(queue, [job], timeout=30)
    assert j.state is JobState.CANCELLED
    wait_for(lambda: pool_containers(docker_client, pool) == [], timeout=30, what="its containers removed")


def test_two_deployments_on_one_engine_never_share_a_container(queue, docker_client, pool, job_image):
    """Job 1 attempt 1 exists in both queues: each gets its own container, and neither takes the other's."""
    mine = DockerRuntime(DockerOptions(image=job_image, pool=pool, queue_id=queue.queue_id()), client=docker_client)
    theirs = DockerRuntime(DockerOptions(image=job_image, pool=pool, queue_id="another-queue-0000"),
                           client=docker_client)
    job = diag(queue, sleep_s=30)
    [claimed] = queue.claim("me", pool, 4 * 1024**3, 1)
    header = Header(job_id=job, attempt=1, tier="small", memory_limit_bytes=claimed.spec.memory_limit_bytes,
                    workload="diag", params={"sleep_s": 30})
    a = mine.launch(claimed.spec, CellInput(header, "diag:"))
    b = theirs.launch(claimed.spec, CellInput(header, "diag:"))
    assert a.ref != b.ref and mine.container_name(claimed.spec) != theirs.container_name(claimed.spec)
    assert [h.ref for h in mine.owned()] == [a.ref] and [h.ref for h in theirs.owned()] == [b.ref]
    # a container under our attempt's name that another queue made is refused, never taken over
    docker_client.api.remove_container(a.ref, force=True)
    impostor = theirs.container_config(claimed.spec)
    impostor["name"] = mine.container_name(claimed.spec)
    docker_client.api.create_container(
        host_config=docker_client.api.create_host_config(**impostor.pop("host_config")), **impostor)
    with pytest.raises(APIError):
        mine.launch(claimed.spec, CellInput(header, "diag:"))


def test_a_sigkill_from_outside_is_lost_not_oom_and_retried_on_the_same_tier(queue, start_dispatcher,
                                                                             docker_client: docker.DockerClient,
                                                                             pool):
    job = diag(queue, alloc_mib=10, sleep_s=20)
    start_dispatcher()
    [c] = wait_for(lambda: pool_containers(docker_client, pool, running_only=True), what="a running cell")
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0].started_at, what="started")
    docker_client.api.kill(c["Id"])  # a human's `docker kill`, a node drain, an engine restart without live-restore
    wait_for(lambda: queue.attempts(job)[0].outcome, what="the first attempt's end")
    first = queue.attempts(job)[0]
    assert (first.outcome, first.exit_code, first.oom_killed) == ("lost", 137, False)
    assert first.peak_memory_bytes is None or first.peak_memory_bytes < first.memory_limit_bytes
    j = queue.get(job)
    assert j.tier == "small" and j.state in (JobState.QUEUED, JobState.RUNNING)  # retried on the same tier
    assert "(lost); will retry" in (j.reason or "") or j.state is JobState.RUNNING


def test_a_backlog_of_large_jobs_does_not_hide_a_small_one(queue, db_url):
    """200 large jobs queued first: the claim still sees (and starts) the small job behind them."""
    for _ in range(200):
        diag(queue, size_class="large")
    small = diag(queue, size_class="small")
    claimed = queue.claim("me", "p", 64 * 1024**3, 32)
    assert small in [c.job.id for c in claimed]
    assert sorted(c.spec.tier for c in claimed) == ["large", "small"]  # one large slot, and the small job


def test_a_large_job_that_waited_is_not_starved_by_a_stream_of_small_ones(db_url, table):
    """The budget holds one large job or a few small ones; small ones keep coming. Once the large one has
    waited reserve_after_s, no new small job may take the memory it needs."""
    q = PostgresQueue(db_url, table, lease_ttl_s=30, reserve_after_s=0.5)
    q.migrate()
    budget = 256 * 1024**2  # large: 256 MiB; small: 64 MiB (tests' classes)
    running = [diag(q, size_class="small") for _ in range(2)]
    assert len(q.claim("me", "p", budget, 2)) == 2
    large = diag(q, size_class="large")
    sql(db_url, "UPDATE jobs SET scheduled_at = now() - interval '10 seconds' WHERE id = %s", large)
    for _ in range(3):  # newcomers: each would fit in the room the two running ones leave
        diag(q, size_class="small")
    assert [c.job.id for c in q.claim("me", "p", budget, 8)] == []  # room for 2 small, but reserved
    for job_id in running:  # the running ones end
        sql(db_url, "UPDATE jobs SET state = 'succeeded', lease_owner = NULL, lease_expires_at = NULL,"
                    " finished_at = now() WHERE id = %s", job_id)
    assert [c.job.id for c in q.claim("me", "p", budget, 8)] == [large]
    q.close()


def test_a_dispatcher_that_lost_its_lease_leaves_the_unit_to_its_new_owner(queue, start_dispatcher, db_url, pool,
                                                                          docker_client):
    """The owner is cut off past its lease; another adopts the running unit. The first, back, must not kill it:
    the job succeeds on its first attempt, recorded by the adopter."""
    job = diag(queue, alloc_mib=10, sleep_s=6)
    first = start_dispatcher(owner="first")
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0].started_at, what="a started unit")
    first.d.heartbeat = lambda: None  # type: ignore[method-assign]  # "paused": it renews nothing
    sql(db_url, "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", job)
    start_dispatcher(owner="second")
    wait_for(lambda: queue.get(job).lease_owner == "second", what="adoption by the second dispatcher")
    del first.d.heartbeat  # "resumed": it finds its lease gone
    [j] = wait_final(queue, [job], timeout=60)
    [attempt] = queue.attempts(job)
    assert j.state is JobState.SUCCEEDED and (attempt.outcome, attempt.dispatcher) == ("succeeded", "second")


def test_a_class_renamed_while_its_job_runs_is_adopted_not_a_crash(queue, start_dispatcher, pool):
    from dispatcher.classes import load_table

    from .conftest import TEST_CLASSES

    job = diag(queue, sleep_s=4)
    first = start_dispatcher(owner="first")
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0].started_at, what="a started unit")
    first.stop()  # leaves the unit, releases the lease
    renamed = load_table([dict(c, name="tiny") if c["name"] == "small" else c for c in TEST_CLASSES])
    start_dispatcher(owner="second", classes=renamed)
    [j] = wait_final(queue, [job], timeout=60)
    assert j.state is JobState.SUCCEEDED and [a.outcome for a in queue.attempts(job)] == ["succeeded"]


def test_an_adopted_attempt_lasts_as_long_as_its_unit_ran(queue, start_dispatcher, pool):
    """Not as long as the dispatcher was away: the runtime's own start and finish times."""
    job = diag(queue, sleep_s=2)
    first = start_dispatcher(owner="first")
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0].started_at, what="a started unit")
    first.stop()


    time.sleep(8)  # the unit ends while no dispatcher watches
    start_dispatcher(owner="second")
    wait_final(queue, [job], timeout=60)
    [attempt] = queue.attempts(job)
    assert attempt.outcome == "succeeded" and 1.5 < attempt.duration_s < 6, attempt.duration_s
