"""The document workload: fetch, validate, then OCR one page at a time, storing each page as it is done."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

from .contract import EXIT_OK, JobEnv
from .fetch import fetch
from .ocr import ocr
from .pages import pending, render
from .results import PostgresSink, Sink, StdoutSink
from .validate import Limits, inspect


def _int_env(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def run(env: JobEnv) -> int:
    limits = Limits(max_pages=_int_env("JOBCELL_MAX_PAGES", 2000),
                    max_pixels=_int_env("JOBCELL_MAX_PIXELS", 40_000_000),
                    dpi=_int_env("JOBCELL_DPI", 200))
    max_bytes = _int_env("JOBCELL_MAX_INPUT_BYTES", 200_000_000)
    lang = os.environ.get("JOBCELL_OCR_LANG", "eng")
    page_timeout = float(os.environ.get("JOBCELL_PAGE_TIMEOUT_S") or 300)
    scratch_root = os.environ.get("JOBCELL_SCRATCH") or tempfile.gettempdir()
    sink: Sink = PostgresSink(env.database_url, env.job_id, env.attempt) if env.database_url else StdoutSink()
    with tempfile.TemporaryDirectory(dir=scratch_root, prefix="jobcell-") as tmp:
        scratch = Path(tmp)
        doc = inspect(fetch(env.document, scratch, max_bytes), limits)
        done = sink.done_pages()
        if done:
            print(f"resuming: {len(done)} of {len(doc.pages)} pages already stored", file=sys.stderr, flush=True)
        for page in pending(doc, done):
            image = render(doc, page, scratch)
            result = ocr(image, lang=lang, timeout_s=page_timeout, dpi=page.dpi)
            image.close()
            del image
            sink.put_page(page, result)
            print(f"page {page.number}/{len(doc.pages)}: {len(result.words)} words in {result.seconds:.1f} s",
                  flush=True)
            gc.collect()  # hand the page's buffers back before the next page is decoded
        sink.complete(doc.media_type, len(doc.pages))
    return EXIT_OK
