"""The cell's entry point: read the header and the document, run one workload, map its end to an exit code."""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

from .cell_io import Channel, read_header, receive_document
from .contract import (
    ENV_SCRATCH,
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_NO_MEMORY,
    EXIT_TEMPFAIL,
    BadInput,
    Header,
    TempFail,
)


def run(header: Header, channel: Channel, scratch: Path) -> int:
    # Each workload imports what it needs when it runs, so that a cell pays only for its own (issue 12)
    if header.workload == "diag":
        from . import diag

        return diag.run(header.params, channel)
    if header.workload == "probe":
        from . import probe  # sockets, subprocess, json: the hostile test workload only

        return probe.run(header, channel, scratch)
    if header.workload == "ocr":
        from .pipeline import run as run_document  # heavy imports only for the document workload

        document = receive_document(header, sys.stdin.buffer, scratch)
        return run_document(header, document, channel, scratch)
    raise BadInput(f"unknown workload {header.workload!r}: expected 'ocr' or 'diag'")


def main() -> int:
    code = EXIT_ERROR
    channel: Channel | None = None
    header: Header | None = None
    try:
        header = read_header(sys.stdin.buffer)
        channel = Channel(header)
        with tempfile.TemporaryDirectory(dir=os.environ.get(ENV_SCRATCH) or None, prefix="jobcell-") as tmp:
            tempfile.tempdir = tmp  # what libraries write (pytesseract's page files) goes to scratch too, not /tmp
            code = run(header, channel, Path(tmp))
    except BadInput as e:
        print(f"bad input: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except TempFail as e:
        print(f"temporary failure: {e}", file=sys.stderr)
        code = EXIT_TEMPFAIL
    except MemoryError as e:
        print(f"out of memory: {e}" if str(e) else "out of memory", file=sys.stderr)
        code = EXIT_NO_MEMORY
    except Exception as e:  # anything else: retried on the same tier up to max attempts
        import traceback  # only on this path

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]  # the last stderr line is the reason: one line
        print(f"unexpected error: {type(e).__name__}: {first}", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        peak = peak_memory_bytes(header.peak_from if header is not None else "cgroup")
        if channel is not None and peak is not None:
            channel.peak(peak)
        sys.stderr.flush()
    return code


def peak_memory_bytes(source: str = "cgroup") -> int | None:
    """This cell's peak memory: as its cgroup counted it (v1 or v2), or, as a process of the host, the larger of
    its own high-water mark and its largest child's. That is a lower bound of what its processes held together
    (a child's mark counts the pages it shared with this process when it forked, which this process still
    held), exact for one process; the runtime's own samples of the whole tree complete it."""
    if source == "process":
        own = _vm_hwm()
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return max(own or 0, children) or None
    for path in ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None



def _vm_hwm() -> int | None:
    """VmHWM of this process (since its exec: unlike ru_maxrss, nothing of the process that started it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
