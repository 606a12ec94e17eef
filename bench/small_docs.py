"""Small documents: what a cell per document costs against OCR alone, side by side in one run (issue 12).

    .venv/bin/python -m bench.small_docs [--docs 40] [--concurrency 2] [--lines 22]

N one-page scans (8.5 x 11 in, 200 dpi, grayscale PNG, real text from the corpus' transcripts drawn with
Pillow; the same bytes for every side, generated the same way every run) go through:

  raw            the `tesseract` CLI on this host: `xargs -P C tesseract page.png - --psm 3 --dpi 200 tsv`,
                 OMP_THREAD_LIMIT=1 (the job's own flags and output: words with boxes)
  raw (image)    the same command inside one long-lived job-image container (no per-page container): what
                 tesseract costs in the image, so that the Docker ratio can be read without the host's build
  jobcell docker a real `jobcell run` (JOBCELL_RUNTIME=docker) on a throwaway Postgres, documents submitted with
                 jobcell.Client while it runs: one sealed container per document
  jobcell process the same with JOBCELL_RUNTIME=process (host tesseract/poppler; skipped, and said, without them)
  ..., poll 0.1 s the process runtime again with JOBCELL_POLL_INTERVAL_S=0.1: with a cgroup it has no event for a
                 unit's end, so the loop sees one only at its next poll (1 s by default)
  warm worker    one long-lived process, C threads, each running job_image.pipeline.run per document (no cell,
                 no queue): the floor for the same pipeline

Equal CPUs: every side has the same C = 2 workers at a time on this 2-core machine (jobcell: one class with
max_running C; each 1-page document is one page worker), nothing else is capped, nothing pinned.

Measures, from the first submit to the last job final (wall):
  docs/s and its ratio to raw (targets: docker >= 0.75, process >= 0.9); and `cpu x raw`, raw's attributed
  CPU-s per document over the side's: the same ratio on a machine kept busy, and the one to read when other
  load shares the machine (the bench warns when it sees some: `bg/s`);
  CPU-s per document, three ways: `work` (the OCR side: tesseract's children via rusage for raw; each cell's
  cpuacct cgroup sampled every 20 ms for Docker, a lower bound by at most one sample per cell; the reaped
  children of the dispatcher for process, i.e. the cells; the warm worker's own), `attributed` (work plus the
  dispatcher's own CPU, Postgres's container cgroup and, for Docker sides, dockerd + containerd: those two are
  shared with anything else on this engine), and `machine` (/proc/stat, every busy jiffy of the host: includes
  the runc/shim processes that nothing else sees, and any other load; the background rate measured just before
  each side is printed with it);
  peak memory: the largest sum, sampled every 100 ms, of the side's host processes' RSS (dispatcher, its
  children) and its containers' memory cgroups (usage less inactive file, as `docker stats`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import docker
import psycopg

from dispatcher.classes import load_table
from dispatcher.queue import PostgresQueue
from dispatcher.settings import load_settings
from jobcell import Client

from ._support import JOB_IMAGE, ROOT, free_port, postgres

CORPUS = ROOT.parent / "shared" / "corpus"
TEXTS = ("ocrmypdf-linn.txt", "tesseract-8087_054.3B.txt", "tesseract-phototest.txt", "tesseract-eurotext.txt")
DPI = 200
TESSERACT = ["--psm", "3", "--dpi", str(DPI), "-l", "eng", "tsv"]  # what pytesseract.image_to_data runs
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPUACCT = Path("/sys/fs/cgroup/cpuacct/docker")
MEMCG = Path("/sys/fs/cgroup/memory/docker")
BENCH_LABEL = "jobcell.bench.small_docs"


# -- documents ------------------------------------------------------------------------------------------------

def make_docs(out: Path, n: int, lines: int) -> list[Path]:
    """N distinct one-page scans: consecutive windows of real text, one window per document."""
    from PIL import Image, ImageDraw, ImageFont

    words = [w for name in TEXTS if (CORPUS / name).exists()
             for w in re.findall(r"\S+", (CORPUS / name).read_text(errors="replace"))]
    if not words:
        raise SystemExit(f"no text found in {CORPUS} ({', '.join(TEXTS)})")
    font = ImageFont.load_default(size=30)
    w, h = int(8.5 * DPI), int(11 * DPI)
    docs, i = [], 0
    for k in range(n):
        text: list[str] = []
        cur = f"Document {k + 1}."
        while len(text) < lines:
            word = words[i % len(words)]
            i += 1
            if len(cur) + len(word) + 1 > 75:
                text.append(cur)
                cur = word
            else:
                cur = f"{cur} {word}"
        im = Image.new("L", (w, h), 255)
        draw = ImageDraw.Draw(im)
        for row, line in enumerate(text):
            draw.text((150, 200 + row * 80), line, fill=0, font=font)
        path = out / f"doc-{k + 1:03d}.png"
        im.save(path, dpi=(DPI, DPI))
        path.chmod(0o644)
        docs.append(path)
    return docs


# -- measuring ------------------------------------------------------------------------------------------------

def machine_busy_s() -> float:
    """Busy CPU-seconds of the whole host since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # user nice system idle iowait irq softirq steal


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU-seconds of a live process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK, (int(f[13]) + int(f[14])) / CLK_TCK


def pids_named(*names: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() in names:
                    out.append(int(p.name))
            except OSError:
                continue
    return out


def engine_cpu() -> float:
    total = 0.0
    for pid in pids_named("dockerd", "containerd"):
        try:
            total += sum(proc_cpu(pid))
        except OSError:
            continue
    return total


def container_cpu(cid: str) -> float | None:
    try:
        return int((CPUACCT / cid / "cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        return None


def container_mem(cid: str) -> int:
    try:
        usage = int((MEMCG / cid / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (MEMCG / cid / "memory.stat").read_text().splitlines())
        return max(0, usage - int(stat.get("total_inactive_file", 0)))
    except (OSError, ValueError):
        return 0


def tree_rss(roots: set[int]) -> int:
    """RSS of the roots and all their descendants (shared pages counted once per process)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            rss[int(p.name)] = int((p / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    total, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class Sampler:
    """One side's memory (host process trees + its containers) every 100 ms, its containers' CPU every 20 ms."""

    def __init__(self, client: docker.DockerClient, mine: Callable[[dict[str, str]], bool]) -> None:
        self.client, self.mine = client, mine
        self.roots: set[int] = set()
        self.containers: dict[str, bool] = {}  # id -> ours
        self.cpu: dict[str, float] = {}  # id -> last cpuacct seen
        self.peak = 0
        self.own_cpu_s = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self.thread.start()
        return self

    def _discover(self) -> None:
        if not CPUACCT.is_dir():
            return
        for d in CPUACCT.iterdir():
            if d.is_dir() and d.name not in self.containers:
                try:
                    labels = self.client.api.inspect_container(d.name)["Config"]["Labels"] or {}
                except docker.errors.APIError:
                    labels = {}
                self.containers[d.name] = self.mine(labels)

    def _run(self) -> None:
        t0, tick = time.thread_time(), 0
        while not self.stop.is_set():
            self._discover()
            ours = [c for c, m in self.containers.items() if m]
            for c in ours:
                v = container_cpu(c)
                if v is not None:
                    self.cpu[c] = max(v, self.cpu.get(c, 0.0))
            if tick % 5 == 0:
                mem = sum(container_mem(c) for c in ours) + (tree_rss(self.roots) if self.roots else 0)
                self.peak = max(self.peak, mem)
            tick += 1
            self.stop.wait(0.02)
        self.own_cpu_s = time.thread_time() - t0

    def done(self) -> Sampler:
        self.stop.set()
        self.thread.join()
        return self


@dataclass
class Side:
    name: str
    docs: int = 0
    wall_s: float = 0.0
    work_cpu_s: float = 0.0
    dispatcher_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    engine_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    background_cpu_per_s: float = 0.0
    sampler_cpu_s: float = 0.0
    peak_bytes: int = 0
    succeeded: int = 0
    skipped: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.wall_s if self.wall_s else 0.0

    @property
    def attributed_cpu_s(self) -> float:
        return self.work_cpu_s + self.dispatcher_cpu_s + self.postgres_cpu_s + self.engine_cpu_s


def background(seconds: float = 2.0) -> float:
    """Busy CPU-seconds per second of the host while this bench runs nothing: other users' load."""
    b0 = machine_busy_s()
    time.sleep(seconds)
    return (machine_busy_s() - b0) / seconds



# -- the sides ------------------------------------------------------------------------------------------------

def raw_host(client: docker.DockerClient, docs: list[Path], c: int) -> Side:
    side = Side("raw tesseract, host", len(docs))
    if not shutil.which("tesseract"):
        side.skipped = "no tesseract on this host"
        return side
    side.background_cpu_per_s = background()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_THREAD_LIMIT": "1", "LANG": "C.UTF-8"}
    sampler = Sampler(client, lambda _: False)
    m0, t0 = machine_busy_s(), time.monotonic()
    proc = subprocess.Popen(["xargs", "-P", str(c), "-I{}", "tesseract", "{}", "-", *TESSERACT],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    sampler.roots.add(proc.pid)
    sampler.start()
    assert proc.stdin is not None
    proc.stdin.write("".join(f"{d}\n" for d in docs).encode())
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)  # xargs and every tesseract it waited for
    proc.returncode = os.waitstatus_to_exitcode(status)
    side.wall_s, side.machine_cpu_s = time.monotonic() - t0, machine_busy_s() - m0
    sampler.done()
    side.work_cpu_s = usage.ru_utime + usage.ru_stime
    side.peak_bytes, side.sampler_cpu_s = sampler.peak, sampler.own_cpu_s
    side.succeeded = len(docs) if proc.returncode == 0 else 0
    return side


def raw_image(client: docker.DockerClient, pages: Path, docs: list[Path], c: int) -> Side:
    """The raw command inside one job-image container that outlives the run (timed by its own clock)."""
    side = Side("raw tesseract, in image", len(docs))
    side.background_cpu_per_s = background()
    names = " ".join(f"/pages/{d.name}" for d in docs)
    script = (f"echo START $(date +%s.%N); for f in {names}; do echo $f; done | xargs -P {c} -I{{}} tesseract {{}} "
              f"- {' '.join(TESSERACT)} >/dev/null 2>&1; echo DONE $? $(date +%s.%N); sleep 600")
    sampler = Sampler(client, lambda labels: labels.get(BENCH_LABEL) == "raw").start()
    m0 = machine_busy_s()
    ctr = client.containers.run(JOB_IMAGE, entrypoint=["sh", "-c", script], detach=True, network_mode="none",
                                read_only=True, user="10001:10001", init=True, tmpfs={"/tmp": "size=64m"},
                                environment={"OMP_THREAD_LIMIT": "1"}, labels={BENCH_LABEL: "raw"},
                                volumes={str(pages): {"bind": "/pages", "mode": "ro"}})
    try:
        start = end = 0.0
        code = -1
        for line in ctr.logs(stream=True, follow=True):
            word = line.decode().split()
            if word and word[0] == "START":
                start = float(word[1])
            elif word and word[0] == "DONE":
                code, end = int(word[1]), float(word[2])
                break
        side.machine_cpu_s = machine_busy_s() - m0
        side.work_cpu_s = container_cpu(str(ctr.id)) or 0.0
        sampler.done()
        side.wall_s = end - start
        side.peak_bytes, side.sampler_cpu_s = sampler.peak, sampler.own_cpu_s
        side.succeeded = len(docs) if code == 0 else 0
        side.notes.append("machine CPU includes the one container's start")
    finally:
        ctr.remove(force=True)
    return side


def classes(c: int) -> str:
    return json.dumps([{"name": "small", "memory_limit_bytes": "512MiB", "max_running": c, "timeout_s": 600}])


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the dispatcher exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the dispatcher was not ready within 90 s")


BREAKDOWN = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.claimed_at - j.created_at)),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.started_at - a.claimed_at)),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.finished_at - a.started_at)),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY p.ocr_seconds),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY a.peak_memory_bytes)
FROM jobs j JOIN job_attempts a ON a.job_id = j.id JOIN document_pages p ON p.job_id = j.id
WHERE j.id = ANY(%s)
"""


def through_jobcell(runtime: str, client: docker.DockerClient, url: str, pg_id: str, docs: list[Path], c: int,
                    work: Path, poll_s: float | None = None, oci: str | None = None) -> Side:
    name = f"jobcell, {runtime} runtime" + (f", poll {poll_s:g} s" if poll_s else "") + (f", {oci}" if oci else "")
    side = Side(name, len(docs))
    if runtime == "process":
        missing = [t for t in ("tesseract", "pdftoppm") if not shutil.which(t)]
        if missing:
            side.skipped = f"{' and '.join(missing)} not on this host: the process runtime cannot run the pipeline"
            return side
    pool = f"bench-{runtime}-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {"JOBCELL_DATABASE_URL": url, "JOBCELL_CLASSES": classes(c), "JOBCELL_POOL": pool,
           "JOBCELL_MEMORY_BUDGET": "4GiB", "JOBCELL_RUNTIME": runtime, "JOBCELL_STORE_DIR": str(work / "store"),
           "JOBCELL_PROCESS_STATE_DIR": str(work / "units"), "JOBCELL_HTTP_PORT": str(port),
           "JOBCELL_JOB_IMAGE": JOB_IMAGE, **({"JOBCELL_POLL_INTERVAL_S": str(poll_s)} if poll_s else {}),
           **({"JOBCELL_OCI_RUNTIME": oci} if oci else {})}
    with (work / f"dispatcher-{runtime}.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "run"], cwd=ROOT, env={**os.environ, **env},
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc)
        with environ(env):
            jobs = Client(load_settings())
        side.background_cpu_per_s = background()
        sampler = Sampler(client, lambda labels: labels.get("jobcell.pool") == pool)
        sampler.roots.add(proc.pid)
        sampler.start()
        m0, d0, p0, e0 = machine_busy_s(), proc_cpu(proc.pid), container_cpu(pg_id) or 0.0, engine_cpu()
        t0 = time.monotonic()
        ids = [jobs.submit(d, name=d.name, force=True).id for d in docs]
        with psycopg.connect(url) as db:
            while True:
                row = db.execute("SELECT count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'cancelled')),"
                                 " count(*) FILTER (WHERE state = 'succeeded') FROM jobs WHERE id = ANY(%s)",
                                 (ids,)).fetchone()
                assert row is not None
                if row[0] == len(ids):
                    break
                time.sleep(0.05)
            side.wall_s = time.monotonic() - t0
            m1, d1, p1, e1 = machine_busy_s(), proc_cpu(proc.pid), container_cpu(pg_id) or 0.0, engine_cpu()
            sampler.done()
            side.succeeded = int(row[1])
            parts = db.execute(BREAKDOWN, (ids,)).fetchone()
        jobs.close()
        side.machine_cpu_s, side.postgres_cpu_s = m1 - m0, p1 - p0
        side.dispatcher_cpu_s = d1[0] - d0[0]
        if runtime == "docker":
            side.work_cpu_s = sum(sampler.cpu.values())
            side.engine_cpu_s = e1 - e0
        else:
            side.work_cpu_s = d1[1] - d0[1]  # the cells: the dispatcher reaps each unit's wrapper as it ends
        side.peak_bytes, side.sampler_cpu_s = sampler.peak, sampler.own_cpu_s
        if parts and parts[0] is not None:
            wait, launch, life, ocr, peak = parts
            side.notes.append(f"median per document: queued {wait:.2f} s, claim->started {launch:.2f} s, "
                              f"started->finished {life:.2f} s, of which tesseract (ocr_seconds) {ocr:.2f} s; "
                              f"cell peak {(peak or 0) / 2**20:.0f} MiB")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return side


def warm_worker(client: docker.DockerClient, docs: list[Path], c: int) -> Side:
    side = Side("warm worker, in-process", len(docs))
    missing = [t for t in ("tesseract", "pdftoppm") if not shutil.which(t)]
    if missing:
        side.skipped = f"{' and '.join(missing)} not on this host"
        return side
    side.background_cpu_per_s = background()
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bench._warm_worker", str(c), *map(str, docs)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the warm worker did not start")
        sampler = Sampler(client, lambda _: False)
        sampler.roots.add(proc.pid)
        sampler.start()
        m0, p0, t0 = machine_busy_s(), proc_cpu(proc.pid), time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        done = proc.stdout.readline().split()
        side.wall_s = time.monotonic() - t0
        m1, p1 = machine_busy_s(), proc_cpu(proc.pid)
        sampler.done()
        side.machine_cpu_s, side.work_cpu_s = m1 - m0, sum(p1) - sum(p0)
        side.peak_bytes, side.sampler_cpu_s = sampler.peak, sampler.own_cpu_s
        side.succeeded = len(docs) - int(done[2]) if done and done[0] == "done" else 0
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return side


# -- the run --------------------------------------------------------------------------------------------------

def cpu_ratio(raw_cpu: float, s: Side) -> float:
    """raw's attributed CPU-s per document over this side's: above 1, this side spends less per document."""
    per_doc = s.attributed_cpu_s / max(s.docs, 1)
    return raw_cpu / per_doc if per_doc > 0 else 0.0


def report(sides: list[Side], baseline: float, raw_cpu: float, args: argparse.Namespace) -> None:
    """raw_cpu: the raw side's attributed CPU-s per document; `cpu x raw` is raw_cpu over the side's, the ratio
    of throughputs on a machine kept busy (what wall time gives when nothing else is running)."""
    print(f"\n{args.docs} one-page 200-dpi scans ({args.lines} lines of real text each), {args.concurrency} at a time "
          f"on {os.cpu_count()} CPUs; CPU-s per document: work / attributed / machine (background load before "
          f"each side, CPU-s per s)")
    head = (f"{'side':36s} {'docs/s':>7s} {'x raw':>6s} {'wall s':>7s} {'work':>6s} {'attrib':>6s} {'machine':>7s}"
            f" {'(bg/s)':>7s} {'cpu x raw':>9s} {'peak MiB':>8s} {'ok':>5s}")
    print(head)
    print("-" * len(head))
    for s in sides:
        if s.skipped:
            print(f"{s.name:36s} skipped: {s.skipped}")
            continue
        n = s.docs
        print(f"{s.name:36s} {s.docs_per_s:7.3f} {s.docs_per_s / baseline:6.2f} {s.wall_s:7.1f} "
              f"{s.work_cpu_s / n:6.2f} {s.attributed_cpu_s / n:6.2f} {s.machine_cpu_s / n:7.2f} "
              f"{s.background_cpu_per_s:7.2f} {cpu_ratio(raw_cpu, s):9.2f} {s.peak_bytes / 2**20:8.0f} "
              f"{s.succeeded:>3d}/{n:<3d}")
    for s in sides:
        if not s.skipped and (s.dispatcher_cpu_s or s.postgres_cpu_s or s.engine_cpu_s or s.notes):
            print(f"  {s.name}: dispatcher {s.dispatcher_cpu_s / s.docs:.3f}, postgres {s.postgres_cpu_s / s.docs:.3f}"
                  f", dockerd+containerd {s.engine_cpu_s / s.docs:.3f} CPU-s/doc; bench sampler "
                  f"{s.sampler_cpu_s:.1f} CPU-s in all. " + " ".join(s.notes))
    busy = [s for s in sides if not s.skipped and s.background_cpu_per_s > 0.25]
    if busy:
        print(f"WARNING: other load on this machine ({', '.join(f'{s.background_cpu_per_s:.2f}' for s in busy)} "
              "CPU-s/s just before some sides): docs/s and 'x raw' measure the share each side got of a contended "
              "machine; compare 'cpu x raw' (CPU per document, little affected) and run again when it is quiet")
    targets = {"jobcell, docker runtime": 0.75, "jobcell, process runtime": 0.9}
    for s in sides:
        if s.name in targets and not s.skipped:
            r = s.docs_per_s / baseline
            rc = cpu_ratio(raw_cpu, s)
            print(f"{s.name}: {r:.2f}x raw in docs/s, {rc:.2f}x in CPU per document (target >= {targets[s.name]}): "
                  f"{'met' if r >= targets[s.name] else 'NOT met'} by docs/s, "
                  f"{'met' if rc >= targets[s.name] else 'NOT met'} by CPU")
    print("JSON " + json.dumps({
        "bench": "small_docs", "docs": args.docs, "lines": args.lines, "concurrency": args.concurrency,
        "cpus": os.cpu_count(), "raw_docs_per_s": round(baseline, 4), "raw_cpu_s_per_doc": round(raw_cpu, 4),
        "sides": [{**asdict(s), "docs_per_s": round(s.docs_per_s, 4),
                   "ratio_to_raw": round(s.docs_per_s / baseline, 3) if not s.skipped else None,
                   "cpu_ratio_to_raw": round(cpu_ratio(raw_cpu, s), 3) if not s.skipped else None,
                   "attributed_cpu_s": round(s.attributed_cpu_s, 3)} for s in sides]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=2, help="workers at a time on every side")
    ap.add_argument("--lines", type=int, default=22, help="lines of text per page")
    ap.add_argument("--sides", default="docker,process,process@0.1,warm,image",
                    help="which sides besides raw, comma-separated; RUNTIME@S: that runtime with "
                         "JOBCELL_POLL_INTERVAL_S=S (default 1.0); docker+crun: with JOBCELL_OCI_RUNTIME=crun. "
                         "The raw baseline always runs first and last")
    a = ap.parse_args()
    wanted = [w for w in a.sides.split(",") if w]
    client = docker.from_env()
    client.images.get(JOB_IMAGE)
    with tempfile.TemporaryDirectory(prefix="jobcell-small-docs-") as tmp:
        work = Path(tmp)
        pages = work / "pages"
        pages.mkdir()
        for p in (work, pages):
            p.chmod(0o755)
        docs = make_docs(pages, a.docs, a.lines)
        print(f"{len(docs)} documents in {pages}; load average {os.getloadavg()[0]:.2f}", flush=True)
        sides = [raw_host(client, docs, a.concurrency)]
        print(f"done: {sides[-1].name}", flush=True)
        with postgres(client) as url:
            pg_id = next(str(c.id) for c in client.containers.list(filters={"label": "jobcell.bench=1"})
                         if any(b and b[0].get("HostPort") == url.split(":")[-1].split("/")[0]
                                for b in (c.ports or {}).values()))
            q = PostgresQueue(url, load_table(json.loads(classes(a.concurrency))))
            q.migrate()
            q.close()
            for want in wanted:
                runtime, _, poll = want.partition("@")
                runtime, _, oci = runtime.partition("+")
                if runtime in ("docker", "process"):
                    sides.append(through_jobcell(runtime, client, url, pg_id, docs, a.concurrency, work,
                                                 float(poll) if poll else None, oci or None))
                    print(f"done: {sides[-1].name}", flush=True)
        if "warm" in wanted:
            sides.append(warm_worker(client, docs, a.concurrency))
            print(f"done: {sides[-1].name}", flush=True)
        if "image" in wanted:
            sides.append(raw_image(client, pages, docs, a.concurrency))
            print(f"done: {sides[-1].name}", flush=True)
        again = raw_host(client, docs, a.concurrency)
        again.name = "raw tesseract, host, again"
        sides.append(again)
    raws = [s for s in (sides[0], again) if not s.skipped]
    image_raw = [s for s in sides if s.name == "raw tesseract, in image"]
    base = raws or image_raw
    if not base:
        raise SystemExit("no raw baseline could run")
    baseline = sum(s.docs for s in base) / sum(s.wall_s for s in base)  # both raw runs: drift is averaged
    raw_cpu = sum(s.attributed_cpu_s for s in base) / sum(s.docs for s in base)
    report(sides, baseline, raw_cpu, a)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0 if all(s.skipped or s.succeeded == s.docs for s in sides) else 1


if __name__ == "__main__":
    sys.exit(main())
