"""Read models: what the CLI, the dashboard and the client read about jobs, typed. Pure values, filled by the
Postgres adapter's named queries (dispatcher/reads.py) and by the in-memory queue."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

V = TypeVar("V")


def from_row(cls: type[V], row: dict[str, Any]) -> V:
    """A view from a row that has at least its fields (extra columns are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in row.items() if k in names})


@dataclass
class Attempt:
    """One attempt of one job, as recorded (the in-memory queue keeps and updates these as its rows)."""

    job_id: int
    attempt: int
    dispatcher: str
    pool: str
    tier: str
    memory_limit_bytes: int
    claimed_at: datetime
    runtime: str | None = None
    handle: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    exit_code: int | None = None
    oom_killed: bool | None = None
    peak_memory_bytes: int | None = None
    need_bytes: int | None = None  # the cell's own estimate, sent once its document was validated
    duration_s: float | None = None
    kill_reason: str | None = None
    error: str | None = None
    log_tail: str | None = None
    memory_now: int | None = None
    memory_seen_at: datetime | None = None


@dataclass(frozen=True)
class JobSummary:
    """One line of `jobcell report`: the path through the tiers and how it ended."""

    id: int
    source: str
    state: str
    tier: str
    attempt: int
    reason: str | None
    page_count: int | None
    peak: int | None  # the last attempt's peak
    duration_s: float | None  # all attempts together
    path: str | None  # "small oom -> medium succeeded"


@dataclass(frozen=True)
class RunningJob:
    id: int
    tier: str
    memory_limit_bytes: int
    pool: str
    lease_owner: str | None
    attempt: int
    started_at: datetime | None
    document_uri: str
    pages_total: int | None
    pages_stored: int
    memory_now: int | None
    memory_seen_at: datetime | None


@dataclass(frozen=True)
class DispatcherSeen:
    id: str
    pool: str
    runtime: str
    started_at: datetime
    seen_at: datetime
    silent_s: float


@dataclass(frozen=True)
class StateCount:
    """How many jobs are in one state and class: a cell of `jobcell status`'s grid."""

    state: str
    size_class: str
    n: int


@dataclass(frozen=True)
class StoredPage:
    page: int
    attempt: int
    dpi: int
    width: int
    height: int
    text: str
    words: list[Any]
    mean_confidence: float | None
    ocr_seconds: float


@dataclass(frozen=True)
class StoredResult:
    media_type: str | None
    page_count: int | None
    completed_at: datetime | None
    manifest_status: str | None
    model: str | None
    manifest: dict[str, Any] | None


NO_RESULT = StoredResult(None, None, None, None, None, None)


@dataclass(frozen=True)
class Prunable:
    id: int
    document_uri: str
    pages: int
    attempts: int


@dataclass(frozen=True)
class MemorySpan:
    """An attempt's hold on its pool's budget: from its claim to its end (None: still holding it)."""

    pool: str
    memory_limit_bytes: int
    claimed_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Timing:
    id: int
    state: str
    size_class: str
    run_s: float | None
    total_s: float | None


@dataclass(frozen=True)
class PeakSample:
    """One attempt that ran to its own end (succeeded, oom, needs_more): what `classes --recommend` learns from."""

    tier: str
    outcome: str
    memory_limit_bytes: int
    peak_memory_bytes: int | None
    need_bytes: int | None
