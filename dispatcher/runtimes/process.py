"""Process runtime: one fresh subprocess per attempt on this host, capped by its own memory cgroup.

For hosts with no container engine (a Render worker, a VM): each job still gets a clean address space and a
hard cap. The cap is a memory cgroup of its own when the host lets us write one (v1: memory.limit_in_bytes and
memory.memsw.limit_in_bytes; v2: memory.max and memory.swap.max under a delegated JOBCELL_CGROUP_ROOT), read
back through the cgroup's OOM counter; otherwise RLIMIT_AS, where an allocation past the cap fails with
MemoryError or the process dies by SIGKILL/SIGSEGV, both read as oom.

Every attempt has a unit directory (state_root/pool/queue_id/job-attempt) holding its logs, its pid and the
exit code that a small shell wrapper writes when the job ends. The wrapper, not the dispatcher, is the job's
parent, so the exit code survives a dispatcher crash and a restarted dispatcher adopts the unit from disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..models import EXIT_SIGKILL, Exit, Handle, LaunchSpec
from . import job_env, last_line, peak_from_output, tail

log = logging.getLogger("jobcell.process")

V1_MEMORY = Path("/sys/fs/cgroup/memory")


@dataclass(frozen=True)
class ProcessOptions:
    state_root: str = "var/process-units"
    pool: str = "default"
    queue_id: str = ""
    command: tuple[str, ...] = (sys.executable, "-m", "job_image.entrypoint")
    cgroup_root: str | None = None  # v2: a delegated cgroup with +memory in its subtree_control
    cap: Literal["auto", "rlimit"] = "auto"  # auto: a cgroup where the host allows one, else RLIMIT_AS
    env: dict[str, str] = field(default_factory=dict)


class Cgroups:
    """The memory cgroup for one unit: v1, v2, or none (then RLIMIT_AS)."""

    def __init__(self, root: Path | None, version: int) -> None:
        self.root, self.version = root, version

    @classmethod
    def detect(cls, pool: str, cgroup_root: str | None) -> Cgroups:
        if cgroup_root:
            return cls(Path(cgroup_root) / f"jobcell-{pool}", 2)
        if (V1_MEMORY / "memory.limit_in_bytes").exists() and os.access(V1_MEMORY, os.W_OK):
            return cls(V1_MEMORY / "jobcell" / pool, 1)
        return cls(None, 0)

    def create(self, name: str, limit: int) -> Path | None:
        if self.root is None:
            return None
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        if self.version == 1:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            swap = path / "memory.memsw.limit_in_bytes"
            if swap.exists():  # absent when the kernel does not account swap: then there is none to use
                swap.write_text(str(limit))
        else:
            (path / "memory.max").write_text(str(limit))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        return path

    @staticmethod
    def oom_kills(path: Path | None) -> int:
        for name, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
            with contextlib.suppress(OSError):
                for line in (path / name).read_text().splitlines() if path else []:
                    k, _, v = line.partition(" ")
                    if k == key:
                        return int(v)
        return 0

    @staticmethod
    def peak(path: Path | None) -> int | None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int((path / name).read_text()) if path else None
        return None

    @staticmethod
    def remove(path: Path | None) -> None:
        if path is not None:
            with contextlib.suppress(OSError):
                path.rmdir()


class ProcessRuntime:
    name = "process"

    def __init__(self, options: ProcessOptions) -> None:
        self.options = options
        self.units = Path(options.state_root).resolve() / options.pool / (options.queue_id or "none")
        rlimit_only = options.cap == "rlimit"
        self.cgroups = Cgroups(None, 0) if rlimit_only else Cgroups.detect(options.pool, options.cgroup_root)
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # ours to reap; adopted units are not
        if self.cgroups.root is None:
            log.warning("no writable memory cgroup: capping jobs with RLIMIT_AS (address space, not resident memory)")

    def _dir(self, job_id: int, attempt: int) -> Path:
        return self.units / f"{job_id}-{attempt}"

    def launch(self, spec: LaunchSpec) -> Handle:
        unit = self._dir(spec.job_id, spec.attempt)
        handle = Handle(self.name, str(unit), spec.job_id, spec.attempt)
        try:
            unit.mkdir(parents=True)
        except FileExistsError:
            log.info("job %s attempt %s: unit already exists, not launching again", spec.job_id, spec.attempt)
            return handle
        cgroup = self.cgroups.create(unit.name, spec.memory_limit_bytes)
        (unit / "cgroup").write_text(str(cgroup or ""))
        (unit / "limit").write_text(str(spec.memory_limit_bytes))
        job = " ".join(shlex.quote(c) for c in self.options.command)
        if cgroup is not None:
            enter = f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}"
        else:
            enter = f"ulimit -v {spec.memory_limit_bytes // 1024}"
        # The wrapper enters the cap before the job exists, then outlives it to record its exit code.
        script = f"{enter} || exit 70; {job}; echo $? > {shlex.quote(str(unit / 'exit_code'))}"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_THREAD_LIMIT": "1", "PYTHONUNBUFFERED": "1",
               **self.options.env, **job_env(spec)}
        with (unit / "stdout").open("wb") as out, (unit / "stderr").open("wb") as err:
            proc = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=env, cwd=unit, start_new_session=True)  # survives a dispatcher crash
        (unit / "pid").write_text(str(proc.pid))
        self._children[str(unit)] = proc
        return handle

    def poll(self, handle: Handle) -> Exit | None:
        unit = Path(handle.ref)
        if not unit.is_dir():
            return Exit(exit_code=None, lost=True, reason="the unit directory vanished")
        child = self._children.get(handle.ref)
        running = child.poll() is None if child else _alive(_read_int(unit / "pid"))
        if running:
            return None
        cgroup = _cgroup(unit)
        code = _read_int(unit / "exit_code")
        if code is None and (unit / "killed").exists():
            code = EXIT_SIGKILL  # we killed the wrapper too
        stdout, stderr = _read(unit / "stdout"), _read(unit / "stderr")
        oom = Cgroups.oom_kills(cgroup) > 0
        if cgroup is None and code is not None and code in (EXIT_SIGKILL, 128 + signal.SIGSEGV):
            oom = not (unit / "killed").exists()  # under RLIMIT_AS a failed allocation kills or segfaults
        if code is None:
            return Exit(exit_code=None, oom_killed=oom, lost=not oom, log_tail=tail(stdout + stderr),
                        reason="the job's wrapper died without an exit code")
        peak = Cgroups.peak(cgroup) or peak_from_output(stdout)
        limit = _read_int(unit / "limit")
        if oom and limit:
            peak = max(peak or 0, limit)
        return Exit(exit_code=code, oom_killed=oom, peak_memory_bytes=peak, log_tail=tail(stdout + stderr),
                    reason=last_line(stderr))

    def kill(self, handle: Handle) -> None:
        unit = Path(handle.ref)
        pid = _read_int(unit / "pid")
        if pid is None or not unit.is_dir():
            return
        (unit / "killed").touch()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the wrapper's session: the wrapper and the job

    def cleanup(self, handle: Handle) -> None:
        unit = Path(handle.ref)
        child = self._children.pop(handle.ref, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        Cgroups.remove(_cgroup(unit))
        shutil.rmtree(unit, ignore_errors=True)

    def owned(self) -> Sequence[Handle]:
        out = []
        for unit in sorted(self.units.glob("*-*")) if self.units.is_dir() else []:
            job, _, attempt = unit.name.partition("-")
            if job.isdigit() and attempt.isdigit():
                out.append(Handle(self.name, str(unit), int(job), int(attempt)))
        return out

    def watch(self, wake: Callable[[], None]) -> None:
        """Polled only: the loop's poll interval bounds how late an exit is noticed."""


def _read(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cgroup(unit: Path) -> Path | None:
    text = _read(unit / "cgroup").strip()
    return Path(text) if text else None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"  # a zombie has ended
    except (OSError, IndexError):
        return False
