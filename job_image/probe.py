"""The hostile workload: what a document that got code execution in a cell would try. Tests run it to show
that a cell reaches nothing but its own input and can emit nothing but its own attempt's records.

`mode` picks the attack. `escape` tries every way out and reports on stderr (as one JSON line) what it
managed; the tests check the same from outside. The other modes abuse the result channel.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .cell_io import Channel
from .contract import EXIT_OK, BadInput, DocumentInfo, Header, PageResult, Word


def run(header: Header, channel: Channel, scratch: Path) -> int:
    mode = header.params.get("mode", "escape")
    job, attempt = channel.job, channel.attempt
    if mode == "escape":
        report = escape(header.params, scratch)
        print("probe " + json.dumps(report, sort_keys=True), file=sys.stderr, flush=True)
        channel.emit(DocumentInfo(job=job, attempt=attempt, media_type="application/x-jobcell-probe", pages=0))
        channel.done()
        return EXIT_OK
    if mode == "other_job":  # results for another job's page
        channel.emit(DocumentInfo(job=job, attempt=attempt, media_type="application/pdf", pages=1))
        channel.emit(_page(int(header.params["target_job"]), 1, 1, "forged"))
    elif mode == "too_many_pages":  # declares 1 page, sends 10
        channel.emit(DocumentInfo(job=job, attempt=attempt, media_type="application/pdf", pages=1))
        for n in range(1, 11):
            channel.emit(_page(job, attempt, n, f"page {n}"))
    elif mode == "huge_words":  # 100 MB of words in one page
        channel.emit(DocumentInfo(job=job, attempt=attempt, media_type="application/pdf", pages=1))
        word = json.dumps({"text": "x" * 900, "left": 0, "top": 0, "width": 1, "height": 1, "conf": 1.0})
        out = os.fdopen(os.dup(channel._out.fileno()), "wb")  # bypass the model: a raw, enormous line
        start = {"job": job, "attempt": attempt, "type": "page", "page": 1, "dpi": 200, "width": 1, "height": 1,
                 "text": "", "ocr_seconds": 0}
        out.write(json.dumps(start).encode()[:-1] + b', "words": [')
        chunk = ((word + ",") * 1000).encode()
        with contextlib.suppress(BrokenPipeError, OSError):
            for _ in range(100 * 1024 * 1024 // len(chunk)):
                out.write(chunk)
            out.write(word.encode() + b"]}\n")
            out.flush()
    elif mode == "malformed":
        channel._out.write(b"this is not a record\n")
    elif mode == "forge_state":  # a record kind that does not exist, claiming the job succeeded
        state = {"job": job, "attempt": attempt, "type": "state", "state": "succeeded"}
        channel._out.write(json.dumps(state).encode() + b"\n")
    elif mode == "forge_done":  # claims done with pages missing, exits 0
        channel.emit(DocumentInfo(job=job, attempt=attempt, media_type="application/pdf", pages=3))
        channel.emit(_page(job, attempt, 1, "page 1"))
        channel.done()
    elif mode == "silent_success":  # exit 0 without a single record
        return EXIT_OK
    else:
        raise BadInput(f"probe: unknown mode {mode!r}")
    time.sleep(float(header.params.get("linger_s", 5)))  # give the dispatcher time to refuse and kill us
    return EXIT_OK


def _page(job: int, attempt: int, n: int, text: str) -> PageResult:
    return PageResult(job=job, attempt=attempt, page=n, dpi=200, width=10, height=10, text=text,
                      words=[Word(text=text, left=0, top=0, width=1, height=1, conf=90.0)], ocr_seconds=0.1)


def escape(params: dict[str, Any], scratch: Path) -> dict[str, Any]:
    secrets = [s for s in params.get("secrets", []) if s]
    return {
        "uid": os.getuid(),
        "env_names": sorted(os.environ),
        "secrets_seen": _secrets_seen(secrets),
        "tcp": {f"{h}:{p}": _connect(h, int(p)) for h, p in params.get("tcp", [])},
        "dns": {name: _resolve(name) for name in params.get("dns", [])},
        "read": {path: _readable(path) for path in params.get("read", [])},
        "write": {path: _writable(path) for path in params.get("write", [])},
        "scratch_fill_mib": _fill(scratch, int(params.get("fill_mib", 0))),
        "exec_from_scratch": _exec_from(scratch),
        "forks": _fork_bomb(int(params.get("forks", 0))),
    }


def _secrets_seen(secrets: list[str]) -> list[str]:
    """Which of the given secrets appear in this cell's environment or in any /proc/*/environ or cmdline."""
    blobs = ["\n".join(f"{k}={v}" for k, v in os.environ.items())]
    for proc in Path("/proc").glob("[0-9]*"):
        for name in ("environ", "cmdline"):
            with contextlib.suppress(OSError):
                blobs.append((proc / name).read_bytes().decode(errors="replace"))
    return [s for s in secrets if any(s in b for b in blobs)]


def _connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=2):
            return "connected"
    except OSError as e:
        return f"refused: {e.strerror or e}"


def _resolve(name: str) -> str:
    try:
        return "resolved " + socket.gethostbyname(name)
    except OSError as e:
        return f"failed: {e}"


def _readable(path: str) -> str:
    p = Path(path)
    try:
        if p.is_dir():
            return f"listed {len(list(p.iterdir()))} entries"
        return f"read {len(p.read_bytes())} bytes"
    except OSError as e:
        return f"denied: {e.strerror}"


def _writable(path: str) -> str:
    try:
        Path(path).write_bytes(b"x")
        return "written"
    except OSError as e:
        return f"denied: {e.strerror}"


def _fill(scratch: Path, mib: int) -> int:
    """MiB written to scratch before it refused more."""
    written = 0
    block = b"\0" * (1024 * 1024)
    try:
        with (scratch / "fill").open("wb") as f:
            for _ in range(mib):
                f.write(block)
                f.flush()
                written += 1
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            (scratch / "fill").unlink()
    return written


def _exec_from(scratch: Path) -> str:
    script = scratch / "run.sh"
    try:
        script.write_text("#!/bin/sh\necho ran\n")
        script.chmod(0o700)
        out = subprocess.run([str(script)], capture_output=True, timeout=5, check=False)
        return "executed" if out.stdout.strip() == b"ran" else f"failed ({out.returncode})"
    except OSError as e:
        return f"denied: {e.strerror}"


def _fork_bomb(n: int) -> int:
    """How many children could be started, up to n (each sleeps until killed)."""
    children: list[int] = []
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:  # exec at once: a forked Python's copied pages would hit the memory cap first
                try:
                    os.execv("/bin/sleep", ["sleep", "30"])
                finally:
                    os._exit(0)
            children.append(pid)
    except OSError:
        pass
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return len(children)
