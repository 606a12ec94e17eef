"""Kubernetes runtime: one batch/v1 Job per attempt. No operator and no CRD: the dispatcher is the controller.

Retries belong to the dispatcher (backoffLimit 0, restartPolicy Never). The memory tier is the container's
request and limit (equal, so the scheduler reserves what the cgroup enforces); the class timeout is the Job's
activeDeadlineSeconds. Outcomes come from the pod: terminated with reason OOMKilled (or 137 we did not cause)
is oom, a Job failed with DeadlineExceeded is timeout, an evicted or vanished pod is lost.

Talks to the API with lightkube: in-cluster service account auth, else the kubeconfig.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from lightkube import ApiError, Client
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod
from lightkube.types import CascadeType

from ..models import Exit, Handle, LaunchSpec
from . import PEAK_MARKER, job_env, last_line, peak_from_output, tail

log = logging.getLogger("jobcell.kubernetes")

LABEL_JOB = "jobcell.io/job"
LABEL_ATTEMPT = "jobcell.io/attempt"
LABEL_POOL = "jobcell.io/pool"
LABEL_QUEUE = "jobcell.io/queue"
LABEL_TIER = "jobcell.io/tier"


@dataclass(frozen=True)
class KubernetesOptions:
    image: str = "jobcell-job:dev"
    namespace: str = "jobcell"
    pool: str = "default"
    queue_id: str = ""
    env: dict[str, str] = field(default_factory=dict)  # plain settings for every job
    env_secret: str | None = None  # a Secret whose keys become env vars (database URL, API keys): never inline
    store_claim: str | None = None  # a PersistentVolumeClaim holding the document store, mounted at /store
    tmpfs_size: str = "64Mi"
    scratch_size: str = "10Gi"
    ttl_after_finished_s: int = 3600
    service_account: str | None = None
    image_pull_policy: str = "IfNotPresent"


class KubernetesRuntime:
    name = "kubernetes"

    def __init__(self, options: KubernetesOptions, client: Client | None = None) -> None:
        self.options = options
        self.client = client or Client(namespace=options.namespace, field_manager="jobcell")

    def job_name(self, job_id: int, attempt: int) -> str:
        return f"jobcell-{self.options.pool}-{job_id}-{attempt}"[:63].rstrip("-.").lower()

    def manifest(self, spec: LaunchSpec) -> dict[str, Any]:
        """The Job for one attempt; public so that tests validate it against the Kubernetes schemas."""
        o = self.options
        labels = {LABEL_JOB: str(spec.job_id), LABEL_ATTEMPT: str(spec.attempt), LABEL_POOL: o.pool,
                  LABEL_QUEUE: o.queue_id, LABEL_TIER: spec.tier}
        memory = str(spec.memory_limit_bytes)
        container: dict[str, Any] = {
            "name": "job",
            "image": o.image,
            "imagePullPolicy": o.image_pull_policy,
            "env": [{"name": k, "value": v} for k, v in sorted({**o.env, **job_env(spec)}.items())],
            "resources": {"requests": {"memory": memory}, "limits": {"memory": memory}},
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "scratch", "mountPath": "/scratch"}],
        }
        if o.env_secret:
            container["envFrom"] = [{"secretRef": {"name": o.env_secret}}]
        volumes: list[dict[str, Any]] = [
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": o.tmpfs_size}},
            {"name": "scratch", "emptyDir": {"sizeLimit": o.scratch_size}},  # disk: a tmpfs would eat the cap
        ]
        if o.store_claim:
            container["volumeMounts"].append({"name": "store", "mountPath": "/store", "readOnly": True})
            volumes.append({"name": "store", "persistentVolumeClaim": {"claimName": o.store_claim, "readOnly": True}})
        pod_spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,  # the job never talks to the API
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        }
        if o.service_account:
            pod_spec["serviceAccountName"] = o.service_account
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": self.job_name(spec.job_id, spec.attempt), "namespace": o.namespace,
                         "labels": labels},
            "spec": {
                "backoffLimit": 0,  # the dispatcher owns retries
                "activeDeadlineSeconds": max(1, int(spec.timeout_s)),
                "ttlSecondsAfterFinished": o.ttl_after_finished_s,
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        }

    def launch(self, spec: LaunchSpec) -> Handle:
        name = self.job_name(spec.job_id, spec.attempt)
        try:
            job = cast(Job, Job.from_dict(self.manifest(spec)))
            self.client.create(job, namespace=self.options.namespace)
        except ApiError as e:
            if e.status.code != 409:
                raise
            log.info("job %s attempt %s: Job %s already exists, not launching again", spec.job_id, spec.attempt, name)
        return Handle(self.name, name, spec.job_id, spec.attempt)

    def poll(self, handle: Handle) -> Exit | None:
        try:
            job = self.client.get(Job, handle.ref, namespace=self.options.namespace)
        except ApiError as e:
            if e.status.code == 404:
                return Exit(exit_code=None, lost=True, reason=f"Job {handle.ref} vanished")
            raise
        status = job.status
        conditions = {c.type: c for c in (status.conditions or []) if c.status == "True"} if status else {}
        failed = conditions.get("Failed")
        if failed is not None and failed.reason == "DeadlineExceeded":
            return Exit(exit_code=None, deadline_exceeded=True, reason=failed.message or "DeadlineExceeded",
                        log_tail=self._logs(handle)[0])
        pod = self._pod(handle)
        terminated = _terminated(pod)
        if terminated is None:
            if pod is not None and pod.status and pod.status.phase == "Failed":  # evicted, node lost
                return Exit(exit_code=None, lost=True, reason=f"pod {pod.status.reason or 'failed'}: "
                                                              f"{pod.status.message or ''}".strip())
            if failed is not None or (pod is None and status and (status.succeeded or status.failed)):
                return Exit(exit_code=None, lost=True, reason="the Job ended without a terminated container")
            return None
        logs, reason = self._logs(handle, pod)
        return Exit(exit_code=terminated.exitCode, oom_killed=terminated.reason == "OOMKilled",
                    peak_memory_bytes=peak_from_output(logs), log_tail=tail(logs), reason=reason)

    def _pod(self, handle: Handle) -> Pod | None:
        selector: dict[str, Any] = {"job-name": handle.ref}
        pods = list(self.client.list(Pod, namespace=self.options.namespace, labels=selector))
        return pods[-1] if pods else None

    def _logs(self, handle: Handle, pod: Pod | None = None) -> tuple[str, str]:
        pod = pod or self._pod(handle)
        if pod is None or pod.metadata is None or pod.metadata.name is None:
            return "", ""
        try:
            text = "".join(self.client.log(pod.metadata.name, namespace=self.options.namespace, tail_lines=200))
        except ApiError:
            return "", ""
        # pod logs interleave stdout and stderr: the reason is the last line that is not the peak report
        lines = [ln for ln in text.splitlines() if not ln.startswith(PEAK_MARKER)]
        return text, last_line("\n".join(lines))

    def kill(self, handle: Handle) -> None:
        self._delete(handle, grace_period=0)

    def cleanup(self, handle: Handle) -> None:
        self._delete(handle, grace_period=None)

    def _delete(self, handle: Handle, grace_period: int | None) -> None:
        with contextlib.suppress(ApiError):
            self.client.delete(Job, handle.ref, namespace=self.options.namespace, grace_period=grace_period,
                               cascade=CascadeType.BACKGROUND)

    def owned(self) -> Sequence[Handle]:
        labels: dict[str, Any] = {LABEL_POOL: self.options.pool, LABEL_QUEUE: self.options.queue_id}
        out = []
        for job in self.client.list(Job, namespace=self.options.namespace, labels=labels):
            meta = job.metadata
            try:
                assert meta is not None and meta.name is not None and meta.labels is not None
                out.append(Handle(self.name, meta.name, int(meta.labels[LABEL_JOB]), int(meta.labels[LABEL_ATTEMPT])))
            except (AssertionError, KeyError, ValueError):
                log.warning("Job %s carries jobcell labels but no job/attempt; ignored", meta and meta.name)
        return out

    def watch(self, wake: Callable[[], None]) -> None:
        """Polled: the loop's poll interval bounds how late an exit is noticed."""


def _terminated(pod: Pod | None) -> Any:
    if pod is None or pod.status is None:
        return None
    for cs in pod.status.containerStatuses or []:
        if cs.name == "job" and cs.state is not None and cs.state.terminated is not None:
            return cs.state.terminated
    return None
