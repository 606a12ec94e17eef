"""Plain values shared by the core and the adapters. No driver or runtime is imported here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MIB = 1024 * 1024



class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Outcome(enum.StrEnum):
    """How one attempt ended. The same words on every runtime."""

    SUCCEEDED = "succeeded"
    OOM = "oom"
    NEEDS_MORE = "needs_more"  # its own estimate exceeded its cap before any work: moved to a tier that holds it
    BAD_INPUT = "bad_input"
    TIMEOUT = "timeout"
    ERROR = "error"
    LOST = "lost"
    CANCELLED = "cancelled"


class KillReason(enum.StrEnum):
    """Why the dispatcher itself killed a unit; a kill we caused is never read as an OOM."""

    DEADLINE = "deadline"
    CANCEL = "cancel"
    ORPHAN = "orphan"
    REFUSED = "refused"  # the cell broke the result contract


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a runtime needs to start one attempt of one job."""

    job_id: int
    attempt: int
    tier: str
    memory_limit_bytes: int
    timeout_s: float
    document_uri: str
    workload: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"jobcell-{self.job_id}-{self.attempt}"


@dataclass(frozen=True)
class Handle:
    """A runtime's reference to one launched attempt."""

    runtime: str
    ref: str
    job_id: int
    attempt: int


@dataclass(frozen=True)
class Exit:
    """What a runtime observed when an attempt's unit ended (read before it is removed)."""

    exit_code: int | None
    oom_killed: bool = False
    peak_memory_bytes: int | None = None
    log_tail: str = ""
    reason: str = ""  # last stderr line: the job's own human-readable reason
    lost: bool = False  # the unit vanished or the runtime failed; no exit code exists
    deadline_exceeded: bool = False  # the runtime itself enforced the class deadline (Kubernetes)
    ran_s: float | None = None  # how long the unit ran, by the runtime's own clock (not when we noticed)


@dataclass(frozen=True)
class Job:
    id: int
    state: JobState
    document_uri: str
    document_bytes: int
    workload: str
    params: dict[str, Any]
    size_class: str
    tier: str
    priority: int
    attempt: int
    max_attempts: int
    scheduled_at: datetime
    created_at: datetime
    cancel_requested: bool = False
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    reason: str | None = None
    finished_at: datetime | None = None
    memory_limit_bytes: int | None = None
    pool: str | None = None
    source: str | None = None  # what the user submitted (a path or URI)
    metadata: dict[str, Any] = field(default_factory=dict)
    pages_total: int | None = None  # as the running (or last) attempt's cell declared it
    webhook_url: str | None = None  # told of the job's end, besides the deployment's JOBCELL_WEBHOOK_URL


@dataclass(frozen=True)
class Pause:
    """An operator's pause: no new attempt of this scope is claimed until it is resumed."""

    scope: str  # ALL_TIERS or a class name
    paused_at: datetime
    reason: str | None = None


ALL_TIERS = "*"


@dataclass(frozen=True)
class Running:
    """One running job as admission sees it: the tier slot and memory it holds."""

    job_id: int
    tier: str
    memory_limit_bytes: int


@dataclass(frozen=True)
class NewJob:
    document_uri: str
    document_bytes: int
    unique_key: str
    size_class: str
    workload: str = "ocr"
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 5
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # the caller's own (a tenant, an upload id)
    webhook_url: str | None = None
