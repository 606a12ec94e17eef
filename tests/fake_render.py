"""A local stand-in for Render's API (api.render.com cannot be reached from here), answering with the objects
Render documents (https://api-docs.render.com, https://render.com/docs/one-off-jobs):

- the job object: {id "job-…", serviceId, startCommand, planId, createdAt, startedAt (null until it runs),
  finishedAt, status: null → pending → running → succeeded | failed | canceled}; lists as
  [{"job": {...}, "cursor": "..."}];
- the service event (serviceEventWithCursor): [{"event": {id, timestamp, serviceId, type "job_run_ended",
  details {jobId, status, reason {oomKilled {memoryLimit}, nonZeroExit, evicted}}}, "cursor"}];
- the service (GET /v1/services/{id}: {id, name, ownerId, type, ...}) and its variables
  (GET /v1/services/{id}/env-vars: [{"envVar": {key, value}, "cursor"}]);
- the logs API (GET /v1/logs?ownerId&resource&startTime&endTime&direction&limit): {logs: [{id, timestamp,
  message, labels [{name, value}]}], hasMore, nextStartTime, nextEndTime}, paginated by time, lines appearing
  a moment after they were written (Render ingests them asynchronously);
- errors as {"id": "not_found", "message": "..."}.

What Render's machines would do is simulated from the header in the start command (JOBCELL_HEADER): a
diagnostic run lasts sleep_s, is OOM-killed when alloc_mib plus a 15 MiB interpreter exceeds its plan's memory,
else exits with exit_code, printing what the job image prints (stdout and stderr in one stream, as Render's
logs keep them). It tests our reading of the documented payloads, not real memory kills.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from job_image.contract import DocumentInfo, Done, Need, Peak, encode

from . import fake_http

MIB = 1024 * 1024
INGEST_S = 0.3  # how long a written line takes to show in the logs API


def fake_presign(uri: str, ttl_s: int) -> str:
    """A stand-in for S3Store.presign: the shape of a presigned GET, recognisable in any manifest it leaks to."""
    return f"https://store.invalid/{uri.rsplit('/', 1)[-1]}?X-Amz-Expires={ttl_s}&X-Amz-Signature=test-signature"


def _ts(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def command_env(command: str) -> dict[str, str]:
    """The VAR=value words of a start command, as a shell hands them to `env`."""
    return dict(w.split("=", 1) for w in shlex.split(command) if "=" in w and w.split("=", 1)[0].isupper())


class FakeRender:
    def __init__(self, service_id: str, plan_memory: dict[str, int], owner_id: str = "tea-test",
                 env_vars: dict[str, str] | None = None) -> None:
        self.service_id = service_id
        self.owner_id = owner_id
        self.plan_memory = plan_memory
        self.env_vars = env_vars or {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.lock = threading.Lock()
        self.url = ""

    def _create(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        header = json.loads(command_env(body["startCommand"]).get("JOBCELL_HEADER") or "{}")
        params = header.get("params") or {}
        memory = self.plan_memory[body["planId"]]
        used = int(float(params.get("alloc_mib", 0)) * MIB) + 15 * MIB
        need = int(float(params["need_mib"]) * MIB) if "need_mib" in params else None
        asks = need is not None and bool(header.get("larger_tier")) and need > memory  # stops before allocating
        oom = used > memory and not asks
        job = {"id": f"job-{uuid.uuid4().hex[:20]}", "serviceId": self.service_id,
               "startCommand": body["startCommand"], "planId": body["planId"], "createdAt": _ts(now)}
        self.jobs[job["id"]] = {"job": job, "start": now + 0.2, "memory": memory, "oom": oom, "peak": min(used, memory),
                                "end": now + 0.2 + (0.3 if oom or asks else float(params.get("sleep_s", 0)) + 0.1),
                                "exit": 87 if asks else 137 if oom else int(params.get("exit_code", 0)),
                                "canceled_at": None, "need": need, "asks": asks,
                                "params": params, "tag": {"job": int(header.get("job_id", 0)),
                                                          "attempt": int(header.get("attempt", 1))}}
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

    def _lines(self, job_id: str) -> list[tuple[float, str]]:
        """(written at, line) of everything the job printed, stdout and stderr alike."""
        s = self.jobs[job_id]
        if s["oom"] or (s["canceled_at"] is not None and s["canceled_at"] < s["start"]):
            return []  # killed during its allocation (or before it ran), before its first line
        start, end = s["start"], s["canceled_at"] or s["end"]
        told = [(start + 0.005, encode(Need(**s["tag"], bytes=s["need"])).decode().rstrip("\n"))] \
            if s["need"] is not None else []
        if s["asks"]:
            return [*told, (start + 0.01, f"needs about {s['need'] // MIB} MiB (as told): asking for a larger tier")]
        lines = [*told, (start + 0.01, f"allocated {int(float(s['params'].get('alloc_mib', 0)))} MiB")]
        if s["canceled_at"] is None:
            if s["params"].get("message"):
                lines.append((end - 0.03, str(s["params"]["message"])))
            if s["exit"] == 0:
                lines += [(end - 0.02, encode(DocumentInfo(**s["tag"], media_type="application/x-jobcell-diag",
                                                           pages=0)).decode().rstrip("\n")),
                          (end - 0.02, encode(Done(**s["tag"])).decode().rstrip("\n"))]  # same stamp: order kept
            lines.append((end - 0.01, encode(Peak(**s["tag"], bytes=s["peak"])).decode().rstrip("\n")))
        return lines

    def _logs(self, query: dict[str, list[str]], now: float) -> tuple[int, Any]:
        if query.get("ownerId", [""])[0] != self.owner_id:
            return 404, {"id": "not_found", "message": "owner not found"}
        resources = set(query.get("resource", []))
        start = _when(query["startTime"][0]) if "startTime" in query else now - 3600
        end = _when(query["endTime"][0]) if "endTime" in query else now
        forward = query.get("direction", ["backward"])[0] == "forward"
        limit = int(query.get("limit", ["20"])[0])
        entries = []
        for job_id in self.jobs:
            if job_id not in resources:
                continue
            for n, (written, line) in enumerate(self._lines(job_id)):
                t = _when(str(_ts(written)))  # at the precision of the timestamps handed out (microseconds)
                if written + INGEST_S <= now and start <= t <= end:
                    entries.append({"id": f"{job_id}-{n:06d}", "timestamp": _ts(t), "message": line, "labels": [
                        {"name": "resource", "value": job_id}, {"name": "instance", "value": f"{job_id}-i"},
                        {"name": "level", "value": "info"}, {"name": "type", "value": "app"}]})
        entries.sort(key=lambda e: (e["timestamp"], e["id"]), reverse=not forward)
        page, more = entries[:limit], entries[limit:]
        answer: dict[str, Any] = {"hasMore": bool(more), "logs": page,
                                  "nextStartTime": _ts(start), "nextEndTime": _ts(end)}
        if more:  # the next page starts (or, backward, ends) at the first entry not returned
            answer["nextStartTime" if forward else "nextEndTime"] = more[0]["timestamp"]
        return 200, answer

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
        parts = path.strip("/").split("/")  # v1 logs | v1 services SID [jobs [JOB [cancel]] | events | env-vars]
        now = time.time()
        with self.lock:
            if parts == ["v1", "logs"] and method == "GET":
                return self._logs(query, now)
            if parts[:3] != ["v1", "services", self.service_id]:
                return 404, {"id": "not_found", "message": "service not found"}
            if parts[3:] == [] and method == "GET":
                return 200, {"id": self.service_id, "name": "jobcell-cell", "ownerId": self.owner_id,
                             "type": "background_worker", "suspended": "not_suspended"}
            if parts[3:] == ["env-vars"] and method == "GET":
                return 200, [{"envVar": {"key": k, "value": v}, "cursor": f"c-{k}"} for k, v in self.env_vars.items()]
            if parts[3:] == ["jobs"] and method == "POST":
                if body.get("planId") is not None and body["planId"] not in self.plan_memory:
                    # Render refuses an instance type it does not know (a plan name such as "starter" included)
                    return 400, {"id": "bad_request", "message": f"invalid planId: {body['planId']}"}
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
