"""The small interfaces the dispatcher loop needs. Adapters implement them; the core imports only these."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from .models import Exit, Handle, Job, KillReason, LaunchSpec, NewJob, Outcome


class Runtime(Protocol):
    """Starts and watches one isolated, memory-capped unit per attempt (a container, a k8s Job, a process)."""

    name: str

    def launch(self, spec: LaunchSpec) -> Handle:
        """Start the unit. Launching the same (job, attempt) twice must not start a second unit."""

    def poll(self, handle: Handle) -> Exit | None:
        """None while it runs; its Exit once it ended (read before cleanup). Exit(lost=True) if it vanished."""

    def kill(self, handle: Handle) -> None:
        """Stop it now. Idempotent."""

    def cleanup(self, handle: Handle) -> None:
        """Remove what is left of it. Idempotent; call only after poll returned an Exit."""

    def owned(self) -> Sequence[Handle]:
        """Every unit this runtime's pool launched and has not cleaned up, running or ended."""

    def watch(self, wake: Callable[[], None]) -> None:
        """Call wake() whenever a unit may have ended, so the loop need not wait for its next poll.
        A runtime that can only be polled may do nothing."""


@dataclass(frozen=True)
class Claimed:
    job: Job
    spec: LaunchSpec
    started_at: datetime | None = None  # set when adopting a unit that already runs


@dataclass(frozen=True)
class Finish:
    """One ended attempt and what the job becomes; applied atomically and fenced on (job, attempt, owner)."""

    job_id: int
    attempt: int
    outcome: Outcome
    exit: Exit
    duration_s: float
    next_state: str
    next_tier: str
    delay_s: float
    reason: str | None


class Queue(Protocol):
    """The job queue and its attempt log."""

    def submit(self, job: NewJob) -> tuple[int, bool]:
        """Enqueue; (id, created). A document already submitted returns its existing job."""

    def claim(self, owner: str, pool: str, budget_bytes: int, limit: int) -> list[Claimed]:
        """Atomically take runnable jobs that fit the tier slots and the memory budget of `pool`."""

    def started(self, job_id: int, attempt: int, runtime: str, handle: str) -> None: ...

    def heartbeat(self, owner: str, job_ids: Sequence[int]) -> tuple[set[int], set[int]]:
        """Renew leases; (ids still ours, ids whose cancel was requested)."""

    def mark_killing(self, job_id: int, attempt: int, reason: KillReason) -> None: ...

    def kill_reason(self, job_id: int, attempt: int) -> KillReason | None: ...

    def finish(self, owner: str, result: Finish) -> bool:
        """Record the attempt and move the job on; False if the lease was no longer ours (result dropped)."""

    def adopt(self, owner: str, pool: str, job_id: int, attempt: int) -> Claimed | None:
        """Take over a running attempt whose lease is ours or expired; None if it belongs to someone else."""

    def attempt_is_current(self, job_id: int, attempt: int) -> bool:
        """True while (job, attempt) is the job's running attempt, whoever holds it."""

    def reap(self, pool: str, keep: Sequence[int]) -> list[int]:
        """Requeue (or fail) running jobs of `pool` whose lease expired, except `keep`; their attempts are lost."""

    def release(self, owner: str) -> None:
        """Expire our leases now, so that the next dispatcher adopts our units at once."""

    def cancel(self, job_id: int) -> str: ...

    def get(self, job_id: int) -> Job: ...

    def watch(self, wake: Callable[[], None]) -> None:
        """Call wake() whenever a job is submitted or a cancel is requested (a hint; the loop also polls)."""

    def now(self) -> datetime: ...


class DocumentStore(Protocol):
    """Where submitted documents live until their job fetches them."""

    def put(self, path: str) -> tuple[str, int, str]:
        """Store a local file; (uri the job fetches, size in bytes, unique key)."""

    def stat(self, uri: str) -> tuple[int, str]:
        """An already-stored document (s3://...); (size in bytes, unique key)."""
