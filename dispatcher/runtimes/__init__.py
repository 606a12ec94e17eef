"""Runtime adapters: each starts one isolated, memory-capped unit per attempt (see dispatcher.ports.Runtime)."""

from __future__ import annotations

from job_image.contract import reason_text


def last_line(text: str) -> str:
    """The last non-empty line, made safe to show: it is the cell's own reason, and a cell is not trusted."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return reason_text(lines[-1]) if lines else ""


def tail(text: str, n_lines: int = 40, n_chars: int = 8000) -> str:
    return "\n".join(text.rstrip().splitlines()[-n_lines:])[-n_chars:]
