"""The small interfaces the dispatcher loop needs. Adapters implement them; the core imports only these."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol

from job_image.contract import Header, PageResult

from .models import Exit, Handle, Job, KillReason, LaunchSpec, NewJob, Outcome, Pause


@dataclass(frozen=True)
class CellInput:
    """What a cell is handed: its header, and the one document it may read (the runtime streams it in or
    presigns it; the cell never sees the store)."""

    header: Header
    document_uri: str

    def header_line(self) -> bytes:
        return self.header.model_dump_json().encode() + b"\n"


class Runtime(Protocol):
    """Starts and watches one isolated, memory-capped unit per attempt (a container, a k8s Job, a process)."""

    name: str

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        """Start the unit with its input. Launching the same (job, attempt) twice must not start a second unit."""

    def output(self, handle: Handle) -> Iterator[bytes]:
        """The unit's stdout from its first byte, in chunks, until the unit ends (the cell's result channel).
        Can be called again (after a dispatcher restart) and yields the same bytes from the start."""

    def poll(self, handle: Handle) -> Exit | None:
        """None while it runs; its Exit once it ended (read before cleanup). Exit(lost=True) if it vanished."""

    def kill(self, handle: Handle) -> None:
        """Stop it now. Idempotent."""

    def cleanup(self, handle: Handle) -> None:
        """Remove what is left of it. Idempotent; call only after poll returned an Exit."""

    def owned(self) -> Sequence[Handle]:
        """Every unit this runtime's pool launched and has not cleaned up, running or ended."""

    def memory_now(self, handle: Handle) -> int | None:
        """The unit's memory in use as last measured while it runs; None where the runtime cannot see it."""

    def watch(self, wake: Callable[[], None]) -> None:
        """Call wake() whenever a unit may have ended, so the loop need not wait for its next poll.
        A runtime that can only be polled may do nothing."""


@dataclass(frozen=True)
class Claimed:
    job: Job
    spec: LaunchSpec
    started_at: datetime | None = None  # set when adopting a unit that already runs


@dataclass(frozen=True)
class Completed:
    """A succeeded attempt's document, as its cell declared it (stored with the job's success)."""

    media_type: str
    page_count: int
    summarise: bool = False  # an LLM manifest is to follow, on the trusted side


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
    completed: Completed | None = None
    need_bytes: int | None = None  # what the cell estimated it needs (its Need record), if it said


class Observer(Protocol):
    """What the loop tells the outside about itself (metrics, probes). Called on the loop's own threads, so an
    implementation must be quick and must not raise."""

    def attempt_ended(self, finish: Finish, tier: str, wait_s: float) -> None:
        """An attempt's end was recorded: it ran on `tier` after waiting `wait_s` in the queue."""
        return None

    def ticked(self, ok: bool, reason: str = "") -> None:
        """One pass of the loop ended; not ok (and why) when the database or the runtime failed it."""
        return None


class Unobserved(Observer):
    """The default: nobody is listening."""


class Results(Protocol):
    """Where the pages a cell emitted go once checked; accepted only while (job, attempt) is running."""

    def done_pages(self, job_id: int, before_attempt: int) -> list[int]:
        """Pages stored by attempts before `before_attempt`: the ones a new attempt must not redo."""

    def declare_pages(self, job_id: int, attempt: int, pages: int) -> None:
        """The page count a running attempt declared (progress: pages stored of this)."""

    def put_page(self, job_id: int, attempt: int, page: PageResult) -> bool:
        """Store one page once; False if the attempt is no longer the job's running one (nothing stored)."""


class Queue(Results, Protocol):
    """The job queue, its attempt log, and the results its cells emitted."""

    def submit(self, job: NewJob) -> tuple[int, bool]:
        """Enqueue; (id, created). A document already submitted returns its existing job."""

    def claim(self, owner: str, pool: str, budget_bytes: int, limit: int,
              budgets: Mapping[str, int] | None = None, cpu_budget: float | None = None) -> list[Claimed]:
        """Atomically take runnable jobs that fit the tier slots and the memory budget of `pool` (and its CPU
        budget, when one is given)."""

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

    def observe_memory(self, samples: Sequence[tuple[int, int, int]]) -> None:
        """Running attempts' memory in use now, as (job, attempt, bytes): what operators watch live."""

    def alive(self, owner: str, pool: str, runtime: str) -> None:
        """Record that this dispatcher is running (every heartbeat): clients can tell when none is."""

    def release(self, owner: str) -> None:
        """Expire our leases now, so that the next dispatcher adopts our units at once."""

    def cancel(self, job_id: int) -> str: ...

    def pause(self, scope: str, reason: str | None = None) -> Pause:
        """Stop claiming new attempts of a tier (or ALL_TIERS); running ones go on. Pausing twice is harmless."""

    def resume(self, scope: str) -> bool:
        """Lift a pause; False if that scope was not paused."""

    def paused(self) -> list[Pause]: ...

    def get(self, job_id: int) -> Job: ...

    def watch(self, wake: Callable[[], None]) -> None:
        """Call wake() whenever a job is submitted or a cancel is requested (a hint; the loop also polls)."""

    def now(self) -> datetime: ...


class DocumentStore(Protocol):
    """Where submitted documents live. Only the dispatcher reads them; a cell gets its one document."""

    def open(self, uri: str) -> tuple[BinaryIO, int]:
        """The stored document and its size in bytes, for streaming into a cell."""

    def presign(self, uri: str, ttl_s: int) -> str:
        """A GET URL for this one document that expires in ttl_s (runtimes that cannot stream stdin)."""

    def delete(self, uri: str) -> None:
        """Remove a stored document (retention); one the store did not store itself is left alone."""

    def put(self, path: str) -> tuple[str, int, str]:
        """Store a local file; (uri the job fetches, size in bytes, unique key)."""

    def stat(self, uri: str) -> tuple[int, str]:
        """An already-stored document (s3://...); (size in bytes, unique key)."""
