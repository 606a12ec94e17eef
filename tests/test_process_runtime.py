"""The process runtime's own promises, beyond the shared behaviour suite."""

from __future__ import annotations

from pathlib import Path

from dispatcher.models import MIB, JobState
from dispatcher.runtimes.process import ProcessOptions, ProcessRuntime

from .conftest import diag, wait_final


def test_without_a_cgroup_rlimit_as_caps_the_job_and_reads_as_oom(queue, start_dispatcher, pool, tmp_path: Path):
    rt = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool, queue_id=queue.queue_id(),
                                       cap="rlimit"))
    assert rt.cgroups.root is None
    job = diag(queue, alloc_mib=300)
    start_dispatcher(rt=rt)
    [j] = wait_final(queue, [job])
    # 300 MiB never fits the small and medium address spaces; the large one (256 MiB) neither: failed, as oom
    assert j.state is JobState.FAILED and "needs more than 256 MiB" in (j.reason or "")
    assert [a["outcome"] for a in queue.attempts(job)] == ["oom", "oom", "oom"]
    assert "out of memory" in queue.attempts(job)[0]["error"]


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
