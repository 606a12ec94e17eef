"""Every manifest in k8s/ and every Job the Kubernetes runtime builds validates against the Kubernetes JSON
schemas of a current release (kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dispatcher.models import MIB, LaunchSpec
from dispatcher.runtimes.kubernetes import KubernetesOptions, KubernetesRuntime

from .conftest import ROOT

K8S = ROOT / "k8s"
VERSION = kubernetes_validate.latest_version()
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path):
    for doc in documents(path):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS if "example" not in p.name)


def test_the_dispatcher_role_grants_only_what_it_needs():
    role = next(d for d in documents(K8S / "rbac.yaml") if d["kind"] == "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {(("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
                     (("",), ("pods", "pods/log")): {"get", "list", "watch"}}


def test_the_job_per_attempt_validates_and_is_hardened():
    rt = KubernetesRuntime(KubernetesOptions(namespace="jobcell", pool="cluster", queue_id="q-1",
                                             env_secret="jobcell-job-env", store_claim="documents"),
                           client=object())  # type: ignore[arg-type]  # building a manifest makes no API call
    job = rt.manifest(LaunchSpec(42, 3, "medium", 1024 * MIB, 1800, "store:abc.pdf", "ocr"))
    kubernetes_validate.validate(job, VERSION, strict=True)
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (0, 1800)
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"] == str(1024 * MIB)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    labels = job["metadata"]["labels"]
    assert (labels["jobcell.io/job"], labels["jobcell.io/attempt"], labels["jobcell.io/pool"]) == ("42", "3", "cluster")
    assert c["envFrom"] == [{"secretRef": {"name": "jobcell-job-env"}}]
    assert not any("DATABASE_URL" in e["name"] for e in c["env"]), "secrets come from the Secret, not the manifest"
