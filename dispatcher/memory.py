"""In-memory adapters of the Queue and Runtime ports: the dispatcher's own logic tested in milliseconds, with no
database and no engine. They keep the real adapters' promises (fenced finish, leases, adoption, reaping,
pages only for the running attempt; one unit per attempt) and pass the same contract and behaviour tests
(tests/test_queue_contract.py, tests/test_behaviour.py). `MemoryRuntime` runs no code: each unit plays a
script, by default the diagnostic workload's (allocate, sleep, exit) judged against the unit's memory limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from job_image.contract import EXIT_NEEDS_MORE, EXIT_OK, DocumentInfo, Done, Need, PageResult, Peak, encode

from .classes import Admission, SizeClassTable
from .errors import NotFound
from .models import ALL_TIERS, MIB, Exit, Handle, Job, JobState, KillReason, LaunchSpec, NewJob, Outcome, Pause, Running
from .ports import CellInput, Claimed, Finish
from .views import Attempt, StoredPage


class MemoryQueue:
    """The Queue (and Results) port in a dict, under one lock; time from `clock` (seconds since the epoch)."""

    def __init__(self, table: SizeClassTable, *, lease_ttl_s: float = 30.0, reserve_after_s: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._table, self.lease_ttl_s, self.reserve_after_s, self._clock = table, lease_ttl_s, reserve_after_s, clock
        self._jobs: dict[int, Job] = {}
        self._keys: dict[str, int] = {}
        self._attempts: dict[tuple[int, int], Attempt] = {}
        self._pages: dict[tuple[int, int], tuple[int, PageResult]] = {}  # (job, page) -> (attempt, page)
        self._totals: dict[int, int] = {}
        self._paused: dict[str, Pause] = {}
        self.completed: dict[int, tuple[str, int, str]] = {}  # job -> media type, pages, manifest status
        self._lock = threading.RLock()
        self._wake: list[Callable[[], None]] = []
        self.seen: dict[str, tuple[str, str, datetime]] = {}  # dispatcher -> pool, runtime, last heartbeat

    # -- helpers --------------------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _set(self, job_id: int, **changes: Any) -> Job:
        self._jobs[job_id] = replace(self._jobs[job_id], **changes)
        return self._jobs[job_id]

    def _lease(self) -> datetime:
        return self.now() + timedelta(seconds=self.lease_ttl_s)

    def _spec(self, job: Job, tier: str) -> LaunchSpec:
        cls = self._table.resolve(tier, job.memory_limit_bytes)
        return LaunchSpec(job_id=job.id, attempt=job.attempt, tier=cls.name,
                          memory_limit_bytes=job.memory_limit_bytes or cls.memory_limit_bytes,
                          timeout_s=cls.timeout_s, document_uri=job.document_uri, workload=job.workload,
                          params=dict(job.params))

    # -- Queue port -----------------------------------------------------------------------------------

    def submit(self, job: NewJob) -> tuple[int, bool]:
        with self._lock:
            if job.unique_key in self._keys:
                return self._keys[job.unique_key], False
            job_id = len(self._jobs) + 1
            now = self.now()
            self._jobs[job_id] = Job(
                id=job_id, state=JobState.QUEUED, document_uri=job.document_uri, document_bytes=job.document_bytes,
                workload=job.workload, params=dict(job.params), size_class=job.size_class, tier=job.size_class,
                priority=job.priority, attempt=0, max_attempts=job.max_attempts, scheduled_at=now, created_at=now,
                source=job.source, metadata=dict(job.metadata), webhook_url=job.webhook_url)
            self._keys[job.unique_key] = job_id
        self._notify()
        return job_id, True

    def claim(self, owner: str, pool: str, budget_bytes: int, limit: int,
              budgets: Mapping[str, int] | None = None, cpu_budget: float | None = None) -> list[Claimed]:
        with self._lock:
            now = self.now()
            running = [Running(j.id, j.tier, j.memory_limit_bytes or 0) for j in self._jobs.values()
                       if j.state is JobState.RUNNING and j.pool == pool]
            admission = Admission(self._table, budget_bytes, running, self.reserve_after_s, budgets, cpu_budget)
            queued = sorted((j for j in self._jobs.values() if j.state is JobState.QUEUED and j.scheduled_at <= now
                             and not j.cancel_requested and not {ALL_TIERS, j.tier} & self._paused.keys()),
                            key=lambda j: (-j.priority, j.scheduled_at, j.id))
            seen: dict[str, int] = {}
            candidates = []
            for j in queued:  # up to N of each tier, as the Postgres claim: no backlog hides another class
                seen[j.tier] = seen.get(j.tier, 0) + 1
                if seen[j.tier] <= max(limit, 8):
                    candidates.append(j)
            taken: list[Claimed] = []
            for j in candidates:
                if len(taken) >= limit:
                    break
                tier = j.tier if j.tier in admission.slots else self._table.for_size(j.document_bytes).name
                if not admission.consider(j.id, tier, (now - j.scheduled_at).total_seconds()):
                    continue
                admission.take(tier)
                cls = self._table.get(tier)
                job = self._set(j.id, state=JobState.RUNNING, attempt=j.attempt + 1, lease_owner=owner,
                                lease_expires_at=self._lease(), pool=pool, memory_limit_bytes=cls.memory_limit_bytes)
                self._attempts[(job.id, job.attempt)] = Attempt(job.id, job.attempt, owner, pool, tier,
                                                                 cls.memory_limit_bytes, now)
                taken.append(Claimed(job, self._spec(job, tier)))
            return taken

    def started(self, job_id: int, attempt: int, runtime: str, handle: str) -> None:
        with self._lock:
            a = self._attempts[(job_id, attempt)]
            a.runtime, a.handle, a.started_at = runtime, handle, self.now()

    def heartbeat(self, owner: str, job_ids: Sequence[int]) -> tuple[set[int], set[int]]:
        with self._lock:
            ours = {i for i in job_ids if i in self._jobs and self._jobs[i].lease_owner == owner
                    and self._jobs[i].state is JobState.RUNNING}
            for i in ours:
                self._set(i, lease_expires_at=self._lease())
            return ours, {i for i in ours if self._jobs[i].cancel_requested}

    def mark_killing(self, job_id: int, attempt: int, reason: KillReason) -> None:
        with self._lock:
            a = self._attempts.get((job_id, attempt))
            if a is not None and a.kill_reason is None:
                a.kill_reason = reason.value

    def kill_reason(self, job_id: int, attempt: int) -> KillReason | None:
        with self._lock:
            a = self._attempts.get((job_id, attempt))
            return KillReason(a.kill_reason) if a and a.kill_reason else None

    def finish(self, owner: str, result: Finish) -> bool:
        with self._lock:
            j = self._jobs.get(result.job_id)
            if j is None or (j.attempt, j.lease_owner, j.state) != (result.attempt, owner, JobState.RUNNING):
                return False
            state = JobState(result.next_state)
            now = self.now()
            self._set(j.id, state=state, tier=result.next_tier, reason=result.reason, lease_owner=None,
                      lease_expires_at=None, pool=None, memory_limit_bytes=None,
                      scheduled_at=now + timedelta(seconds=result.delay_s) if state is JobState.QUEUED
                      else j.scheduled_at, finished_at=now if state.final else None)
            a, e = self._attempts[(j.id, result.attempt)], result.exit
            if a.outcome is None:
                a.finished_at, a.outcome, a.duration_s = now, result.outcome.value, result.duration_s
                a.exit_code, a.oom_killed, a.peak_memory_bytes = e.exit_code, e.oom_killed, e.peak_memory_bytes
                a.need_bytes = result.need_bytes
                a.error = None if result.outcome is Outcome.SUCCEEDED else e.reason or None
            if result.completed is not None:
                done = result.completed
                self.completed[j.id] = (done.media_type, done.page_count, "pending" if done.summarise else "skipped")
            return True

    def adopt(self, owner: str, pool: str, job_id: int, attempt: int) -> Claimed | None:
        with self._lock:
            j = self._jobs.get(job_id)
            if (j is None or j.state is not JobState.RUNNING or j.attempt != attempt or j.pool != pool
                    or not (j.lease_owner == owner or (j.lease_expires_at and j.lease_expires_at < self.now()))):
                return None
            job = self._set(job_id, lease_owner=owner, lease_expires_at=self._lease())
            a = self._attempts[(job_id, attempt)]
            a.dispatcher = owner
            return Claimed(job, self._spec(job, job.tier), a.started_at or a.claimed_at)

    def attempt_is_current(self, job_id: int, attempt: int) -> bool:
        with self._lock:
            j = self._jobs.get(job_id)
            return j is not None and j.attempt == attempt and j.state is JobState.RUNNING

    def reap(self, pool: str, keep: Sequence[int]) -> list[int]:
        with self._lock:
            now, reaped = self.now(), []
            for j in list(self._jobs.values()):
                if (j.state is not JobState.RUNNING or j.pool != pool or j.id in keep
                        or not j.lease_expires_at or j.lease_expires_at >= now):
                    continue
                gave_up = j.attempt >= j.max_attempts
                state = JobState.CANCELLED if j.cancel_requested else JobState.FAILED if gave_up else JobState.QUEUED
                reason = ("cancelled by request" if j.cancel_requested else
                          f"its dispatcher vanished (lost); gave up after {j.attempt} attempts" if gave_up else
                          "its dispatcher vanished (lost); will retry")
                self._set(j.id, state=state, reason=reason, finished_at=now if state.final else None,
                          lease_owner=None, lease_expires_at=None, pool=None, memory_limit_bytes=None,
                          scheduled_at=now)
                a = self._attempts[(j.id, j.attempt)]
                if a.outcome is None:
                    a.outcome, a.finished_at, a.error = "lost", now, "lease expired with no unit left"
                reaped.append(j.id)
            return reaped

    def observe_memory(self, samples: Sequence[tuple[int, int, int]]) -> None:
        with self._lock:
            for job_id, attempt, used in samples:
                if (job_id, attempt) in self._attempts:
                    self._attempts[(job_id, attempt)].memory_now = used

    def alive(self, owner: str, pool: str, runtime: str) -> None:
        with self._lock:
            self.seen[owner] = (pool, runtime, self.now())

    def release(self, owner: str) -> None:
        with self._lock:
            for j in list(self._jobs.values()):
                if j.lease_owner == owner and j.state is JobState.RUNNING:
                    self._set(j.id, lease_expires_at=self.now())

    def pause(self, scope: str, reason: str | None = None) -> Pause:
        with self._lock:
            old = self._paused.get(self._table.pause_scope(scope))
            p = Pause(scope, old.paused_at if old else self.now(), reason or (old.reason if old else None))
            self._paused[scope] = p
            return p

    def resume(self, scope: str) -> bool:
        with self._lock:
            return self._paused.pop(self._table.pause_scope(scope), None) is not None

    def paused(self) -> list[Pause]:
        with self._lock:
            return sorted(self._paused.values(), key=lambda p: p.scope)

    def cancel(self, job_id: int) -> str:
        with self._lock:
            j = self._jobs.get(job_id)
            if j is None:
                raise NotFound(f"no job {job_id}")
            if j.state is JobState.QUEUED:
                j = self._set(job_id, state=JobState.CANCELLED, reason="cancelled by request",
                              finished_at=self.now(), cancel_requested=True)
            else:
                j = self._set(job_id, cancel_requested=True)
        self._notify()
        return j.state.value

    def get(self, job_id: int) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise NotFound(f"no job {job_id}")
            return self._jobs[job_id]

    def jobs(self, ids: Sequence[int]) -> list[Job]:
        with self._lock:
            return [self._jobs[i] for i in sorted(set(ids)) if i in self._jobs]

    def attempts(self, job_id: int) -> list[Attempt]:
        """The attempt log, as the Postgres adapter reads it (copies: the queue's own rows stay its own)."""
        with self._lock:
            return [replace(a) for k, a in sorted(self._attempts.items()) if k[0] == job_id]

    def watch(self, wake: Callable[[], None]) -> None:
        self._wake.append(wake)

    def _notify(self) -> None:
        for wake in self._wake:
            wake()

    # -- Results port ---------------------------------------------------------------------------------

    def done_pages(self, job_id: int, before_attempt: int) -> list[int]:
        with self._lock:
            return sorted(p for (j, p), (a, _) in self._pages.items() if j == job_id and a < before_attempt)

    def put_page(self, job_id: int, attempt: int, page: PageResult) -> bool:
        with self._lock:
            if not self.attempt_is_current(job_id, attempt):
                return False
            self._pages.setdefault((job_id, page.page), (attempt, page))
            return True

    def declare_pages(self, job_id: int, attempt: int, pages: int) -> None:
        with self._lock:
            if self.attempt_is_current(job_id, attempt):
                self._totals[job_id] = pages

    def pages(self, job_id: int) -> list[StoredPage]:
        with self._lock:
            return [StoredPage(p, a, r.dpi, r.width, r.height, r.text, [w.model_dump() for w in r.words],
                               r.mean_confidence, r.ocr_seconds)
                    for (j, p), (a, r) in sorted(self._pages.items()) if j == job_id]


# -- runtime ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Script:
    """What one unit does: the bytes it writes on stdout, how long it runs, and how it ends."""

    output: bytes = b""
    runs_s: float = 0.0
    exit_code: int = EXIT_OK
    oom_killed: bool = False
    peak_bytes: int | None = None
    stderr: str = ""


PYTHON_BASE = 15 * MIB  # what the diagnostic workload's interpreter holds before it allocates


def diag_script(spec: LaunchSpec, cell: CellInput) -> Script:
    """The diagnostic workload, judged against the unit's limit: over it is an OOM kill, as a cgroup's."""
    p = cell.header.params
    need = PYTHON_BASE + int(float(p.get("alloc_mib", 0)) * MIB)
    runs = float(p.get("sleep_s", 0))
    job, attempt = cell.header.job_id, cell.header.attempt
    if "need_mib" in p:  # it says what it needs before any work, and stops if a larger tier can hold that
        said = int(float(p["need_mib"]) * MIB)
        told = encode(Need(job=job, attempt=attempt, bytes=said))
        if cell.header.larger_tier and said > spec.memory_limit_bytes:
            return Script(output=told, exit_code=EXIT_NEEDS_MORE, stderr=f"needs about {said // MIB} MiB")
    if need > spec.memory_limit_bytes:
        return Script(runs_s=runs / 2, exit_code=137, oom_killed=True)
    code = int(p.get("exit_code", 0))
    out = told if "need_mib" in p else b""
    if code == EXIT_OK:
        out += (encode(DocumentInfo(job=job, attempt=attempt, media_type="application/x-jobcell-diag", pages=0))
               + encode(Done(job=job, attempt=attempt)))
    out += encode(Peak(job=job, attempt=attempt, bytes=need))
    return Script(output=out, runs_s=runs, exit_code=code, peak_bytes=need, stderr=str(p.get("message", "")))


@dataclass
class _Unit:
    spec: LaunchSpec
    script: Script
    started: float
    killed: bool = False
    handle: Handle = field(init=False)


class MemoryRuntime:
    """Units that play scripts on a clock; launching an attempt twice returns the first unit."""

    name = "memory"

    def __init__(self, script: Callable[[LaunchSpec, CellInput], Script] = diag_script, pool: str = "default",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.script, self.pool, self.clock = script, pool, clock
        self.units: dict[str, _Unit] = {}
        self.launches = 0

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        ref = f"{self.pool}-{spec.job_id}-{spec.attempt}"
        if ref not in self.units:
            self.launches += 1
            unit = _Unit(spec, self.script(spec, cell), self.clock())
            unit.handle = Handle(self.name, ref, spec.job_id, spec.attempt)
            self.units[ref] = unit
        return self.units[ref].handle

    def output(self, handle: Handle) -> Iterator[bytes]:
        """All of its output at once, then (as a real unit's stream) open until the unit ends."""
        unit = self.units.get(handle.ref)
        if unit is None:
            return
        if unit.script.output:
            yield unit.script.output
        while not unit.killed and self.clock() - unit.started < unit.script.runs_s and handle.ref in self.units:
            time.sleep(0.01)

    def poll(self, handle: Handle) -> Exit | None:
        unit = self.units.get(handle.ref)
        if unit is None:
            return Exit(exit_code=None, lost=True, reason="the unit vanished")
        if unit.killed:
            return Exit(exit_code=137, reason="killed")
        if self.clock() - unit.started < unit.script.runs_s:
            return None
        s = unit.script
        return Exit(exit_code=s.exit_code, oom_killed=s.oom_killed, peak_memory_bytes=s.peak_bytes,
                    reason=s.stderr.strip().splitlines()[-1] if s.stderr.strip() else "", log_tail=s.stderr)

    def kill(self, handle: Handle) -> None:
        if handle.ref in self.units:
            self.units[handle.ref].killed = True

    def cleanup(self, handle: Handle) -> None:
        self.units.pop(handle.ref, None)

    def owned(self) -> Sequence[Handle]:
        return [u.handle for u in self.units.values()]

    def memory_now(self, handle: Handle) -> int | None:
        unit = self.units.get(handle.ref)
        return unit.script.peak_bytes if unit is not None else None

    def watch(self, wake: Callable[[], None]) -> None:
        """Polled only."""
