"""The seeds' case on a Render-like worker: a 512 MB background worker that cannot write cgroups. Its small tiers
run as capped processes of the worker itself, held by the watchdog (JOBCELL_PROCESS_CAP=watchdog, as on Render),
on real documents with the real OCR pipeline of this host; its large tier is routed to Render one-off jobs, here
against the documented-payload stand-in (tests/fake_render.py: Render itself cannot be reached from here)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.classes import SizeClassTable, load_table
from dispatcher.loop import Dispatcher, LoopConfig
from dispatcher.models import MIB, JobState, NewJob
from dispatcher.outcome import Backoff
from dispatcher.ports import Runtime
from dispatcher.queue import PostgresQueue
from dispatcher.routing import RoutedRuntime
from dispatcher.runtimes.process import ProcessOptions, ProcessRuntime
from dispatcher.runtimes.render import PLANS, RenderOptions, RenderRuntime
from dispatcher.store import LocalStore

from .conftest import CORPUS, Running, sql, wait_final
from .fake_render import FakeRender, fake_presign

pytestmark = pytest.mark.skipif(not (shutil.which("tesseract") and shutil.which("pdftoppm")),
                                reason="the process runtime runs the OCR pipeline on this host: install "
                                       "tesseract-ocr and poppler-utils (scripts/setup.sh does, as root)")

# The demo's tiers (examples/demo-classes.toml): ocrmypdf-enormous.pdf outgrows small and fits medium.
WORKER_CLASSES: list[dict[str, Any]] = [
    {"name": "small", "max_input_bytes": "5MB", "memory_limit_bytes": "192MiB", "max_running": 2, "timeout_s": 600},
    {"name": "medium", "max_input_bytes": "20MB", "memory_limit_bytes": "512MiB", "max_running": 1,
     "timeout_s": 600},
    {"name": "large", "memory_limit_bytes": "2GiB", "max_running": 2, "timeout_s": 600},
]


class Worker:
    """A dispatcher as on the worker: process cells, real documents, results in the test's Postgres."""

    def __init__(self, db_url: str, tmp: Path) -> None:
        self.db_url, self.tmp = db_url, tmp
        self.store = LocalStore(str(tmp / "store"))
        self.running: list[Running] = []
        self.queues: list[PostgresQueue] = []

    def queue(self, table: SizeClassTable) -> PostgresQueue:
        q = PostgresQueue(self.db_url, table, lease_ttl_s=10.0, give_up_after_s=None)
        self.queues.append(q)
        return q

    def processes(self, q: PostgresQueue, pool: str, cap: str) -> ProcessRuntime:
        return ProcessRuntime(ProcessOptions(state_root=str(self.tmp / f"units-{pool}"), pool=pool,
                                             queue_id=q.queue_id(), cap=cap), documents=self.store.open)

    def start(self, table: SizeClassTable, runtime: Runtime, pool: str, budget_mib: int,
              budgets: dict[str, int] | None = None, sizing: bool = True) -> PostgresQueue:
        q = self.queue(table)
        cfg = LoopConfig(owner=f"worker-{uuid.uuid4().hex[:4]}", pool=pool, budget_bytes=budget_mib * MIB,
                         budgets=budgets or {}, poll_s=0.2, heartbeat_s=2, reconcile_s=2,
                         backoff=Backoff(exponent=0), sizing=sizing)
        self.running.append(Running(Dispatcher(q, runtime, table, cfg)))
        return q

    def submit(self, q: PostgresQueue, name: str) -> int:
        uri, size, key = self.store.put(str(CORPUS / name))
        job_id, _ = q.submit(NewJob(uri, size, f"{key}:{uuid.uuid4()}", q._table.for_size(size).name, source=name))
        return job_id

    def stop(self) -> None:
        for r in self.running:
            r.stop()
        for q in self.queues:
            q.close()


@pytest.fixture
def worker(db_url: str, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(db_url, tmp_path)
    yield w
    w.stop()


def attempts(q: PostgresQueue, job_id: int) -> list[tuple[str, str, str]]:
    return [(a.tier, a.outcome, a.runtime) for a in q.attempts(job_id)]


def test_without_cgroups_real_documents_oom_and_escalate_and_bad_input_fails_once(worker):
    table = load_table(WORKER_CLASSES)
    docs = ["ocrmypdf-enormous.pdf", "tesseract-phototest.tif", "pdf2image-test_corrupted.pdf"]
    pool = f"w-watchdog-{uuid.uuid4().hex[:6]}"
    probe = worker.queue(table)
    # sizing off: the cell does not stop at its own estimate (tests/test_documents.py shows that it would), so
    # that the watchdog's kill of a real document at its cap is what is shown here
    q = worker.start(table, worker.processes(probe, pool, "watchdog"), pool, budget_mib=1024, sizing=False)
    ids = {name: worker.submit(q, name) for name in docs}
    jobs = {j.id: j for j in wait_final(q, list(ids.values()), timeout=300)}
    enormous, photo, corrupt = (ids[n] for n in docs)
    assert jobs[enormous].state is JobState.SUCCEEDED and jobs[photo].state is JobState.SUCCEEDED
    assert attempts(q, enormous) == [("small", "oom", "process"), ("medium", "succeeded", "process")]
    first, second = q.attempts(enormous)
    assert first.oom_killed is True and first.peak_memory_bytes == 192 * MIB  # killed at its limit
    assert second.peak_memory_bytes is not None and 192 * MIB < second.peak_memory_bytes <= 512 * MIB
    assert len(q.pages(enormous)) == 1 and "quick brown" in " ".join(p.text for p in q.pages(photo)).lower()
    # bad input: one attempt, a reason a person can read, never retried
    assert attempts(q, corrupt) == [("small", "bad_input", "process")]
    assert jobs[corrupt].state is JobState.FAILED and "the PDF is corrupt" in (jobs[corrupt].reason or "")


def test_without_cgroups_the_peak_is_within_ten_percent_of_what_a_cgroup_reports(worker):
    # The same jobs under the watchdog and under this host's memory cgroup (the reference). Diagnostic jobs,
    # which write no file: a cgroup also counts the page cache of files a cell writes (reclaimable, and
    # dependent on writeback), which no process-tree measure can see.
    table = load_table(WORKER_CLASSES)
    sizes = (40, 100, 150)
    peaks: dict[str, list[int]] = {}
    for cap in ("watchdog", "auto"):
        pool = f"w-{cap}-{uuid.uuid4().hex[:6]}"
        probe = worker.queue(table)
        rt = worker.processes(probe, pool, cap)
        if cap == "auto" and rt.cgroups.root is None:
            pytest.skip("no writable cgroup here to compare the watchdog's peak with")
        q = worker.start(table, rt, pool, budget_mib=1024)
        ids = [q.submit(NewJob("diag:", 0, f"diag:{uuid.uuid4()}", "small", workload="diag",
                               params={"alloc_mib": mib, "sleep_s": 0.5}))[0] for mib in sizes]
        assert all(j.state is JobState.SUCCEEDED for j in wait_final(q, ids, timeout=120))
        peaks[cap] = [q.attempts(i)[0].peak_memory_bytes or 0 for i in ids]
    for mib, watched, cgroup in zip(sizes, peaks["watchdog"], peaks["auto"], strict=True):
        assert mib * MIB < watched and abs(watched - cgroup) <= 0.10 * cgroup, (mib, watched / MIB, cgroup / MIB)


def test_the_seeds_case_small_documents_on_the_worker_a_large_one_on_a_render_plan(worker, db_url):
    routed = load_table([dict(c, runtime="render") if c["name"] == "large" else c for c in WORKER_CLASSES])
    pool = f"seeds-{uuid.uuid4().hex[:6]}"
    render = FakeRender("srv-cell", dict(PLANS))  # Render's documented instance types only
    with render.serve():
        probe = worker.queue(routed)
        processes = worker.processes(probe, pool, "watchdog")
        one_off = RenderRuntime(RenderOptions(service_id="srv-cell", api_key="rnd_test", pool=pool,
                                              queue_id=probe.queue_id(), base_url=render.url,
                                              own_service_id="srv-dispatcher", log_poll_s=0.2, log_settle_s=1.0),
                                presign=fake_presign)
        # a 512 MB worker keeps 384 MiB for cells: two small ones, or one medium; Render holds two 2 GiB jobs
        q = worker.start(routed, RoutedRuntime(processes, [one_off], routed), pool, budget_mib=384,
                         budgets={"render": 4096 * MIB})
        small = [worker.submit(q, n) for n in ("tesseract-phototest.tif", "tesseract-eurotext.tif",
                                                "ocrmypdf-linn.png", "ocrmypdf-cardinal.pdf")]
        # the 142-page scan or the 21 MB TIFF: on Render's machines, played by the stand-in from its header
        large = [q.submit(NewJob("diag:", 0, f"diag:{uuid.uuid4()}", "large", workload="diag", source=name,
                                 params={"alloc_mib": 1200, "sleep_s": 1}))[0]
                 for name in ("scan-142p.pdf", "21mb.tif")]
        jobs = wait_final(q, [*small, *large], timeout=300)
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 6, [(j.id, j.reason) for j in jobs]
    assert all(attempts(q, j) == [("small", "succeeded", "process")] for j in small)
    assert all(attempts(q, j) == [("large", "succeeded", "render")] for j in large)
    assert all(q.pages(j) for j in small)
    assert {j["job"]["planId"] for j in render.jobs.values()} == {"plan-srv-008"}  # 2 GiB: standard
    assert _most_held_at_once(db_url, pool, "process") <= 384 * MIB
    assert _most_held_at_once(db_url, pool, "render") <= 4096 * MIB


def _most_held_at_once(db_url: str, pool: str, runtime: str) -> int:
    """The most memory (limits) the attempts on one runtime held at the same time, from the attempt log."""
    rows = sql(db_url, "SELECT claimed_at, finished_at, memory_limit_bytes FROM job_attempts "
                       "WHERE pool = %s AND runtime = %s", pool, runtime)
    events = sorted([(start, limit) for start, _, limit in rows] + [(end, -limit) for _, end, limit in rows],
                    key=lambda e: (e[0], e[1]))  # at one instant, an end before a start
    held = most = 0
    for _, delta in events:
        held += delta
        most = max(most, held)
    return most
