"""Fixtures against the real things: a Docker engine, Postgres in a testcontainer, the job image."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import psycopg
import pytest

from dispatcher.classes import SizeClassTable, load_table
from dispatcher.loop import Dispatcher, LoopConfig
from dispatcher.models import MIB, Job
from dispatcher.outcome import Backoff
from dispatcher.ports import Observer, Runtime
from dispatcher.queue import PostgresQueue
from dispatcher.runtimes.docker import LABEL_POOL, DockerOptions, DockerRuntime
from dispatcher.runtimes.process import ProcessOptions, ProcessRuntime

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"
JOB_IMAGE = os.environ.get("JOBCELL_JOB_IMAGE", "jobcell-job:dev")

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
# Test traffic stays on loopback: Postgres is published on 127.0.0.1 only, and reached there.
# (this sandbox looks like a container to testcontainers, which would otherwise pick the bridge gateway)
os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

# Small tiers keep real OOM kills fast: python itself needs ~15 MiB, so 100 MiB fits only from medium up.
TEST_CLASSES: list[dict[str, Any]] = [
    {"name": "small", "max_input_bytes": "5MB", "memory_limit_bytes": "64MiB", "max_running": 3,
     "timeout_s": 60},
    {"name": "medium", "max_input_bytes": "20MB", "memory_limit_bytes": "160MiB", "max_running": 2,
     "timeout_s": 60},
    {"name": "large", "memory_limit_bytes": "256MiB", "max_running": 1, "timeout_s": 60},
]


def pg_image() -> str:
    marker = ROOT / ".jobcell-pg-image"
    if os.environ.get("JOBCELL_TEST_PG_IMAGE"):
        return os.environ["JOBCELL_TEST_PG_IMAGE"]
    return marker.read_text().strip() if marker.exists() else "postgres:16"


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    client = docker.from_env()
    client.ping()  # no engine is a failure, not a skip: the test command starts one
    return client


@pytest.fixture(scope="session")
def job_image(docker_client: docker.DockerClient) -> str:
    docker_client.images.get(JOB_IMAGE)  # built by scripts/build-job-image.sh, which the test command runs
    return JOB_IMAGE


@pytest.fixture(scope="session")
def pg_server(docker_client: docker.DockerClient) -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.postgres import PostgresContainer

    pg = PostgresContainer(pg_image(), username="jobcell", password="jobcell-test-pw", dbname="postgres",
                           driver=None)
    pg.ports = {5432: ("127.0.0.1",)}  # docker-py's (host ip,) form: a free port on loopback, not 0.0.0.0
    with pg:
        yield pg.get_connection_url()


@pytest.fixture(scope="session")
def migrated_template(pg_server: str) -> str:
    """One database migrated once; every test's database is a copy of it (CREATE DATABASE ... TEMPLATE)."""
    from dispatcher.classes import DEFAULT_TABLE

    with psycopg.connect(pg_server, autocommit=True) as c:
        c.execute('DROP DATABASE IF EXISTS "jobcell_template"')
        c.execute('CREATE DATABASE "jobcell_template"')
    q = PostgresQueue(pg_server.rsplit("/", 1)[0] + "/jobcell_template", load_table(DEFAULT_TABLE))
    q.migrate()
    q.close()
    return "jobcell_template"


@pytest.fixture
def db_url(pg_server: str, migrated_template: str) -> Iterator[str]:
    """A fresh, migrated database per test: no test sees another's jobs, and each queue has its own identity."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{migrated_template}"')
    url = pg_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("UPDATE jobcell_meta SET value = gen_random_uuid()::text WHERE key = 'queue_id'")
    yield url
    with psycopg.connect(pg_server, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def table() -> SizeClassTable:
    return load_table(TEST_CLASSES)


@pytest.fixture
def queue(db_url: str, table: SizeClassTable) -> Iterator[PostgresQueue]:
    q = PostgresQueue(db_url, table, lease_ttl_s=4.0, give_up_after_s=30)
    q.migrate()
    yield q
    q.close()


def pool_containers(client: docker.DockerClient, pool: str, running_only: bool = False) -> list[dict[str, Any]]:
    """The containers of a pool as the engine lists them (one call: no per-container inspect to race a removal)."""
    filters: dict[str, Any] = {"label": f"{LABEL_POOL}={pool}"}
    if running_only:
        filters["status"] = "running"
    return client.api.containers(all=not running_only, filters=filters)  # type: ignore[no-any-return]


@pytest.fixture
def pool(docker_client: docker.DockerClient) -> Iterator[str]:
    """A pool name of its own per test; its containers are removed afterwards whatever happened."""
    name = "test-" + uuid.uuid4().hex[:10]
    yield name
    for c in pool_containers(docker_client, name):
        with contextlib.suppress(docker.errors.APIError):
            docker_client.api.remove_container(c["Id"], force=True, v=True)


@pytest.fixture
def runtime(docker_client: docker.DockerClient, job_image: str, pool: str, queue: PostgresQueue) -> DockerRuntime:
    return DockerRuntime(DockerOptions(image=job_image, pool=pool, queue_id=queue.queue_id(), network_mode="none",
                                       stats_every_s=0.5), client=docker_client)


INFRA = {"docker_client", "pg_server", "db_url", "queue", "job_image", "runtime", "any_runtime", "pool", "docs",
         "stack", "start_dispatcher", "any_queue"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs no engine, no database and no image is a unit test: `pytest -m unit` runs them alone.
    A disruptive test (it restarts the engine) runs last, so that nothing else shares its outage; a slow one
    (minutes of OCR) first, so that parallel workers share out the rest around it rather than wait for it."""
    for item in items:
        if not INFRA & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda item: (item.get_closest_marker("disruptive") is not None,
                                 item.get_closest_marker("slow") is None))


@pytest.fixture(params=["docker", "process", "process-watchdog", "kubernetes", "render", "memory"])
def any_runtime(request: pytest.FixtureRequest, pool: str, queue: PostgresQueue, tmp_path: Path) -> Iterator[Runtime]:
    """Every runtime; the behaviour suite runs once per runtime. Docker and process run for real; Kubernetes and
    Render against local API servers answering with documented payloads (tests/fake_kubernetes.py, fake_render.py);
    the in-memory runtime (dispatcher/memory.py) plays the diagnostic workload, so that it means the same."""
    rt: Runtime
    if request.param == "docker":
        rt = request.getfixturevalue("runtime")
    elif request.param == "memory":
        from dispatcher.memory import MemoryRuntime

        rt = MemoryRuntime(pool=pool)
    elif request.param == "process":
        rt = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id=queue.queue_id()))
    elif request.param == "process-watchdog":  # as on a Render worker: no cgroup can be written
        rt = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id=queue.queue_id(),
                                           cap="watchdog"))
    elif request.param == "render":
        from dispatcher.runtimes.render import RenderOptions, RenderRuntime

        from .fake_render import FakeRender, fake_presign

        plans = {f"plan-test-{c['name']}": int(c["memory_limit_bytes"].removesuffix("MiB")) * MIB
                 for c in TEST_CLASSES}
        render = FakeRender("srv-test", plans)
        stack = contextlib.ExitStack()
        stack.enter_context(render.serve())
        request.addfinalizer(stack.close)
        rt = RenderRuntime(RenderOptions(service_id="srv-test", api_key="rnd_test_key", pool=pool,
                                         queue_id=queue.queue_id(), base_url=render.url,
                                         plans={c["name"]: f"plan-test-{c['name']}" for c in TEST_CLASSES},
                                         own_service_id="srv-dispatcher", log_poll_s=0.2, log_settle_s=1.0),
                           presign=fake_presign)
    else:

        from dispatcher.runtimes.kubernetes import KubernetesOptions, KubernetesRuntime

        from .fake_kubernetes import FakeKubernetes, client_for, fake_presign

        fake = FakeKubernetes()
        stack = contextlib.ExitStack()
        stack.enter_context(fake.serve())
        request.addfinalizer(stack.close)
        client = client_for(fake)
        rt = KubernetesRuntime(KubernetesOptions(namespace="jobcell", pool=pool, queue_id=queue.queue_id(),
                                                 log_poll_s=0.1),
                               presign=fake_presign, client=client)
    yield rt
    for h in rt.owned():  # whatever a failed test left behind
        rt.kill(h)
        rt.cleanup(h)


class Running:
    """A Dispatcher on a thread, stopped (without drain) at the end of the test."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.thread = threading.Thread(target=d.run, name=f"dispatcher-{d.cfg.owner}", daemon=True)
        self.thread.start()

    def stop(self, drain: bool = False, timeout: float = 60) -> None:
        self.d.stop(drain=drain)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "dispatcher did not stop"


@pytest.fixture
def start_dispatcher(db_url: str, queue: PostgresQueue, runtime: DockerRuntime, table: SizeClassTable,
                     pool: str) -> Iterator[Callable[..., Running]]:
    """Each dispatcher gets its own connection, as separate processes would."""
    started: list[Running] = []

    def start(budget_mib: int = 4096, owner: str | None = None, classes: SizeClassTable | None = None,
              rt: Runtime | None = None, observer: Observer | None = None, **kw: Any) -> Running:
        t = classes or table
        q = PostgresQueue(db_url, t, lease_ttl_s=queue.lease_ttl_s, give_up_after_s=None)
        cfg = LoopConfig(owner=owner or f"d-{uuid.uuid4().hex[:6]}", pool=pool, budget_bytes=budget_mib * MIB,
                         poll_s=0.2, heartbeat_s=1.0, reconcile_s=1.0, backoff=Backoff(exponent=0, jitter=0.1),
                         **kw)
        r = Running(Dispatcher(q, rt or runtime, t, cfg, observer=observer))
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()
        r.d.queue.close()  # type: ignore[attr-defined]


def sql(db_url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as c:
        cur = c.execute(statement, params)
        return cur.fetchall() if cur.description else []


def diag(queue: PostgresQueue, size_class: str = "small", max_attempts: int = 5, priority: int = 0,
         **params: Any) -> int:
    from dispatcher.models import NewJob

    job_id, _ = queue.submit(NewJob(document_uri="diag:", document_bytes=0, unique_key=f"diag:{uuid.uuid4()}",
                                    size_class=size_class, workload="diag", params=params,
                                    max_attempts=max_attempts, priority=priority))
    return job_id


def wait_final(queue: PostgresQueue, ids: list[int], timeout: float = 120) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = queue.jobs(ids)
        if all(j.state.final for j in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"jobs did not end within {timeout} s: {[(j.id, j.state.value) for j in queue.jobs(ids)]}")


def wait_for(pred: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_removed(runtime: Any, timeout: float = 30) -> None:
    """A unit is removed just after its outcome is recorded (recorded first, so a crash in between loses
    nothing): a final state may be visible a moment before the unit is gone."""
    wait_for(lambda: runtime.owned() == [], timeout=timeout, what=f"{runtime.name} to remove its units")


def classes_json(classes: list[dict[str, Any]] | None = None) -> str:
    return json.dumps(classes or TEST_CLASSES)
