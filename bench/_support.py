"""Shared by the benchmarks: a throwaway Postgres on 127.0.0.1 and the job image's name."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import psycopg

ROOT = Path(__file__).resolve().parent.parent
JOB_IMAGE = os.environ.get("JOBCELL_JOB_IMAGE", "jobcell-job:dev")


def pg_image() -> str:
    marker = ROOT / ".jobcell-pg-image"
    return marker.read_text().strip() if marker.exists() else "postgres:16"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres(client: docker.DockerClient) -> Iterator[str]:
    port = _free_port()
    c = client.containers.run(pg_image(), detach=True, remove=True, ports={"5432/tcp": ("127.0.0.1", port)},
                              environment={"POSTGRES_USER": "bench", "POSTGRES_PASSWORD": "bench",
                                           "POSTGRES_DB": "bench"},
                              command=["postgres", "-c", "fsync=off"], labels={"jobcell.bench": "1"})
    url = f"postgresql://bench:bench@127.0.0.1:{port}/bench"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        c.remove(force=True)
