"""Render runtime: each attempt is a Render one-off job on the cell's own base service, on the instance type
(plan) that matches its memory tier.

Render API (https://api-docs.render.com, https://render.com/docs/one-off-jobs):
- POST /v1/services/{serviceId}/jobs {startCommand, planId} creates a job; GET .../jobs/{jobId} polls its
  status (pending, running, succeeded, failed, canceled); POST .../jobs/{jobId}/cancel cancels it.
- A failed job's reason comes from its job_run_ended event (GET /v1/services/{serviceId}/events), whose details
  carry reason.oomKilled {memoryLimit}, reason.nonZeroExit (the exit code), reason.evicted or
  reason.timedOutSeconds.
- GET /v1/logs?ownerId=&resource={jobId}&startTime=&endTime=&direction=forward&limit= lists a job's log lines
  ({logs: [{id, timestamp, message, labels}], hasMore, nextStartTime, nextEndTime}); the job's output is read
  there (the result channel).

A sealed cell (issue 7). A one-off job gets "all of the base service's configured environment variables", so
the base service must not be the dispatcher: it is `jobcell-cell` in render.yaml, a worker built from the same
image whose environment holds no secret, named by JOBCELL_RENDER_SERVICE_ID. The runtime refuses to start when
that id is the dispatcher's own (RENDER_SERVICE_ID), and refuses a base service whose variables look like
credentials. The start command carries the cell's header (no secret in it) and, for a document, a presigned
GET URL that expires in minutes; it holds no credential. The key to Render's API (RENDER_API_KEY) stays in the
dispatcher and travels only in the Authorization header.

Limits of this runtime, as Render documents it:
- The start command is stored with the job and shown to every member of the workspace (dashboard, API) for as
  long as Render keeps the job: whoever can read it can fetch that one document until its URL expires.
- Render's logs API has no stdout/stderr label: a job's lines are one stream. Records are told from stderr by
  their form (only lines that start with `{"`, a JSON object, are passed on; each is still checked as any
  record is). The failure reason is the last other line, read back from the same logs.
- Logs are ingested asynchronously: the output is read until the job has ended and no new line arrived for
  `log_settle_s`. A line Render drops, truncates or delays past that window is missing, and the attempt then
  fails for a missing or malformed record (it is retried), never stores a half record. Render does not document
  a maximum log line size; very large pages (long records) are the ones at risk.
- Lines are polled (every `log_poll_s`; Render rate-limits its API), so pages arrive in batches, not one by one.
- Logs are kept for the workspace's retention period only: an attempt adopted after a longer dispatcher
  outage cannot be re-read, and is retried.
- One-off jobs have no network policy: a cell can reach the internet and the workspace's private network
  (with nothing to authenticate with). Put jobcell-cell in an environment of its own with private network
  isolation where your plan offers it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from job_image.contract import ENV_DOCUMENT_URL, ENV_HEADER

from ..errors import ConfigError, JobcellError
from ..models import MIB, Exit, Handle, LaunchSpec
from ..ports import CellInput
from .base import Presign, RuntimeBase, is_record_line, stderr_of

log = logging.getLogger("jobcell.render")

# Render's instance type ids for one-off jobs of a web service, private service or background worker, and
# their memory, smallest first: a tier runs on the smallest that holds its limit (render.com/docs/one-off-jobs,
# "Instance type IDs"). Cron job bases have plan-crn-* ids instead: set JOBCELL_RENDER_PLANS for those.
PLANS: tuple[tuple[str, int], ...] = (
    ("plan-srv-006", 512 * MIB),  # Starter
    ("plan-srv-008", 2048 * MIB),  # Standard
    ("plan-srv-010", 4096 * MIB),  # Pro
    ("plan-srv-011", 8192 * MIB),  # Pro Plus
    ("plan-srv-013", 16384 * MIB),  # Pro Max
    ("plan-srv-014", 32768 * MIB),  # Pro Ultra
)
ENV_POOL = "JOBCELL_POOL"  # tags in the start command: how owned() finds this queue's jobs again
ENV_QUEUE = "JOBCELL_QUEUE"
_FINAL = frozenset({"succeeded", "failed", "canceled"})
# Variable names and values a cell's base service must not carry: it would hand them to every cell.
_SECRET_NAME = re.compile(r"DATABASE|PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE|_DSN$|"
                          r"^AWS_|^OPENAI_|^RENDER_API", re.I)
_SECRET_VALUE = re.compile(r"^rnd_|^sk-|://[^/\s:@]+:[^/\s@]+@")  # a Render key, an OpenAI key, a URL with a password


class RenderError(JobcellError):
    """The Render API refused a request; the message never carries the API key nor a start command."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RenderOptions:
    service_id: str  # the cells' base service (render.yaml: jobcell-cell), never the dispatcher's own
    api_key: str = field(repr=False)
    pool: str = "default"
    queue_id: str = ""
    base_url: str = "https://api.render.com/v1"
    plans: Mapping[str, str] = field(default_factory=dict)  # tier -> planId; default: by memory (PLANS)
    command: str = "python -m job_image.entrypoint"
    # Render sets RENDER_SERVICE_ID in every service: in the dispatcher, that is the dispatcher itself.
    own_service_id: str | None = field(default_factory=lambda: os.environ.get("RENDER_SERVICE_ID"))
    owner_id: str | None = None  # the workspace, for the logs API; default: the base service's ownerId
    document_url_ttl_s: int = 900
    log_poll_s: float = 5.0
    log_settle_s: float = 15.0


def plan_for(limit_bytes: int) -> str:
    for plan, memory in PLANS:
        if limit_bytes <= memory:
            return plan
    raise ValueError(f"no Render plan has {limit_bytes // MIB} MiB: set JOBCELL_RENDER_PLANS for this tier")


def command_env(start_command: str) -> dict[str, str]:
    """The VAR=value words of a start command (as `env` takes them), unquoted."""
    try:
        words = shlex.split(start_command)
    except ValueError:
        return {}
    return dict(w.split("=", 1) for w in words if "=" in w and re.match(r"^[A-Z_][A-Z0-9_]*=", w))


class RenderRuntime(RuntimeBase):
    name = "render"

    def __init__(self, options: RenderOptions, presign: Presign, session: requests.Session | None = None) -> None:
        if not options.service_id:
            raise ConfigError("JOBCELL_RUNTIME=render needs JOBCELL_RENDER_SERVICE_ID: the id (srv-...) of the "
                              "jobcell-cell worker in render.yaml, the base service of every one-off job")
        if options.service_id == options.own_service_id:
            raise ConfigError(
                f"JOBCELL_RENDER_SERVICE_ID is this dispatcher's own service ({options.service_id}): a one-off job "
                "inherits every variable of its base service, the database URL and RENDER_API_KEY included. Set "
                "JOBCELL_RENDER_SERVICE_ID to the id of the jobcell-cell worker (render.yaml), whose environment "
                "holds no secret")
        self.options = options
        self.presign = presign
        self.http = session or requests.Session()
        self.http.headers.update({"Authorization": f"Bearer {options.api_key}", "Accept": "application/json"})
        self._owner_id = options.owner_id
        self.verify_base_service()

    # -- API ------------------------------------------------------------------------------------------

    def _api(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, f"{self.options.base_url}{path}", timeout=30, **kw)
        if r.status_code >= 400:
            try:
                detail = str(r.json().get("message", ""))[:300]
            except ValueError:
                detail = r.text[:300]
            raise RenderError(f"Render API {method} {path}: {r.status_code} {detail}".rstrip(), r.status_code)
        return r.json() if r.content else None

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        """A request about the base service: `path` is relative to /services/{serviceId}."""
        return self._api(method, f"/services/{self.options.service_id}{path}", **kw)

    def owner_id(self) -> str:
        if self._owner_id is None:
            self._owner_id = str(self._call("GET", "")["ownerId"])
        return self._owner_id

    def verify_base_service(self) -> None:
        """Refuse a base service that would hand a credential to every cell (names only are logged)."""
        suspect: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = self._call("GET", "/env-vars", params=params) or []
            for item in page:
                var = item.get("envVar", item)
                key, value = str(var.get("key", "")), str(var.get("value", ""))
                if _SECRET_NAME.search(key) or _SECRET_VALUE.search(value):
                    suspect.append(key)
            if len(page) < 100:
                break
            cursor = page[-1].get("cursor")
        if suspect:
            raise ConfigError(
                f"the cells' base service {self.options.service_id} has variables that look like credentials "
                f"({', '.join(sorted(suspect))}): every one-off job would get them. Remove them from that service "
                "(render.yaml: jobcell-cell), or point JOBCELL_RENDER_SERVICE_ID at a service without secrets")

    # -- Runtime port ---------------------------------------------------------------------------------

    def start_command(self, cell: CellInput, document_url: str | None) -> str:
        """`env` with the queue's tags, the header and the document's URL, then the job. Shell-quoted: Render
        runs it in a shell. It is visible to every workspace member: it holds a short-lived URL to one
        document and no credential."""
        env = {ENV_POOL: self.options.pool, ENV_QUEUE: self.options.queue_id,
               ENV_HEADER: cell.header.model_dump_json()}
        if document_url is not None:
            env[ENV_DOCUMENT_URL] = document_url
        return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + self.options.command

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        for h in self.owned():  # Render has no names to collide on: look before creating
            if (h.job_id, h.attempt) == (spec.job_id, spec.attempt):
                log.info("job %s attempt %s: Render job %s exists, not launching again", *(h.job_id, h.attempt, h.ref))
                return h
        plan = self.options.plans.get(spec.tier) or plan_for(spec.memory_limit_bytes)
        url = (self.presign(cell.document_uri, self.options.document_url_ttl_s)
               if cell.header.document_bytes > 0 else None)
        job = self._call("POST", "/jobs", json={"startCommand": self.start_command(cell, url), "planId": plan})
        return self.handle(str(job["id"]), spec.job_id, spec.attempt)

    def output(self, handle: Handle) -> Iterator[bytes]:
        """The job's record lines from Render's logs, oldest first, until it has ended and its logs settled."""
        try:
            job = self._call("GET", f"/jobs/{handle.ref}")
        except RenderError as e:
            if e.status == 404:
                return
            raise
        start = _ts(_parse(job.get("createdAt")) - timedelta(minutes=1))  # clocks differ a little
        seen: set[str] = set()
        ended_at: float | None = None
        while True:
            new = False
            for entry in self._logs(handle.ref, start):
                if entry.get("id") in seen:
                    continue  # a query from the last timestamp returns that timestamp's lines again
                seen.add(str(entry.get("id")))
                new = True
                start = str(entry.get("timestamp") or start)
                message = str(entry.get("message", ""))
                if is_record_line(message):
                    yield message.encode() + b"\n"
            if ended_at is None and self._status(handle) in _FINAL | {"gone"}:
                ended_at = time.monotonic()
            if ended_at is not None and not new and time.monotonic() - ended_at >= self.options.log_settle_s:
                return
            time.sleep(self.options.log_poll_s)

    def _logs(self, job_id: str, start: str, end: str | None = None, direction: str = "forward",
              limit: int = 100, pages: int | None = None) -> Iterator[dict[str, Any]]:
        """Log entries of one job in [start, end], following Render's time-based pagination."""
        params: dict[str, Any] = {"ownerId": self.owner_id(), "resource": [job_id], "direction": direction,
                                  "limit": limit, "startTime": start, "endTime": end or _ts(datetime.now(UTC))}
        seen: set[str] = set()
        while True:
            page = self._api("GET", "/logs", params=params) or {}
            entries = page.get("logs") or []
            fresh = [e for e in entries if str(e.get("id")) not in seen]
            seen.update(str(e.get("id")) for e in entries)
            yield from fresh
            if not page.get("hasMore") or pages == 1:
                return
            if not fresh:  # more lines share one timestamp than a page holds: the next page would be this one
                raise RenderError(f"Render's logs of job {job_id} do not advance past {params['startTime']}")
            pages = None if pages is None else pages - 1
            params.update(startTime=page["nextStartTime"], endTime=page["nextEndTime"])

    def _status(self, handle: Handle) -> str:
        try:
            return str(self._call("GET", f"/jobs/{handle.ref}").get("status") or "pending")
        except RenderError as e:
            if e.status == 404:
                return "gone"
            raise

    def poll(self, handle: Handle) -> Exit | None:
        try:
            job = self._call("GET", f"/jobs/{handle.ref}")
        except RenderError as e:
            if e.status == 404:
                return Exit(exit_code=None, lost=True, reason=f"Render job {handle.ref} vanished")
            raise
        status = job.get("status")
        if status in (None, "pending", "running"):
            return None
        if status == "succeeded":
            return Exit(exit_code=0)
        if status == "canceled":
            return Exit(exit_code=None, lost=True, reason="the Render job was canceled")
        return self._failure(handle, job)

    def _failure(self, handle: Handle, job: dict[str, Any]) -> Exit:
        events = self._call("GET", "/events", params={"type": "job_run_ended", "limit": 100}) or []
        details = next((e["event"]["details"] for e in events
                        if e.get("event", {}).get("details", {}).get("jobId") == handle.ref), None)
        reason = (details or {}).get("reason") or {}
        if "oomKilled" in reason:
            limit = reason["oomKilled"].get("memoryLimit", "its plan's memory")
            return Exit(exit_code=137, oom_killed=True, reason=f"OOM-killed at {limit}")
        if reason.get("nonZeroExit") is not None:
            code = int(reason["nonZeroExit"])
            rest, said = self._stderr_tail(handle, job)
            return Exit(exit_code=code, log_tail=rest, reason=said or f"exited with {code} (no reason in its logs)")
        if reason.get("timedOutSeconds"):
            return Exit(exit_code=None, deadline_exceeded=True, reason=reason.get("timedOutReason") or "timed out")
        what = "evicted" if reason.get("evicted") else "failed without a reason"
        return Exit(exit_code=None, lost=True, reason=f"the Render job was {what}")

    def _stderr_tail(self, handle: Handle, job: dict[str, Any]) -> tuple[str, str]:
        """The job's last non-record lines (its reason last), as far as Render's logs hold them yet."""
        try:
            start = _ts(_parse(job.get("createdAt")) - timedelta(minutes=1))
            entries = list(self._logs(handle.ref, start, direction="backward", limit=100, pages=1))
        except RenderError as e:
            log.info("logs of Render job %s unavailable: %s", handle.ref, e)
            return "", ""
        return stderr_of(str(e.get("message", "")) for e in reversed(entries))

    def kill(self, handle: Handle) -> None:
        try:
            self._call("POST", f"/jobs/{handle.ref}/cancel")
        except RenderError as e:
            log.info("cancel of Render job %s: %s", handle.ref, e)  # already ended: nothing to stop

    def cleanup(self, handle: Handle) -> None:
        """Render keeps a job's record and logs; there is nothing of ours to remove (its URL expires)."""

    def owned(self) -> Sequence[Handle]:
        out = []
        # Pending and running only: Render keeps every ended job. One that ended while no dispatcher watched
        # is reaped as lost and retried (its pages are checkpointed, so little is redone).
        for item in self._call("GET", "/jobs", params={"status": "pending,running", "limit": 100}) or []:
            job = item.get("job", item)
            env = command_env(str(job.get("startCommand", "")))
            if (env.get(ENV_POOL), env.get(ENV_QUEUE)) != (self.options.pool, self.options.queue_id):
                continue
            try:
                header = json.loads(env[ENV_HEADER])
                out.append(self.handle(str(job["id"]), int(header["job_id"]), int(header["attempt"])))
            except (KeyError, ValueError, TypeError):
                continue
        return out


def _parse(stamp: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(stamp))
    except ValueError:
        return datetime.now(UTC) - timedelta(days=1)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()
