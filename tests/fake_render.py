"""A local stand-in for Render's API (api.render.com cannot be reached from here), answering with the objects
Render documents:

- the job object of "One-Off Jobs" and the API reference: {id "job-…", serviceId, startCommand, planId,
  createdAt, startedAt (null until it runs), finishedAt, status: null → pending → running → succeeded | failed |
  canceled}; lists as [{"job": {...}, "cursor": "..."}];
- the service event of the API reference (serviceEventWithCursor): [{"event": {id, timestamp, serviceId, type
  "job_run_ended", details {jobId, status, reason {oomKilled {memoryLimit}, nonZeroExit, evicted}}},
  "cursor"}];
- errors as {"id": "not_found", "message": "..."}.

What Render's machines would do is simulated from the job's own diagnostic parameters, read from the start
command: it runs for sleep_s, is OOM-killed when alloc_mib plus a 15 MiB interpreter exceeds its plan's memory,
else exits with exit_code. It tests our reading of the documented payloads, not real memory kills.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import fake_http

MIB = 1024 * 1024


def _ts(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


class FakeRender:
    def __init__(self, service_id: str, plan_memory: dict[str, int]) -> None:
        self.service_id = service_id
        self.plan_memory = plan_memory
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.lock = threading.Lock()
        self.url = ""

    def _create(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        env = dict(tok.split("=", 1) for tok in shlex.split(body["startCommand"]) if "=" in tok)
        params = json.loads(env.get("JOBCELL_PARAMS") or "{}")
        memory = self.plan_memory[body["planId"]]
        used = int(float(params.get("alloc_mib", 0)) * MIB) + 15 * MIB
        oom = used > memory
        job = {"id": f"job-{uuid.uuid4().hex[:20]}", "serviceId": self.service_id,
               "startCommand": body["startCommand"], "planId": body["planId"], "createdAt": _ts(now)}
        self.jobs[job["id"]] = {"job": job, "start": now + 0.2, "memory": memory, "oom": oom,
                                "end": now + 0.2 + (0.3 if oom else float(params.get("sleep_s", 0)) + 0.1),
                                "exit": 137 if oom else int(params.get("exit_code", 0)), "canceled_at": None}
        return self._view(job["id"], now)

    def _view(self, job_id: str, now: float) -> dict[str, Any]:
        s = self.jobs[job_id]
        ended = s["canceled_at"] or (s["end"] if now >= s["end"] else None)
        if s["canceled_at"]:
            status = "canceled"
        elif now < s["start"]:
            status = "pending"
        elif ended is None:
            status = "running"
        else:
            status = "succeeded" if s["exit"] == 0 else "failed"
        return {**s["job"], "status": status, "startedAt": _ts(s["start"]) if now >= s["start"] else None,
                "finishedAt": _ts(ended)}

    def _events(self, now: float) -> list[dict[str, Any]]:
        out = []
        for job_id, s in self.jobs.items():
            view = self._view(job_id, now)
            if view["status"] not in ("succeeded", "failed", "canceled"):
                continue
            reason: dict[str, Any] = {"evicted": False}
            if view["status"] == "failed":
                if s["oom"]:
                    reason["oomKilled"] = {"memoryLimit": f"{s['memory'] // MIB}Mi"}
                else:
                    reason["nonZeroExit"] = s["exit"]
            out.append({"event": {"id": f"evt-{job_id[4:]}", "timestamp": view["finishedAt"],
                                  "serviceId": self.service_id, "type": "job_run_ended",
                                  "details": {"jobId": job_id, "status": view["status"], "reason": reason}},
                        "cursor": f"c-{job_id}"})
        return out

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")  # v1 services SID jobs [JOB [cancel]] | v1 services SID events
        now = time.time()
        if parts[:3] != ["v1", "services", self.service_id]:
            return 404, {"id": "not_found", "message": "service not found"}
        with self.lock:
            if parts[3:] == ["jobs"] and method == "POST":
                return 201, self._create(body, now)
            if parts[3:] == ["jobs"]:
                wanted = set(",".join(query.get("status", [])).split(",")) - {""}
                views = [self._view(j, now) for j in self.jobs]
                return 200, [{"job": v, "cursor": f"c-{v['id']}"} for v in views
                             if not wanted or v["status"] in wanted]
            if parts[3:] == ["events"]:
                return 200, self._events(now)
            if len(parts) >= 5 and parts[3] == "jobs" and parts[4] in self.jobs:
                if parts[5:] == ["cancel"] and method == "POST":
                    s = self.jobs[parts[4]]
                    if self._view(parts[4], now)["status"] in ("succeeded", "failed", "canceled"):
                        return 400, {"id": "bad_request", "message": "job has already finished"}
                    s["canceled_at"] = now
                    return 200, self._view(parts[4], now)
                return 200, self._view(parts[4], now)
        return 404, {"id": "not_found", "message": "not found"}

    @contextmanager
    def serve(self) -> Iterator[FakeRender]:
        def handle(method: str, path: str, query: dict[str, list[str]], body: Any,
                   headers: Any) -> tuple[int, Any]:
            self.requests.append((method, path, headers.get("Authorization")))
            return self.handle(method, path, query, body)

        with fake_http.serve(handle) as url:
            self.url = url + "/v1"
            yield self
