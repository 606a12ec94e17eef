"""Shared by the benchmarks: a throwaway Postgres on 127.0.0.1 and the job image's name."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import psycopg

from job_image.contract import Header, JobOptions

ROOT = Path(__file__).resolve().parent.parent
JOB_IMAGE = os.environ.get("JOBCELL_JOB_IMAGE", "jobcell-job:dev")


def pg_image() -> str:
    marker = ROOT / ".jobcell-pg-image"
    return marker.read_text().strip() if marker.exists() else "postgres:16"


def wait_db(url: str, timeout: float = 60) -> None:
    """Until Postgres at `url` takes connections (it is starting, or restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres(client: docker.DockerClient) -> Iterator[str]:
    port = free_port()
    c = client.containers.run(pg_image(), detach=True, remove=True, ports={"5432/tcp": ("127.0.0.1", port)},
                              environment={"POSTGRES_USER": "bench", "POSTGRES_PASSWORD": "bench",
                                           "POSTGRES_DB": "bench"},
                              command=["postgres", "-c", "fsync=off"], labels={"jobcell.bench": "1"})
    url = f"postgresql://bench:bench@127.0.0.1:{port}/bench"
    try:
        wait_db(url)
        yield url
    finally:
        c.remove(force=True)


def scanned_pdf(path: Path, pages: int, dpi: int = 200) -> Path:
    """A scan-like PDF: one grayscale 8.5 x 11 in image per page at `dpi`, with real text on it.
    Pages are generated one at a time, so that making a long one needs little memory."""
    first, *rest = scan_pages(pages, dpi, "Page {n} line {line}: the quick brown fox jumps over the lazy dog")
    first.save(path, save_all=True, resolution=dpi, append_images=rest)
    return path


def scan_pages(pages: int, dpi: int, text: str) -> Iterator[Any]:
    """Grayscale letter pages at `dpi`, 40 lines of `text` each ({n}: the page, {line}: the line)."""
    from PIL import Image, ImageDraw

    for n in range(1, pages + 1):
        im = Image.new("L", (int(8.5 * dpi), int(11 * dpi)), 255)
        d = ImageDraw.Draw(im)
        for line in range(40):
            d.text((120, 120 + line * 50), text.format(n=n, line=line), fill=0, font_size=32)
        yield im


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory the job image's user can read, with a docs/ folder in it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        (work / "docs").mkdir(mode=0o755)
        yield work


PEAK = "jobcell-peak-bytes="


def run_job(client: docker.DockerClient, store: Path, name: str, memory: str = "2g", cpus: float | None = None,
            env: dict[str, str] | None = None, **options: Any) -> tuple[int, float, str]:
    """The job image on one stored document, sealed as the Docker runtime starts it (no network, read-only,
    the header and the document on stdin), no database: (peak bytes, seconds, stdout and stderr). `options`
    go into the header's JobOptions (e.g. ocr_workers=1); `env` is kept for callers that set OCR_* tuning."""
    document = (store / name).read_bytes()
    header = Header(job_id=1, attempt=1, tier="bench", memory_limit_bytes=_bytes(memory), workload="ocr",
                    document_name=name, document_bytes=len(document), options=JobOptions(**options))
    cmd = ["docker", "run", "-i", "--rm", "--network", "none", "--memory", memory, "--memory-swap", memory,
           "--read-only", "--tmpfs", "/tmp:size=64m", "--user", "10001:10001",
           "--tmpfs", "/scratch:rw,noexec,nosuid,nodev,size=512m,uid=10001,gid=10001,mode=0700",
           "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           *(["--cpus", str(cpus)] if cpus else []),
           *[a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")], JOB_IMAGE]
    t0 = time.monotonic()
    out = subprocess.run(cmd, input=header.model_dump_json().encode() + b"\n" + document, capture_output=True,
                         check=False)
    seconds = time.monotonic() - t0
    text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    peaks = [json.loads(line)["bytes"] for line in out.stdout.decode(errors="replace").splitlines()
             if line.startswith("{") and json.loads(line).get("type") == "peak"]
    if out.returncode != 0 or not peaks:
        raise RuntimeError(f"the job exited {out.returncode} on {name}: {text[-500:]}")
    return peaks[-1], seconds, text


def _bytes(memory: str) -> int:
    units = {"m": 1024**2, "g": 1024**3}
    return int(float(memory[:-1]) * units[memory[-1]])


def mib(n: float) -> str:
    return f"{n / 1024**2:,.0f} MiB"
