"""The "seeds' model" for bench.small_docs: one long-lived process, imports done once, a pool of threads each
running the cell's own pipeline (job_image.pipeline.run) on one document at a time. No container, no cell
process, no queue, no database: the floor that a warm worker with the same pipeline reaches.

    python -m bench._warm_worker THREADS DOC...

Prints `ready` once imported, waits for one line on stdin, OCRs every document, prints `done SECONDS FAILED`,
then waits for one more line before it exits (so that the bench can read its CPU and memory first).
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from job_image.cell_io import Channel
from job_image.contract import Header
from job_image.pipeline import run


def one(i: int, doc: Path) -> int:
    header = Header(job_id=i, attempt=1, tier="small", memory_limit_bytes=512 * 1024 * 1024, workload="ocr",
                    document_name=doc.name, document_bytes=doc.stat().st_size)
    out = io.BytesIO()  # the records, as a cell would write them to its stdout
    with tempfile.TemporaryDirectory(prefix="jobcell-warm-") as scratch:
        return run(header, doc, Channel(header, out=out), Path(scratch))


def main() -> int:
    threads, docs = int(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    failed = 0
    with ThreadPoolExecutor(threads) as pool:
        for code in pool.map(one, range(1, len(docs) + 1), docs):
            failed += code != 0
    print(f"done {time.monotonic() - t0:.3f} {failed}", flush=True)
    sys.stdin.readline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
