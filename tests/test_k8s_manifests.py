"""Every manifest in k8s/ and every Job the Kubernetes runtime builds validates against the Kubernetes JSON
schemas of a current release (kubernetes-validate, strict: unknown fields are errors), carries no secret value,
and keeps a cell sealed: no credential, no shared volume, no network but DNS and the object store's HTTPS."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from lightkube import ApiError
from lightkube.resources.batch_v1 import Job

from dispatcher.models import MIB, LaunchSpec
from dispatcher.ports import CellInput
from dispatcher.runtimes.kubernetes import LABEL_CELL, KubernetesOptions, KubernetesRuntime, label_value
from job_image.contract import Header, decode

from .conftest import ROOT
from .fake_kubernetes import FakeKubernetes, client_for, fake_presign

K8S = ROOT / "k8s"
VERSION = kubernetes_validate.latest_version()
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
SECRET_NAME = re.compile(r"DATABASE|PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY", re.I)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def spec_and_cell(job_id: int = 42, attempt: int = 3, document_bytes: int = 1234, **params: Any
                  ) -> tuple[LaunchSpec, CellInput]:
    spec = LaunchSpec(job_id, attempt, "medium", 160 * MIB, 30, "s3://bucket/docs/scan.pdf", "diag", params)
    header = Header(job_id=job_id, attempt=attempt, tier="medium", memory_limit_bytes=160 * MIB, workload="diag",
                    params=params, done_pages=[1, 2], document_name="scan.pdf", document_bytes=document_bytes)
    return spec, CellInput(header, spec.document_uri)


def offline(**options: Any) -> KubernetesRuntime:
    """A runtime that only builds manifests: no API call is made."""
    return KubernetesRuntime(KubernetesOptions(**{"namespace": "jobcell", "pool": "cluster", "queue_id": "q-1",
                                                  **options}),
                             presign=fake_presign, client=object())  # type: ignore[arg-type]


@pytest.fixture
def k8s() -> Iterator[tuple[FakeKubernetes, KubernetesRuntime]]:
    fake = FakeKubernetes()
    with fake.serve():
        client = client_for(fake)
        yield fake, KubernetesRuntime(KubernetesOptions(pool="p_1", queue_id="q-1", log_poll_s=0.05),
                                      presign=fake_presign, client=client)


# -- the manifests in k8s/ ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS if "example" not in p.name)
    assert "networkpolicy.yaml" in kustomization["resources"]


def test_the_dispatcher_role_grants_only_what_it_needs() -> None:
    role = next(d for d in documents(K8S / "rbac.yaml") if d["kind"] == "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {(("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
                     (("",), ("pods",)): {"get", "list", "watch"},
                     (("",), ("pods/log",)): {"get"},
                     (("",), ("secrets",)): {"create", "delete"}}  # never get/list/watch: it reads no Secret


def test_no_manifest_holds_a_secret_value() -> None:
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == "Secret":
                assert "example" in path.name, f"{path.name}: real Secrets are created out of band"
                assert set(doc["stringData"].values()) <= {"CHANGE-ME"} | {
                    v for v in doc["stringData"].values() if "CHANGE-ME" in v}, "placeholders only"
                continue
            text = json.dumps(doc)
            assert "secretRef" not in text, f"{path.name}: a whole Secret as env; name each key (secretKeyRef)"
            for container in _containers(doc):
                for e in container.get("env", []):
                    if SECRET_NAME.search(e["name"]):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], (path.name, e["name"])


def test_the_dispatcher_reads_each_secret_by_key() -> None:
    [deploy] = documents(K8S / "dispatcher.yaml")
    [c] = _containers(deploy)
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"JOBCELL_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"} <= set(refs)
    assert all(r["name"] == "jobcell-dispatcher" for r in refs.values())
    config = next(d for d in documents(K8S / "configmap.yaml"))
    assert "JOBCELL_K8S_ENV_SECRET" not in config["data"], "no Secret is handed to job pods any more"


def test_the_network_policy_seals_every_cell() -> None:
    [policy] = documents(K8S / "networkpolicy.yaml")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {LABEL_CELL: "true"}}
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert not spec.get("ingress"), "nothing may connect to a cell"
    Net = ipaddress.IPv4Network | ipaddress.IPv6Network
    allowed: list[tuple[Net, list[Net], set[int]]] = []
    for rule in spec["egress"]:
        assert rule.get("to") and rule.get("ports"), "an egress rule without `to` or `ports` allows everything"
        ports = {p["port"] for p in rule["ports"]}
        for peer in rule["to"]:
            if "ipBlock" in peer:
                block = peer["ipBlock"]
                allowed.append((ipaddress.ip_network(block["cidr"]),
                                [ipaddress.ip_network(x) for x in block.get("except", [])], ports))
            else:  # the cluster DNS only
                assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
                assert peer["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
                assert ports == {53}

    def reachable(address: str) -> set[int]:
        ip = ipaddress.ip_address(address)
        return {p for net, excepts, ports in allowed for p in ports
                if ip in net and not any(ip in x for x in excepts)}

    assert reachable("52.216.8.1") == {443}, "the object store's public HTTPS"
    for private in ["169.254.169.254", "169.254.170.2", "10.0.0.1", "172.16.0.10", "172.31.255.1",
                    "192.168.1.1", "100.64.0.10"]:
        assert reachable(private) == set(), f"{private} must be out of a cell's reach"


def test_the_namespace_enforces_the_restricted_pod_security_profile() -> None:
    [ns] = documents(K8S / "namespace.yaml")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -- the Job per attempt -------------------------------------------------------------------------------------

def test_the_job_per_attempt_validates_and_is_sealed() -> None:
    rt = offline()
    spec, cell = spec_and_cell()
    job = rt.manifest(spec, cell)
    kubernetes_validate.validate(job, VERSION, strict=True)
    s = job["spec"]
    assert (s["backoffLimit"], s["activeDeadlineSeconds"]) == (0, 30)
    pod = s["template"]["spec"]
    [c] = pod["containers"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert s["template"]["metadata"]["labels"][LABEL_CELL] == "true", "the NetworkPolicy selects this label"
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"] == str(160 * MIB)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    labels = job["metadata"]["labels"]
    assert (labels["jobcell.io/job"], labels["jobcell.io/attempt"], labels["jobcell.io/pool"]) == ("42", "3", "cluster")
    # Only non-secret values inline; the document URL only as a reference to the attempt's own Secret.
    env = {e["name"]: e for e in c["env"]}
    assert set(env) == {"JOBCELL_HEADER", "JOBCELL_SCRATCH", "JOBCELL_DOCUMENT_URL"}
    assert Header.model_validate_json(env["JOBCELL_HEADER"]["value"]) == cell.header
    assert env["JOBCELL_DOCUMENT_URL"] == {"name": "JOBCELL_DOCUMENT_URL", "valueFrom": {"secretKeyRef": {
        "name": rt.secret_name(job["metadata"]["name"]), "key": "url", "optional": False}}}
    assert "envFrom" not in c
    # No shared store: only memory-backed scratch, capped, counted against the memory limit.
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp", "/scratch"]
    for v in pod["volumes"]:
        assert set(v) == {"name", "emptyDir"} and v["emptyDir"]["medium"] == "Memory" and v["emptyDir"]["sizeLimit"]
    assert {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["volumes"]}["scratch"] == str(160 * MIB)


def test_a_cell_without_document_bytes_gets_no_url_at_all() -> None:
    spec, cell = spec_and_cell(document_bytes=0)
    [c] = offline().manifest(spec, cell)["spec"]["template"]["spec"]["containers"]
    assert {e["name"] for e in c["env"]} == {"JOBCELL_HEADER", "JOBCELL_SCRATCH"}


@pytest.mark.parametrize("pool", ["cluster", "_under_score_", "Upper.Case.Dots", "-edge-", "p" * 63, "a_b" * 21])
def test_names_and_labels_are_valid_for_any_pool(pool: str) -> None:
    rt = offline(pool=pool, queue_id="0f8e2a4c-9a1b-4d3e-8f00-123456789abc")
    spec, cell = spec_and_cell(job_id=123456789, attempt=12)
    name = rt.job_name(spec.job_id, spec.attempt)
    assert len(name) <= 63 and DNS_LABEL.match(name), name
    assert name.endswith("-123456789-12")
    secret = rt.secret_manifest(spec, "https://x.invalid/doc")
    assert len(secret["metadata"]["name"]) <= 253 and DNS_LABEL.match(secret["metadata"]["name"])
    for value in [*rt.manifest(spec, cell)["metadata"]["labels"].values(), *secret["metadata"]["labels"].values()]:
        assert len(value) <= 63 and LABEL_VALUE.match(value), value
    kubernetes_validate.validate(rt.manifest(spec, cell), VERSION, strict=True)
    kubernetes_validate.validate(secret, VERSION, strict=True)


def test_names_keep_queues_and_pools_apart() -> None:
    names = {offline(pool=pool, queue_id=q).job_name(7, 1)
             for pool in ["a_b", "a-b", "A-B", "x" * 70, "x" * 71] for q in ["q-1", "q-2"]}
    assert len(names) == 10, "sanitizing must not merge two pools or two queues into one name"
    assert label_value("a_b") == "a_b" and label_value("_b") != label_value("-b")


# -- against the stand-in API server -------------------------------------------------------------------------

def test_the_presigned_url_lives_only_in_the_attempts_secret(k8s: tuple[FakeKubernetes, KubernetesRuntime]) -> None:
    fake, rt = k8s
    spec, cell = spec_and_cell(sleep_s=0.2)
    url = fake_presign(cell.document_uri, rt.options.document_url_ttl_s)
    h = rt.launch(spec, cell)
    assert rt.launch(spec, cell) == h, "the same attempt is never created twice"
    [job] = fake.created
    assert url not in json.dumps(job) and "X-Amz-Signature" not in json.dumps(job)
    secret_name = rt.secret_name(h.ref)
    assert [s["metadata"]["name"] for s in fake.secrets_created] == [secret_name], "a running Job's is left alone"
    assert fake.secrets_created[0]["stringData"] == {"url": url}
    assert fake.calls == [("POST", "secrets", secret_name), ("POST", "jobs", h.ref)], "the Secret comes first"
    # A launch cut short after its Secret: the next one replaces the Secret (its URL may have expired).
    rt.client.delete(Job, h.ref)
    assert rt.launch(spec, cell) == h
    assert fake.calls[3:] == [("POST", "secrets", secret_name), ("DELETE", "secrets", secret_name),
                              ("POST", "secrets", secret_name), ("POST", "jobs", h.ref)]
    rt.cleanup(h)
    assert fake.jobs == {} and fake.secrets == {}, "cleanup removes the Job and its Secret"
    rt.cleanup(h)  # idempotent: both already gone


def test_output_is_the_cells_records_only_and_poll_reads_the_reason(
        k8s: tuple[FakeKubernetes, KubernetesRuntime]) -> None:
    _, rt = k8s
    spec, cell = spec_and_cell(exit_code=65, message="page 3 is not a valid JPEG stream")
    h = rt.launch(spec, cell)
    lines = b"".join(rt.output(h)).splitlines()  # follows until the container ends
    assert [type(decode(ln)).__name__ for ln in lines] == ["Peak"]
    assert {(decode(ln).job, decode(ln).attempt) for ln in lines} == {(42, 3)}
    assert b"".join(rt.output(h)).splitlines() == lines, "read again, the same bytes from the start"
    exit = _wait_exit(rt, h)
    assert (exit.exit_code, exit.reason) == (65, "page 3 is not a valid JPEG stream")
    assert '{"' not in exit.log_tail, "records (page text) never reach the attempt log"
    rt.cleanup(h)


def test_a_successful_cell_emits_document_and_done(k8s: tuple[FakeKubernetes, KubernetesRuntime]) -> None:
    _, rt = k8s
    spec, cell = spec_and_cell(alloc_mib=20)
    h = rt.launch(spec, cell)
    records = [decode(ln) for ln in b"".join(rt.output(h)).splitlines()]
    assert [r.type for r in records] == ["document", "done", "peak"]
    assert _wait_exit(rt, h).exit_code == 0
    rt.cleanup(h)


def test_a_pod_whose_secret_is_missing_is_lost_not_left_waiting(
        k8s: tuple[FakeKubernetes, KubernetesRuntime]) -> None:
    _, rt = k8s
    spec, cell = spec_and_cell()
    # The Job alone, without its Secret: as if someone had deleted the Secret. Its container never starts.
    rt.client.create(cast(Job, Job.from_dict(rt.manifest(spec, cell))))
    [h] = rt.owned()
    exit = _wait_exit(rt, h)
    assert exit.lost and "CreateContainerConfigError" in exit.reason
    rt.cleanup(h)


def test_delete_swallows_only_not_found(k8s: tuple[FakeKubernetes, KubernetesRuntime]) -> None:
    fake, rt = k8s
    spec, cell = spec_and_cell()
    h = rt.launch(spec, cell)
    fake.forbid.add(("DELETE", "secrets"))
    with pytest.raises(ApiError) as e:
        rt.cleanup(h)
    assert e.value.status.code == 403
    fake.forbid.clear()
    rt.cleanup(h)


def _wait_exit(rt: KubernetesRuntime, h: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exit = rt.poll(h)
        if exit is not None:
            return exit
        time.sleep(0.05)
    raise AssertionError("the unit did not end")


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    template = spec.get("template", {}).get("spec", {})
    return list(template.get("containers", [])) + list(template.get("initContainers", []))
