"""What holds a process-runtime job to its memory limit where no cgroup can be written (a Render worker).

    .venv/bin/python -m bench.process_cap [--limit-mib 64] [--repeat 3]

Every mode runs the same workloads through the real ProcessRuntime, side by side in one run: RLIMIT_AS alone
(cap=rlimit, the old fallback), RLIMIT_DATA alone, the watchdog alone (the unit's process tree sampled every
50 ms, SIGKILLed past the limit), the watchdog with an RLIMIT_DATA or RLIMIT_AS backstop, and, where this host
lets us write one, a memory cgroup as the reference. For each run the bench samples the unit's tree itself
every 10 ms and prints its true peak (private resident: RssAnon + RssShmem, what a cgroup charges; and VmRSS)
against the limit, the peak the runtime reported, and how the dispatcher classifies the end. A cap holds when
every over-limit workload is oom with a true peak near the limit and every under-limit one succeeds.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dispatcher.models import MIB, Exit, LaunchSpec
from dispatcher.outcome import classify
from dispatcher.ports import CellInput
from dispatcher.runtimes.process import ProcessOptions, ProcessRuntime, proc_table, tree_memory, unit_tree
from job_image.contract import Header

ENTRYPOINT = (sys.executable, "-m", "job_image.entrypoint")

# Three children of 30 MiB each: every process stays under a 64 MiB per-process rlimit, the tree does not.
TREE = """
import subprocess, sys
child = "import time; held = b'Z' * (30 << 20); time.sleep(1.0)"
kids = [subprocess.Popen(["python3", "-c", child]) for _ in range(3)]  # by PATH: a sealed uid may not reach ours
sys.exit(86 if any(k.wait() != 0 for k in kids) else 0)  # a child that failed to allocate: the job's oom
"""
# Four worker threads next to 30 MiB, each holding small objects (as the job's page threads do): each thread's
# 8 MiB stack is reserved (RLIMIT_DATA and RLIMIT_AS count it) and glibc reserves an arena per thread
# (RLIMIT_AS counts that too); little of either is resident, which is all a cgroup counts.
THREADS = """
import threading, time
held, kept = b'Z' * (30 << 20), []
def work():
    kept.append([bytes(1000) for _ in range(500)])
    time.sleep(1.0)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
"""


@dataclass(frozen=True)
class Workload:
    name: str
    over: bool  # it needs more than a 64 MiB limit: it must end as oom
    params: dict[str, Any]
    command: tuple[str, ...] = ENTRYPOINT


WORKLOADS = [
    Workload("diag 20 MiB (under)", False, {"alloc_mib": 20, "sleep_s": 0.5}),
    Workload("4 threads + 30 MiB (under)", False, {}, (sys.executable, "-c", THREADS)),
    Workload("diag 150 MiB at once", True, {"alloc_mib": 150, "sleep_s": 0.5}),
    Workload("diag 150 MiB, 8 MiB / 50 ms", True, {"alloc_mib": 150, "step_sleep_s": 0.05, "sleep_s": 0.5}),
    Workload("3 children x 30 MiB", True, {}, (sys.executable, "-c", TREE)),
]


@dataclass(frozen=True)
class Mode:
    name: str
    options: dict[str, Any]
    watchdog: bool = True


MODES = [
    Mode("RLIMIT_AS alone (cap=rlimit)", {"cap": "rlimit"}, watchdog=False),
    Mode("RLIMIT_DATA 1.0x alone", {"cap": "watchdog", "backstop": "data", "backstop_ratio": 1.0}, watchdog=False),
    Mode("watchdog alone", {"cap": "watchdog", "backstop": "none"}),
    Mode("watchdog + RLIMIT_AS 1.25x", {"cap": "watchdog", "backstop": "as", "backstop_ratio": 1.25}),
    Mode("watchdog + RLIMIT_DATA 1.0x", {"cap": "watchdog", "backstop": "data", "backstop_ratio": 1.0}),
    Mode("watchdog + RLIMIT_DATA 1.25x", {"cap": "watchdog", "backstop": "data", "backstop_ratio": 1.25}),
    Mode("cgroup (reference)", {"cap": "auto"}),
]


@dataclass
class Run:
    outcome: str
    exit_code: int | None
    true_private: int
    true_rss: int
    reported: int | None
    reason: str


class Sampler:
    """The unit's tree, sampled every 10 ms on a thread of its own: what it really held, the bench's measure."""

    def __init__(self, unit: Path) -> None:
        self.unit, self.private, self.rss = unit, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sid = int((self.unit / "pid").read_text())
        uid_file = self.unit / "uid"
        uid = int(uid_file.read_text()) if uid_file.exists() else None
        while not self.stop.is_set():
            private, rss, _ = tree_memory(unit_tree(proc_table(uid is not None), sid, uid))
            self.private, self.rss = max(self.private, private), max(self.rss, rss)
            time.sleep(0.01)

    def done(self) -> tuple[int, int]:
        self.stop.set()
        self.thread.join()
        return self.private, self.rss


def one(rt: ProcessRuntime, job_id: int, limit: int, w: Workload) -> Run:
    spec = LaunchSpec(job_id, 1, "small", limit, 60, "diag:", "diag", w.params)
    cell = CellInput(Header(job_id=job_id, attempt=1, tier="small", memory_limit_bytes=limit, workload="diag",
                            params=w.params), "diag:")
    handle = rt.launch(spec, cell)
    sampler = Sampler(Path(handle.ref))
    ended: Exit | None = None
    deadline = time.monotonic() + 60
    while (ended := rt.poll(handle)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    private, rss = sampler.done()
    if ended is None:
        rt.kill(handle)
        ended = Exit(exit_code=None, lost=True)
    rt.cleanup(handle)
    return Run(classify(ended, None).value, ended.exit_code, private, rss, ended.peak_memory_bytes,
               ended.reason or (ended.log_tail.strip().splitlines() or [""])[-1])


def sample_cost() -> tuple[float, int]:
    """One watchdog sample of this host (every process's stat, one tree's status): (ms, processes)."""
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        procs = proc_table(with_uid=True)
        tree_memory(unit_tree(procs, 1, None))
    return (time.perf_counter() - t0) / n * 1000, len(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each workload in each mode (the worst is shown)")
    ap.add_argument("--modes", nargs="*", default=[], help="only the modes whose name holds one of these words")
    ap.add_argument("--verbose", action="store_true", help="every run's outcome and true peak")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the runtime's warnings about its cap, once per mode, are noise here
    limit = a.limit_mib * MIB
    ids = itertools.count(1)
    ms, procs = sample_cost()
    print(f"limit {a.limit_mib} MiB, worst of {a.repeat} runs; true peaks sampled every 10 ms by the bench "
          f"('private': RssAnon + RssShmem of the unit's tree, 'rss': its VmRSS); 'reported': what poll() says.\n"
          f"one watchdog sample here: {ms:.2f} ms for {procs} processes ({ms / 50 * 100:.1f}% of a CPU every 50 ms)")
    summary: list[tuple[str, list[str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in [m for m in MODES if not a.modes or any(w.lower() in m.name.lower() for w in a.modes)]:
            base = ProcessOptions(state_root=str(Path(tmp) / "units"), pool="bench", queue_id="bench", **mode.options)
            probe = ProcessRuntime(base)
            if mode.options["cap"] == "auto" and probe.cap != "cgroup":
                print(f"\n{mode.name}: skipped, no memory cgroup can be written here")
                continue
            print(f"\n{mode.name}  (sealed cells: {probe.sealed})")
            print(f"  {'workload':30s} {'outcomes':24s} {'true private':>12s} {'true rss':>9s} {'/ limit':>7s} "
                  f"{'reported':>9s}")
            cells = []
            for w in WORKLOADS:
                # a state dir of its own: one runtime's watchdog per unit, as in a dispatcher
                rt = ProcessRuntime(replace(base, command=w.command, queue_id=f"{len(summary)}-{len(cells)}"))
                if not mode.watchdog:
                    rt.watchdog = None  # the rlimit alone: nothing samples or kills
                runs = [one(rt, next(ids), limit, w) for _ in range(a.repeat)]
                if a.verbose:
                    print("    outcome, true private (reported) MiB:",
                          [f"{r.outcome} {r.true_private / MIB:.0f} ({(r.reported or 0) / MIB:.0f})" for r in runs])
                worst = max(r.true_private for r in runs)
                outcomes = ",".join(sorted({f"{r.outcome}({r.exit_code})" for r in runs}))
                reported = [r.reported for r in runs if r.reported is not None]
                right = all(r.outcome == ("oom" if w.over else "succeeded") for r in runs)
                print(f"  {w.name:30s} {outcomes:24s} {worst / MIB:8.0f} MiB {max(r.true_rss for r in runs) / MIB:5.0f}"
                      f" MiB {worst / limit:6.2f}x {max(reported) / MIB if reported else 0:5.0f} MiB"
                      f"{'' if right else '  WRONG: ' + ('not oom' if w.over else 'not succeeded')}", flush=True)
                for r in [] if right else runs[:1]:
                    print(f"      {r.outcome}: {r.reason[:100]}")
                cells.append(f"{'ok' if right else 'WRONG'} {worst / limit:.2f}x")
            summary.append((mode.name, cells))
        if not a.modes:
            peaks(Path(tmp), ids, a.repeat)
    print("\nsummary: right outcome (oom over the limit, succeeded under it), worst true private peak / limit")
    print(f"  {'mode':30s} " + " ".join(f"{w.name[:22]:>22s}" for w in WORKLOADS))
    for name, cells in summary:
        print(f"  {name:30s} " + " ".join(f"{c:>22s}" for c in cells))


PEAKS: list[tuple[str, int, dict[str, Any]]] = [
    ("diag 20 MiB, held 0.5 s", 64, {"alloc_mib": 20, "sleep_s": 0.5}),
    ("diag 20 MiB, exits at once", 64, {"alloc_mib": 20}),
    ("diag 100 MiB, held 0.5 s", 160, {"alloc_mib": 100, "sleep_s": 0.5}),
    ("diag 100 MiB, exits at once", 160, {"alloc_mib": 100})]


def peaks(tmp: Path, ids: Iterator[int], repeat: int) -> None:
    """The peak poll() reports for the same job: the watchdog's (its samples, or the kernel's high-water mark
    less file pages for a peak shorter than a sample) against the cgroup's own counter."""
    by_cap = {}
    for cap in ("auto", "watchdog"):
        rt = ProcessRuntime(ProcessOptions(state_root=str(tmp / "peaks"), pool="bench", queue_id=cap, cap=cap))
        if rt.cap == "rlimit" or (cap == "auto" and rt.cap != "cgroup"):
            return
        by_cap[cap] = [[one(rt, next(ids), limit * MIB, Workload(name, False, params)).reported or 0
                        for _ in range(repeat)] for name, limit, params in PEAKS]
    print("\npeak reported by poll(), watchdog vs cgroup, same job (each run)")
    for (name, _, _), cg, wd in zip(PEAKS, by_cap["auto"], by_cap["watchdog"], strict=True):
        worst = max(((w - c) / c for w, c in zip(wd, cg, strict=True) if c), key=abs)
        print(f"  {name:30s} cgroup {' '.join(f'{c / MIB:5.1f}' for c in cg)} MiB   watchdog "
              f"{' '.join(f'{w / MIB:5.1f}' for w in wd)} MiB   worst {worst:+.0%}")


if __name__ == "__main__":
    main()
