"""What the runtime adapters share, so that each of them holds only what is its own.

- `RuntimeBase`: the Runtime port's answers for a runtime that can only be polled and measures no live memory.
- `Identity`: the labels that make a unit one attempt of this runtime's pool and queue, and reading them back
  into Handles in owned(). A restarted dispatcher adopts running units by these keys: never rename them.
- `Hardening`: how every cell is confined (user, read-only root, no capabilities, no privilege gain, pids, the
  sizes of /tmp and /scratch); each runtime translates this one description into its own spec.
- The helpers for a merged log, where a cell's records and its stderr arrive as one stream of lines.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from ..classes import parse_bytes
from ..errors import ConfigError
from ..models import Handle

log = logging.getLogger("jobcell.runtimes")

OpenDocument = Callable[[str], tuple[BinaryIO, int]]  # DocumentStore.open: what a runtime streams into a cell
Presign = Callable[[str, int], str]  # DocumentStore.presign: (uri, ttl_s) -> a GET URL for that one document

_RECORD_PREFIX = '{"'  # a record is a JSON object


def no_documents(uri: str) -> tuple[BinaryIO, int]:
    """The opener of a runtime built without a store: a cell with document bytes cannot be launched."""
    raise LookupError(f"no document store is configured to open {uri}")


class RuntimeBase:
    """The parts of dispatcher.ports.Runtime that a runtime may leave as they are."""

    name: str

    def handle(self, ref: str, job_id: int, attempt: int) -> Handle:
        return Handle(self.name, ref, job_id, attempt)

    def memory_now(self, handle: Handle) -> int | None:
        """Not measured: the runtime's API reports no live memory."""
        return None

    def watch(self, wake: Callable[[], None]) -> None:
        """Polled: the loop's poll interval bounds how late an exit is noticed."""


class LabelKeys(NamedTuple):
    job: str
    attempt: str
    pool: str
    queue: str
    tier: str

    @classmethod
    def under(cls, prefix: str) -> LabelKeys:
        return cls(*(prefix + key for key in cls._fields))


@dataclass(frozen=True)
class Identity:
    """Which runtime, pool and queue a unit belongs to and which attempt it runs, as labels on the unit."""

    runtime: str
    pool: str
    queue_id: str
    keys: LabelKeys
    value: Callable[[str], str] = str  # makes a free-form value (pool, queue, tier) valid where it is stored

    def selector(self) -> dict[str, str]:
        """What every unit of this pool and queue carries: how owned() finds them, and only them."""
        return {self.keys.pool: self.value(self.pool), self.keys.queue: self.value(self.queue_id)}

    def labels(self, job_id: int, attempt: int, tier: str) -> dict[str, str]:
        return {self.keys.job: str(job_id), self.keys.attempt: str(attempt), **self.selector(),
                self.keys.tier: self.value(tier)}

    def handles(self, units: Iterable[tuple[str, str, Mapping[str, str] | None]]) -> list[Handle]:
        """owned(): a Handle for each listed (ref, name, labels) whose labels name its attempt."""
        out = []
        for ref, name, labels in units:
            found = labels or {}
            try:
                out.append(Handle(self.runtime, ref, int(found[self.keys.job]), int(found[self.keys.attempt])))
            except (KeyError, ValueError):
                log.warning("%s unit %s carries jobcell labels but no job/attempt; ignored", self.runtime, name)
        return out


@dataclass(frozen=True)
class Hardening:
    """How a cell is confined, whatever runs it. Docker applies all of it; Kubernetes all but the pids limit,
    which is the kubelet's (podPidsLimit, a node setting)."""

    uid: int = 10001
    gid: int = 10001
    read_only_root: bool = True
    drop_capabilities: tuple[str, ...] = ("ALL",)
    no_new_privileges: bool = True
    pids_limit: int = 256
    tmpfs_bytes: int = 64 * 1024 * 1024  # /tmp
    scratch_bytes: int | None = 512 * 1024 * 1024  # /scratch; None: the unit's memory limit

    @classmethod
    def of(cls, user: str, tmpfs_size: str, scratch_size: str | None, pids_limit: int = 256) -> Hardening:
        """From the settings' words: user "uid:gid" (JOBCELL_JOB_USER), sizes as 64m, 1g or 64Mi."""
        ids = re.fullmatch(r"(\d+):(\d+)", user.strip())
        if ids is None:
            raise ConfigError(f"JOBCELL_JOB_USER={user!r}: write the cells' user as numbers, uid:gid (e.g. "
                              "10001:10001); Kubernetes takes only numbers, and /scratch is made theirs")
        return cls(uid=int(ids[1]), gid=int(ids[2]), pids_limit=pids_limit, tmpfs_bytes=size_bytes(tmpfs_size),
                   scratch_bytes=size_bytes(scratch_size) if scratch_size else None)

    def scratch_for(self, memory_limit_bytes: int) -> int:
        return self.scratch_bytes or memory_limit_bytes


def size_bytes(size: str) -> int:
    """A size as the settings write it (64m, 1g: binary) or as Kubernetes does (64Mi, 1Gi)."""
    return parse_bytes(f"{size}B" if size.endswith("i") else size)


# -- a merged log: records and stderr in one stream ------------------------------------------------------------

def is_record_line(line: str) -> bool:
    return line.startswith(_RECORD_PREFIX)


def stderr_of(lines: Iterable[str]) -> tuple[str, str]:
    """Of a merged log, everything but the records: (its tail, its last line: the cell's reason). Only this is
    ever copied into the attempt log (records carry page text, often medical)."""
    rest = "\n".join(line for line in lines if not is_record_line(line))
    return tail(rest), last_line(rest)


def last_line(text: str) -> str:
    """The last non-empty line: the cell's own reason (the loop makes it safe to show, for every runtime)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def tail(text: str, n_lines: int = 40, n_chars: int = 8000) -> str:
    return "\n".join(text.rstrip().splitlines()[-n_lines:])[-n_chars:]
