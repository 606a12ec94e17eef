"""What jobcell adds on top of `docker run`: N no-op jobs through the dispatcher vs N `docker run --rm` of the
same image with the same limits at the same concurrency, side by side in one run.

    .venv/bin/python -m bench.dispatch_overhead [--jobs 40] [--concurrency 4] [--rounds 2]

Reports the ratio of total wall times (target <= 1.15) and the median submit-to-start latency of an idle
dispatcher next to the median `docker run`-to-start latency.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import docker

from dispatcher.classes import SizeClassTable, load_table
from dispatcher.loop import Dispatcher, LoopConfig
from dispatcher.models import MIB, NewJob
from dispatcher.queue import PostgresQueue
from dispatcher.runtimes.docker import DockerOptions, DockerRuntime
from job_image.contract import Header

from ._support import JOB_IMAGE, postgres

LIMIT = "128m"
# a diag cell's whole input: its header line (a diag job reads no document)
DIAG = Header(job_id=1, attempt=1, tier="bench", memory_limit_bytes=128 * MIB,
              workload="diag").model_dump_json().encode() + b"\n"


def baseline(n: int, concurrency: int) -> float:
    """Wall seconds of N `docker run --rm` with the limits and hardening jobcell uses."""

    def one(_: int) -> None:
        subprocess.run(["docker", "run", "-i", "--rm", "--network", "none", "--memory", LIMIT,
                        "--memory-swap", LIMIT, "--pids-limit", "256", "--read-only", "--tmpfs", "/tmp:size=64m",
                        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--user", "10001:10001",
                        JOB_IMAGE], input=DIAG, check=True, capture_output=True)

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return time.monotonic() - start


def raw_start_latency(client: docker.DockerClient, samples: int) -> list[float]:
    """Invoke-to-StartedAt of single `docker run`s, the engine's own clock for the start."""
    out = []
    for _ in range(samples):
        name = f"bench-raw-{uuid.uuid4().hex[:8]}"
        t0 = time.time()
        subprocess.run(["docker", "run", "-i", "--name", name, "--network", "none", "--memory", LIMIT,
                        "--memory-swap", LIMIT, JOB_IMAGE], input=DIAG, check=True, capture_output=True)
        c = client.containers.get(name)
        out.append(_ts(c.attrs["State"]["StartedAt"]) - t0)
        c.remove(force=True)
    return out


def _ts(docker_time: str) -> float:
    # '2026-11-22T22:40:01.123456789Z' -> epoch seconds (microsecond precision is plenty)
    head, _, frac = docker_time.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0")[:6])


def table(concurrency: int) -> SizeClassTable:
    return load_table([{"name": "small", "memory_limit_bytes": LIMIT.replace("m", "MiB"),
                        "max_running": concurrency, "timeout_s": 600}])


def through_jobcell(url: str, client: docker.DockerClient, n: int, concurrency: int) -> tuple[float, str]:
    """Wall seconds from the first submit until every job is recorded as succeeded and cleaned up."""
    pool = f"bench-{uuid.uuid4().hex[:6]}"
    t = table(concurrency)
    q = PostgresQueue(url, t)
    runtime = DockerRuntime(DockerOptions(image=JOB_IMAGE, pool=pool, network_mode="none"), client=client)
    d = Dispatcher(q, runtime, t, LoopConfig(owner="bench", pool=pool, budget_bytes=64 * 1024 * MIB, poll_s=0.5))
    start = time.monotonic()
    ids = [q.submit(NewJob("diag:", 0, f"diag:{uuid.uuid4()}", "small", workload="diag"))[0] for _ in range(n)]
    thread = threading.Thread(target=d.run, daemon=True)
    thread.start()
    while not all(j.state.final for j in q.jobs(ids)):
        time.sleep(0.05)
    wall = time.monotonic() - start
    d.stop()
    thread.join(30)
    bad = [j for j in q.jobs(ids) if j.state.value != "succeeded"]
    assert not bad, f"{len(bad)} bench jobs did not succeed: {bad[0]}"
    q.close()
    return wall, pool


def submit_to_start(url: str, client: docker.DockerClient, samples: int) -> list[float]:
    """An idle dispatcher: each job submitted alone; created_at (DB clock) to the engine's StartedAt."""
    pool = f"bench-{uuid.uuid4().hex[:6]}"
    t = table(1)
    q = PostgresQueue(url, t)
    runtime = DockerRuntime(DockerOptions(image=JOB_IMAGE, pool=pool, network_mode="none"), client=client)
    d = Dispatcher(q, runtime, t, LoopConfig(owner="bench-latency", pool=pool, budget_bytes=64 * 1024 * MIB))
    thread = threading.Thread(target=d.run, daemon=True)
    thread.start()
    time.sleep(1.0)
    out = []
    starts: dict[int, float] = {}

    def record_start() -> None:
        for ev in client.events(decode=True, filters={"type": "container", "event": "start",
                                                      "label": f"jobcell.pool={pool}"}):
            starts[int(ev["Actor"]["Attributes"]["jobcell.job"])] = ev["timeNano"] / 1e9

    threading.Thread(target=record_start, daemon=True).start()
    time.sleep(0.5)
    for _ in range(samples):
        job_id, _ = q.submit(NewJob("diag:", 0, f"diag:{uuid.uuid4()}", "small", workload="diag"))
        while not q.get(job_id).state.final:
            time.sleep(0.02)
        created = q.get(job_id).created_at.timestamp()
        deadline = time.monotonic() + 5
        while job_id not in starts and time.monotonic() < deadline:
            time.sleep(0.02)
        out.append(starts[job_id] - created)
        time.sleep(0.3)
    d.stop()
    thread.join(30)
    q.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-samples", type=int, default=10)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    client = docker.from_env()
    client.images.get(JOB_IMAGE)
    with postgres(client) as url:
        PostgresQueue(url, table(1)).migrate()
        raw_walls, cell_walls = [], []
        baseline(4, a.concurrency)  # warm the engine and the page cache for both sides
        for r in range(a.rounds):
            # alternate the order, so that drift in the machine's speed does not favour one side
            runs = [("raw", lambda: baseline(a.jobs, a.concurrency)),
                    ("jobcell", lambda: through_jobcell(url, client, a.jobs, a.concurrency)[0])]
            for name, fn in runs if r % 2 == 0 else runs[::-1]:
                wall = fn()
                (raw_walls if name == "raw" else cell_walls).append(wall)
                print(f"round {r + 1}: {name:8s} {a.jobs} jobs at concurrency {a.concurrency}: {wall:6.2f} s",
                      flush=True)
        lat_cell = submit_to_start(url, client, a.latency_samples)
        lat_raw = raw_start_latency(client, a.latency_samples)
    raw, cell = statistics.median(raw_walls), statistics.median(cell_walls)
    print()
    print(f"total wall time, median of {a.rounds} rounds: docker run --rm {raw:.2f} s, jobcell {cell:.2f} s")
    print(f"ratio jobcell / docker run = {cell / raw:.3f}  (target <= 1.15)")
    print(f"median submit-to-start latency, idle dispatcher: {statistics.median(lat_cell) * 1000:.0f} ms "
          f"(docker run invoke-to-start: {statistics.median(lat_raw) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
