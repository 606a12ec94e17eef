"""What a Docker job container is allowed, checked from outside (inspect) and from inside (exec)."""

from __future__ import annotations

import docker

from .conftest import diag, pool_containers, wait_for


def test_job_containers_are_hardened(queue, start_dispatcher, docker_client: docker.DockerClient, pool):
    diag(queue, sleep_s=60)
    start_dispatcher()
    [listed] = wait_for(lambda: pool_containers(docker_client, pool, running_only=True), what="running container")
    c = docker_client.containers.get(listed["Id"])
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
    assert host["NetworkMode"] == "none" and host["Init"] is True
    assert c.attrs["Mounts"] == []  # no store, no volume: scratch is a capped tmpfs
    # from inside: not root, no capabilities, nothing writable but the two capped, noexec tmpfs
    assert c.exec_run("id -u").output.decode().strip() != "0"
    status = c.exec_run(["sh", "-c", "grep CapEff /proc/self/status"]).output.decode()
    assert status.split()[-1] == "0000000000000000"
    assert c.exec_run(["touch", "/etc/jobcell-probe"]).exit_code != 0
    assert c.exec_run(["touch", "/tmp/ok"]).exit_code == 0
    assert c.exec_run(["touch", "/scratch/ok"]).exit_code == 0
    assert c.exec_run(["test", "-e", "/var/run/docker.sock"]).exit_code != 0
