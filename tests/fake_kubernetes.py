"""A local stand-in for the Kubernetes API server and its kubelets (no cluster can run here).

It serves the endpoints the runtime uses, with objects shaped as the Kubernetes API reference documents them:
batch/v1 Job (status.active / succeeded / failed, status.conditions[] with type Complete or Failed and, for a
Job past activeDeadlineSeconds, reason "DeadlineExceeded", message "Job was active longer than specified
deadline"), core/v1 Pod (status.phase, status.containerStatuses[].state.running / .terminated with exitCode,
reason "OOMKilled" / "Error" / "Completed", startedAt, finishedAt, containerID), pod logs as text/plain, and
meta/v1 Status for errors (reason "NotFound" 404, "AlreadyExists" 409).

What a real kubelet would do is simulated from the job's own diagnostic parameters (JOBCELL_PARAMS): it runs
for sleep_s, is OOMKilled when alloc_mib plus a 15 MiB interpreter exceeds its memory limit, else exits with
exit_code, printing `message` and its peak as the job image does. It tests our reading of the documented
payloads, not real memory kills: those are tested on Docker and the process runtime.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import fake_http

MIB = 1024 * 1024


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
    deleted: bool = False
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    def _container(self) -> dict[str, Any]:
        return self.manifest["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]

    def plan_run(self) -> None:
        env = {e["name"]: e.get("value", "") for e in self._container().get("env", [])}
        params = json.loads(env.get("JOBCELL_PARAMS") or "{}")
        limit = int(self._container()["resources"]["limits"]["memory"])
        used = int(float(params.get("alloc_mib", 0)) * MIB) + 15 * MIB
        oom = used > limit
        self.plan = {
            "start": self.created + 0.2,
            "end": self.created + 0.2 + (0.3 if oom else float(params.get("sleep_s", 0)) + 0.1),
            "oom": oom, "exit": 137 if oom else int(params.get("exit_code", 0)),
            "message": params.get("message", ""), "peak": min(used, limit),
            "deadline": self.created + float(self.manifest["spec"].get("activeDeadlineSeconds", 1e9)),
        }

    def pod(self, now: float) -> dict[str, Any]:
        p = self.plan
        labels = dict(self.manifest["spec"]["template"]["metadata"].get("labels", {}))
        labels.update({"job-name": self.name, "batch.kubernetes.io/job-name": self.name})
        meta = {"name": self.pod_name, "namespace": self.manifest["metadata"]["namespace"], "labels": labels,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.pod_name))}
        if now < p["start"]:
            return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": {"phase": "Pending"}}
        state: dict[str, Any]
        if now < p["end"] and now < p["deadline"]:
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
            {"name": "job", "image": self._container()["image"], "imageID": "", "ready": phase == "Running",
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
        if now < self.plan["end"] or self.plan["oom"]:
            return ""
        lines = [self.plan["message"]] if self.plan["message"] else []
        return "".join(f"{ln}\n" for ln in [*lines, f"jobcell-peak-bytes={self.plan['peak']}"])


class FakeKubernetes:
    def __init__(self) -> None:
        self.jobs: dict[str, SimJob] = {}
        self.created: list[dict[str, Any]] = []  # every Job manifest as the runtime sent it
        self.lock = threading.Lock()
        self.url = ""

    def _select(self, selector: str) -> list[SimJob]:
        want = dict(part.split("=", 1) for part in selector.split(",") if part)
        now = time.time()
        return [j for j in self.jobs.values()
                if all(j.pod(now)["metadata"]["labels"].get(k) == v for k, v in want.items())]

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        now = time.time()
        with self.lock:
            if parts[:3] == ["apis", "batch", "v1"] and parts[5:6] == ["jobs"]:  # .../namespaces/NS/jobs[/NAME]
                name = parts[6] if len(parts) > 6 else None
                if method == "POST":
                    if (taken := body["metadata"]["name"]) in self.jobs:
                        return 409, _status(409, "AlreadyExists", f'jobs.batch "{taken}" already exists')
                    self.created.append(body)
                    job = SimJob(body, now, f"{body['metadata']['name']}-{uuid.uuid4().hex[:5]}")
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
            if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"]:  # /api/v1/namespaces/NS/pods[/NAME/log]
                if len(parts) > 6 and parts[6] == "log":
                    job = next((j for j in self.jobs.values() if j.pod_name == parts[5]), None)
                    if job is None:
                        return 404, _status(404, "NotFound", f'pods "{parts[5]}" not found')
                    return 200, job.logs(now)
                items = self._select(query.get("labelSelector", [""])[0])
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {},
                             "items": [j.pod(now) for j in items]}
        return 404, _status(404, "NotFound", f"no route for {method} {path}")

    @contextmanager
    def serve(self) -> Iterator[FakeKubernetes]:
        with fake_http.serve(lambda m, p, q, b, _h: self.handle(m, p, q, b)) as url:
            self.url = url
            yield self
