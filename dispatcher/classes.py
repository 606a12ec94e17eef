"""The size-class table (which memory tier a document gets) and memory-budget admission. Pure."""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, NotFound
from .models import ALL_TIERS, MIB, Running

_UNITS = {"b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MIB, "mb": 1000**2, "mib": MIB,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3}
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_bytes(value: Any) -> int:
    """'512MiB', '1GiB', '5MB', 1048576 -> bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(digits):] or "b"
    if unit not in _UNITS or not digits:
        raise ValueError(f"{value!r} is not a size: write e.g. 512MiB, 1GiB or 5MB")
    return int(float(digits) * _UNITS[unit])


def parse_seconds(value: Any) -> float:
    """'10min', '90s', '1h', '30d', 600 -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(digits):] or "s"
    if unit not in _SECONDS or not digits:
        raise ValueError(f"{value!r} is not a duration: write e.g. 90s, 10min or 1h")
    return float(digits) * _SECONDS[unit]


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


class SizeClass(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,30}$")]
    max_input_bytes: int | None = None  # exclusive upper bound; None on the last class
    memory_limit_bytes: Annotated[int, Field(ge=6 * MIB)]  # Docker refuses less than 6 MiB
    max_running: Annotated[int, Field(ge=1)]
    timeout_s: Annotated[float, Field(gt=0)]
    # Where this tier's cells run; None: the dispatcher's JOBCELL_RUNTIME. Routing lets small documents run as
    # capped processes on a small worker while large ones go to a runtime with bigger machines (a Render plan).
    runtime: Literal["docker", "process", "kubernetes", "render"] | None = None
    # CPUs a cell of this tier counts for in CPU admission (JOBCELL_CPU_BUDGET), and the OCR workers it runs:
    # more workers than cores only queue on the CPU, and a document waits longer for every other one
    cpus: Annotated[float, Field(gt=0, le=64)] = 1.0

    @field_validator("max_input_bytes", "memory_limit_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        return None if v is None else parse_bytes(v)

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        return parse_seconds(v)

    @property
    def memory_mib(self) -> int:
        return self.memory_limit_bytes // MIB


class SizeClassTable(BaseModel):
    """Classes ordered by input size; the order is also the escalation order after an OOM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: Sequence[SizeClass]

    @model_validator(mode="after")
    def _consistent(self) -> SizeClassTable:
        cs = list(self.classes)
        if not cs:
            raise ValueError("the table has no classes: define at least one")
        names = [c.name for c in cs]
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        for c in cs[:-1]:
            if c.max_input_bytes is None:
                raise ValueError(f"class {c.name!r} needs max_input_bytes: only the last class may be open-ended")
        if cs[-1].max_input_bytes is not None:
            raise ValueError(f"the last class {cs[-1].name!r} must have no max_input_bytes (it takes the rest)")
        for a, b in itertools.pairwise(cs):
            if a.max_input_bytes is not None and b.max_input_bytes is not None \
                    and b.max_input_bytes <= a.max_input_bytes:
                raise ValueError(f"max_input_bytes must grow: {a.name!r} then {b.name!r}")
            if b.memory_limit_bytes <= a.memory_limit_bytes:
                raise ValueError(
                    f"memory limits must grow so that an OOM retry gets more: "
                    f"{a.name!r} has {format_bytes(a.memory_limit_bytes)}, "
                    f"{b.name!r} has {format_bytes(b.memory_limit_bytes)}")
        return self

    def __iter__(self) -> Iterable[SizeClass]:  # type: ignore[override]
        return iter(self.classes)

    def get(self, name: str) -> SizeClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(f"no size class named {name!r}; known: {[c.name for c in self.classes]}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def pause_scope(self, scope: str) -> str:
        """What a pause may name: every tier ("*") or one class of this table."""
        if scope != ALL_TIERS and scope not in self.names:
            raise NotFound(f"no class {scope!r} to pause or resume; known: {', '.join(self.names)} "
                           f"(or {ALL_TIERS!r} for all)")
        return scope

    def resolve(self, name: str, memory_limit_bytes: int | None = None) -> SizeClass:
        """The class by name; for a name the table no longer has (renamed or removed while jobs ran or waited),
        the smallest class that holds the memory it had, else the top one."""
        try:
            return self.get(name)
        except KeyError:
            fits = [c for c in self.classes if memory_limit_bytes and c.memory_limit_bytes >= memory_limit_bytes]
            return fits[0] if fits else self.classes[-1]

    def for_size(self, n_bytes: int) -> SizeClass:
        for c in self.classes:
            if c.max_input_bytes is None or n_bytes < c.max_input_bytes:
                return c
        return self.classes[-1]

    def next_tier(self, name: str) -> SizeClass | None:
        names = [c.name for c in self.classes]
        i = names.index(name)
        return self.classes[i + 1] if i + 1 < len(names) else None

    def holding(self, need_bytes: int, above: str) -> SizeClass | None:
        """The smallest class above `above` whose limit holds `need_bytes`, else the top one; None at the top."""
        higher = self.classes[self.names.index(above) + 1:]
        return next((c for c in higher if c.memory_limit_bytes >= need_bytes), higher[-1] if higher else None)

    @property
    def top(self) -> SizeClass:
        return self.classes[-1]


DEFAULT_TABLE: list[dict[str, Any]] = [
    {"name": "small", "max_input_bytes": "5MB", "memory_limit_bytes": "512MiB", "max_running": 15,
     "timeout_s": "10min"},
    {"name": "medium", "max_input_bytes": "20MB", "memory_limit_bytes": "1GiB", "max_running": 5,
     "timeout_s": "30min"},
    {"name": "large", "max_input_bytes": None, "memory_limit_bytes": "2GiB", "max_running": 1,
     "timeout_s": "60min"},
]


def _explain(err: ValidationError, origin: str) -> ConfigError:
    lines = [f"invalid size-class table ({origin}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "table"
        lines.append(f"  - {where}: {e['msg']}")
    lines.append("Fix the table (see `jobcell classes` for the expected shape) and start again.")
    return ConfigError("\n".join(lines))


def load_table(raw: Any, origin: str = "defaults") -> SizeClassTable:
    """Validate a table given as a list of classes or {"classes": [...]}; raise ConfigError saying what to fix."""
    data = raw if isinstance(raw, dict) else {"classes": raw}
    try:
        return SizeClassTable.model_validate(data)
    except ValidationError as err:
        raise _explain(err, origin) from None


def load_table_from(text: str | None, path: str | None) -> SizeClassTable:
    """The table from JSON text (env), a .toml/.json file, or the defaults, in that order."""
    if text:
        try:
            return load_table(json.loads(text), "JOBCELL_CLASSES")
        except json.JSONDecodeError as e:
            raise ConfigError(f"JOBCELL_CLASSES is not valid JSON: {e}") from None
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"JOBCELL_CLASSES_FILE={path} does not exist: point it at a .toml or .json table")
        try:
            raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} cannot be parsed: {e}") from None
        return load_table(raw, str(p))
    return load_table(DEFAULT_TABLE)


def check_budget(table: SizeClassTable, budget_bytes: int, budgets: Mapping[str, int] | None = None,
                 cpu_budget: float | None = None) -> None:
    """Refuse a budget that could never admit the largest tier it serves: its jobs would wait forever. `budgets`
    are those of runtimes that classes are routed to; every other class counts against `budget_bytes`, and
    against `cpu_budget` when CPU admission is on."""
    routed = budgets or {}
    for c in reversed(table.classes):  # the largest class of each budget first
        if c.runtime is not None and c.runtime in routed:
            have, name = routed[c.runtime], f"JOBCELL_RUNTIME_BUDGETS[{c.runtime!r}]"
        else:
            have, name = budget_bytes, "JOBCELL_MEMORY_BUDGET"
            if cpu_budget is not None and c.cpus > cpu_budget:
                raise ConfigError(
                    f"the CPU budget JOBCELL_CPU_BUDGET ({cpu_budget:g}) is smaller than the {c.name!r} class's "
                    f"cpus ({c.cpus:g}): raise JOBCELL_CPU_BUDGET or lower that class's cpus")
        if have < c.memory_limit_bytes:
            raise ConfigError(
                f"the memory budget {name} ({format_bytes(have)}) is smaller than the {c.name!r} class limit "
                f"({format_bytes(c.memory_limit_bytes)}): raise {name} or lower that class's memory_limit_bytes")


@dataclass
class Ledger:
    """One budget: the default runtime's, or one that classes are routed to. Memory always; CPUs where the
    cells share this host's cores (a routed runtime's cells run on machines of their own: no CPU budget)."""

    budget_bytes: int
    cpu_budget: float = math.inf
    used_bytes: int = 0
    used_cpus: float = 0.0
    reserved_bytes: int = 0
    reserved_cpus: float = 0.0
    reserved_for: int | None = None

    def has_room(self, c: SizeClass) -> bool:
        return (self.used_bytes + c.memory_limit_bytes <= self.budget_bytes - self.reserved_bytes
                and self.used_cpus + c.cpus <= self.cpu_budget - self.reserved_cpus + 1e-9)

    def could_ever_hold(self, c: SizeClass) -> bool:
        return c.memory_limit_bytes <= self.budget_bytes and c.cpus <= self.cpu_budget + 1e-9

    def hold(self, c: SizeClass) -> None:
        self.used_bytes += c.memory_limit_bytes
        self.used_cpus += c.cpus


class Admission:
    """Whether a job may start now: a free slot in its tier AND room in the memory budget of its runtime (and in
    the CPU budget, when one is set: `cpu_budget`, shared by every class that is not routed elsewhere).

    Fair both ways: candidates come per tier (a backlog of one class never hides another's jobs), and a job
    that has waited `reserve_after_s` for memory gets it reserved: smaller jobs may still start, but only in
    the room left beside the reservation (backfill, as batch schedulers do), so a steady stream of small jobs
    cannot hold a large one back forever. Classes routed to a runtime with a budget of its own (`budgets`,
    by runtime name) count against that budget only: a Render plan's memory is not the worker's.
    """

    def __init__(self, table: SizeClassTable, budget_bytes: int, running: Iterable[Running],
                 reserve_after_s: float = 120.0, budgets: Mapping[str, int] | None = None,
                 cpu_budget: float | None = None) -> None:
        self.table = table
        self.reserve_after_s = reserve_after_s
        cpus = math.inf if cpu_budget is None else cpu_budget
        self.ledgers: dict[str | None, Ledger] = {None: Ledger(budget_bytes, cpus)}
        self.ledgers.update({name: Ledger(b) for name, b in (budgets or {}).items()})
        self.slots: dict[str, int] = {c.name: 0 for c in table.classes}
        for r in running:
            c = table.resolve(r.tier, r.memory_limit_bytes)
            self.slots[c.name] = self.slots.get(c.name, 0) + 1
            book = self.ledger(c.name)
            book.used_bytes += r.memory_limit_bytes  # what it was started with, even if its class changed since
            book.used_cpus += c.cpus

    def ledger(self, tier: str) -> Ledger:
        runtime = self.table.get(tier).runtime
        return self.ledgers[runtime if runtime in self.ledgers else None]

    def fits(self, tier: str) -> bool:
        c = self.table.get(tier)
        return self.slots[tier] < c.max_running and self.ledger(tier).has_room(c)

    def consider(self, job_id: int, tier: str, waited_s: float) -> bool:
        """True if the job may start now; otherwise it may get its budget's reservation (one per budget and
        claim, and candidates come oldest first, so it goes to the job that has waited longest)."""
        if self.fits(tier):
            return True
        c, book = self.table.get(tier), self.ledger(tier)
        if (book.reserved_for is None and waited_s >= self.reserve_after_s and self.slots[tier] < c.max_running
                and book.could_ever_hold(c)):
            book.reserved_for, book.reserved_bytes, book.reserved_cpus = job_id, c.memory_limit_bytes, c.cpus
        return False

    def take(self, tier: str) -> None:
        self.slots[tier] += 1
        self.ledger(tier).hold(self.table.get(tier))
