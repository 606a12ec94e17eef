"""The job side of the exit-code contract (the dispatcher's side is dispatcher/models.py; a test keeps them equal)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 65  # permanent: never retried; the last stderr line is the reason
EXIT_TEMPFAIL = 75  # temporary: retried on the same tier
PEAK_MARKER = "jobcell-peak-bytes="


class BadInput(Exception):
    """The document cannot be processed, now or ever. The message is shown to the user as the reason."""


class TempFail(Exception):
    """A dependency failed; the same attempt may succeed later."""


@dataclass(frozen=True)
class JobEnv:
    job_id: int
    attempt: int
    tier: str
    memory_limit_bytes: int
    document: str
    workload: str
    params: dict[str, Any] = field(default_factory=dict)
    database_url: str | None = None

    @classmethod
    def from_environ(cls, env: dict[str, str] | None = None) -> JobEnv:
        e = dict(os.environ if env is None else env)
        return cls(job_id=int(e.get("JOBCELL_JOB_ID", "0")), attempt=int(e.get("JOBCELL_ATTEMPT", "1")),
                   tier=e.get("JOBCELL_TIER", ""), memory_limit_bytes=int(e.get("JOBCELL_MEMORY_LIMIT_BYTES", "0")),
                   document=e.get("JOBCELL_DOCUMENT", ""), workload=e.get("JOBCELL_WORKLOAD", "ocr"),
                   params=json.loads(e.get("JOBCELL_PARAMS") or "{}"),
                   database_url=e.get("JOBCELL_DATABASE_URL") or None)


def peak_memory_bytes() -> int | None:
    """This container's peak memory as its cgroup counted it (v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None
