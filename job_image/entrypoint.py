"""The job container's entry point: run one workload, map its end to the exit-code contract."""

from __future__ import annotations

import sys
import traceback

from . import diag
from .contract import (
    EXIT_BAD_INPUT,
    EXIT_TEMPFAIL,
    PEAK_MARKER,
    BadInput,
    JobEnv,
    TempFail,
    peak_memory_bytes,
)


def run(env: JobEnv) -> int:
    if env.workload == "diag":
        return diag.run(env.params)
    if env.workload == "ocr":
        from .pipeline import run as run_document  # heavy imports only for the document workload

        return run_document(env)
    raise BadInput(f"unknown workload {env.workload!r}: expected 'ocr' or 'diag'")


def main() -> int:
    code = 1
    try:
        code = run(JobEnv.from_environ())
    except BadInput as e:
        print(f"bad input: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except TempFail as e:
        print(f"temporary failure: {e}", file=sys.stderr)
        code = EXIT_TEMPFAIL
    except MemoryError as e:
        # Same outcome as the cgroup's kill (oom, retried on a bigger tier), when we live to report it.
        print(f"out of memory: {e}" if str(e) else "out of memory", file=sys.stderr)
        code = 137
    except Exception as e:  # anything else: retried on the same tier up to max attempts
        traceback.print_exc()
        print(f"unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        peak = peak_memory_bytes()
        if peak is not None:
            print(f"{PEAK_MARKER}{peak}", flush=True)
        sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
