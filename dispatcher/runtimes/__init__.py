"""Runtime adapters: each starts one isolated, memory-capped unit per attempt (see dispatcher.ports.Runtime)."""

from __future__ import annotations


def last_line(text: str) -> str:
    """The last non-empty line: the cell's own reason (the loop makes it safe to show, for every runtime)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def tail(text: str, n_lines: int = 40, n_chars: int = 8000) -> str:
    return "\n".join(text.rstrip().splitlines()[-n_lines:])[-n_chars:]
