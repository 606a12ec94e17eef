"""Kubernetes runtime: one batch/v1 Job per attempt. No operator and no CRD: the dispatcher is the controller.

Retries belong to the dispatcher (backoffLimit 0, restartPolicy Never). The memory tier is the container's
request and limit (equal, so the scheduler reserves what the cgroup enforces); the class timeout is the Job's
activeDeadlineSeconds. Outcomes come from the pod: terminated with reason OOMKilled (or 137 we did not cause)
is oom, a Job failed with DeadlineExceeded is timeout, an evicted or vanished pod is lost.

A sealed cell (issue 7): the pod holds no credential and shares no volume. Its header (no secret in it) is the
JOBCELL_HEADER variable; its one document comes from a presigned GET URL that expires in minutes, kept out of
the Job's manifest in a per-attempt Secret read through `secretKeyRef`. The pod carries the label
`jobcell.io/cell: "true"`, which k8s/networkpolicy.yaml confines to DNS and the object store's HTTPS. No
service account token is mounted. Scratch and /tmp are memory-backed emptyDirs: what the cell writes there
counts against its memory limit, so its disk use is capped by the same number as its memory (Kubernetes has
no noexec for emptyDir; the root filesystem is read-only).

The Secret is created before the Job and deleted with it (kill, cleanup). It has no ownerReference (that would
need `patch` on secrets); one whose Job was removed by its TTL while no dispatcher ran is left behind holding
only an expired URL to one document.

The result channel is the pod's log, read with `follow` while the container runs. Limits of that channel:
- Kubernetes merges a container's stdout and stderr into one log (a split needs the alpha feature gate
  PodLogsQuerySplitStreams), so records are told from stderr by their form: only lines that start with `{"`
  (a JSON object) are passed on; every one of them is still checked by the dispatcher as any record is.
- The container runtime splits lines past its limit (containerd: 16 KiB) into partial entries that the kubelet
  joins again; a stderr line written while a long record is still being drained can land inside it. The record
  is then malformed and refused (the attempt fails and is retried), never stored half.
- After the fact (a dispatcher restart), the log holds only the kubelet's current file (containerLogMaxSize,
  10 MiB by default): a cell whose output outgrew it cannot be re-read from its first byte. Raise the kubelet
  limit for large documents.
- Lines are decoded as UTF-8 by the client; invalid bytes arrive replaced, which the record check refuses.

Talks to the API with lightkube: in-cluster service account auth, else the kubeconfig.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from lightkube import ApiError, Client
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod, Secret
from lightkube.types import CascadeType

from job_image.contract import ENV_DOCUMENT_URL, ENV_HEADER, ENV_SCRATCH

from ..errors import ConfigError
from ..models import Exit, Handle, LaunchSpec
from ..ports import CellInput
from .base import Hardening, Identity, LabelKeys, Presign, RuntimeBase, is_record_line, last_line, stderr_of

log = logging.getLogger("jobcell.kubernetes")

# jobcell.io/job, /attempt, /pool, /queue, /tier: what running Jobs are found by after a restart
LABELS = LabelKeys.under("jobcell.io/")
LABEL_CELL = "jobcell.io/cell"  # selected by k8s/networkpolicy.yaml: keep the two in step
SECRET_KEY = "url"

# Waiting reasons that no retry of the kubelet will clear: the attempt is lost, the next one starts afresh.
_STUCK = frozenset({"CreateContainerConfigError", "InvalidImageName", "ErrImageNeverPull"})
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class KubernetesOptions:
    image: str = "jobcell-job:dev"
    namespace: str = "jobcell"
    pool: str = "default"
    queue_id: str = ""
    user: str = "10001:10001"  # uid:gid of the cells (JOBCELL_JOB_USER); not 0: pods run as non-root
    tmpfs_size: str = "64Mi"
    scratch_size: str | None = None  # None: the tier's memory limit, which it counts against anyway
    ttl_after_finished_s: int = 3600
    service_account: str | None = None
    image_pull_policy: str = "IfNotPresent"
    document_url_ttl_s: int = 900  # the presigned GET: long enough to be scheduled, short enough to be useless later
    log_poll_s: float = 1.0  # while the container has not started, how often to look again


def _hash8(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def dns_label(text: str, limit: int) -> str:
    """`text` as a DNS-1123 label fragment: lowercase alphanumerics and '-', no '-' at either end."""
    clean = re.sub(r"[^a-z0-9-]+", "-", text.lower())[:limit]
    return clean.strip("-")


def label_value(text: str) -> str:
    """`text` if it is a valid label value, else a sanitized prefix and a hash of it (same input, same value)."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:54].strip("-_.")
    return f"{clean}-{_hash8(text)}" if clean else _hash8(text)


class KubernetesRuntime(RuntimeBase):
    name = "kubernetes"

    def __init__(self, options: KubernetesOptions, presign: Presign, client: Client | None = None) -> None:
        self.options = options
        self.identity = Identity(self.name, options.pool, options.queue_id, LABELS, value=label_value)
        self.hardening = Hardening.of(options.user, options.tmpfs_size, options.scratch_size)
        if self.hardening.uid == 0:
            raise ConfigError("JOBCELL_JOB_USER: Kubernetes runs cells as non-root (runAsNonRoot); not uid 0")
        self.presign = presign
        self.client = client or Client(namespace=options.namespace, field_manager="jobcell")

    # -- names ----------------------------------------------------------------------------------------

    def job_name(self, job_id: int, attempt: int) -> str:
        """A valid DNS-1123 label (63 chars at most) for any pool, unique per (pool, queue, job, attempt):
        the pool is sanitized and shortened, so a hash of pool and queue keeps two queues apart."""
        suffix = f"-{_hash8(self.options.pool, self.options.queue_id)}-{job_id}-{attempt}"
        return dns_label(f"jobcell-{self.options.pool}", 63 - len(suffix)) + suffix

    @staticmethod
    def secret_name(job_name: str) -> str:
        return f"{job_name}-doc"

    # -- manifests ------------------------------------------------------------------------------------

    def manifest(self, spec: LaunchSpec, cell: CellInput) -> dict[str, Any]:
        """The Job for one attempt; public so that tests validate it against the Kubernetes schemas.
        It holds no secret: the document URL is only ever a reference to the attempt's Secret."""
        o, h = self.options, self.hardening
        name = self.job_name(spec.job_id, spec.attempt)
        labels = self.identity.labels(spec.job_id, spec.attempt, spec.tier)
        memory = str(spec.memory_limit_bytes)
        env: list[dict[str, Any]] = [
            {"name": ENV_HEADER, "value": cell.header.model_dump_json()},
            {"name": ENV_SCRATCH, "value": "/scratch"},
        ]
        if _has_document(cell):
            env.append({"name": ENV_DOCUMENT_URL, "valueFrom": {"secretKeyRef": {
                "name": self.secret_name(name), "key": SECRET_KEY, "optional": False}}})
        container: dict[str, Any] = {
            "name": "job",
            "image": o.image,
            "imagePullPolicy": o.image_pull_policy,
            "env": env,
            "resources": {"requests": {"memory": memory}, "limits": {"memory": memory}},
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": h.uid, "runAsGroup": h.gid,
                "allowPrivilegeEscalation": not h.no_new_privileges, "readOnlyRootFilesystem": h.read_only_root,
                "privileged": False, "capabilities": {"drop": list(h.drop_capabilities)},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "scratch", "mountPath": "/scratch"}],
        }
        volumes: list[dict[str, Any]] = [
            # Memory-backed: pages written here count against the container's memory limit, so a cell cannot
            # fill a node's disk; sizeLimit evicts the pod before the tmpfs reaches it.
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(h.tmpfs_bytes)}},
            {"name": "scratch", "emptyDir": {"medium": "Memory",
                                             "sizeLimit": str(h.scratch_for(spec.memory_limit_bytes))}},
        ]
        pod_spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,  # the cell never talks to the API
            "enableServiceLinks": False,  # no environment variables naming the namespace's services
            "securityContext": {"runAsNonRoot": True, "runAsUser": h.uid, "runAsGroup": h.gid, "fsGroup": h.gid,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        }
        if o.service_account:
            pod_spec["serviceAccountName"] = o.service_account
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": o.namespace, "labels": labels},
            "spec": {
                "backoffLimit": 0,  # the dispatcher owns retries
                "activeDeadlineSeconds": max(1, int(spec.timeout_s)),
                "ttlSecondsAfterFinished": o.ttl_after_finished_s,
                "template": {"metadata": {"labels": {**labels, LABEL_CELL: "true"}}, "spec": pod_spec},
            },
        }

    def secret_manifest(self, spec: LaunchSpec, url: str) -> dict[str, Any]:
        name = self.secret_name(self.job_name(spec.job_id, spec.attempt))
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": self.options.namespace,
                         "labels": self.identity.labels(spec.job_id, spec.attempt, spec.tier)},
            "type": "Opaque",
            "immutable": True,  # the kubelet need not watch it; a relaunch replaces it whole
            "stringData": {SECRET_KEY: url},
        }

    # -- Runtime port ---------------------------------------------------------------------------------

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        name = self.job_name(spec.job_id, spec.attempt)
        handle = self.handle(name, spec.job_id, spec.attempt)
        if self._job(handle) is not None:  # launched before: its pod may still need the Secret as it is
            log.info("job %s attempt %s: Job %s already exists, not launching again", spec.job_id, spec.attempt, name)
            return handle
        if _has_document(cell):
            # Before the Job, so that the pod never waits for it. The URL is never logged.
            url = self.presign(cell.document_uri, self.options.document_url_ttl_s)
            self._put_secret(spec, url)
        try:
            job = cast(Job, Job.from_dict(self.manifest(spec, cell)))
            self.client.create(job, namespace=self.options.namespace)
        except ApiError as e:
            if e.status.code != 409:
                raise
            log.info("job %s attempt %s: Job %s already exists, not launching again", spec.job_id, spec.attempt, name)
        return handle

    def _put_secret(self, spec: LaunchSpec, url: str) -> None:
        secret = cast(Secret, Secret.from_dict(self.secret_manifest(spec, url)))
        try:
            self.client.create(secret, namespace=self.options.namespace)
        except ApiError as e:
            if e.status.code != 409:
                raise
            # Left by a launch cut short: its URL may have expired. Immutable, so replaced whole.
            assert secret.metadata is not None and secret.metadata.name is not None
            self._delete_named(Secret, secret.metadata.name)
            self.client.create(secret, namespace=self.options.namespace)

    def output(self, handle: Handle) -> Iterator[bytes]:
        """The records the container printed, from its first line, followed until it ends. Waits for the pod
        and its container to start as long as the Job may still start one (its own deadline bounds the wait)."""
        ns = self.options.namespace
        give_up: float | None = None
        while True:
            pod = self._pod(handle)
            pod_name = pod.metadata.name if pod is not None and pod.metadata is not None else None
            if pod_name is not None:
                try:
                    lines = self.client.log(pod_name, namespace=ns, container="job", follow=True, newlines=False)
                    for line in lines:
                        if is_record_line(line):
                            yield line.encode() + b"\n"
                except ApiError as e:
                    if e.status.code not in (400, 404):  # 400: not started yet; 404: not there (yet, or any more)
                        raise
                else:
                    self._check_ended(handle, pod_name)
                    return
            job = self._job(handle)
            if job is None or (_ended(job) and (pod is None or _terminated(pod) is not None)):
                return  # the Job ended or vanished without a container left to read
            if give_up is None:
                deadline = job.spec.activeDeadlineSeconds if job.spec else None
                give_up = time.monotonic() + float(deadline or 0) + 60
            if time.monotonic() > give_up:
                return  # past the Job's own deadline: poll() reports what became of it
            time.sleep(self.options.log_poll_s)

    def _check_ended(self, handle: Handle, pod_name: str) -> None:
        """A follow ends cleanly when the container does, or when the connection was cut; the pod's status may
        trail the end of its log by a moment. A cut stream is an error: the caller reads again from the start."""
        for _ in range(10):
            job = self._job(handle)
            if job is None or _ended(job) or _terminated(self._pod(handle)) is not None:
                return
            time.sleep(0.5)
        raise ConnectionError(f"the log stream of pod {pod_name} ended while its container still runs")

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
            waiting = _waiting(pod)
            if waiting is not None and waiting.reason in _STUCK:  # e.g. its Secret is gone: it never starts
                return Exit(exit_code=None, lost=True, reason=f"the container cannot start: {waiting.reason}: "
                                                              f"{waiting.message or ''}".strip())
            if failed is not None or (pod is None and status and (status.succeeded or status.failed)):
                return Exit(exit_code=None, lost=True, reason="the Job ended without a terminated container")
            return None
        rest, reason = self._logs(handle, pod)
        # The kubelet's termination message (/dev/termination-log, 4 KiB at most) wins where the cell wrote one.
        reason = last_line(terminated.message or "") or reason
        return Exit(exit_code=terminated.exitCode, oom_killed=terminated.reason == "OOMKilled",
                    log_tail=rest, reason=reason)

    def kill(self, handle: Handle) -> None:
        self._delete(handle, grace_period=0)

    def cleanup(self, handle: Handle) -> None:
        self._delete(handle, grace_period=None)

    def owned(self) -> Sequence[Handle]:
        """The Jobs of this pool and queue, by their labels. (memory_now, watch: the base's. No metrics server is
        assumed, so no live memory; exits are polled.)"""
        selector: dict[str, Any] = self.identity.selector()
        jobs = [job.metadata for job in self.client.list(Job, namespace=self.options.namespace, labels=selector)]
        return self.identity.handles((m.name, m.name, m.labels) for m in jobs if m is not None and m.name)

    # -- helpers --------------------------------------------------------------------------------------

    def _pod(self, handle: Handle) -> Pod | None:
        selector: dict[str, Any] = {"job-name": handle.ref}
        pods = list(self.client.list(Pod, namespace=self.options.namespace, labels=selector))
        return pods[-1] if pods else None

    def _job(self, handle: Handle) -> Job | None:
        try:
            return self.client.get(Job, handle.ref, namespace=self.options.namespace)
        except ApiError as e:
            if e.status.code == 404:
                return None
            raise

    def _logs(self, handle: Handle, pod: Pod | None = None) -> tuple[str, str]:
        """(the tail of the non-record lines, its last line: the cell's reason)."""
        pod = pod or self._pod(handle)
        if pod is None or pod.metadata is None or pod.metadata.name is None:
            return "", ""
        try:
            text = "".join(self.client.log(pod.metadata.name, namespace=self.options.namespace, container="job",
                                           tail_lines=200))
        except ApiError:
            return "", ""
        return stderr_of(text.splitlines())

    def _delete(self, handle: Handle, grace_period: int | None) -> None:
        try:
            self.client.delete(Job, handle.ref, namespace=self.options.namespace, grace_period=grace_period,
                               cascade=CascadeType.BACKGROUND)
        except ApiError as e:
            if e.status.code != 404:  # gone already is what we wanted; anything else is the caller's to see
                raise
        self._delete_named(Secret, self.secret_name(handle.ref))

    def _delete_named(self, kind: type[Secret], name: str) -> None:
        try:
            self.client.delete(kind, name, namespace=self.options.namespace)
        except ApiError as e:
            if e.status.code != 404:
                raise


def _has_document(cell: CellInput) -> bool:
    """A cell with no bytes to read (a diagnostic run, an empty file) gets no URL and no Secret."""
    return cell.header.document_bytes > 0


def _ended(job: Job) -> bool:
    conditions = (job.status.conditions or []) if job.status else []
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in conditions)


def _container_state(pod: Pod | None) -> Any:
    if pod is None or pod.status is None:
        return None
    for cs in pod.status.containerStatuses or []:
        if cs.name == "job":
            return cs.state
    return None


def _terminated(pod: Pod | None) -> Any:
    state = _container_state(pod)
    return state.terminated if state is not None else None


def _waiting(pod: Pod | None) -> Any:
    state = _container_state(pod)
    return state.waiting if state is not None else None
