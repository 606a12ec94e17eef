"""Memory reserved as jobs really need it: today's by-bytes table against a calibrated table with the sizing step,
the same backlog through the same memory budget, side by side in one run (issue 12).

    .venv/bin/python -m bench.reservations [--budget 1GiB] [--scans 24] [--repeat 1]

The backlog is a mix like the shared corpus plus generated scans, every document real:
  the corpus' documents that succeed (4 to 6 pages of letter PDF, two 6000 x 6000 px pages, TIFFs and a PNG;
  pdf2image-test_241.pdf is left out: 241 pages take minutes and say nothing more about memory);
  N one-page 200-dpi grayscale scans with real text (bench.small_docs' generator);
  four 5-page 200-dpi scanned PDFs;
  three 22 MB uncompressed 6-page TIFFs (200 dpi): large by their bytes, small by their pages, as the 21 MB TIFF
  that took a 512 MB worker down;
  a 6000 x 6000 px poster PNG: small by its bytes, large by its pixels.

Sides, each a real `jobcell run` (Docker runtime) on a database of its own, with JOBCELL_MEMORY_BUDGET=--budget
and JOBCELL_CPU_BUDGET=--cpu-budget (default auto: one CPU a cell, the engine's CPUs; a larger number lets
memory, not CPUs, bound how many cells run):
  by bytes      today: small < 5 MB 512 MiB, medium < 20 MB 768 MiB, large 1 GiB (the default table's shape,
                its top tier at the budget), sizing off: a cell runs until its cap stops it
  calibrated    the table `jobcell classes --recommend` makes from the by-bytes side's own attempts (its
                policy, with at least 3 samples a class instead of 20 on a backlog this small), sizing on

Reported for each: documents per hour (wall, first submit to last end) and its ratio to by bytes; the median
over succeeded attempts of reservation / peak (target <= 2x); OOM retries per job (target <= 5%); jobs moved up
by their own estimate; memory held: reserved and peaked GiB-seconds (limit x run time, peak x run time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
import psycopg

from dispatcher.calibrate import Policy, recommend
from dispatcher.classes import load_table
from dispatcher.models import MIB
from dispatcher.settings import load_settings
from dispatcher.views import PeakSample
from jobcell import Client

from ._support import JOB_IMAGE, ROOT, free_port, postgres, scan_pages, scanned_pdf, workdir
from .small_docs import CORPUS, environ, make_docs, wait_ready

BY_BYTES = [
    {"name": "small", "max_input_bytes": "5MB", "memory_limit_bytes": "512MiB", "max_running": 15, "timeout_s": 900},
    {"name": "medium", "max_input_bytes": "20MB", "memory_limit_bytes": "768MiB", "max_running": 5, "timeout_s": 900},
    {"name": "large", "memory_limit_bytes": "1GiB", "max_running": 1, "timeout_s": 900},
]
CORPUS_DOCS = ("ocrmypdf-cardinal.pdf", "ocrmypdf-enormous.pdf", "ocrmypdf-linn.png", "ocrmypdf-multipage.pdf",
               "tesseract-8087_054.3B.tif", "tesseract-eurotext.tif", "tesseract-phototest.tif")


def big_tiff(path: Path, pages: int, dpi: int = 200) -> Path:
    """An uncompressed grayscale multi-page TIFF with real-looking text: 3.7 MB a letter page."""
    first, *rest = scan_pages(pages, dpi, "Record {n}.{line}: patient seen, vitals stable, follow up in two weeks")
    first.save(path, save_all=True, dpi=(dpi, dpi), append_images=rest)
    return path


def poster(path: Path, dpi: int = 200) -> Path:
    """A 30 x 30 in page at 200 dpi (6000 x 6000 px, as ocrmypdf-enormous.pdf): small in bytes, huge in pixels."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (30 * dpi, 30 * dpi), 255)
    d = ImageDraw.Draw(im)
    for line in range(60):
        d.text((300, 300 + line * 90), f"Poster line {line}: the quick brown fox jumps over the lazy dog", fill=0,
               font_size=48)
    im.save(path, dpi=(dpi, dpi))
    return path


def backlog(out: Path, scans: int) -> list[Path]:
    docs = [out / name for name in CORPUS_DOCS]
    for name in CORPUS_DOCS:
        (out / name).write_bytes((CORPUS / name).read_bytes())
    docs += make_docs(out, scans, 22)
    docs += [scanned_pdf(out / f"scan5-{i}.pdf", 5) for i in range(4)]
    docs += [big_tiff(out / f"big-{i}.tif", 6) for i in range(3)]
    docs.append(poster(out / "poster.png"))
    for d in docs:
        d.chmod(0o644)
    return docs


@dataclass
class Side:
    name: str
    table: list[dict[str, object]]
    sizing: bool
    env: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    jobs: int = 0
    succeeded: int = 0
    ratios: tuple[float, ...] = ()
    oom_jobs: int = 0
    moved_jobs: int = 0
    reserved_gib_s: float = 0.0
    peaked_gib_s: float = 0.0
    samples: tuple[PeakSample, ...] = ()
    latencies: tuple[float, ...] = ()  # submit to end, per job

    @property
    def docs_per_hour(self) -> float:
        return self.jobs / self.wall_s * 3600 if self.wall_s else 0.0


ATTEMPTS = """
SELECT a.job_id, a.tier, a.outcome, a.memory_limit_bytes, a.peak_memory_bytes, a.need_bytes, a.duration_s
FROM job_attempts a WHERE a.job_id = ANY(%s) ORDER BY a.job_id, a.attempt
"""


def run_side(side: Side, url: str, docs: list[Path], budget: str, work: Path) -> Side:
    port = free_port()
    env = {"JOBCELL_DATABASE_URL": url, "JOBCELL_CLASSES": json.dumps(side.table), "JOBCELL_POOL": "bench",
           "JOBCELL_MEMORY_BUDGET": budget, "JOBCELL_RUNTIME": "docker", "JOBCELL_SIZING": str(side.sizing).lower(),
           "JOBCELL_STORE_DIR": str(work / "store"), "JOBCELL_HTTP_PORT": str(port), "JOBCELL_JOB_IMAGE": JOB_IMAGE,
           "JOBCELL_BACKOFF_EXPONENT": "0", **side.env}
    log = (work / f"dispatcher-{side.name.replace(' ', '-')}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "run", "--migrate"], cwd=ROOT,
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc)
        with environ(env):
            client = Client(load_settings())
        t0 = time.monotonic()
        ids = [client.submit(d, name=d.name, force=True).id for d in docs]
        with psycopg.connect(url) as db:
            while db.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND state NOT IN "
                             "('succeeded', 'failed', 'cancelled')", (ids,)).fetchone() != (0,):
                time.sleep(0.2)
            side.wall_s = time.monotonic() - t0
            rows = db.execute(ATTEMPTS, (ids,)).fetchall()
            side.succeeded = db.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND state = 'succeeded'",
                                        (ids,)).fetchone()[0]  # type: ignore[index]
            side.latencies = tuple(r[0] for r in db.execute(
                "SELECT extract(epoch FROM finished_at - created_at)::float8 FROM jobs WHERE id = ANY(%s)", (ids,)))
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    side.jobs = len(docs)
    side.samples = tuple(PeakSample(t, o, lim, peak, need) for _, t, o, lim, peak, need, _ in rows)
    side.ratios = tuple(lim / peak for _, _, o, lim, peak, _, _ in rows if o == "succeeded" and peak)
    side.oom_jobs = len({j for j, _, o, *_ in rows if o == "oom"})
    side.moved_jobs = len({j for j, _, o, *_ in rows if o == "needs_more"})
    side.reserved_gib_s = sum(lim * (d or 0) for _, _, _, lim, _, _, d in rows) / 2**30
    side.peaked_gib_s = sum((peak or 0) * (d or 0) for _, _, _, _, peak, _, d in rows) / 2**30
    return side


def database(admin_url: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def report(sides: list[Side], budget: str, cpu_budget: str) -> None:
    base = sides[0]
    print(f"\n{base.jobs} documents, memory budget {budget}, CPU budget {cpu_budget}, on {os.cpu_count()} CPUs\n")
    head = f"{'side':<12} {'docs/h':>7} {'x bytes':>8} {'ok':>4} {'reserve/peak p50':>17} {'OOM retries':>12} " \
           f"{'moved up':>9} {'reserved GiB-s':>15} {'peaked GiB-s':>13}"
    print(head)
    for s in sides:
        ratio = statistics.median(s.ratios) if s.ratios else float("nan")
        print(f"{s.name:<12} {s.docs_per_hour:7.0f} {s.docs_per_hour / base.docs_per_hour:7.2f}x {s.succeeded:4d} "
              f"{ratio:16.1f}x {s.oom_jobs / s.jobs:11.1%} {s.moved_jobs:9d} {s.reserved_gib_s:15.0f} "
              f"{s.peaked_gib_s:13.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--scans", type=int, default=24, help="generated one-page scans in the backlog")
    ap.add_argument("--cpu-budget", default="auto", help="JOBCELL_CPU_BUDGET of both sides (auto: the CPUs)")
    a = ap.parse_args()
    client = docker.from_env()
    client.images.get(JOB_IMAGE)
    with workdir("jobcell-reservations-") as work:
        docs = backlog(work / "docs", a.scans)
        print(f"{len(docs)} documents in {work / 'docs'}", flush=True)
        with postgres(client) as admin:
            cpu = {"JOBCELL_CPU_BUDGET": a.cpu_budget}
            first = run_side(Side("by bytes", BY_BYTES, sizing=False, env=cpu), database(admin), docs, a.budget, work)
            print(f"done: {first.name} in {first.wall_s:.0f} s", flush=True)
            cal = recommend(load_table(BY_BYTES), first.samples, Policy(min_samples=3))
            table = [c.model_dump(exclude_none=True) for c in cal.table.classes]
            print("calibrated: " + ", ".join(f"{r.name} {r.recommended_bytes // MIB} MiB ({r.note})"
                                             for r in cal.classes), flush=True)
            second = run_side(Side("calibrated", table, sizing=True, env=cpu), database(admin), docs, a.budget, work)
            print(f"done: {second.name} in {second.wall_s:.0f} s", flush=True)
    report([first, second], a.budget, a.cpu_budget)
    return 0 if all(s.succeeded == s.jobs for s in (first, second)) else 1


if __name__ == "__main__":
    sys.exit(main())
