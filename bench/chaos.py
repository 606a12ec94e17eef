"""Chaos campaign: a mixed backlog through two real dispatcher processes while faults are thrown at them, then
the invariants checked on what the database and the engine say.

Faults, at random: kill -9 of a dispatcher (restarted a little later), SIGSTOP past the lease (then SIGCONT),
Postgres stopped for a while and started again, and with --engine-restart (root, live-restore) the Docker
engine itself stopped and started. Invariants at the end: every job final; attempts numbered 1..N without a
gap; exit-65 jobs with exactly one attempt; never two running units of one job at once (sampled throughout);
no unit left; no healthy job recorded oom or lost; every succeeded document's pages stored exactly once.

    .venv/bin/python -m bench.chaos --jobs 120 --minutes 4
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import psycopg

from ._support import ROOT, free_port, pg_image, wait_db

CORPUS = ROOT.parent / "shared" / "corpus"
CLASSES = ('[{"name": "small", "max_input_bytes": "5MB", "memory_limit_bytes": "128MiB", "max_running": 4,'
           ' "timeout_s": 300}, {"name": "medium", "memory_limit_bytes": "384MiB", "max_running": 2,'
           ' "timeout_s": 300}]')
LEASE_TTL_S = 6


class Dispatcher:
    """One `jobcell run` process with a stable id, so that a restart adopts its own units at once."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.env, self.log = name, env, (log_dir / f"{name}.log").open("ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "run"], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**self.env, "JOBCELL_DISPATCHER_ID": self.name})

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def submit_backlog(env: dict[str, str], n: int, rng: random.Random, work: Path) -> dict[str, int]:
    kinds = collections.Counter[str]()
    pdf = CORPUS / "ocrmypdf-cardinal.pdf"  # 4 pages: each copy must end with 4 pages stored, once each
    for i in range(n):
        roll = rng.random()
        if roll < 0.5:
            kind, args = "healthy", ["--diag", f"alloc_mib={rng.choice([5, 20, 40])},sleep_s={rng.uniform(1, 12):.1f}"]
        elif roll < 0.65:
            kind, args = "oom", ["--diag", f"alloc_mib=200,sleep_s={rng.uniform(0.5, 3):.1f}"]
        elif roll < 0.8:
            kind, args = "bad_input", ["--diag", "exit_code=65,message=refused by design"]
        elif roll < 0.9 and pdf.exists():
            copy = work / f"doc-{i}.pdf"  # a comment after %%EOF: other bytes (no dedupe), the same pages
            copy.write_bytes(pdf.read_bytes() + f"\n% chaos {i}\n".encode())
            kind, args = "document", [str(copy)]
        else:
            kind, args = "tempfail", ["--diag", "exit_code=75,message=flaky dependency", "--max-attempts", "2"]
        out = subprocess.run([sys.executable, "-m", "dispatcher.cli", "submit", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"submit failed: {out.stderr}")
        kinds[kind] += 1
    return dict(kinds)


class Sampler(threading.Thread):
    """Watches the engine: two running units of one job at once is a violation."""

    def __init__(self, pool: str) -> None:
        super().__init__(daemon=True)
        self.pool, self.doubles, self.samples = pool, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                client = docker.from_env(timeout=5)
                running = client.api.containers(filters={"label": f"jobcell.pool={self.pool}", "status": "running"})
                per_job = collections.Counter(c["Labels"]["jobcell.job"] for c in running)
                self.doubles += sum(1 for n in per_job.values() if n > 1)
                self.samples += 1
            except Exception:  # the engine is being restarted
                pass
            self.stop.wait(0.5)


def chaos(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    client = docker.from_env()
    port = free_port()
    pg = client.containers.run(pg_image(), detach=True, ports={"5432/tcp": ("127.0.0.1", port)},
                               environment={"POSTGRES_USER": "chaos", "POSTGRES_PASSWORD": "chaos",
                                            "POSTGRES_DB": "chaos"}, labels={"jobcell.bench": "1"},
                               command=["postgres", "-c", "fsync=off"])
    url = f"postgresql://chaos:chaos@127.0.0.1:{port}/chaos"
    pool = "chaos-" + uuid.uuid4().hex[:6]
    log_dir = ROOT / "var" / "chaos" / pool
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JOBCELL_DATABASE_URL": url, "JOBCELL_CLASSES": CLASSES, "JOBCELL_POOL": pool,
           "JOBCELL_MEMORY_BUDGET": "1GiB", "JOBCELL_LEASE_TTL_S": str(LEASE_TTL_S), "JOBCELL_POLL_INTERVAL_S": "0.5",
           "JOBCELL_BACKOFF_EXPONENT": "1", "JOBCELL_STORE_DIR": str(log_dir / "store")}
    faults = collections.Counter[str]()
    sampler = Sampler(pool)
    dispatchers = [Dispatcher(f"{pool}-d{i}", env, log_dir) for i in (1, 2)]
    try:
        wait_db(url)
        subprocess.run([sys.executable, "-m", "dispatcher.cli", "migrate"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        kinds = submit_backlog(env, args.jobs, rng, log_dir)
        print(f"backlog: {args.jobs} jobs {kinds}; pool {pool}; logs in {log_dir}")
        for d in dispatchers:
            d.start()
        sampler.start()
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(rng.uniform(4, 12))
            fault = rng.choice(["kill9", "kill9", "sigstop", "postgres"] + (["engine"] if args.engine_restart else []))
            d = rng.choice(dispatchers)
            if fault == "kill9" and d.alive():
                d.signal(signal.SIGKILL)
                time.sleep(rng.uniform(0.5, 5))
                d.start()
            elif fault == "sigstop" and d.alive():
                d.signal(signal.SIGSTOP)
                time.sleep(LEASE_TTL_S + rng.uniform(2, 8))  # past the lease: the other one may adopt
                d.signal(signal.SIGCONT)
            elif fault == "postgres":
                pg.stop(timeout=5)
                time.sleep(rng.uniform(5, 20))
                pg.start()
            elif fault == "engine":
                subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=False)
                time.sleep(rng.uniform(3, 8))
                subprocess.run(["bash", "scripts/ensure-docker.sh"], cwd=ROOT, capture_output=True, check=False)
            else:
                continue
            faults[fault] += 1
        print(f"faults thrown: {dict(faults)}; waiting for the backlog to finish")
        for d in dispatchers:
            if not d.alive():
                d.start()
        wait_db(url)
        deadline = time.monotonic() + args.settle_minutes * 60
        while time.monotonic() < deadline:
            with psycopg.connect(url) as c:
                left = c.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
            if left and left[0] == 0:
                break
            time.sleep(2)
        for d in dispatchers:
            d.signal(signal.SIGTERM)
        for d in dispatchers:
            if d.proc:
                d.proc.wait(timeout=60)
        time.sleep(1)
        sampler.stop.set()
        return report(url, client, pool, sampler)
    finally:
        for d in dispatchers:
            d.signal(signal.SIGKILL)
        for c in client.api.containers(all=True, filters={"label": f"jobcell.pool={pool}"}):
            client.api.remove_container(c["Id"], force=True)
        pg.remove(force=True)


def report(url: str, client: docker.DockerClient, pool: str, sampler: Sampler) -> int:
    with psycopg.connect(url) as c:
        def one(q: str) -> Any:
            row = c.execute(q).fetchone()
            return row[0] if row else None
        states: dict[str, int] = dict(c.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        outcomes: dict[str, int] = dict(
            c.execute("SELECT outcome, count(*) FROM job_attempts GROUP BY outcome").fetchall())
        violations = {
            "jobs not final": one("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"),
            "attempt gaps": one("SELECT count(*) FROM jobs j WHERE j.attempt <> (SELECT count(*) FROM job_attempts a"
                                " WHERE a.job_id = j.id) OR EXISTS (SELECT 1 FROM job_attempts a WHERE"
                                " a.job_id = j.id AND (a.attempt < 1 OR a.attempt > j.attempt))"),
            "exit-65 jobs retried": one("SELECT count(*) FROM jobs j WHERE j.params->>'exit_code' = '65'"
                                        " AND j.attempt <> 1"),
            "healthy jobs recorded oom or lost": one(
                "SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id WHERE a.outcome IN ('oom','lost')"
                " AND j.workload = 'diag' AND coalesce((j.params->>'alloc_mib')::float, 0) < 64"
                " AND coalesce(j.params->>'exit_code', '0') = '0'"),
            "documents with pages missing or extra": one(
                "SELECT count(*) FROM jobs j JOIN document_results r ON r.job_id = j.id WHERE j.state = 'succeeded'"
                " AND r.page_count <> (SELECT count(*) FROM document_pages p WHERE p.job_id = j.id)"),
            "two running units of one job (samples)": sampler.doubles,
            "units left": len(client.api.containers(all=True, filters={"label": f"jobcell.pool={pool}"})),
        }
    print(f"jobs by state: {states}")
    print(f"attempts by outcome: {outcomes}")
    print(f"engine samples: {sampler.samples}")
    for name, n in violations.items():
        print(f"  {name}: {n}")
    broken = {k: v for k, v in violations.items() if v}
    print("invariants: " + ("all hold" if not broken else f"VIOLATED {broken}"))
    return 1 if broken else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=120)
    p.add_argument("--minutes", type=float, default=4.0, help="how long faults are thrown")
    p.add_argument("--settle-minutes", type=float, default=10.0, help="how long the backlog may take afterwards")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--engine-restart", action="store_true", help="also restart dockerd (root, live-restore)")
    return chaos(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
