"""From what a runtime observed to what happens next. Pure: no I/O, no clock, no randomness of its own."""

from __future__ import annotations

import random
from dataclasses import dataclass

from job_image.contract import EXIT_BAD_INPUT, EXIT_NEEDS_MORE, EXIT_NO_MEMORY, EXIT_OK, EXIT_SIGKILL

from .classes import SizeClassTable, format_bytes
from .models import Exit, JobState, KillReason, Outcome


def classify(exit: Exit, killed_by: KillReason | None) -> Outcome:
    """The exit-code contract. A SIGKILL is oom only on the runtime's own OOM signal; one nobody can explain
    (an engine restart, a node drain, a human's kill) is lost, retried on the same tier."""
    if killed_by is KillReason.CANCEL:
        return Outcome.CANCELLED
    if killed_by is KillReason.REFUSED:  # its output broke the contract: the same document would again
        return Outcome.BAD_INPUT
    if killed_by is KillReason.DEADLINE or exit.deadline_exceeded:
        return Outcome.TIMEOUT
    if exit.lost or exit.exit_code is None:
        return Outcome.LOST
    if exit.oom_killed:
        return Outcome.OOM
    if exit.exit_code == EXIT_OK:
        return Outcome.SUCCEEDED
    if exit.exit_code == EXIT_BAD_INPUT:
        return Outcome.BAD_INPUT
    if exit.exit_code == EXIT_NO_MEMORY:
        return Outcome.OOM
    if exit.exit_code == EXIT_NEEDS_MORE:
        return Outcome.NEEDS_MORE
    if exit.exit_code == EXIT_SIGKILL and killed_by is None:
        return Outcome.LOST
    return Outcome.ERROR


@dataclass(frozen=True)
class Backoff:
    """attempt**exponent seconds, capped, with up to `jitter` of it added at random."""

    exponent: float = 4.0
    cap_s: float = 3600.0
    jitter: float = 0.25

    def delay(self, attempt: int, rand: random.Random | None = None) -> float:
        base = min(float(attempt**self.exponent), self.cap_s)
        r = rand.random() if rand else random.random()
        return base * (1.0 + self.jitter * r)


@dataclass(frozen=True)
class Decision:
    state: JobState
    tier: str
    delay_s: float = 0.0
    reason: str | None = None

    @property
    def retry(self) -> bool:
        return self.state is JobState.QUEUED


def decide(outcome: Outcome, *, tier: str, attempt: int, max_attempts: int, table: SizeClassTable,
           backoff: Backoff, exit_reason: str = "", rand: random.Random | None = None,
           need_bytes: int | None = None) -> Decision:
    """What the job becomes after an attempt ended with `outcome`."""
    limit = table.get(tier)
    if outcome is Outcome.SUCCEEDED:
        return Decision(JobState.SUCCEEDED, tier)
    if outcome is Outcome.CANCELLED:
        return Decision(JobState.CANCELLED, tier, reason="cancelled by request")
    if outcome is Outcome.BAD_INPUT:
        return Decision(JobState.FAILED, tier, reason=exit_reason or "the job rejected its input (exit 65)")
    if outcome is Outcome.TIMEOUT:
        # A document that needs longer than its class allows will need it again: do not burn retries.
        return Decision(JobState.FAILED, tier,
                        reason=f"timed out after {limit.timeout_s:.0f} s, the {tier!r} class deadline")
    if outcome is Outcome.OOM:
        bigger = table.next_tier(tier)
        if bigger is None:
            return Decision(JobState.FAILED, tier, reason=f"needs more than {limit.memory_mib} MiB "
                                                            f"(OOM-killed on the top tier {tier!r})")
        if attempt >= max_attempts:
            return Decision(JobState.FAILED, tier, reason=f"OOM-killed at {limit.memory_mib} MiB "
                                                            f"after {attempt} attempts")
        return Decision(JobState.QUEUED, bigger.name, 0.0,
                        reason=f"OOM-killed at {limit.memory_mib} MiB; retrying on {bigger.name!r}")
    if outcome is Outcome.NEEDS_MORE:
        return _move_up(tier, attempt, max_attempts, table, need_bytes)
    # error, lost: transient until proven otherwise
    what = exit_reason or ("the job's unit vanished or was killed from outside (not by its memory cap)"
                           if outcome is Outcome.LOST else "the job failed")
    if attempt >= max_attempts:
        return Decision(JobState.FAILED, tier, reason=f"{what} ({outcome.value}); gave up after {attempt} attempts")
    return Decision(JobState.QUEUED, tier, backoff.delay(attempt, rand), reason=f"{what} ({outcome.value}); will retry")


def _move_up(tier: str, attempt: int, max_attempts: int, table: SizeClassTable, need_bytes: int | None) -> Decision:
    """The cell said, before any work, that it needs more than its cap: straight to the smallest tier above that
    holds the need (the top one if none does: the estimate is generous), skipping tiers an OOM would climb."""
    limit = table.get(tier)
    need = f"about {format_bytes(need_bytes)}" if need_bytes else "more"
    target = table.holding(need_bytes or 0, above=tier)
    if target is None:
        return Decision(JobState.FAILED, tier, reason=f"needs {need} memory; the top tier {tier!r} has "
                                                      f"{format_bytes(limit.memory_limit_bytes)}")
    if attempt >= max_attempts:
        return Decision(JobState.FAILED, tier, reason=f"needs {need} memory, over the {tier!r} tier's "
                                                      f"{format_bytes(limit.memory_limit_bytes)}, "
                                                      f"after {attempt} attempts")
    return Decision(JobState.QUEUED, target.name, 0.0,
                    reason=f"needs {need} for its largest page, over the {tier!r} tier's "
                           f"{format_bytes(limit.memory_limit_bytes)}: moved to {target.name!r} before it ran out")
