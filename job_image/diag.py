"""The diagnostic workload: allocate N MiB, sleep, exit with a code. Tests drive real OOM kills with it."""

from __future__ import annotations

import sys
import time
from typing import Any

from .cell_io import Channel
from .contract import EXIT_OK, BadInput, DocumentInfo

_STEP = 8 * 1024 * 1024


def run(params: dict[str, Any], channel: Channel) -> int:
    unknown = set(params) - {"alloc_mib", "sleep_s", "exit_code", "message", "step_sleep_s", "need_mib"}
    if unknown:
        raise BadInput(f"diagnostic workload: unknown parameters {sorted(unknown)}")
    need = int(float(params.get("need_mib", 0)) * 1024 * 1024)
    if "need_mib" in params and channel.need(need):
        return channel.ask_for_more(need, "as told")
    held = []
    remaining = int(float(params.get("alloc_mib", 0)) * 1024 * 1024)
    while remaining > 0:
        n = min(_STEP, remaining)
        held.append(b"\x5a" * n)  # written, not just reserved: the pages count against the cgroup
        remaining -= n
        if params.get("step_sleep_s"):
            time.sleep(float(params["step_sleep_s"]))
    print(f"allocated {sum(map(len, held)) // (1024 * 1024)} MiB", file=sys.stderr, flush=True)
    time.sleep(float(params.get("sleep_s", 0)))
    if params.get("message"):
        print(str(params["message"]), file=sys.stderr, flush=True)
    code = int(params.get("exit_code", 0))
    if code == EXIT_OK:
        channel.emit(DocumentInfo(job=channel.job, attempt=channel.attempt, media_type="application/x-jobcell-diag",
                                  pages=0))
        channel.done()
    return code
