"""The process runtime's own promises, beyond the shared behaviour suite."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from dispatcher.models import MIB, JobState
from dispatcher.runtimes.process import ProcessOptions, ProcessRuntime, proc_table, unit_tree

from .conftest import diag, wait_final, wait_for


def test_without_a_cgroup_rlimit_as_caps_the_job_and_reads_as_oom(queue, start_dispatcher, pool, tmp_path: Path):
    rt = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id=queue.queue_id(),
                                       cap="rlimit"))
    assert rt.cgroups.root is None
    job = diag(queue, alloc_mib=300)
    start_dispatcher(rt=rt)
    [j] = wait_final(queue, [job])
    # 300 MiB never fits the small and medium address spaces; the large one (256 MiB) neither: failed, as oom
    assert j.state is JobState.FAILED and "needs more than 256 MiB" in (j.reason or "")
    assert [a.outcome for a in queue.attempts(job)] == ["oom", "oom", "oom"]
    assert "out of memory" in queue.attempts(job)[0].error


def test_units_live_on_disk_and_a_second_launch_of_an_attempt_is_refused(queue, pool, tmp_path: Path):
    from dispatcher.models import LaunchSpec
    from dispatcher.ports import CellInput
    from job_image.contract import Header

    rt = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id="q"))
    spec = LaunchSpec(7, 1, "small", 64 * MIB, 60, "diag:", "diag", {"sleep_s": 2})
    cell = CellInput(Header(job_id=7, attempt=1, tier="small", memory_limit_bytes=64 * MIB, workload="diag",
                            params={"sleep_s": 2}), "diag:")
    h = rt.launch(spec, cell)
    again = rt.launch(spec, cell)
    assert again == h and len(rt.owned()) == 1
    assert (Path(h.ref) / "pid").exists()
    # a fresh runtime object (a restarted dispatcher) finds the unit and reads its exit from disk
    other = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id="q"))
    assert other.owned() == [h]
    import time

    deadline = time.monotonic() + 20
    while (ended := other.poll(h)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ended is not None and ended.exit_code == 0 and not ended.oom_killed
    rt.cleanup(h)
    assert rt.owned() == []


def _watchdog(tmp_path: Path, pool: str, queue_id: str) -> ProcessRuntime:
    """The cap of a host where no cgroup can be written (a Render worker), forced on this one."""
    rt = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id=queue_id,
                                       cap="watchdog"))
    assert rt.cgroups.root is None and rt.cap == "watchdog"
    return rt


@pytest.mark.parametrize("step_sleep_s", [0.1, 0.0], ids=["growing-watchdog-kills", "burst-rlimit-data-refuses"])
def test_without_a_cgroup_the_watchdog_caps_the_job_as_oom_and_the_next_tier_succeeds(
        queue, start_dispatcher, pool, tmp_path: Path, step_sleep_s: float):
    job = diag(queue, alloc_mib=100, step_sleep_s=step_sleep_s, sleep_s=0.3)
    start_dispatcher(rt=_watchdog(tmp_path, pool, queue.queue_id()))
    [j] = wait_final(queue, [job])
    assert j.state is JobState.SUCCEEDED, j.reason
    small, medium = queue.attempts(job)
    assert (small.tier, small.outcome, medium.tier, medium.outcome) == \
        ("small", "oom", "medium", "succeeded")
    assert small.peak_memory_bytes == small.memory_limit_bytes == 64 * MIB
    if step_sleep_s:  # 8 MiB every 100 ms: the watchdog sees the tree pass 64 MiB long before RLIMIT_DATA (80)
        assert small.oom_killed is True  # the runtime's own signal, not only the cell's word
        assert small.exit_code == 137
        assert "killed by the process runtime's watchdog" in small.error
    else:  # faster than it samples: RLIMIT_DATA refuses an allocation (the cell reports it, exit 86: oom
        # by the contract), or the watchdog kills (the runtime's own signal)
        assert (small.exit_code, small.oom_killed) in ((86, False), (86, True), (137, True))
    # the tree's own peak: above what it allocated, within its cap (not the host's, capped to the limit)
    assert 100 * MIB < medium.peak_memory_bytes < 160 * MIB


def test_without_a_cgroup_a_job_under_its_limit_reports_its_own_trees_peak(queue, start_dispatcher, pool,
                                                                           tmp_path: Path):
    job = diag(queue, alloc_mib=20, sleep_s=0.5)
    start_dispatcher(rt=_watchdog(tmp_path, pool, queue.queue_id()))
    [j] = wait_final(queue, [job])
    assert j.state is JobState.SUCCEEDED, j.reason
    [a] = queue.attempts(job)
    # The cell's own peak record reads the enclosing cgroup (here the whole machine's), which would be stored as
    # exactly the limit: the runtime drops it and reports the watchdog's sample of the unit's processes.
    assert 20 * MIB < a.peak_memory_bytes < 64 * MIB


def test_without_a_cgroup_a_sigkill_from_outside_is_lost_not_oom(queue, start_dispatcher, pool, tmp_path: Path):
    rt = _watchdog(tmp_path, pool, queue.queue_id())
    job = diag(queue, alloc_mib=10, sleep_s=3)
    start_dispatcher(rt=rt)
    unit = rt.units / f"{job}-1"

    def the_job() -> int | None:
        sid = (unit / "pid").read_text() if (unit / "pid").exists() else ""
        for pid in unit_tree(proc_table(with_uid=True), int(sid), None) - {int(sid)} if sid else ():  # not sh
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                # the job itself, once unshare, prlimit and setpriv have exec'd into it (their argv names it too)
                if b"job_image.entrypoint" in argv and Path(argv[0].decode()).name.startswith("python"):
                    return pid
        return None

    os.kill(wait_for(the_job, 30, "the job's process"), signal.SIGKILL)  # an operator's kill, not ours
    [j] = wait_final(queue, [job])
    assert j.state is JobState.SUCCEEDED, j.reason
    first, second = queue.attempts(job)
    assert (first.outcome, first.exit_code, first.oom_killed) == ("lost", 137, False)
    assert (second.tier, second.outcome) == ("small", "succeeded")  # retried on the same tier


def test_a_burst_too_short_to_sample_is_still_in_the_peak_the_cell_reports(queue, start_dispatcher, pool,
                                                                           tmp_path: Path):
    # allocated, touched and freed between two of the watchdog's samples; the cell, told that its /sys/fs/cgroup
    # is the host's, reports its own processes' high-water marks instead, and the loop keeps the larger measure
    rt = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id=queue.queue_id(),
                                       cap="watchdog"))
    jobs = [diag(queue, alloc_mib=30) for _ in range(3)]
    start_dispatcher(rt=rt)
    assert all(j.state is JobState.SUCCEEDED for j in wait_final(queue, jobs))
    for job in jobs:
        [a] = queue.attempts(job)
        assert a.peak_memory_bytes is not None and 30 * MIB < a.peak_memory_bytes <= 64 * MIB, a.peak_memory_bytes


def test_without_a_cgroup_a_restarted_dispatcher_reads_the_units_own_peak_from_disk(tmp_path: Path):
    import time

    from dispatcher.models import LaunchSpec
    from dispatcher.ports import CellInput
    from job_image.contract import Header

    rt = _watchdog(tmp_path, "unit-watchdog", "q")
    params = {"alloc_mib": 20, "sleep_s": 1.0}
    h = rt.launch(LaunchSpec(9, 1, "small", 64 * MIB, 60, "diag:", "diag", params),
                  CellInput(Header(job_id=9, attempt=1, tier="small", memory_limit_bytes=64 * MIB, workload="diag",
                                   params=params), "diag:"))
    other = _watchdog(tmp_path, "unit-watchdog", "q")  # a restarted dispatcher: not the wrapper's parent
    assert other.owned() == [h]
    deadline = time.monotonic() + 20
    while (ended := other.poll(h)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended is not None and ended.exit_code == 0 and not ended.oom_killed
    assert ended.peak_memory_bytes == int((Path(h.ref) / "peak").read_text())  # sampled, kept in the unit
    assert ended.peak_memory_bytes is not None and 20 * MIB < ended.peak_memory_bytes < 64 * MIB
    other.cleanup(h)
    rt.cleanup(h)
    assert other.owned() == []


def test_two_dispatchers_on_one_host_never_share_a_uid(tmp_path: Path):
    # A unit's stragglers are killed by its uid at cleanup; a second dispatcher (another pool or queue, its own
    # state dir) must not have been given that uid meanwhile, or the first one's cleanup kills its job.
    import time

    from dispatcher.models import LaunchSpec
    from dispatcher.ports import CellInput
    from job_image.contract import Header

    first = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "a"), pool="a", queue_id="qa"))
    second = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "b"), pool="b", queue_id="qb"))
    if not first.sealed:
        pytest.skip("units get uids of their own only as root, with setpriv, unshare and prlimit")

    def launch(rt: ProcessRuntime, job: int, **params: float) -> Any:
        header = Header(job_id=job, attempt=1, tier="small", memory_limit_bytes=64 * MIB, workload="diag",
                        params=params)
        return rt.launch(LaunchSpec(job, 1, "small", 64 * MIB, 60, "diag:", "diag", params),
                         CellInput(header, "diag:"))

    def ended(rt: ProcessRuntime, h: Any) -> Any:
        deadline = time.monotonic() + 20
        while (e := rt.poll(h)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return e

    done = launch(first, 1)
    assert ended(first, done).exit_code == 0  # ended, not yet cleaned up: its uid is still its own
    running = launch(second, 2, sleep_s=2)
    assert (Path(done.ref) / "uid").read_text() != (Path(running.ref) / "uid").read_text()
    first.cleanup(done)  # kills whatever still runs as the first unit's uid
    assert ended(second, running).exit_code == 0
    second.cleanup(running)
