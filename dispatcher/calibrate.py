"""A size-class table calibrated from recorded peaks (`jobcell classes --recommend`). Pure: samples in, table out.

Limits set by input bytes reserve far more than jobs use (1-page documents peaking at 40 to 110 MiB in 512 MiB
slots). Each class's limit is brought down to what its succeeded attempts really peaked at (a high percentile,
with headroom), never raised, and kept where the evidence is thin or the class already runs out of memory. The
sizing step catches what such a limit misses: a cell whose own estimate is over its cap moves up before any work.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .classes import SizeClassTable, format_bytes
from .models import MIB
from .views import PeakSample


@dataclass(frozen=True)
class Policy:
    percentile: float = 95.0  # of the class's succeeded peaks
    headroom: float = 1.2  # times that percentile
    step_bytes: int = 16 * MIB  # limits are rounded up to this
    floor_bytes: int = 64 * MIB
    min_samples: int = 20  # fewer succeeded attempts than this: the class is kept as it is
    max_oom_rate: float = 0.05  # a class that OOMs more often is kept (it needs more, not less)
    # With the sizing step on, an attempt whose own estimate is over the limit moves up before any work: the
    # limit need only hold the attempts whose estimates fit it, as long as at most this share would move
    sizing: bool = True
    max_moved: float = 0.10


@dataclass(frozen=True)
class ClassReport:
    name: str
    limit_bytes: int
    attempts: int
    succeeded: int
    oom: int
    moved_up: int  # needs_more: the cell's estimate was over this class's cap
    peak_p50: int | None
    peak_high: int | None  # the policy's percentile
    peak_max: int | None
    need_p50: int | None
    recommended_bytes: int
    note: str

    @property
    def oom_rate(self) -> float:
        return self.oom / self.attempts if self.attempts else 0.0

    @property
    def frees_bytes(self) -> int:
        """Memory each running job of this class would no longer hold."""
        return self.limit_bytes - self.recommended_bytes


@dataclass(frozen=True)
class Calibration:
    classes: list[ClassReport]
    table: SizeClassTable
    median_peak: int | None  # over every succeeded attempt
    median_reserved_now: int | None  # the limits those attempts ran with
    median_reserved_after: int | None  # the recommended limits of their classes


def recommend(table: SizeClassTable, samples: Iterable[PeakSample], policy: Policy | None = None) -> Calibration:
    p = policy or Policy()
    by_tier: dict[str, list[PeakSample]] = {c.name: [] for c in table.classes}
    for s in samples:
        if s.tier in by_tier:  # a class renamed or removed since says nothing about today's
            by_tier[s.tier].append(s)
    reports: list[ClassReport] = []
    floor = 0
    carried: list[PeakSample] = []  # attempts whose estimate would move them up from the class below
    for c in table.classes:
        report = _one(c.name, c.memory_limit_bytes, by_tier[c.name], carried, p, floor)
        reports.append(report)
        floor = report.recommended_bytes
        carried = [s for s in (*by_tier[c.name], *carried) if _ran(s) and _moves(s, floor, p)]
    new = table.model_copy(update={"classes": [c.model_copy(update={"memory_limit_bytes": r.recommended_bytes})
                                               for c, r in zip(table.classes, reports, strict=True)]})
    recs = [r.recommended_bytes for r in reports]
    won = [(i, s) for i, c in enumerate(table.classes) for s in by_tier[c.name] if _ran(s)]
    return Calibration(reports, SizeClassTable.model_validate(new.model_dump()),
                       _median([s.peak_memory_bytes or 0 for _, s in won]),
                       _median([s.memory_limit_bytes for _, s in won]),
                       _median([recs[_landing(i, s, recs, p)] for i, s in won]))


def _ran(s: PeakSample) -> bool:
    return s.outcome == "succeeded" and bool(s.peak_memory_bytes)


def _moves(s: PeakSample, limit: int, p: Policy) -> bool:
    return p.sizing and bool(s.need_bytes) and (s.need_bytes or 0) > limit


def _landing(i: int, s: PeakSample, recs: Sequence[int], p: Policy) -> int:
    """The class an attempt would run in under the recommended limits: its own, or above by its estimate."""
    while i + 1 < len(recs) and _moves(s, recs[i], p):
        i += 1
    return i


def _one(name: str, limit: int, samples: Sequence[PeakSample], carried: Sequence[PeakSample], p: Policy,
         floor: int) -> ClassReport:
    ran = [(s.peak_memory_bytes or 0, s.need_bytes) for s in (*samples, *carried) if _ran(s)]
    peaks = sorted(s.peak_memory_bytes for s in samples if s.outcome == "succeeded" and s.peak_memory_bytes)
    needs = [s.need_bytes for s in samples if s.need_bytes]
    oom = sum(s.outcome == "oom" for s in samples)
    moved = sum(s.outcome == "needs_more" for s in samples)
    high = _percentile(peaks, p.percentile)
    if len(ran) < p.min_samples:
        rec, note = limit, f"kept: {len(ran)} succeeded attempts, fewer than {p.min_samples}"
    elif samples and oom / len(samples) > p.max_oom_rate:
        rec, note = limit, f"kept: {oom / len(samples):.0%} of its attempts ran out of memory"
    else:
        rec, note = _fit(limit, ran, p)
        if carried:
            note += f"; with {len(carried)} that would move up from the class below"
    if rec <= floor:  # limits must grow, so that an OOM retry always gets more
        rec, note = min(limit, floor + p.step_bytes), note + "; raised above the class below"
    return ClassReport(name, limit, len(samples), len(peaks), oom, moved, _median(peaks), high,
                       peaks[-1] if peaks else None, _median(needs), rec, note)


def _fit(limit: int, ran: Sequence[tuple[int, int | None]], p: Policy) -> tuple[int, str]:
    """The smallest limit (in steps, from the floor up to today's) that holds the p-th percentile peak, with
    headroom, of the attempts that would stay in the class: with sizing, those whose estimate fits the limit
    (at most max_moved of them may move up); without, all of them."""
    for candidate in range(p.floor_bytes, limit + 1, p.step_bytes):
        stay = sorted(peak for peak, need in ran if not (p.sizing and need and need > candidate))
        moved = len(ran) - len(stay)
        if moved > p.max_moved * len(ran):
            continue
        high = _percentile(stay, p.percentile)
        if high is not None and high * p.headroom <= candidate:
            why = f"p{p.percentile:g} peak {format_bytes(high)} x {p.headroom:g}"
            return candidate, why + (f"; {moved} of {len(ran)} would move up by their estimate" if moved else "")
    return limit, "kept: its peaks already need its limit"


def _percentile(sorted_values: Sequence[int], q: float) -> int | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))  # nearest rank
    return sorted_values[k]


def _median(values: Sequence[int]) -> int | None:
    return int(statistics.median(values)) if values else None


def to_toml(table: SizeClassTable) -> str:
    """The table as a JOBCELL_CLASSES_FILE: sizes in bytes, every field written out."""
    out = ["# Written by `jobcell classes --recommend --write`: the current table with its memory limits",
           "# calibrated from recorded peaks. Point JOBCELL_CLASSES_FILE at it to apply it.", ""]
    for c in table.classes:
        out.append("[[classes]]")
        out.append(f'name = "{c.name}"')
        if c.max_input_bytes is not None:
            out.append(f"max_input_bytes = {c.max_input_bytes}")
        out.append(f"memory_limit_bytes = {c.memory_limit_bytes}  # {format_bytes(c.memory_limit_bytes)}")
        out.append(f"max_running = {c.max_running}")
        out.append(f"timeout_s = {c.timeout_s:g}")
        out.append(f"cpus = {c.cpus:g}")
        if c.runtime is not None:
            out.append(f'runtime = "{c.runtime}"')
        out.append("")
    return "\n".join(out)
