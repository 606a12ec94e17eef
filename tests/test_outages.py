"""A dead database is waited out with backoff and logged; running jobs are neither lost nor run twice."""

from __future__ import annotations

import logging
import socket
import time
import uuid

import psycopg
import pytest

from dispatcher.loop import Dispatcher, LoopConfig
from dispatcher.models import MIB, JobState
from dispatcher.outcome import Backoff
from dispatcher.queue import PostgresQueue
from dispatcher.runtimes.docker import DockerOptions, DockerRuntime

from .conftest import Running, diag, pg_image, wait_final, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_postgres(docker_client):
    """A Postgres of this test's own, on a fixed loopback port, so that it can be stopped and started."""
    port = _free_port()
    c = docker_client.containers.run(
        pg_image(), detach=True, name=f"jobcell-test-pg-{uuid.uuid4().hex[:6]}",
        ports={"5432/tcp": ("127.0.0.1", port)},
        environment={"POSTGRES_USER": "jobcell", "POSTGRES_PASSWORD": "outage-pw", "POSTGRES_DB": "jobcell"})
    url = f"postgresql://jobcell:outage-pw@127.0.0.1:{port}/jobcell"

    def up() -> bool:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    try:
        wait_for(up, 60, "postgres")
        yield c, url, up
    finally:
        c.remove(force=True)


def test_database_outage_loses_no_job(own_postgres, table, docker_client, job_image, pool, caplog):
    container, url, up = own_postgres
    q = PostgresQueue(url, table, lease_ttl_s=4.0, give_up_after_s=120)
    q.migrate()
    runtime = DockerRuntime(DockerOptions(image=job_image, pool=pool, queue_id=q.queue_id(), network_mode="none"),
                            client=docker_client)
    ids = [diag(q, sleep_s=4) for _ in range(3)]

    dq = PostgresQueue(url, table, lease_ttl_s=4.0, give_up_after_s=None)
    d = Running(Dispatcher(dq, runtime, table, LoopConfig(owner="outage", pool=pool, budget_bytes=4096 * MIB,
                                                          poll_s=0.2, heartbeat_s=1, reconcile_s=1,
                                                          backoff=Backoff(exponent=0))))
    try:
        wait_for(lambda: all(j.state is JobState.RUNNING for j in q.jobs(ids)), 30, "jobs running")
        with caplog.at_level(logging.WARNING):
            container.stop(timeout=5)
            time.sleep(7)  # longer than the lease: the jobs end while the database is away
            container.start()
            wait_for(up, 60, "postgres back")
            jobs = wait_final(q, ids, timeout=90)
    finally:
        d.stop()
        dq.close()
    assert [(j.state, j.attempt) for j in jobs] == [(JobState.SUCCEEDED, 1)] * 3
    for job_id in ids:
        assert [a.outcome for a in q.attempts(job_id)] == ["succeeded"]
    assert "database unavailable" in caplog.text
    q.close()
