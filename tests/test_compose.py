"""compose.yaml: it validates, and the stack it describes OCRs a real document end to end on the real engine."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.conftest import CORPUS, ROOT, pg_image, pool_containers

COMPOSE_FILE = ROOT / "compose.yaml"
DISPATCHER_IMAGE = "jobcell-dispatcher:dev"
DOCUMENT = CORPUS / "tesseract-phototest.tif"

def compose_cmd() -> list[str]:
    """`docker compose` (v2) where it exists, else Debian's `docker-compose`; neither is a failure."""
    if shutil.which("docker"):
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, stdin=subprocess.DEVNULL)
        if v2.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed (scripts/ensure-docker.sh installs it)")


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def test_compose_file_validates() -> None:
    env = {**os.environ, "JOBCELL_PG_IMAGE": pg_image()}
    got = run([*compose_cmd(), "-f", str(COMPOSE_FILE), "config", "-q"], env, timeout=60)
    assert got.returncode == 0, got.stderr


def test_compose_file_names_line_up() -> None:
    """The names the dispatcher hands to the engine are the ones compose creates (on the resolved defaults)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    got = run([*compose_cmd(), "-f", str(COMPOSE_FILE), "config"], env, timeout=60)
    assert got.returncode == 0, got.stderr
    text = got.stdout
    # Only forms that docker-compose 1.x and compose v2 render alike: map entries and top-level names.
    assert re.search(r"^networks:\n  default:\n    name: \"?jobcell\"?$", text, re.M), text
    assert re.search(r"^  store:\n    name: \"?jobcell-store\"?$", text, re.M), text
    for key, value in [("JOBCELL_JOB_IMAGE", "jobcell-job:dev"), ("JOBCELL_STORE_DIR", "/var/lib/jobcell/store"),
                       ("JOBCELL_DATABASE_URL", "postgresql://jobcell:jobcell@postgres:5432/jobcell"),
                       ("image", "jobcell-job:dev")]:
        assert re.search(rf"^ +{key}: \"?{re.escape(value)}\"?$", text, re.M), f"no {key}: {value}:\n{text}"
    # nothing that would give cells the database, the store or a network
    for retired in ("JOBCELL_JOB_DATABASE_URL", "JOBCELL_STORE_MOUNT", "JOBCELL_NETWORK:", "JOBCELL_JOB_ENV"):
        assert retired not in text, f"{retired} is back in compose.yaml"


class Stack:
    """One compose project with names of its own, so that it clashes with nothing else on the engine."""

    def __init__(self, client: docker.DockerClient) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.client = client
        self.project = f"jobcell-test-{suffix}"
        self.network = f"jobcell-test-{suffix}"
        self.volume = f"jobcell-test-store-{suffix}"
        self.pool = f"test-compose-{suffix}"
        self.env = {**os.environ, "JOBCELL_PG_IMAGE": pg_image(), "JOBCELL_PG_PORT": "",  # any free port
                    "JOBCELL_NETWORK_NAME": self.network, "JOBCELL_STORE_VOLUME": self.volume,
                    "JOBCELL_POOL": self.pool, "JOBCELL_MEMORY_BUDGET": "2GiB"}
        self.base = [*compose_cmd(), "-f", str(COMPOSE_FILE), "-p", self.project]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], self.env, timeout)

    def logs(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            got = self("logs", "--no-color", "--tail", "60", timeout=30)
            return got.stdout + got.stderr
        return "(no logs)"

    def down(self) -> None:
        # Job containers are the engine's, not compose's: gone first, or the network cannot be removed.
        for c in pool_containers(self.client, self.pool):
            with contextlib.suppress(docker.errors.APIError):
                self.client.api.remove_container(c["Id"], force=True, v=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self("down", "-v", "--remove-orphans", "--timeout", "5", timeout=90)
        # Whatever `down` could not remove (it failed, or timed out) goes by name.
        for c in self.client.api.containers(all=True, filters={"label": f"com.docker.compose.project={self.project}"}):
            with contextlib.suppress(docker.errors.APIError):
                self.client.api.remove_container(c["Id"], force=True, v=True)
        with contextlib.suppress(docker.errors.APIError):  # NotFound included
            self.client.networks.get(self.network).remove()
        with contextlib.suppress(docker.errors.APIError):
            self.client.volumes.get(self.volume).remove(force=True)
        for v in self.client.volumes.list(filters={"label": f"com.docker.compose.project={self.project}"}):
            with contextlib.suppress(docker.errors.APIError):
                v.remove(force=True)


@pytest.fixture
def dispatcher_image(docker_client: docker.DockerClient) -> str:
    """Always `docker build`: a no-op from cache (well under a second) unless the code changed since."""
    got = subprocess.run(["docker", "build", "-q", "-f", "Dockerfile.dispatcher", "-t", DISPATCHER_IMAGE, "."],
                         cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, f"dispatcher image build failed:\n{got.stdout[-3000:]}\n{got.stderr[-3000:]}"
    return DISPATCHER_IMAGE


@pytest.fixture
def stack(docker_client: docker.DockerClient, job_image: str, dispatcher_image: str) -> Iterator[Stack]:
    s = Stack(docker_client)
    s.env["JOBCELL_JOB_IMAGE"] = job_image
    s.env["JOBCELL_DISPATCHER_IMAGE"] = dispatcher_image
    try:
        yield s
    finally:
        s.down()
    assert not pool_containers(docker_client, s.pool)


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_compose_stack_ocrs_a_document(stack: Stack, docker_client: docker.DockerClient) -> None:
    assert DOCUMENT.is_file(), f"corpus document missing: {DOCUMENT}"
    t0 = time.monotonic()
    up = stack("up", "-d", "--no-build", timeout=180)  # images are built above; up waits for a healthy Postgres
    assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}\n{stack.logs()}"

    docs = Path(DOCUMENT).parent
    got = stack("run", "--rm", "-T", "-v", f"{docs}:/docs:ro", "dispatcher",
                "submit", f"/docs/{DOCUMENT.name}", "--wait", timeout=180)
    out = got.stdout + got.stderr
    assert got.returncode == 0, f"submit --wait failed (exit {got.returncode}):\n{out}\n{stack.logs()}"
    assert "1 succeeded, 0 failed" in out, out
    row = re.search(rf"{re.escape(DOCUMENT.name)}\s+succeeded\s+(\d+)", out)
    assert row and int(row.group(1)) >= 1, f"no page stored:\n{out}"

    # The dispatcher read the document from its store volume and streamed it into a sealed cell: no network,
    # no mount, not a superuser's database either (compose's dispatcher role is a plain owner).
    docker_client.networks.get(stack.network)
    docker_client.volumes.get(stack.volume)
    role = stack("exec", "-T", "postgres", "psql", "-U", "postgres", "-tAc",
                 "SELECT rolsuper FROM pg_roles WHERE rolname = 'jobcell'", timeout=60)
    assert role.stdout.strip() == "f", role.stdout + role.stderr
    print(f"compose stack: up + one document in {time.monotonic() - t0:.1f} s")
