"""Several runtimes behind the one Runtime port: each tier's cells start on the runtime its class names (the
dispatcher's own runtime when it names none), and every later call follows the handle to the runtime that made
it. Small documents can so run as capped processes on a small worker while large ones go to bigger machines,
and an OOM on one runtime escalates to the next tier wherever that tier runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from .classes import SizeClassTable
from .errors import ConfigError
from .models import Exit, Handle, LaunchSpec
from .ports import CellInput, Runtime


class RoutedRuntime:
    def __init__(self, default: Runtime, others: Sequence[Runtime], table: SizeClassTable) -> None:
        self.default = default
        self.runtimes: dict[str, Runtime] = {default.name: default, **{r.name: r for r in others}}
        self.routes = {c.name: c.runtime for c in table.classes if c.runtime is not None}
        missing = sorted({r for r in self.routes.values()} - self.runtimes.keys())
        if missing:
            raise ConfigError(f"classes are routed to {', '.join(missing)}, which this dispatcher has not set up")
        self.name = "+".join([default.name, *sorted(n for n in self.runtimes if n != default.name)])

    def for_tier(self, tier: str) -> Runtime:
        named = self.routes.get(tier)
        return self.runtimes[named] if named is not None else self.default  # a tier gone since: the default

    def _of(self, handle: Handle) -> Runtime:
        return self.runtimes[handle.runtime]

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        return self.for_tier(spec.tier).launch(spec, cell)

    def output(self, handle: Handle) -> Iterator[bytes]:
        return self._of(handle).output(handle)

    def poll(self, handle: Handle) -> Exit | None:
        return self._of(handle).poll(handle)

    def kill(self, handle: Handle) -> None:
        self._of(handle).kill(handle)

    def cleanup(self, handle: Handle) -> None:
        self._of(handle).cleanup(handle)

    def memory_now(self, handle: Handle) -> int | None:
        return self._of(handle).memory_now(handle)

    def owned(self) -> Sequence[Handle]:
        # All or nothing: a partial list would let reconcile reap the leases of units it merely failed to list.
        return [h for r in self.runtimes.values() for h in r.owned()]

    def watch(self, wake: Callable[[], None]) -> None:
        for r in self.runtimes.values():
            r.watch(wake)


def routed_budgets(table: SizeClassTable, default: str, budgets: Mapping[str, int]) -> dict[str, int]:
    """The budgets of the runtimes that classes are routed to, other than the default (which has its own);
    a routed runtime without one is refused, since admission could not bound what it holds."""
    routed = sorted({c.runtime for c in table.classes if c.runtime is not None and c.runtime != default})
    missing = [r for r in routed if r not in budgets]
    if missing:
        names = ", ".join(f"{r!r} (class {', '.join(c.name for c in table.classes if c.runtime == r)})"
                          for r in missing)
        raise ConfigError(f"JOBCELL_RUNTIME_BUDGETS needs a memory budget for {names}: e.g. "
                          f"JOBCELL_RUNTIME_BUDGETS='{{\"{missing[0]}\": \"8GiB\"}}'")
    return {r: budgets[r] for r in routed}
