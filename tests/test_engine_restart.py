"""A Docker engine restart (a package upgrade, host maintenance) with live-restore on, as the project's set-up
starts the engine: the running cell keeps running, the dispatcher re-attaches (events, polls, its output
stream) when the engine is back, and the job succeeds on its first attempt. Restarts the engine that the
test command started; on a machine whose engine the suite does not own, test_faults covers a SIGKILL from
outside instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import docker
import pytest

from dispatcher.models import JobState

from .conftest import ROOT, diag, pool_containers, wait_final, wait_for


def engine_is_ours() -> bool:
    """Root, and a dockerd process of this machine's that scripts/ensure-docker.sh can start again."""
    return os.geteuid() == 0 and shutil.which("pgrep") is not None and subprocess.run(
        ["pgrep", "-x", "dockerd"], capture_output=True, check=False).returncode == 0


def engine_up() -> bool:
    try:
        return bool(docker.from_env(timeout=5).ping())
    except docker.errors.DockerException:
        return False


@pytest.mark.disruptive
@pytest.mark.skipif(not engine_is_ours(), reason="the engine is not one this test run started (not root)")
def test_a_cell_keeps_running_across_an_engine_restart(queue, start_dispatcher, docker_client, pool):
    assert docker_client.info()["LiveRestoreEnabled"], "scripts/ensure-docker.sh enables live-restore"
    job = diag(queue, alloc_mib=10, sleep_s=15)
    start_dispatcher()
    [cell] = wait_for(lambda: pool_containers(docker_client, pool, running_only=True), what="a running cell")
    subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=True)
    wait_for(lambda: not engine_up(), timeout=60, what="the engine to stop")
    wait_for(lambda: not engine_is_ours(), timeout=60, what="dockerd to exit")  # it may take a while to stop
    time.sleep(3)  # the engine stays down a while; the cell does not notice
    started = subprocess.run(["bash", "scripts/ensure-docker.sh"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for(lambda: engine_up(), timeout=60, what="the engine to return")
    [j] = wait_final(queue, [job], timeout=120)
    assert j.state is JobState.SUCCEEDED, j.reason
    [attempt] = queue.attempts(job)
    assert (attempt.outcome, attempt.exit_code) == ("succeeded", 0)
    assert attempt.handle == cell["Id"]  # the same container, re-attached, not a relaunch
