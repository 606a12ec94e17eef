"""A local stand-in for the Kubernetes API server and its kubelets (no cluster can run here).

It serves the endpoints the runtime uses, with objects shaped as the Kubernetes API reference documents them:
batch/v1 Job (status.active / succeeded / failed, status.conditions[] with type Complete or Failed and, for a
Job past activeDeadlineSeconds, reason "DeadlineExceeded", message "Job was active longer than specified
deadline"), core/v1 Pod (status.phase, status.containerStatuses[].state.waiting / .running / .terminated with
exitCode, reason "OOMKilled" / "Error" / "Completed", startedAt, finishedAt, containerID), core/v1 Secret
(stringData is folded into base64 `data` on write, as the API server does), pod logs as text/plain
(`GET /api/v1/namespaces/{ns}/pods/{name}/log`: 400 while the container is waiting to start, `follow` holds the
answer until the container ends, `tailLines`), and meta/v1 Status for errors (reason "NotFound" 404,
"AlreadyExists" 409, "BadRequest" 400).

What a real kubelet would do is simulated from the header the cell is given (JOBCELL_HEADER): a diagnostic run
lasts sleep_s, is OOMKilled when alloc_mib plus a 15 MiB interpreter exceeds its memory limit, else exits with
exit_code. Its log is what the job image prints, stdout and stderr merged as a kubelet merges them: progress and
`message` lines, then on success the DocumentInfo and Done records, then its Peak record. A pod whose
secretKeyRef names no Secret at its start waits with CreateContainerConfigError, as a kubelet's does. It tests
our reading of the documented payloads, not real memory kills: those are tested on Docker and the process
runtime.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from job_image.contract import DocumentInfo, Done, Need, Peak, encode

from . import fake_http

MIB = 1024 * 1024


def fake_presign(uri: str, ttl_s: int) -> str:
    """A stand-in for S3Store.presign: the shape of a presigned GET, recognisable in any manifest it leaks to."""
    return f"https://store.invalid/{uri.rsplit('/', 1)[-1]}?X-Amz-Expires={ttl_s}&X-Amz-Signature=test-signature"


def _now(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


@dataclass
class SimJob:
    manifest: dict[str, Any]
    created: float
    pod_name: str
    missing_secret: str | None = None  # a secretKeyRef that named no Secret when the pod was to start
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    def container(self) -> dict[str, Any]:
        return self.manifest["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]

    def header(self) -> dict[str, Any]:
        env = {e["name"]: e.get("value", "") for e in self.container().get("env", [])}
        return json.loads(env.get("JOBCELL_HEADER") or "{}")  # type: ignore[no-any-return]

    def plan_run(self) -> None:
        header = self.header()
        params = header.get("params") or {}
        limit = int(self.container()["resources"]["limits"]["memory"])
        used = int(float(params.get("alloc_mib", 0)) * MIB) + 15 * MIB
        need = int(float(params["need_mib"]) * MIB) if "need_mib" in params else None
        asks = need is not None and bool(header.get("larger_tier")) and need > limit  # stops before allocating
        oom = used > limit and not asks
        stuck = self.missing_secret is not None
        self.plan = {
            "start": self.created + 0.2,
            "end": float("inf") if stuck else
            self.created + 0.2 + (0.3 if oom or asks else float(params.get("sleep_s", 0)) + 0.1),
            "oom": oom, "exit": 87 if asks else 137 if oom else int(params.get("exit_code", 0)),
            "need": need, "asks": asks,
            "message": params.get("message", ""), "peak": min(used, limit), "alloc_mib": params.get("alloc_mib", 0),
            "deadline": self.created + float(self.manifest["spec"].get("activeDeadlineSeconds", 1e9)),
            "job": int(header.get("job_id", 0)), "attempt": int(header.get("attempt", 1)),
        }

    def started(self, now: float) -> bool:
        return now >= self.plan["start"] and self.missing_secret is None

    def ended_at(self) -> float:
        p = self.plan
        return float(min(p["end"], p["deadline"]))

    def pod(self, now: float) -> dict[str, Any]:
        p = self.plan
        labels = dict(self.manifest["spec"]["template"]["metadata"].get("labels", {}))
        labels.update({"job-name": self.name, "batch.kubernetes.io/job-name": self.name})
        meta = {"name": self.pod_name, "namespace": self.manifest["metadata"]["namespace"], "labels": labels,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.pod_name))}
        if now < p["start"]:
            return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": {"phase": "Pending"}}
        state: dict[str, Any]
        if self.missing_secret is not None:
            phase, state = "Pending", {"waiting": {"reason": "CreateContainerConfigError",
                                                   "message": f'secret "{self.missing_secret}" not found'}}
        elif now < p["end"] and now < p["deadline"]:
            phase, state = "Running", {"running": {"startedAt": _now(p["start"])}}
        elif now >= p["deadline"] and p["end"] > p["deadline"]:
            phase, state = "Failed", {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": _now(p["start"]),
                                                     "finishedAt": _now(p["deadline"])}}
        else:
            reason = "OOMKilled" if p["oom"] else ("Completed" if p["exit"] == 0 else "Error")
            phase = "Succeeded" if p["exit"] == 0 else "Failed"
            state = {"terminated": {"exitCode": p["exit"], "reason": reason, "startedAt": _now(p["start"]),
                                    "finishedAt": _now(p["end"]), "containerID": f"containerd://{self.pod_name}"}}
        status = {"phase": phase, "containerStatuses": [
            {"name": "job", "image": self.container()["image"], "imageID": "", "ready": phase == "Running",
             "restartCount": 0, "started": phase == "Running", "state": state}]}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}

    def job(self, now: float) -> dict[str, Any]:
        p = self.plan
        status: dict[str, Any] = {"startTime": _now(self.created)}
        if now >= p["deadline"] and p["end"] > p["deadline"]:
            status.update(failed=1, conditions=[{
                "type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
                "lastProbeTime": _now(p["deadline"]), "lastTransitionTime": _now(p["deadline"])}])
        elif now >= p["end"]:
            ok = p["exit"] == 0
            status.update({"succeeded" if ok else "failed": 1, "conditions": [{
                "type": "Complete" if ok else "Failed", "status": "True",
                **({} if ok else {"reason": "BackoffLimitExceeded",
                                  "message": "Job has reached the specified backoff limit"}),
                "lastProbeTime": _now(p["end"]), "lastTransitionTime": _now(p["end"])}]})
            if ok:
                status["completionTime"] = _now(p["end"])
        else:
            status["active"] = 1
        meta = dict(self.manifest["metadata"], uid=str(uuid.uuid5(uuid.NAMESPACE_URL, self.name)))
        return {**self.manifest, "metadata": meta, "status": status}

    def logs(self, now: float) -> str:
        """What the container printed by `now`, stdout and stderr in one log as a kubelet keeps them."""
        p = self.plan
        if not self.started(now) or p["oom"]:
            return ""  # an OOM kill comes during the allocation, before the first line
        tag = {"job": p["job"], "attempt": p["attempt"]}
        told = [encode(Need(**tag, bytes=p["need"])).decode()] if p["need"] is not None else []
        if p["asks"]:
            return "".join([*told, f"needs about {p['need'] // MIB} MiB (as told): asking for a larger tier\n"])
        lines = [*told, f"allocated {int(float(p['alloc_mib']))} MiB\n"]
        if now >= p["end"]:
            if p["message"]:
                lines.append(f"{p['message']}\n")
            if p["exit"] == 0:
                lines += [encode(DocumentInfo(**tag, media_type="application/x-jobcell-diag", pages=0)).decode(),
                          encode(Done(**tag)).decode()]
            lines.append(encode(Peak(**tag, bytes=p["peak"])).decode())
        return "".join(lines)


class FakeKubernetes:
    def __init__(self) -> None:
        self.jobs: dict[str, SimJob] = {}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []  # every Job manifest as the runtime sent it
        self.secrets_created: list[dict[str, Any]] = []  # every Secret as the runtime sent it
        self.calls: list[tuple[str, str, str]] = []  # (method, resource, name) of every write, in order
        self.forbid: set[tuple[str, str]] = set()  # (method, resource) answered 403, as RBAC would
        self.lock = threading.Lock()
        self.url = ""

    def _select(self, selector: str) -> list[SimJob]:
        want = dict(part.split("=", 1) for part in selector.split(",") if part)
        now = time.time()
        return [j for j in self.jobs.values()
                if all(j.pod(now)["metadata"]["labels"].get(k) == v for k, v in want.items())]

    def _missing_secret(self, manifest: dict[str, Any]) -> str | None:
        for c in manifest["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in self.secrets:
                    return str(ref["name"])
        return None

    def _secrets(self, method: str, name: str | None, body: Any) -> tuple[int, Any]:
        if method == "POST":
            taken = body["metadata"]["name"]
            if taken in self.secrets:
                return 409, _status(409, "AlreadyExists", f'secrets "{taken}" already exists')
            self.secrets_created.append(body)
            data = dict(body.get("data") or {})
            data.update({k: base64.b64encode(v.encode()).decode() for k, v in (body.get("stringData") or {}).items()})
            stored = {k: v for k, v in body.items() if k != "stringData"}
            stored["data"] = data
            self.secrets[taken] = stored
            return 201, stored
        if name is None or name not in self.secrets:
            return 404, _status(404, "NotFound", f'secrets "{name}" not found')
        if method == "DELETE":
            del self.secrets[name]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        return 200, self.secrets[name]

    def _log(self, pod: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        with self.lock:
            job = next((j for j in self.jobs.values() if j.pod_name == pod), None)
        if job is None:
            return 404, _status(404, "NotFound", f'pods "{pod}" not found')
        container = query.get("container", ["job"])[0]
        if not job.started(time.time()):
            why = "CreateContainerConfigError" if job.missing_secret else "ContainerCreating"
            return 400, _status(400, "BadRequest", f'container "{container}" in pod "{pod}" is waiting to start: {why}')
        if query.get("follow", ["false"])[0] == "true":  # held open until the container ends, or the Job goes
            while time.time() < job.ended_at() and job.name in self.jobs:
                time.sleep(0.05)
        text = job.logs(time.time())
        if "tailLines" in query:
            n = int(query["tailLines"][0])
            text = "".join(text.splitlines(keepends=True)[-n:]) if n else ""
        return 200, text

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"] and parts[6:7] == ["log"]:
            return self._log(parts[5], query)  # outside the lock: a follow waits for the container
        now = time.time()
        resource = parts[5] if len(parts) > 5 and parts[:2] == ["apis", "batch"] else parts[4] if len(parts) > 4 else ""
        if (method, resource) in self.forbid:
            return 403, _status(403, "Forbidden", f'{resource} is forbidden: User "jobcell" cannot '
                                                  f"{method.lower()} resource \"{resource}\"")
        if method in ("POST", "DELETE"):
            target = (body or {}).get("metadata", {}).get("name") if method == "POST" else parts[-1]
            self.calls.append((method, resource, str(target)))
        with self.lock:
            if parts[:3] == ["apis", "batch", "v1"] and parts[5:6] == ["jobs"]:  # .../namespaces/NS/jobs[/NAME]
                name = parts[6] if len(parts) > 6 else None
                if method == "POST":
                    if (taken := body["metadata"]["name"]) in self.jobs:
                        return 409, _status(409, "AlreadyExists", f'jobs.batch "{taken}" already exists')
                    self.created.append(body)
                    job = SimJob(body, now, f"{body['metadata']['name']}-{uuid.uuid4().hex[:5]}",
                                 missing_secret=self._missing_secret(body))
                    job.plan_run()
                    self.jobs[job.name] = job
                    return 201, job.job(now)
                if name is None:
                    items = self._select(query.get("labelSelector", [""])[0])
                    return 200, {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {},
                                 "items": [j.job(now) for j in items]}
                if name not in self.jobs:
                    return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
                if method == "DELETE":
                    del self.jobs[name]
                    return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
                return 200, self.jobs[name].job(now)
            if parts[:2] == ["api", "v1"] and parts[4:5] == ["secrets"]:  # /api/v1/namespaces/NS/secrets[/NAME]
                return self._secrets(method, parts[5] if len(parts) > 5 else None, body)
            if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"]:  # /api/v1/namespaces/NS/pods
                items = self._select(query.get("labelSelector", [""])[0])
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {},
                             "items": [j.pod(now) for j in items]}
        return 404, _status(404, "NotFound", f"no route for {method} {path}")

    @contextmanager
    def serve(self) -> Iterator[FakeKubernetes]:
        with fake_http.serve(lambda m, p, q, b, _h: self.handle(m, p, q, b)) as url:
            self.url = url
            yield self


def client_for(fake: FakeKubernetes) -> Any:
    """A real lightkube Client pointed at the stand-in, with a kubeconfig as a user would have one."""
    from lightkube import Client
    from lightkube.config.kubeconfig import KubeConfig

    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                  "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                  "users": [{"name": "jobcell", "user": {"token": "test-token"}}],
                  "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "jobcell",
                                                            "namespace": "jobcell"}}]}
    return Client(config=KubeConfig.from_dict(kubeconfig), namespace="jobcell")
