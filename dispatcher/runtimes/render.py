"""Render runtime: each attempt is a Render one-off job of the dispatcher's base service, on the instance type
(plan) that matches its memory tier.

Render API: POST /v1/services/{serviceId}/jobs {startCommand, planId} creates the job; GET .../jobs/{jobId}
polls its status (pending, running, succeeded, failed, canceled); POST .../jobs/{jobId}/cancel cancels it; a
failed job's reason comes from its job_run_ended event (GET /v1/services/{serviceId}/events), whose details
carry reason.oomKilled {memoryLimit}, reason.nonZeroExit (the exit code), reason.evicted or
reason.timedOutSeconds. A one-off job inherits its base service's environment, so secrets stay there; the
start command carries only the job contract. The API key comes from RENDER_API_KEY and is never logged.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from ..models import MIB, Exit, Handle, LaunchSpec
from . import job_env

log = logging.getLogger("jobcell.render")

# Render's instance types and their memory, smallest first: a tier runs on the smallest that holds its limit.
PLANS: tuple[tuple[str, int], ...] = (("starter", 512 * MIB), ("standard", 2048 * MIB), ("pro", 4096 * MIB),
                                      ("pro_plus", 8192 * MIB), ("pro_max", 16384 * MIB), ("pro_ultra", 32768 * MIB))
_TOKEN = re.compile(r"(JOBCELL_[A-Z_]+)=(\S+)")


class RenderError(Exception):
    """The Render API refused a request; the message never carries the API key."""


@dataclass(frozen=True)
class RenderOptions:
    service_id: str
    api_key: str = field(repr=False)
    pool: str = "default"
    queue_id: str = ""
    base_url: str = "https://api.render.com/v1"
    plans: Mapping[str, str] = field(default_factory=dict)  # tier -> planId; default: by memory (PLANS)
    command: str = "python -m job_image.entrypoint"


def plan_for(limit_bytes: int) -> str:
    for name, memory in PLANS:
        if limit_bytes <= memory:
            return name
    raise ValueError(f"no Render plan has {limit_bytes // MIB} MiB: set JOBCELL_RENDER_PLANS for this tier")


class RenderRuntime:
    name = "render"

    def __init__(self, options: RenderOptions, session: requests.Session | None = None) -> None:
        self.options = options
        self.http = session or requests.Session()
        self.http.headers.update({"Authorization": f"Bearer {options.api_key}", "Accept": "application/json"})

    # -- API ------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        url = f"{self.options.base_url}/services/{self.options.service_id}{path}"
        r = self.http.request(method, url, timeout=30, **kw)
        if r.status_code >= 400:
            raise RenderError(f"Render API {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    # -- Runtime port ---------------------------------------------------------------------------------

    def start_command(self, spec: LaunchSpec) -> str:
        env = {**job_env(spec), "JOBCELL_POOL": self.options.pool, "JOBCELL_QUEUE": self.options.queue_id}
        return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + self.options.command

    def launch(self, spec: LaunchSpec) -> Handle:
        for h in self.owned():  # Render has no names to collide on: look before creating
            if (h.job_id, h.attempt) == (spec.job_id, spec.attempt):
                log.info("job %s attempt %s: Render job %s exists, not launching again", *(h.job_id, h.attempt, h.ref))
                return h
        plan = self.options.plans.get(spec.tier) or plan_for(spec.memory_limit_bytes)
        job = self._call("POST", "/jobs", json={"startCommand": self.start_command(spec), "planId": plan})
        return Handle(self.name, str(job["id"]), spec.job_id, spec.attempt)

    def poll(self, handle: Handle) -> Exit | None:
        try:
            job = self._call("GET", f"/jobs/{handle.ref}")
        except RenderError as e:
            if " 404 " in str(e):
                return Exit(exit_code=None, lost=True, reason=f"Render job {handle.ref} vanished")
            raise
        status = job.get("status")
        if status in (None, "pending", "running"):
            return None
        if status == "succeeded":
            return Exit(exit_code=0)
        if status == "canceled":
            return Exit(exit_code=None, lost=True, reason="the Render job was canceled")
        return self._failure(handle)

    def _failure(self, handle: Handle) -> Exit:
        events = self._call("GET", "/events", params={"type": "job_run_ended", "limit": 100}) or []
        details = next((e["event"]["details"] for e in events
                        if e.get("event", {}).get("details", {}).get("jobId") == handle.ref), None)
        reason = (details or {}).get("reason") or {}
        if "oomKilled" in reason:
            limit = reason["oomKilled"].get("memoryLimit", "its plan's memory")
            return Exit(exit_code=137, oom_killed=True, reason=f"OOM-killed at {limit}")
        if reason.get("nonZeroExit") is not None:
            code = int(reason["nonZeroExit"])
            return Exit(exit_code=code, reason=f"exited with {code} (the job's logs on Render say why)")
        if reason.get("timedOutSeconds"):
            return Exit(exit_code=None, deadline_exceeded=True, reason=reason.get("timedOutReason") or "timed out")
        what = "evicted" if reason.get("evicted") else "failed without a reason"
        return Exit(exit_code=None, lost=True, reason=f"the Render job was {what}")

    def kill(self, handle: Handle) -> None:
        try:
            self._call("POST", f"/jobs/{handle.ref}/cancel")
        except RenderError as e:
            log.info("cancel of Render job %s: %s", handle.ref, e)  # already ended: nothing to stop

    def cleanup(self, handle: Handle) -> None:
        """Render keeps a job's record and logs; there is nothing of ours to remove."""

    def owned(self) -> Sequence[Handle]:
        out = []
        # Pending and running only: Render keeps every ended job. One that ended while no dispatcher watched
        # is reaped as lost and retried (its pages are checkpointed, so little is redone).
        for item in self._call("GET", "/jobs", params={"status": "pending,running", "limit": 100}) or []:
            job = item.get("job", item)
            tokens = dict(_TOKEN.findall(job.get("startCommand", "")))
            if (tokens.get("JOBCELL_POOL"), tokens.get("JOBCELL_QUEUE")) != (self.options.pool, self.options.queue_id):
                continue
            try:
                out.append(Handle(self.name, str(job["id"]), int(tokens["JOBCELL_JOB_ID"]),
                                  int(tokens["JOBCELL_ATTEMPT"])))
            except (KeyError, ValueError):
                continue
        return out

    def watch(self, wake: Callable[[], None]) -> None:
        """Polled: the loop's poll interval bounds how late an exit is noticed."""
