"""What the runtimes share (dispatcher/runtimes/base.py), and what they must keep as running units know it:
the label keys and unit names a restarted dispatcher adopts by, and one hardening that Docker and Kubernetes
both apply, the configured job user included. Specs are built without an engine; the memory sampler runs
against the real one."""

from __future__ import annotations

import time
from typing import Any, cast

import docker
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from dispatcher.errors import ConfigError
from dispatcher.models import MIB, Handle, LaunchSpec
from dispatcher.ports import CellInput
from dispatcher.runtimes.base import Hardening, Identity, LabelKeys, size_bytes
from dispatcher.runtimes.docker import DockerOptions, DockerRuntime, _cgroup_memory
from dispatcher.runtimes.kubernetes import KubernetesOptions, KubernetesRuntime
from job_image.contract import Header

QUEUE = "0f8e2a4c-9a1b-4d3e-8f00-123456789abc"
SPEC = LaunchSpec(7, 2, "medium", 160 * MIB, 30, "s3://bucket/docs/scan.pdf", "diag", {})
CELL = CellInput(Header(job_id=7, attempt=2, tier="medium", memory_limit_bytes=160 * MIB, workload="diag",
                        params={}, done_pages=[], document_name="scan.pdf", document_bytes=0), SPEC.document_uri)


def docker_rt(client: Any = None, **options: Any) -> DockerRuntime:
    return DockerRuntime(DockerOptions(**{"pool": "blue", "queue_id": QUEUE, **options}),
                         client=cast(docker.DockerClient, client or object()))


def k8s_rt(**options: Any) -> KubernetesRuntime:
    return KubernetesRuntime(KubernetesOptions(**{"pool": "Blue_Pool", "queue_id": QUEUE, **options}),
                             presign=lambda uri, ttl: "https://x.invalid/doc", client=object())  # type: ignore[arg-type]


def k8s_security(rt: KubernetesRuntime) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    pod = rt.manifest(SPEC, CELL)["spec"]["template"]["spec"]
    sizes = {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["volumes"]}
    return pod["securityContext"], pod["containers"][0]["securityContext"], sizes


def test_units_keep_the_labels_and_names_that_running_ones_were_created_with() -> None:
    cfg = docker_rt().container_config(SPEC)
    assert cfg["name"] == "jobcell-0f8e2a4c-9a1-blue-7-2"
    assert cfg["labels"] == {"jobcell.job": "7", "jobcell.attempt": "2", "jobcell.pool": "blue",
                             "jobcell.queue": QUEUE, "jobcell.tier": "medium"}
    rt = k8s_rt()
    assert rt.job_name(7, 2) == "jobcell-blue-pool-ae566227-7-2"
    assert rt.manifest(SPEC, CELL)["metadata"]["labels"] == {
        "jobcell.io/job": "7", "jobcell.io/attempt": "2", "jobcell.io/pool": "Blue_Pool",
        "jobcell.io/queue": QUEUE, "jobcell.io/tier": "medium"}


def test_owned_reads_the_attempt_back_and_skips_units_without_one(caplog: pytest.LogCaptureFixture) -> None:
    ids = Identity("docker", "blue", QUEUE, LabelKeys.under("jobcell."))
    units = [("a", "/a", ids.labels(7, 2, "small")), ("b", "/b", {"jobcell.job": "x"}), ("c", "/c", None)]
    assert ids.handles(units) == [Handle("docker", "a", 7, 2)]
    assert "/b" in caplog.text and "/c" in caplog.text


def test_the_default_hardening_is_what_both_runtimes_always_applied() -> None:
    host = docker_rt().container_config(SPEC)["host_config"]
    assert docker_rt().container_config(SPEC)["user"] == "10001:10001"
    assert (host["read_only"], host["cap_drop"], host["security_opt"], host["pids_limit"]) == (
        True, ["ALL"], ["no-new-privileges:true"], 256)
    assert host["tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size={64 * MIB}",
                             "/scratch": f"rw,noexec,nosuid,nodev,size={512 * MIB},uid=10001,gid=10001,mode=0700"}
    pod, container, sizes = k8s_security(k8s_rt())
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (10001, 10001, 10001)
    assert (container["runAsUser"], container["runAsGroup"], container["capabilities"]) == (
        10001, 10001, {"drop": ["ALL"]})
    assert container["readOnlyRootFilesystem"] and not container["allowPrivilegeEscalation"]
    assert sizes == {"tmp": str(64 * MIB), "scratch": str(160 * MIB)}  # scratch: the tier's memory limit


def test_the_configured_job_user_and_sizes_reach_docker_and_kubernetes_alike() -> None:
    cfg = docker_rt(user="2000:3000", tmpfs_size="32m", scratch_size="1g").container_config(SPEC)
    assert cfg["user"] == "2000:3000"
    assert cfg["host_config"]["tmpfs"]["/scratch"].endswith(f"size={1024 * MIB},uid=2000,gid=3000,mode=0700")
    rt = k8s_rt(user="2000:3000", tmpfs_size="32Mi", scratch_size="1Gi")
    kubernetes_validate.validate(rt.manifest(SPEC, CELL), kubernetes_validate.latest_version(), strict=True)
    pod, container, sizes = k8s_security(rt)
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (2000, 3000, 3000)
    assert (container["runAsUser"], container["runAsGroup"]) == (2000, 3000)
    assert sizes == {"tmp": str(32 * MIB), "scratch": str(1024 * MIB)}


@pytest.mark.parametrize("user", ["nobody", "1000", "1000:", "a:b", ""])
def test_a_job_user_that_is_not_uid_gid_is_refused_at_start(user: str) -> None:
    with pytest.raises(ConfigError, match="uid:gid"):
        docker_rt(user=user)
    with pytest.raises(ConfigError, match="uid:gid"):
        k8s_rt(user=user)


def test_kubernetes_refuses_root_as_the_job_user() -> None:
    with pytest.raises(ConfigError, match="non-root"):
        k8s_rt(user="0:0")


def test_sizes_in_the_settings_notation_and_in_kubernetes_notation() -> None:
    assert [size_bytes(s) for s in ("64m", "64Mi", "1g", "1Gi", "512k", "512Ki")] == [
        64 * MIB, 64 * MIB, 1024 * MIB, 1024 * MIB, 512 * 1024, 512 * 1024]
    assert Hardening.of("1:2", "64m", None).scratch_for(100) == 100


def test_docker_samples_memory_from_its_first_unit_on_not_from_watch(docker_client, pool, job_image) -> None:
    params = {"alloc_mib": 20, "sleep_s": 5}
    header = Header(job_id=7, attempt=1, tier="small", memory_limit_bytes=64 * MIB, workload="diag", params=params)
    spec = LaunchSpec(7, 1, "small", 64 * MIB, 60, "diag:", "diag", params)
    options = DockerOptions(image=job_image, pool=pool, queue_id=QUEUE, stats_every_s=0.1)
    started = DockerRuntime(options, client=docker_client).launch(spec, CellInput(header, "diag:"))
    restarted = DockerRuntime(options, client=docker_client)  # a new dispatcher: no watch(), no launch
    [handle] = restarted.owned()  # what a restarted dispatcher does first: its units are sampled from here on
    assert handle == started
    deadline = time.monotonic() + 10
    while not (restarted.memory_now(handle) or 0) > 20 * MIB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 20 * MIB < (restarted.memory_now(handle) or 0) <= 64 * MIB
    # read from the container's cgroup where this host shows it (no dockerd CPU), else from the stats API:
    # both say the same
    cid = docker_client.containers.get(handle.ref).id
    by_files, by_stats = _cgroup_memory(cid), restarted._stats_memory(cid)
    if by_files is not None:
        assert abs(by_files[0] - by_stats[0]) < 4 * MIB and 20 * MIB < by_files[1] <= 64 * MIB
    assert 20 * MIB < by_stats[0] <= 64 * MIB
    restarted.kill(handle)
    restarted.cleanup(handle)
