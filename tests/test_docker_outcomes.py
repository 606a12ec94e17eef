"""The exit-code contract end to end: real containers hitting real memory limits, a real queue."""

from __future__ import annotations

import docker

from dispatcher.classes import load_table
from dispatcher.models import MIB, JobState
from dispatcher.queue import PostgresQueue
from dispatcher.runtimes.docker import LABEL_POOL

from .conftest import TEST_CLASSES, diag, sql, wait_final, wait_for


def outcomes(queue: PostgresQueue, job_id: int) -> list[tuple[str, str, int | None]]:
    return [(a["tier"], a["outcome"], a["exit_code"]) for a in queue.attempts(job_id)]


def test_oom_on_small_is_retried_on_medium_and_succeeds(queue, start_dispatcher):
    job = diag(queue, alloc_mib=100, sleep_s=0.2)
    start_dispatcher()
    [j] = wait_final(queue, [job])
    assert j.state is JobState.SUCCEEDED, j.reason
    attempts = queue.attempts(job)
    assert [(a["tier"], a["outcome"]) for a in attempts] == [("small", "oom"), ("medium", "succeeded")]
    assert attempts[0]["oom_killed"] is True
    assert attempts[0]["memory_limit_bytes"] == 64 * MIB
    assert attempts[0]["peak_memory_bytes"] >= 64 * MIB
    # the successful attempt reports its own peak: above what it allocated, within its cap
    assert 100 * MIB < attempts[1]["peak_memory_bytes"] <= 160 * MIB


def test_oom_on_the_top_tier_fails_with_the_limit_in_the_reason(queue, start_dispatcher):
    job = diag(queue, alloc_mib=400)
    start_dispatcher()
    [j] = wait_final(queue, [job])
    assert j.state is JobState.FAILED
    assert "needs more than 256 MiB" in (j.reason or "")
    assert [o for _, o, _ in outcomes(queue, job)] == ["oom", "oom", "oom"]
    assert [t for t, _, _ in outcomes(queue, job)] == ["small", "medium", "large"]


def test_bad_input_fails_after_one_attempt_with_the_jobs_reason(queue, start_dispatcher):
    job = diag(queue, exit_code=65, message="page 3 is not a valid JPEG stream")
    start_dispatcher()
    [j] = wait_final(queue, [job])
    assert j.state is JobState.FAILED
    assert j.reason == "page 3 is not a valid JPEG stream"
    assert outcomes(queue, job) == [("small", "bad_input", 65)]


def test_tempfail_is_retried_on_the_same_tier_until_max_attempts(queue, start_dispatcher):
    job = diag(queue, exit_code=75, message="object store unreachable", max_attempts=3)
    start_dispatcher()
    [j] = wait_final(queue, [job])
    assert j.state is JobState.FAILED
    assert outcomes(queue, job) == [("small", "error", 75)] * 3
    assert "gave up after 3 attempts" in (j.reason or "")


def test_other_exit_codes_are_retried_and_may_then_succeed(queue, start_dispatcher, db_url):
    # attempt 1 exits 3; while it waits out its backoff the cause goes away, and attempt 2 succeeds
    job = diag(queue, exit_code=3, max_attempts=2)
    d = start_dispatcher()
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0]["outcome"], what="first attempt")
    d.stop()
    sql(db_url, "UPDATE jobs SET params = '{}'::jsonb WHERE id = %s", job)
    start_dispatcher()
    [j] = wait_final(queue, [job])
    assert outcomes(queue, job) == [("small", "error", 3), ("small", "succeeded", 0)]
    assert j.state is JobState.SUCCEEDED


def test_a_job_past_its_deadline_is_killed_as_timeout(queue, start_dispatcher, docker_client, pool):
    short = load_table([dict(c, timeout_s=2) if c["name"] == "small" else c for c in TEST_CLASSES])
    job = diag(queue, sleep_s=60)
    start_dispatcher(classes=short)
    [j] = wait_final(queue, [job], timeout=60)
    assert j.state is JobState.FAILED
    assert outcomes(queue, job) == [("small", "timeout", 137)]
    assert queue.attempts(job)[0]["kill_reason"] == "deadline"
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_POOL}={pool}"}) == []


def test_cancel_kills_a_running_job_within_seconds(queue, start_dispatcher, docker_client, pool):
    job = diag(queue, sleep_s=120)
    start_dispatcher()
    wait_for(lambda: docker_client.containers.list(filters={"label": f"{LABEL_POOL}={pool}"}), what="container")
    assert queue.cancel(job) == "running"
    [j] = wait_final(queue, [job], timeout=15)
    assert j.state is JobState.CANCELLED
    assert outcomes(queue, job)[0][1] == "cancelled"
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_POOL}={pool}"}) == []


def test_cancel_of_a_queued_job_never_starts_it(queue):
    job = diag(queue, sleep_s=120)
    assert queue.cancel(job) == "cancelled"
    assert queue.get(job).state is JobState.CANCELLED
    assert queue.claim("d", "p", 4096 * MIB, 10) == []


def test_job_containers_are_hardened(queue, start_dispatcher, docker_client: docker.DockerClient, pool):
    diag(queue, sleep_s=60)
    start_dispatcher()
    [c] = wait_for(lambda: docker_client.containers.list(filters={"label": f"{LABEL_POOL}={pool}"}),
                   what="running container")
    wait_for(lambda: c.reload() or c.status == "running", what="running")
    host = c.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"])
    assert host["Memory"] == 64 * 1024 * 1024 and host["MemorySwap"] == host["Memory"]
    assert 0 < host["PidsLimit"] <= 1024
    assert host["Privileged"] is False
    mounts = [m.get("Source", "") for m in c.attrs["Mounts"]] + list(host.get("Binds") or [])
    assert not any("docker.sock" in m for m in mounts)
    # from inside: not root, no capabilities, nothing writable but the capped tmpfs
    assert c.exec_run("id -u").output.decode().strip() != "0"
    status = c.exec_run(["sh", "-c", "grep CapEff /proc/self/status"]).output.decode()
    assert status.split()[-1] == "0000000000000000"
    assert c.exec_run(["touch", "/etc/jobcell-probe"]).exit_code != 0
    assert c.exec_run(["touch", "/tmp/ok"]).exit_code == 0
    assert c.exec_run(["test", "-e", "/var/run/docker.sock"]).exit_code != 0
