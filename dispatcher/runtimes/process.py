"""Process runtime: one fresh subprocess per attempt on this host, capped by its own memory cgroup.

For hosts with no container engine (a Render worker, a VM): each job still gets a clean address space and a
hard cap. The cap is a memory cgroup of its own when the host lets us write one (v1: memory.limit_in_bytes and
memory.memsw.limit_in_bytes; v2: memory.max and memory.swap.max under a delegated JOBCELL_CGROUP_ROOT), read
back through the cgroup's OOM counter. Where none can be written (a Render worker), a watchdog thread samples
each unit's process tree (its wrapper's session, its uid when sealed, and their descendants) every 50 ms and
SIGKILLs the tree once its private resident memory (RssAnon + RssShmem, what a cgroup charges) passes the
limit, after writing an `oom` marker that poll() reads as the runtime's own OOM signal; RLIMIT_DATA at 1.25x
the limit stops a single process that allocates faster than that (bench/process_cap.py measured the choice).
A SIGKILL with no marker is nobody's OOM (lost). The unit's peak is the tree's sampled one (its `peak` file,
which survives a dispatcher restart), or the kernel's high-water mark of its largest process where that is
higher. cap="rlimit" keeps the old RLIMIT_AS alone, where an allocation past the cap fails with MemoryError or
the process dies by SIGKILL/SIGSEGV, both read as oom.

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
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from job_image.contract import ENV_SCRATCH, EXIT_BAD_INPUT, EXIT_NEEDS_MORE, EXIT_NO_MEMORY, EXIT_OK, EXIT_SIGKILL

from ..models import MIB, Exit, Handle, LaunchSpec
from ..ports import CellInput
from .base import OpenDocument, RuntimeBase, last_line, no_documents, tail

log = logging.getLogger("jobcell.process")

V1_MEMORY = Path("/sys/fs/cgroup/memory")
Cap = Literal["auto", "rlimit", "watchdog"]


@dataclass(frozen=True)
class ProcessOptions:
    state_root: str = "var/process-units"
    pool: str = "default"
    queue_id: str = ""
    command: tuple[str, ...] = (sys.executable, "-m", "job_image.entrypoint")
    cgroup_root: str | None = None  # v2: a delegated cgroup with +memory in its subtree_control
    cap: Cap = "auto"  # auto: a cgroup where the host allows one, else the watchdog; rlimit: RLIMIT_AS alone
    scratch_bytes: int = 512 * 1024 * 1024  # RLIMIT_FSIZE: no file the job writes grows past this
    first_uid: int = 200_000  # as root: each running unit gets the first free uid from here
    # Where every process runtime on this host claims its units' uids (one file per uid, naming its unit): two
    # dispatchers on one host must never hand out the same uid, since stragglers are killed by uid
    uid_claims: str = "/run/jobcell-uids"
    scratch_root: str = tempfile.gettempdir()  # each unit's scratch dir goes here, 0700 and owned by its uid
    pids_limit: int = 256  # as root: RLIMIT_NPROC of the unit's own uid
    watchdog_s: float = 0.05  # no cgroup: how often each unit's process tree is sampled
    # cap=watchdog: each process's own rlimit, at backstop_ratio x the limit, for a burst faster than the
    # watchdog samples. RLIMIT_DATA counts private writable mappings, close to what is resident; RLIMIT_AS
    # also counts libraries and reserved arenas (4 threads and 30 MiB: 44 MiB resident, 342 MiB of address
    # space). At 1.0x, 8 MiB of reserved stack per thread makes small threaded jobs fail (bench/process_cap.py).
    backstop: Literal["data", "as", "none"] = "data"
    backstop_ratio: float = 1.25


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
        if path is None:
            return
        for _ in range(20):  # busy until the processes just killed have exited
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


class ProcessRuntime(RuntimeBase):
    name = "process"

    def __init__(self, options: ProcessOptions, documents: OpenDocument = no_documents) -> None:
        self.options = options
        self.documents = documents
        self.sealed = os.geteuid() == 0 and all(shutil.which(t) for t in ("setpriv", "unshare", "prlimit"))
        self._uids = threading.Lock()
        self._reaping = threading.Lock()
        self.units = Path(options.state_root).resolve() / options.pool / (options.queue_id or "none")
        no_cgroup = options.cap in ("rlimit", "watchdog")
        self.cgroups = Cgroups(None, 0) if no_cgroup else Cgroups.detect(options.pool, options.cgroup_root)
        self.cap: Literal["cgroup", "rlimit", "watchdog"] = (
            "cgroup" if self.cgroups.root is not None else "rlimit" if options.cap == "rlimit" else "watchdog")
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # ours to reap; adopted units are not
        # Without a cgroup, the watchdog measures each unit's own peak (and under cap=watchdog enforces the cap)
        self.watchdog = Watchdog(self.units, options.watchdog_s) if self.cap != "cgroup" else None
        if self.cap == "rlimit":
            log.warning("no memory cgroup: capping jobs with RLIMIT_AS (address space, not resident memory)")
        elif self.cap == "watchdog":
            backstop = "no rlimit" if options.backstop == "none" else \
                f"RLIMIT_{options.backstop.upper()} at {options.backstop_ratio:.2f}x the limit"
            log.warning("no writable memory cgroup: capping jobs with a watchdog on their process tree's resident "
                        "memory (sampled every %.0f ms) and %s", options.watchdog_s * 1000, backstop)
        if not self.sealed:
            log.warning("process runtime not running as root (or no setpriv/unshare): cells run as this user, "
                        "with this host's network; only their environment is cleared")

    def _dir(self, job_id: int, attempt: int) -> Path:
        return self.units / f"{job_id}-{attempt}"

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        unit = self._dir(spec.job_id, spec.attempt)
        handle = self.handle(str(unit), spec.job_id, spec.attempt)
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
        (unit / "cap").write_text(self.cap)  # how its end reads, whatever a restarted dispatcher is configured with
        # not inside the unit: the state dir's parents need not be traversable by the job's uid
        scratch = Path(tempfile.mkdtemp(prefix=f"jobcell-{unit.name}-", dir=self.options.scratch_root))
        (unit / "scratch").write_text(str(scratch))
        job = " ".join(shlex.quote(c) for c in self._command(unit, scratch))
        enter = self._enter_cap(cgroup, spec.memory_limit_bytes)
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
        if self.watchdog is not None:
            self.watchdog.add(unit)
        return handle

    def _enter_cap(self, cgroup: Path | None, limit: int) -> str:
        """The wrapper's first command: into the cgroup, or the rlimit that all of the job inherits."""
        if cgroup is not None:
            return f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}"
        o = self.options
        if self.cap == "rlimit":
            return f"ulimit -v {limit // 1024}"
        if o.backstop == "none" or o.backstop_ratio <= 0:
            return ":"
        return f"ulimit -{'d' if o.backstop == 'data' else 'v'} {int(limit * o.backstop_ratio) // 1024}"

    def _write_input(self, path: Path, cell: CellInput) -> None:
        """Header and document in one file, readable by the wrapper (us) only: the job gets it as stdin."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # the cell's /sys/fs/cgroup is the host's: it reports its own processes' high-water marks instead
        header = cell.header.model_copy(update={"peak_from": "process"})
        with os.fdopen(fd, "wb") as f:
            f.write(header.model_dump_json().encode() + b"\n")
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
        """A uid no other unit on this host holds, claimed by creating its file (O_EXCL) under uid_claims. A
        claim outlives its unit only if a dispatcher died between the two; one whose unit is gone and whose uid
        runs nothing is taken over."""
        claims = Path(self.options.uid_claims)
        claims.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._uids:
            running = {uid for _, _, uid in proc_table(with_uid=True).values()}  # a straggler of an earlier unit
            for uid in range(self.options.first_uid, self.options.first_uid + 65536):
                if uid in running or not _claim(claims / str(uid), unit):
                    continue
                (unit / "uid").write_text(str(uid))
                return uid
        raise RuntimeError(f"no free uid from {self.options.first_uid}: {claims} holds 65536 claims")

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
                    if rest := f.read():
                        yield rest
                    return
                time.sleep(0.05)

    def _running(self, handle: Handle) -> bool:
        child = self._children.get(handle.ref)
        if child is None:  # adopted: not ours to reap
            return _alive(_read_int(Path(handle.ref) / "pid"))
        with self._reaping:  # the output reader and poll() both ask
            if child.returncode is not None:
                return False
            try:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            except ChildProcessError:
                return child.poll() is None
            if pid == 0:
                return True
            # The wrapper's rusage: the high-water mark of its largest process (its children's counted as they
            # were reaped), a peak no sample may have seen. Kept before the end is visible to poll().
            with contextlib.suppress(OSError):
                _write_atomic(Path(handle.ref) / "maxrss", str(usage.ru_maxrss * 1024))
            child.returncode = os.waitstatus_to_exitcode(status)
            return False

    def poll(self, handle: Handle) -> Exit | None:
        unit = Path(handle.ref)
        if not unit.is_dir():
            return Exit(exit_code=None, lost=True, reason="the unit directory vanished")
        if self._running(handle):
            return None
        cgroup = _cgroup(unit)
        code = _read_int(unit / "exit_code")
        watchdog_oom = _read_int(unit / "oom")  # what its tree held when the watchdog killed it
        if code is None and ((unit / "killed").exists() or watchdog_oom is not None):
            code = EXIT_SIGKILL  # we killed the wrapper too
        stderr = _read(unit / "stderr")  # stdout is the result channel: never copied into logs
        limit = _read_int(unit / "limit")
        if watchdog_oom is not None:  # its peak is what it held when killed (the loop records the limit)
            return Exit(exit_code=code, oom_killed=True, peak_memory_bytes=watchdog_oom, log_tail=tail(stderr),
                        reason=f"out of memory: its processes held {watchdog_oom // MIB} MiB, past its "
                               f"{(limit or 0) // MIB} MiB limit (killed by the process runtime's watchdog)",
                        ran_s=_ran_s(unit))
        oom = Cgroups.oom_kills(cgroup) > 0
        rlimit_as = cgroup is None and _read(unit / "cap") in ("", "rlimit")  # "": a unit from before the watchdog
        if rlimit_as and code is not None and code in (EXIT_SIGKILL, 128 + signal.SIGSEGV):
            oom = not (unit / "killed").exists()  # under RLIMIT_AS a failed allocation kills or segfaults
        if code is None:
            return Exit(exit_code=None, oom_killed=oom, lost=not oom, log_tail=tail(stderr),
                        reason="the job's wrapper died without an exit code")
        # No cgroup: the watchdog's sample of the unit's own tree (the enclosing cgroup's counter, which is all
        # the cell could read, would be the whole host's). A SIGKILL with no marker is nobody's OOM: lost.
        peak = Cgroups.peak(cgroup) if cgroup is not None else _own_peak(unit)
        watchdog = _read(unit / "cap") == "watchdog" and not (unit / "killed").exists()
        ended_by_itself = code in (EXIT_OK, EXIT_BAD_INPUT, EXIT_NEEDS_MORE)
        if watchdog and (code == EXIT_NO_MEMORY or (not ended_by_itself and peak and limit and peak > limit)):
            # RLIMIT_DATA, this runtime's own backstop, refused an allocation between two samples: the cell ran
            # out of memory (its exit 86), or was seen past its limit and then failed however its process put it
            # (tesseract's abort, a segfault). Either way its cap stopped it: oom (the loop records the limit).
            oom = True
        return Exit(exit_code=code, oom_killed=oom, peak_memory_bytes=peak, log_tail=tail(stderr),
                    reason=last_line(stderr), ran_s=_ran_s(unit))

    def kill(self, handle: Handle) -> None:
        unit = Path(handle.ref)
        if _read_int(unit / "pid") is None or not unit.is_dir():
            return
        (unit / "killed").touch()
        _kill_unit(unit)

    def cleanup(self, handle: Handle) -> None:
        unit = Path(handle.ref)
        if self.watchdog is not None:
            self.watchdog.forget(unit)  # before the unit's uid can be given to the next one
        # What outlived the job (a child orphaned by its kill) would count against the next unit with its uid
        _kill_unit(unit, session=False)
        child = self._children.pop(handle.ref, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        Cgroups.remove(_cgroup(unit))
        scratch = _read(unit / "scratch").strip()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        uid = _read_int(unit / "uid")
        shutil.rmtree(unit, ignore_errors=True)
        if uid is not None:  # only now, when nothing of the unit is left, may another unit have its uid
            _release(Path(self.options.uid_claims) / str(uid), unit)

    def memory_now(self, handle: Handle) -> int | None:
        unit = Path(handle.ref)
        cgroup = _cgroup(unit)
        for name in ("memory.usage_in_bytes", "memory.current"):
            with contextlib.suppress(OSError, ValueError):
                return int((cgroup / name).read_text()) if cgroup else None
        watched = self.watchdog.watched(unit) if self.watchdog is not None else None
        return watched.now if watched is not None else None

    def owned(self) -> Sequence[Handle]:
        out = []
        for unit in sorted(self.units.glob("*-*")) if self.units.is_dir() else []:
            job, _, attempt = unit.name.partition("-")
            if job.isdigit() and attempt.isdigit():
                out.append(self.handle(str(unit), int(job), int(attempt)))
        if out and self.watchdog is not None:
            self.watchdog.start()  # a restarted dispatcher's units are watched again from here
        return out

    def watch(self, wake: Callable[[], None]) -> None:
        """Wake the loop when a unit ends (its wrapper writes exit_code), and when the watchdog kills one for
        memory, so that the next job starts then, not at the next poll (bench.small_docs, one-page documents:
        0.45x raw tesseract waiting for the 1 s poll, 0.75x woken)."""
        if self.watchdog is not None:
            self.watchdog.wake = wake
            self.watchdog.start()
        threading.Thread(target=_watch_ends, args=(weakref.ref(self), wake), name="jobcell-process-ends",
                         daemon=True).start()


@dataclass
class _Watched:
    unit: Path
    sid: int  # the wrapper's pid: its session, which the job and its children stay in unless they setsid
    limit: int
    uid: int | None  # sealed: the unit's own uid, which no process of any other unit has
    enforce: bool  # cap=watchdog: kill past the limit; otherwise only measure
    peak: int = 0
    now: int = 0  # private resident memory at the last sample
    written: int = 0
    top_file: int = 0  # RssFile of its largest process at the peak
    killed: bool = False


class Watchdog:
    """One thread for every unit of a runtime without a cgroup: samples each unit's process tree, keeps its peak
    in the unit's `peak` file (so that it survives a dispatcher restart) and, where it enforces the cap, writes
    the unit's `oom` marker and SIGKILLs the tree once its private resident memory passes the limit."""

    def __init__(self, units: Path, every_s: float) -> None:
        self.units, self.every_s = units, every_s
        self.wake: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._watched: dict[Path, _Watched] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="jobcell-watchdog", daemon=True)
                self._thread.start()

    def add(self, unit: Path) -> None:
        watched = _watched(unit)
        if watched is not None:
            with self._lock:
                self._watched.setdefault(unit, watched)
        self.start()

    def watched(self, unit: Path) -> _Watched | None:
        with self._lock:
            return self._watched.get(unit)

    def forget(self, unit: Path) -> None:
        with self._lock:
            self._watched.pop(unit, None)

    def _run(self) -> None:
        rescanned = 0.0
        while True:
            began = time.monotonic()
            if began - rescanned >= 1.0:  # units launched by an earlier dispatcher, adopted from disk
                rescanned = began
                self._rescan()
            with self._lock:
                watched = list(self._watched.values())
                if not watched:  # nothing to watch: the next launch or adoption starts the thread again
                    self._thread = None
                    return
            try:
                self.sample(watched)
            except Exception:  # one bad sample must not end the watch
                log.exception("watchdog: sampling the units failed")
            time.sleep(max(0.0, self.every_s - (time.monotonic() - began)))

    def _rescan(self) -> None:
        for unit in self.units.glob("*-*") if self.units.is_dir() else []:
            if unit in self._watched or (unit / "exit_code").exists():
                continue
            watched = _watched(unit)
            if watched is not None and _alive(watched.sid):
                with self._lock:
                    self._watched.setdefault(unit, watched)

    def sample(self, watched: Sequence[_Watched]) -> None:
        procs = proc_table(any(w.uid is not None for w in watched))
        for w in watched:
            if not w.unit.is_dir():  # cleaned up: its uid may already be the next unit's
                self.forget(w.unit)
                continue
            members = unit_tree(procs, w.sid, w.uid)
            if not _alive(w.sid) and members <= {w.sid}:  # ended, and nothing of it is left
                self._record(w, force=True)
                self.forget(w.unit)
                continue
            memory = tree_memory(members)
            w.now = memory.private
            if memory.private > w.peak:  # the file pages at the peak: poll() takes them off the rusage high-water
                w.peak, w.top_file = memory.private, memory.top_file
            self._record(w)
            if w.enforce and (w.killed or memory.private > w.limit):
                self._kill(w, members, memory.private)

    @staticmethod
    def _record(w: _Watched, force: bool = False) -> None:
        if w.peak > w.written and (force or w.peak - w.written >= MIB // 4) and w.unit.is_dir():
            with contextlib.suppress(OSError):
                _write_atomic(w.unit / "file_rss", str(w.top_file))
                _write_atomic(w.unit / "peak", str(w.peak))
                w.written = w.peak

    def _kill(self, w: _Watched, members: set[int], private: int) -> None:
        if not w.killed:
            w.killed = True
            try:  # first the marker: poll() must never see the end of a unit we killed without it
                _write_atomic(w.unit / "oom", str(private))
            except OSError:  # the unit is being removed: nothing left to record
                return
            log.warning("unit %s: its processes hold %d MiB, past its %d MiB limit: killing them", w.unit.name,
                        private // MIB, w.limit // MIB)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.sid, signal.SIGKILL)
        for pid in members:  # and whatever left the session; killed again on each sample until none is left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.wake()


def _kill_unit(unit: Path, session: bool = True) -> None:
    """SIGKILL every process of the unit: its wrapper's session, and whatever left it (setsid) but not its
    cgroup, or (no cgroup) its uid or its descendants. Without `session`, only by its cgroup or its uid, which
    stay the unit's while its directory exists: a wrapper reaped long ago may have passed its pid on."""
    pid = _read_int(unit / "pid")
    if pid is None:
        return
    if session:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the wrapper's session: the wrapper and the job
    cgroup = _cgroup(unit)
    uid = _read_int(unit / "uid")
    if cgroup is not None:
        escaped = {int(p) for p in _read(cgroup / "cgroup.procs").split() if p.isdigit()}
    elif session or uid is not None:
        escaped = unit_tree(proc_table(uid is not None), pid if session else -1, uid)
    else:
        escaped = set()
    for p in escaped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _watched(unit: Path) -> _Watched | None:
    sid, limit = _read_int(unit / "pid"), _read_int(unit / "limit")
    if sid is None or limit is None:
        return None
    w = _Watched(unit, sid, limit, _read_int(unit / "uid"), enforce=_read(unit / "cap") == "watchdog",
                 killed=(unit / "oom").exists())
    w.peak = w.written = _read_int(unit / "peak") or 0  # what an earlier dispatcher already saw
    w.top_file = _read_int(unit / "file_rss") or 0
    return w


def proc_table(with_uid: bool = False) -> dict[int, tuple[int, int, int | None]]:
    """Every process of this host: pid -> (parent pid, session id, owner uid when asked for)."""
    table: dict[int, tuple[int, int, int | None]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
            try:
                stat = os.read(fd, 1024)
            finally:
                os.close(fd)
            uid = os.stat(f"/proc/{name}").st_uid if with_uid else None
            fields = stat[stat.rindex(b")") + 2:].split(None, 4)  # the name may hold spaces and parentheses
            table[int(name)] = (int(fields[1]), int(fields[3]), uid)
        except (OSError, ValueError, IndexError):  # it ended while we looked
            continue
    return table


def unit_tree(procs: dict[int, tuple[int, int, int | None]], sid: int, uid: int | None) -> set[int]:
    """A unit's processes: its wrapper's session, its own uid's (sealed), and every descendant of those."""
    members = {pid for pid, (_, s, u) in procs.items() if s == sid or (uid is not None and u == uid)}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in members:
                members.add(child)
                todo.append(child)
    return members


class TreeMemory(NamedTuple):
    private: int  # RssAnon + RssShmem summed: what a memory cgroup charges a job whose libraries are cached
    rss: int  # VmRSS summed: adds the file pages (libraries) that other processes share
    top_file: int  # RssFile of the process holding the most private memory


def tree_memory(pids: set[int]) -> TreeMemory:
    private = rss = top_private = top_file = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        kib = {}
        for line in status.splitlines():
            key, _, value = line.partition(b":")
            if key in (b"RssAnon", b"RssShmem", b"RssFile", b"VmRSS"):
                kib[key] = int(value.split()[0]) * 1024
        own = kib.get(b"RssAnon", 0) + kib.get(b"RssShmem", 0)
        private, rss = private + own, rss + kib.get(b"VmRSS", 0)
        if own >= top_private:
            top_private, top_file = own, kib.get(b"RssFile", 0)
    return TreeMemory(private, rss, top_file)


def _watch_ends(runtime: weakref.ref[ProcessRuntime], wake: Callable[[], None], every_s: float = 0.05) -> None:
    """Until the runtime is gone: wake() when a unit's exit_code appears, and once more just after (the wrapper
    may still be exiting when the loop first looks)."""
    seen: set[Path] = set()
    again = False
    while (rt := runtime()) is not None:
        units = rt.units
        del rt  # hold no reference between rounds: a dropped runtime ends this thread
        with contextlib.suppress(OSError):
            ended = {p.parent for p in units.glob("*-*/exit_code")}
            if ended - seen or again:
                wake()
            again, seen = bool(ended - seen), ended
        time.sleep(every_s)


def _claim(path: Path, unit: Path) -> bool:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if Path(_read(path).strip() or "/nonexistent").is_dir():
                return False  # its unit is there: running, or ended and not yet cleaned up
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale (its dispatcher died before cleanup): take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(unit.resolve()))
        return True
    return False


def _release(path: Path, unit: Path) -> None:
    if _read(path).strip() == str(unit.resolve()):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _own_peak(unit: Path) -> int | None:
    """No cgroup: the watchdog's peak of the tree's private memory (a peak between two samples is missed)."""
    # Not the wrapper's rusage high-water mark: the wrapper is forked from the dispatcher, so its ru_maxrss
    # counts the dispatcher's own resident pages at the fork (seen: a 20 MiB job "peaking" past 64 MiB).
    return _read_int(unit / "peak")


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
