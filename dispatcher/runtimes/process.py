"""Process runtime: one fresh subprocess per attempt on this host, capped by its own memory cgroup.

For hosts with no container engine (a Render worker, a VM): each job still gets a clean address space and a
hard cap. The cap is a memory cgroup of its own when the host lets us write one (v1: memory.limit_in_bytes and
memory.memsw.limit_in_bytes; v2: memory.max and memory.swap.max under a delegated JOBCELL_CGROUP_ROOT), read
back through the cgroup's OOM counter; otherwise RLIMIT_AS, where an allocation past the cap fails with
MemoryError or the process dies by SIGKILL/SIGSEGV, both read as oom.

Every attempt has a unit directory (state_root/pool/queue_id/job-attempt) holding its input (header and
document), its output (the result channel), its stderr, its pid and the exit code that a small shell wrapper
writes when the job ends. The wrapper, not the dispatcher, is the job's parent, so the exit code survives a
dispatcher crash and a restarted dispatcher adopts the unit from disk and reads its output again.

Sealing: the job gets a cleared environment (nothing of the dispatcher's). Run as root (as on a VM), it also
runs under a uid of its own per unit, in a network namespace with no interface but a down loopback, with no
capabilities, and can read none of the unit files (0600 root): its input is opened for it by the wrapper.
Not root (as on a Render worker), it runs as the dispatcher's user with the host's network: the README says so.
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
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from job_image.contract import ENV_SCRATCH, EXIT_SIGKILL

from ..models import Exit, Handle, LaunchSpec
from ..ports import CellInput
from . import last_line, tail

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
    scratch_bytes: int = 512 * 1024 * 1024  # RLIMIT_FSIZE: no file the job writes grows past this
    first_uid: int = 200_000  # as root: each running unit gets the first free uid from here
    scratch_root: str = tempfile.gettempdir()  # each unit's scratch dir goes here, 0700 and owned by its uid
    pids_limit: int = 256  # as root: RLIMIT_NPROC of the unit's own uid


OpenDocument = Callable[[str], tuple[BinaryIO, int]]


def _no_documents(uri: str) -> tuple[BinaryIO, int]:
    raise LookupError(f"no document store is configured to open {uri}")


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

    def __init__(self, options: ProcessOptions, documents: OpenDocument = _no_documents) -> None:
        self.options = options
        self.documents = documents
        self.sealed = os.geteuid() == 0 and all(shutil.which(t) for t in ("setpriv", "unshare", "prlimit"))
        self._uids = threading.Lock()
        self.units = Path(options.state_root).resolve() / options.pool / (options.queue_id or "none")
        rlimit_only = options.cap == "rlimit"
        self.cgroups = Cgroups(None, 0) if rlimit_only else Cgroups.detect(options.pool, options.cgroup_root)
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # ours to reap; adopted units are not
        if self.cgroups.root is None:
            log.warning("no writable memory cgroup: capping jobs with RLIMIT_AS (address space, not resident memory)")
        if not self.sealed:
            log.warning("process runtime not running as root (or no setpriv/unshare): cells run as this user, "
                        "with this host's network; only their environment is cleared")

    def _dir(self, job_id: int, attempt: int) -> Path:
        return self.units / f"{job_id}-{attempt}"

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        unit = self._dir(spec.job_id, spec.attempt)
        handle = Handle(self.name, str(unit), spec.job_id, spec.attempt)
        try:
            unit.mkdir(parents=True, mode=0o711)  # traversable, not listable: the job only reaches scratch/
        except FileExistsError:
            log.info("job %s attempt %s: unit already exists, not launching again", spec.job_id, spec.attempt)
            return handle
        self._write_input(unit / "input", cell)
        for name in ("stdout", "stderr"):  # there before the reader looks; the job gets them as open fds only
            os.close(os.open(unit / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        cgroup = self.cgroups.create(unit.name, spec.memory_limit_bytes)
        (unit / "cgroup").write_text(str(cgroup or ""))
        (unit / "limit").write_text(str(spec.memory_limit_bytes))
        # not inside the unit: the state dir's parents need not be traversable by the job's uid
        scratch = Path(tempfile.mkdtemp(prefix=f"jobcell-{unit.name}-", dir=self.options.scratch_root))
        (unit / "scratch").write_text(str(scratch))
        job = " ".join(shlex.quote(c) for c in self._command(unit, scratch))
        if cgroup is not None:
            enter = f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}"
        else:
            enter = f"ulimit -v {spec.memory_limit_bytes // 1024}"
        q = {name: shlex.quote(str(unit / name)) for name in ("input", "stdout", "stderr", "exit_code")}
        # The wrapper enters the cap before the job exists, opens its files for it, then outlives it to record
        # its exit code. RLIMIT_FSIZE bounds every file the job writes, its output and scratch files alike.
        script = (f"{enter} || exit 70; ulimit -f {self.options.scratch_bytes // 512}; "
                  f"{job} <{q['input']} >{q['stdout']} 2>{q['stderr']}; echo $? > {q['exit_code']}")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "OMP_THREAD_LIMIT": "1",
               "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(scratch),
               ENV_SCRATCH: str(scratch)}
        proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, cwd=scratch,
                                start_new_session=True)  # survives a dispatcher crash
        (unit / "pid").write_text(str(proc.pid))
        self._children[str(unit)] = proc
        return handle

    def _write_input(self, path: Path, cell: CellInput) -> None:
        """Header and document in one file, readable by the wrapper (us) only: the job gets it as stdin."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cell.header_line())
            if cell.header.document_bytes:
                document, _size = self.documents(cell.document_uri)
                with document:
                    shutil.copyfileobj(document, f, 1024 * 1024)

    def _command(self, unit: Path, scratch: Path) -> list[str]:
        command = list(self.options.command)
        if not self.sealed:
            return command
        uid = self._free_uid(unit)
        os.chown(scratch, uid, uid)
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]
        nproc = ["prlimit", f"--nproc={self.options.pids_limit}", "--"]  # counted per uid: each unit has its own
        return ["unshare", "--net", "--", *nproc, *drop, *command]  # a network namespace of its own: no way out

    def _free_uid(self, unit: Path) -> int:
        with self._uids:
            taken = {_read_int(u / "uid") for u in self.units.glob("*-*")}
            uid = next(n for n in range(self.options.first_uid, self.options.first_uid + 65536) if n not in taken)
            (unit / "uid").write_text(str(uid))
            return uid

    def output(self, handle: Handle) -> Iterator[bytes]:
        """The unit's stdout file from its start, followed until the unit has ended and all of it is read."""
        unit = Path(handle.ref)
        try:
            f = (unit / "stdout").open("rb")
        except FileNotFoundError:
            return
        with f:
            while True:
                chunk = f.read(256 * 1024)
                if chunk:
                    yield chunk
                    continue
                if not unit.is_dir() or not self._running(handle):
                    rest = f.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.05)

    def _running(self, handle: Handle) -> bool:
        child = self._children.get(handle.ref)
        return child.poll() is None if child else _alive(_read_int(Path(handle.ref) / "pid"))

    def poll(self, handle: Handle) -> Exit | None:
        unit = Path(handle.ref)
        if not unit.is_dir():
            return Exit(exit_code=None, lost=True, reason="the unit directory vanished")
        if self._running(handle):
            return None
        cgroup = _cgroup(unit)
        code = _read_int(unit / "exit_code")
        if code is None and (unit / "killed").exists():
            code = EXIT_SIGKILL  # we killed the wrapper too
        stderr = _read(unit / "stderr")  # stdout is the result channel: never copied into logs
        oom = Cgroups.oom_kills(cgroup) > 0
        if cgroup is None and code is not None and code in (EXIT_SIGKILL, 128 + signal.SIGSEGV):
            oom = not (unit / "killed").exists()  # under RLIMIT_AS a failed allocation kills or segfaults
        if code is None:
            return Exit(exit_code=None, oom_killed=oom, lost=not oom, log_tail=tail(stderr),
                        reason="the job's wrapper died without an exit code")
        # no cgroup: the enclosing one's counter would be the whole host's; the cell's own report is used
        return Exit(exit_code=code, oom_killed=oom, peak_memory_bytes=Cgroups.peak(cgroup), log_tail=tail(stderr),
                    reason=last_line(stderr), ran_s=_ran_s(unit))

    def kill(self, handle: Handle) -> None:
        unit = Path(handle.ref)
        pid = _read_int(unit / "pid")
        if pid is None or not unit.is_dir():
            return
        (unit / "killed").touch()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the wrapper's session: the wrapper and the job
        cgroup = _cgroup(unit)  # and whatever left the session (setsid) but not the cgroup
        for line in _read(cgroup / "cgroup.procs").split() if cgroup else []:
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(line), signal.SIGKILL)

    def cleanup(self, handle: Handle) -> None:
        unit = Path(handle.ref)
        child = self._children.pop(handle.ref, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        Cgroups.remove(_cgroup(unit))
        scratch = _read(unit / "scratch").strip()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
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


def _ran_s(unit: Path) -> float | None:
    """From the pid file (written at launch) to the exit code (written by the wrapper as the job ended)."""
    try:
        return max(0.0, (unit / "exit_code").stat().st_mtime - (unit / "pid").stat().st_mtime)
    except OSError:
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
