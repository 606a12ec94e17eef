"""The cell's entry point: read the header and the document, run one workload, map its end to an exit code."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

from . import diag, probe
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
    if header.workload == "diag":
        return diag.run(header.params, channel)
    if header.workload == "probe":
        return probe.run(header, channel, scratch)
    if header.workload == "ocr":
        from .pipeline import run as run_document  # heavy imports only for the document workload

        document = receive_document(header, sys.stdin.buffer, scratch)
        return run_document(header, document, channel, scratch)
    raise BadInput(f"unknown workload {header.workload!r}: expected 'ocr' or 'diag'")


def main() -> int:
    code = EXIT_ERROR
    channel: Channel | None = None
    try:
        header = read_header(sys.stdin.buffer)
        channel = Channel(header)
        with tempfile.TemporaryDirectory(dir=os.environ.get(ENV_SCRATCH) or None, prefix="jobcell-") as tmp:
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
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]  # the last stderr line is the reason: one line
        print(f"unexpected error: {type(e).__name__}: {first}", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        peak = peak_memory_bytes()
        if channel is not None and peak is not None:
            channel.peak(peak)
        sys.stderr.flush()
    return code


def peak_memory_bytes() -> int | None:
    """This cell's peak memory as its cgroup counted it (v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
