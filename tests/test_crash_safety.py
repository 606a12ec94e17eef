"""Crash safety and sharing: kill -9 and restart, two dispatchers on one queue, the memory budget under load."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from dispatcher.models import MIB, JobState
from dispatcher.runtimes.docker import LABEL_JOB, LABEL_POOL, LABEL_TIER

from .conftest import ROOT, TEST_CLASSES, classes_json, diag, pool_containers, sql, wait_final, wait_for


class StartEvents:
    """Counts container 'start' events per job from the engine itself, independent of what jobcell records."""

    def __init__(self, client: docker.DockerClient, pool: str) -> None:
        self.starts: collections.Counter[int] = collections.Counter()
        self._stream = client.events(decode=True, filters={"type": "container", "event": "start",
                                                           "label": f"{LABEL_POOL}={pool}"})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._stream:
                self.starts[int(ev["Actor"]["Attributes"][LABEL_JOB])] += 1
        except Exception:
            pass  # closed at the end of the test

    def close(self) -> None:
        self._stream.close()


@pytest.fixture
def start_events(docker_client, pool) -> Iterator[StartEvents]:
    ev = StartEvents(docker_client, pool)
    yield ev
    ev.close()


def dispatcher_process(db_url: str, pool: str, tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, JOBCELL_DATABASE_URL=db_url, JOBCELL_CLASSES=classes_json(), JOBCELL_POOL=pool,
               JOBCELL_LEASE_TTL_S="3", JOBCELL_POLL_INTERVAL_S="0.2",
               JOBCELL_MEMORY_BUDGET="4GiB", JOBCELL_STORE_DIR=str(tmp_path / "store"),
               JOBCELL_DISPATCHER_ID=name, JOBCELL_BACKOFF_EXPONENT="0",
               JOBCELL_CPU_BUDGET="off")  # diagnostic cells only sleep: their tier's slots alone bound them
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "run", *args], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)


def run_until_final(queue, ids, db_url, pool, tmp_path, name, timeout=90):
    """A dispatcher process that runs until every job ended, then gets SIGTERM."""
    proc = dispatcher_process(db_url, pool, tmp_path, name)
    try:
        return wait_final(queue, ids, timeout=timeout)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def running_containers(client: docker.DockerClient, pool: str) -> list[dict[str, Any]]:
    return pool_containers(client, pool, running_only=True)


def test_kill_9_and_restart_ends_every_job_exactly_once(queue, db_url, pool, tmp_path, docker_client,
                                                        start_events, job_image):
    ids = [diag(queue, sleep_s=s) for s in (1.5, 8, 8, 2)]  # 3 small slots: the 4th waits in the queue
    first = dispatcher_process(db_url, pool, tmp_path, "first")
    try:
        wait_for(lambda: len(running_containers(docker_client, pool)) == 3, 30, "3 running containers")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(4)  # the leases (3 s) expire; the 1.5 s job's container exits while no dispatcher watches
        assert len(running_containers(docker_client, pool)) == 2, "containers must outlive their dispatcher"
        jobs = run_until_final(queue, ids, db_url, pool, tmp_path, "second")
    finally:
        if first.poll() is None:
            first.kill()
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 4
    assert [j.attempt for j in jobs] == [1, 1, 1, 1], "no job may be relaunched while its container runs"
    for j in ids:
        assert [a.outcome for a in queue.attempts(j)] == ["succeeded"]
    assert dict(start_events.starts) == {j: 1 for j in ids}
    assert pool_containers(docker_client, pool) == []
    # the job that ended while no dispatcher ran still has its real result, read from the exited container
    assert queue.attempts(ids[0])[0].exit_code == 0
    log = (tmp_path / "second.log").read_text()
    assert "adopted a running unit" in log


def test_sigterm_leaves_units_for_the_next_dispatcher(queue, db_url, pool, tmp_path, docker_client, job_image):
    ids = [diag(queue, sleep_s=6) for _ in range(2)]
    first = dispatcher_process(db_url, pool, tmp_path, "first")
    wait_for(lambda: len(running_containers(docker_client, pool)) == 2, 30, "2 running containers")
    first.send_signal(signal.SIGTERM)
    assert first.wait(15) == 0
    assert len(running_containers(docker_client, pool)) == 2
    assert all(expired for (expired,) in sql(db_url, "SELECT lease_expires_at <= now() FROM jobs")), "leases released"
    jobs = run_until_final(queue, ids, db_url, pool, tmp_path, "second")
    assert [(j.state, j.attempt) for j in jobs] == [(JobState.SUCCEEDED, 1)] * 2


def test_two_dispatchers_never_run_the_same_attempt_twice(queue, start_dispatcher, start_events, docker_client,
                                                          pool):
    ids = [diag(queue, sleep_s=0.3) for _ in range(16)]
    a, b = start_dispatcher(owner="a"), start_dispatcher(owner="b")
    jobs = wait_final(queue, ids, timeout=120)
    assert all(j.state is JobState.SUCCEEDED and j.attempt == 1 for j in jobs)
    assert dict(start_events.starts) == {j: 1 for j in ids}
    owners = collections.Counter(queue.attempts(j)[0].dispatcher for j in ids)
    assert set(owners) <= {"a", "b"} and sum(owners.values()) == 16
    a.stop()
    b.stop()


def test_admission_keeps_running_limits_within_budget_and_slots(queue, start_dispatcher, docker_client, pool):
    limits = {c["name"]: int(c["memory_limit_bytes"].removesuffix("MiB")) * MIB for c in TEST_CLASSES}
    slots = {c["name"]: c["max_running"] for c in TEST_CLASSES}
    budget = 400 * MIB  # 2 medium + 1 small fit; the large one only with little else beside it
    ids = [diag(queue, size_class=c, sleep_s=1.5) for c in ["small"] * 6 + ["medium"] * 4 + ["large"] * 2]
    start_dispatcher(budget_mib=400)
    samples: list[tuple[int, dict[str, int]]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tiers = collections.Counter(c["Labels"][LABEL_TIER] for c in running_containers(docker_client, pool))
        db = collections.Counter(t for (t,) in sql(queue.db.dsn, "SELECT tier FROM jobs WHERE state = 'running'"))
        for seen in (tiers, db):
            samples.append((sum(limits[t] * n for t, n in seen.items()), dict(seen)))
        if all(j.state.final for j in queue.jobs(ids)):
            break
        time.sleep(0.1)
    assert all(j.state is JobState.SUCCEEDED for j in queue.jobs(ids))
    over = [s for s in samples if s[0] > budget or any(n > slots[t] for t, n in s[1].items())]
    assert not over, f"budget or slots exceeded: {over[:5]}"
    assert max(s[0] for s in samples) > 256 * MIB, "jobs should run side by side while they fit"


def test_another_queue_sharing_the_pool_name_leaves_our_containers_alone(queue, start_dispatcher, pg_server, table,
                                                                          docker_client, job_image, pool):
    """Two deployments on one engine with the same pool name: job ids collide, but the queue label keeps
    each dispatcher's reconciliation to its own containers."""
    import uuid as _uuid

    import psycopg

    from dispatcher.loop import Dispatcher, LoopConfig
    from dispatcher.queue import PostgresQueue
    from dispatcher.runtimes.docker import DockerOptions, DockerRuntime

    from .conftest import Running

    ours = diag(queue, sleep_s=6)
    start_dispatcher()
    wait_for(lambda: len(running_containers(docker_client, pool)) == 1, 30, "our container")
    name = "t_" + _uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    other_url = pg_server.rsplit("/", 1)[0] + "/" + name
    other_q = PostgresQueue(other_url, table, lease_ttl_s=4.0)
    other_q.migrate()
    other_runtime = DockerRuntime(DockerOptions(image=job_image, pool=pool, queue_id=other_q.queue_id(),
                                                network_mode="none"), client=docker_client)
    other = Running(Dispatcher(other_q, other_runtime, table, LoopConfig(
        owner="other", pool=pool, budget_bytes=4096 * MIB, poll_s=0.2, reconcile_s=0.5)))
    try:
        [j] = wait_final(queue, [ours], timeout=60)
    finally:
        other.stop()
        other_q.close()
        with psycopg.connect(pg_server, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert (j.state, j.attempt) == (JobState.SUCCEEDED, 1)
    assert [a.outcome for a in queue.attempts(ours)] == ["succeeded"]


def test_a_container_whose_job_moved_on_is_removed(queue, runtime, start_dispatcher, docker_client, pool):
    from dispatcher.models import LaunchSpec
    from dispatcher.ports import CellInput
    from job_image.contract import Header

    job = diag(queue, sleep_s=60)
    assert queue.cancel(job) == "cancelled"
    # a container for that job's first attempt, as a dispatcher that died mid-launch might have left it
    header = Header(job_id=job, attempt=1, tier="small", memory_limit_bytes=64 * MIB, workload="diag",
                    params={"sleep_s": 60})
    runtime.launch(LaunchSpec(job, 1, "small", 64 * MIB, 60, "diag:", "diag", {"sleep_s": 60}),
                   CellInput(header, "diag:"))
    assert len(running_containers(docker_client, pool)) == 1
    start_dispatcher()
    wait_for(lambda: not pool_containers(docker_client, pool), 20,
             "the orphan to be removed")
    assert queue.get(job).state is JobState.CANCELLED


def test_drain_waits_for_running_jobs_before_exiting(queue, db_url, pool, tmp_path, docker_client, job_image):
    ids = [diag(queue, sleep_s=4) for _ in range(2)]
    proc = dispatcher_process(db_url, pool, tmp_path, "draining", "--drain")
    wait_for(lambda: len(running_containers(docker_client, pool)) == 2, 30, "2 running containers")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    jobs = queue.jobs(ids)
    assert [(j.state, j.attempt) for j in jobs] == [(JobState.SUCCEEDED, 1)] * 2
    assert {queue.attempts(j)[0].dispatcher for j in ids} == {"draining"}
    assert pool_containers(docker_client, pool) == []
