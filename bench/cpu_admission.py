"""CPU-aware admission: the same backlog of multi-page scans with 15 small slots, admitted by memory alone
(JOBCELL_CPU_BUDGET=off, every cell running as many page workers as it sees CPUs) against admission by CPU as
well (the default: one CPU a cell, the engine's CPUs), side by side in one run (issue 12).

    .venv/bin/python -m bench.cpu_admission [--docs 12] [--pages 5]

Reported for each: documents per hour, the median and 90th percentile of submit-to-end, and the ratio of each to
memory-only admission. Both sides: a real `jobcell run` (Docker), budget 8 GiB, 15 small slots of 512 MiB.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import docker

from ._support import JOB_IMAGE, postgres, scanned_pdf, workdir
from .reservations import Side, database, run_side

CLASSES: list[dict[str, object]] = [
    {"name": "small", "memory_limit_bytes": "512MiB", "max_running": 15, "timeout_s": 1800}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--pages", type=int, default=5)
    a = ap.parse_args()
    client = docker.from_env()
    client.images.get(JOB_IMAGE)
    with workdir("jobcell-cpu-admission-") as work:
        docs = [scanned_pdf(work / "docs" / f"scan-{i}.pdf", a.pages) for i in range(a.docs)]
        for d in docs:
            d.chmod(0o644)
        sides = [Side("memory only", CLASSES, sizing=True, env={"JOBCELL_CPU_BUDGET": "off"}),
                 Side("by CPU too", CLASSES, sizing=True, env={"JOBCELL_CPU_BUDGET": "auto"})]
        with postgres(client) as admin:
            for s in sides:
                run_side(s, database(admin), docs, "8GiB", work)
                print(f"done: {s.name} in {s.wall_s:.0f} s", flush=True)
    base = sides[0]
    print(f"\n{a.docs} documents of {a.pages} pages, 15 slots, on the engine's CPUs\n")
    print(f"{'side':<12} {'docs/h':>7} {'x':>6} {'p50 s':>7} {'x':>6} {'p90 s':>7} {'x':>6} {'ok':>4}")
    for s in sides:
        p50, p90 = statistics.median(s.latencies), statistics.quantiles(s.latencies, n=10)[-1]
        b50, b90 = statistics.median(base.latencies), statistics.quantiles(base.latencies, n=10)[-1]
        print(f"{s.name:<12} {s.docs_per_hour:7.0f} {s.docs_per_hour / base.docs_per_hour:5.2f}x {p50:7.1f} "
              f"{p50 / b50:5.2f}x {p90:7.1f} {p90 / b90:5.2f}x {s.succeeded:4d}")
    return 0 if all(s.succeeded == s.jobs for s in sides) else 1


if __name__ == "__main__":
    sys.exit(main())
