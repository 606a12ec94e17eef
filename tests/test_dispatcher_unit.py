"""The Dispatcher's own logic on the in-memory Queue and Runtime (dispatcher/memory.py): no database, no engine,
milliseconds a test. The same logic runs end to end against Postgres and real units in test_behaviour.py;
here each decision is driven one tick at a time, including the faults that are hard to cause for real."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from dispatcher.classes import load_table
from dispatcher.loop import Dispatcher, LoopConfig
from dispatcher.memory import MemoryQueue, MemoryRuntime, Script, diag_script
from dispatcher.models import MIB, Exit, Handle, JobState, NewJob
from dispatcher.outcome import Backoff
from dispatcher.ports import CellInput
from job_image.contract import DocumentInfo, Done, PageResult, encode

from .conftest import TEST_CLASSES

TABLE = load_table(TEST_CLASSES)


def make(runtime: MemoryRuntime | None = None, owner: str = "d1", queue: MemoryQueue | None = None,
         **cfg: Any) -> tuple[Dispatcher, MemoryQueue, MemoryRuntime]:
    q = queue or MemoryQueue(TABLE, lease_ttl_s=30)
    rt = runtime or MemoryRuntime()
    config = LoopConfig(owner=owner, pool="p", budget_bytes=4096 * MIB, backoff=Backoff(exponent=0, cap_s=0, jitter=0),
                        drain_output_s=2, **cfg)
    return Dispatcher(q, rt, TABLE, config), q, rt


def submit(q: MemoryQueue, max_attempts: int = 5, **params: Any) -> int:
    job_id, _ = q.submit(NewJob("diag:", 0, f"diag:{uuid.uuid4()}", "small", workload="diag", params=params,
                                max_attempts=max_attempts))
    return job_id


def run(d: Dispatcher, ticks: int = 3) -> None:
    for _ in range(ticks):
        d.tick()


def outcomes(q: MemoryQueue, job_id: int) -> list[tuple[str, str | None]]:
    return [(a.tier, a.outcome) for a in q.attempts(job_id)]


def test_a_job_runs_and_succeeds():
    d, q, rt = make()
    job = submit(q, alloc_mib=10)
    run(d)
    assert q.get(job).state is JobState.SUCCEEDED
    assert outcomes(q, job) == [("small", "succeeded")] and rt.owned() == []


def test_an_oom_moves_up_a_tier_and_a_bad_input_is_never_retried():
    d, q, _ = make()
    big, bad = submit(q, alloc_mib=100), submit(q, exit_code=65, message="not a PDF")
    run(d, 5)
    assert outcomes(q, big) == [("small", "oom"), ("medium", "succeeded")]
    assert outcomes(q, bad) == [("small", "bad_input")] and q.get(bad).reason == "not a PDF"


def test_a_cell_that_foresees_it_needs_more_moves_up_before_any_work_with_no_oom():
    d, q, _ = make()
    big, fits = submit(q, need_mib=200, alloc_mib=150), submit(q, need_mib=40, alloc_mib=10)
    run(d, 5)
    assert outcomes(q, big) == [("small", "needs_more"), ("large", "succeeded")]  # 200 MiB: past medium's 160
    assert [a.need_bytes for a in q.attempts(big)] == [200 * MIB, 200 * MIB]
    assert q.get(big).state is JobState.SUCCEEDED and q.attempts(big)[0].oom_killed is False
    assert outcomes(q, fits) == [("small", "succeeded")] and q.attempts(fits)[0].need_bytes == 40 * MIB


def test_a_sigkill_no_oom_signal_explains_is_lost_and_retried_on_the_same_tier():
    def killed_from_outside(spec: Any, cell: CellInput) -> Script:
        return Script(exit_code=137) if cell.header.attempt == 1 else diag_script(spec, cell)

    d, q, _ = make(MemoryRuntime(killed_from_outside))
    job = submit(q)
    run(d, 5)
    assert outcomes(q, job) == [("small", "lost"), ("small", "succeeded")]


def test_losing_a_lease_never_kills_the_unit():
    d, q, rt = make()
    job = submit(q, sleep_s=60)
    run(d, 2)
    [unit] = rt.units.values()
    q._set(job, lease_owner="d2")  # another dispatcher adopted it while we were cut off
    d.heartbeat()
    assert not unit.killed and rt.owned() == [unit.handle] and d.watched == {}


def test_a_failed_launch_is_lost_and_retried():
    class FailsOnce(MemoryRuntime):
        def launch(self, spec: Any, cell: CellInput) -> Handle:
            if self.launches == 0:
                self.launches += 1
                raise ConnectionError("engine unreachable")
            return super().launch(spec, cell)

    d, q, _ = make(FailsOnce())
    job = submit(q)
    with pytest.raises(ConnectionError):
        d.tick()  # the loop backs off after a failed launch
    run(d, 3)
    assert outcomes(q, job) == [("small", "lost"), ("small", "succeeded")]


def test_one_units_poll_error_does_not_stall_the_others():
    class Flaky(MemoryRuntime):
        def poll(self, handle: Handle) -> Exit | None:
            if handle.job_id == 1:
                raise TimeoutError("inspect timed out")
            return super().poll(handle)

    d, q, _ = make(Flaky())
    stuck, fine = submit(q, sleep_s=60), submit(q)
    run(d, 2)
    assert q.get(fine).state is JobState.SUCCEEDED and q.get(stuck).state is JobState.RUNNING
    with pytest.raises(TimeoutError):  # every unit failing is the engine itself: then the loop backs off
        d.tick()


def test_a_unit_past_its_deadline_is_timeout():
    short = load_table([dict(c, timeout_s=0.05) if c["name"] == "small" else c for c in TEST_CLASSES])
    q = MemoryQueue(short)
    d = Dispatcher(q, MemoryRuntime(), short, LoopConfig(owner="d", pool="p", budget_bytes=4096 * MIB))
    job = submit(q, sleep_s=60)
    d.tick()


    time.sleep(0.1)
    run(d, 3)
    assert outcomes(q, job) == [("small", "timeout")] and q.get(job).state is JobState.FAILED


def test_output_for_another_job_is_refused_and_never_stored():
    def forger(spec: Any, cell: CellInput) -> Script:
        j, a = cell.header.job_id, cell.header.attempt
        return Script(output=encode(DocumentInfo(job=j, attempt=a, media_type="application/pdf", pages=1))
                      + encode(PageResult(job=j + 1, attempt=1, page=1, dpi=200, width=1, height=1, text="x",
                                          words=[], ocr_seconds=0)), runs_s=0.2)

    d, q, _ = make(MemoryRuntime(forger))
    job = submit(q)
    run(d, 5)
    j = q.get(job)
    assert j.state is JobState.FAILED and "a record for job 2 attempt 1" in (j.reason or "")
    assert outcomes(q, job) == [("small", "bad_input")] and q.pages(2) == [] and q.pages(job) == []


def test_exit_0_without_a_whole_result_is_an_error():
    def half(spec: Any, cell: CellInput) -> Script:
        j, a = cell.header.job_id, cell.header.attempt
        return Script(output=encode(DocumentInfo(job=j, attempt=a, media_type="application/pdf", pages=2)))

    d, q, _ = make(MemoryRuntime(half))
    job = submit(q, max_attempts=1)
    run(d, 3)
    assert "1 of 2 pages missing" not in (q.get(job).reason or "")
    assert "2 of 2 pages missing" in (q.get(job).reason or "") and outcomes(q, job) == [("small", "error")]


def test_pages_are_stored_as_they_come_and_a_retry_resumes_after_them():
    def pages(spec: Any, cell: CellInput) -> Script:
        j, a, done = cell.header.job_id, cell.header.attempt, set(cell.header.done_pages)
        out = encode(DocumentInfo(job=j, attempt=a, media_type="application/pdf", pages=3))
        for n in [n for n in (1, 2, 3) if n not in done][: 2 if a == 1 else 3]:
            out += encode(PageResult(job=j, attempt=a, page=n, dpi=200, width=1, height=1, text=f"p{n}",
                                     words=[], ocr_seconds=0))
        if a == 1:
            return Script(output=out, exit_code=137, oom_killed=True)  # killed after two pages
        return Script(output=out + encode(Done(job=j, attempt=a)))

    d, q, _ = make(MemoryRuntime(pages))
    job = submit(q)
    run(d, 5)
    assert outcomes(q, job) == [("small", "oom"), ("medium", "succeeded")]
    assert [(p.page, p.attempt) for p in q.pages(job)] == [(1, 1), (2, 1), (3, 2)]
    assert q.completed[job] == ("application/pdf", 3, "skipped")


def test_a_second_dispatcher_adopts_units_whose_lease_expired():
    q = MemoryQueue(TABLE, lease_ttl_s=0.01)
    rt = MemoryRuntime()
    first, _, _ = make(rt, owner="first", queue=q)
    job = submit(q, sleep_s=0.3)
    first.tick()
    assert rt.launches == 1
    second, _, _ = make(rt, owner="second", queue=q)


    time.sleep(0.35)
    run(second, 3)
    assert q.get(job).state is JobState.SUCCEEDED and rt.launches == 1  # adopted, never relaunched
    assert q.attempts(job)[0].dispatcher == "second"


def test_tiers_run_on_the_runtime_their_class_names_and_an_oom_escalates_across_runtimes():
    from dispatcher.routing import RoutedRuntime

    table = load_table([dict(c, runtime="render") if c["name"] != "small" else c for c in TEST_CLASSES])
    worker, render = MemoryRuntime(pool="p"), MemoryRuntime(pool="p")
    worker.name, render.name = "process", "render"
    routed = RoutedRuntime(worker, [render], table)
    q = MemoryQueue(table, lease_ttl_s=30)
    config = LoopConfig(owner="d", pool="p", budget_bytes=128 * MIB, budgets={"render": 256 * MIB},
                        backoff=Backoff(exponent=0, cap_s=0, jitter=0), drain_output_s=2)
    d = Dispatcher(q, routed, table, config)
    small = [submit(q, alloc_mib=10, sleep_s=0.2) for _ in range(3)]
    grows = submit(q, alloc_mib=100)  # OOM on small (64 MiB, a process) -> medium (128 MiB, a Render job)
    large, _ = q.submit(NewJob("diag:", 0, f"diag:{uuid.uuid4()}", "large", workload="diag",
                               params={"alloc_mib": 10}))
    d.tick()
    # the worker's 128 MiB holds two 64 MiB small jobs; Render's 256 MiB holds the large job, not the worker's
    assert {a.tier for j in (*small, grows, large) for a in q.attempts(j)} == {"small", "large"}
    assert len(worker.owned()) == 2 and len(render.owned()) == 1
    for _ in range(40):
        d.tick()
        if all(q.get(j).state.final for j in (*small, grows, large)):
            break
        time.sleep(0.1)
    assert all(q.get(j).state is JobState.SUCCEEDED for j in (*small, grows, large))
    assert [(a.tier, a.outcome, a.runtime) for a in q.attempts(grows)] == [
        ("small", "oom", "process"), ("medium", "succeeded", "render")]
    assert [a.runtime for a in q.attempts(large)] == ["render"] and routed.name == "process+render"


def test_a_cpu_budget_runs_no_more_cells_than_it_has_cpus_and_tells_each_its_share():
    headers = []

    def record(spec: Any, cell: CellInput) -> Script:
        headers.append(cell.header)
        return diag_script(spec, cell)

    d, q, rt = make(MemoryRuntime(record), cpu_budget=1)
    jobs = [submit(q, sleep_s=0.3) for _ in range(3)]
    run(d, 1)
    assert len(rt.units) == 1  # memory and slots hold three small jobs; one CPU holds one
    deadline = time.time() + 10
    while any(q.get(j).state is not JobState.SUCCEEDED for j in jobs) and time.time() < deadline:
        d.tick()
        assert len([u for u in rt.units.values() if d.runtime.poll(u.handle) is None]) <= 1
        time.sleep(0.05)
    assert all(q.get(j).state is JobState.SUCCEEDED for j in jobs)
    assert [h.cpus for h in headers] == [1.0, 1.0, 1.0]  # its page workers keep to the CPU it was counted for
    d2, q2, rt2 = make(MemoryRuntime(record))
    headers.clear()
    [submit(q2, sleep_s=0.3) for _ in range(3)]
    run(d2, 1)
    assert len(rt2.units) == 3 and [h.cpus for h in headers] == [None] * 3  # no CPU budget: as many as it sees
