"""Runtime adapters: each starts one isolated, memory-capped unit per attempt (see dispatcher.ports.Runtime)."""

from __future__ import annotations

import json
import re

from ..models import LaunchSpec

PEAK_MARKER = "jobcell-peak-bytes="  # the job image prints its cgroup's peak on stdout as it exits
_PEAK = re.compile(re.escape(PEAK_MARKER) + r"(\d+)")


def job_env(spec: LaunchSpec) -> dict[str, str]:
    """The environment every runtime gives a job: the contract between dispatcher and job image."""
    return {
        "JOBCELL_JOB_ID": str(spec.job_id),
        "JOBCELL_ATTEMPT": str(spec.attempt),
        "JOBCELL_TIER": spec.tier,
        "JOBCELL_MEMORY_LIMIT_BYTES": str(spec.memory_limit_bytes),
        "JOBCELL_DOCUMENT": spec.document_uri,
        "JOBCELL_WORKLOAD": spec.workload,
        "JOBCELL_PARAMS": json.dumps(spec.params, separators=(",", ":")),
    }


def peak_from_output(stdout: str) -> int | None:
    found = _PEAK.findall(stdout)
    return int(found[-1]) if found else None


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:1000] if lines else ""


def tail(text: str, n_lines: int = 40, n_chars: int = 8000) -> str:
    return "\n".join(text.rstrip().splitlines()[-n_lines:])[-n_chars:]
