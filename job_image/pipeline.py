"""The document workload: fetch, validate, then OCR page by page, storing each page as soon as it is done.

Only a page at a time per worker is ever decoded; workers = CPUs, bounded by how many of the document's
largest page fit in the container's memory cap.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .contract import EXIT_OK, BadInput, JobEnv
from .fetch import fetch
from .manifest import Summariser
from .ocr import PageText, ocr
from .pages import pending, render
from .resources import cpu_count, workers
from .results import PostgresSink, Sink, StdoutSink
from .validate import Document, Limits, Page, inspect


@dataclass(frozen=True)
class Options:
    limits: Limits
    max_bytes: int
    lang: str
    page_timeout_s: float
    scratch: str
    max_workers: int

    @classmethod
    def from_environ(cls) -> Options:
        e = os.environ
        return cls(limits=Limits(max_pages=int(e.get("JOBCELL_MAX_PAGES") or 2000),
                                 max_pixels=int(e.get("JOBCELL_MAX_PIXELS") or 40_000_000),
                                 dpi=int(e.get("JOBCELL_DPI") or 200)),
                   max_bytes=int(e.get("JOBCELL_MAX_INPUT_BYTES") or 200_000_000),
                   lang=e.get("JOBCELL_OCR_LANG") or "eng",
                   page_timeout_s=float(e.get("JOBCELL_PAGE_TIMEOUT_S") or 300),
                   scratch=e.get("JOBCELL_SCRATCH") or tempfile.gettempdir(),
                   max_workers=int(e.get("JOBCELL_OCR_WORKERS") or 0))


def run(env: JobEnv, opts: Options | None = None) -> int:
    o = opts or Options.from_environ()
    lang = env.params.get("lang")
    if lang:  # per-document languages, given at submit
        if not isinstance(lang, str) or not re.fullmatch(r"[A-Za-z_]+(\+[A-Za-z_]+)*", lang):
            raise BadInput(f"invalid OCR language {lang!r}: expected tesseract codes such as eng or eng+deu")
        o = replace(o, lang=lang)
    sink: Sink = PostgresSink(env.database_url, env.job_id, env.attempt) if env.database_url else StdoutSink()
    with tempfile.TemporaryDirectory(dir=o.scratch, prefix="jobcell-") as tmp:
        scratch = Path(tmp)
        doc = inspect(fetch(env.document, scratch, o.max_bytes), o.limits)
        done = sink.done_pages()
        todo = list(pending(doc, done))
        n = workers(doc.pages, env.memory_limit_bytes, o.max_workers or cpu_count())
        pages = f"{len(doc.pages)} page{'s' if len(doc.pages) != 1 else ''}"
        print(f"{doc.media_type}, {pages}, {len(done)} already stored, {n} worker{'s' if n != 1 else ''}",
              file=sys.stderr, flush=True)

        def one(page: Page) -> tuple[Page, PageText]:
            return page, _ocr_page(doc, page, scratch, o)

        with ThreadPoolExecutor(n, thread_name_prefix="page") as pool:
            # map() yields in page order while up to n pages are in flight; each is stored as it comes
            for page, result in pool.map(one, todo):
                sink.put_page(page, result)
                print(f"page {page.number}/{len(doc.pages)}: {len(result.words)} words in {result.seconds:.1f} s",
                      flush=True)
        _manifest(sink)
        sink.complete(doc.media_type, len(doc.pages))
    return EXIT_OK


def _manifest(sink: Sink) -> None:
    summariser = Summariser.from_environ()
    if summariser is None:
        sink.put_manifest(None, None)  # recorded as skipped: no API key configured
        return
    manifest = summariser.manifest(sink.page_texts())
    sink.put_manifest(summariser.model, manifest.model_dump())
    print(f"manifest: {manifest.document_type}, {summariser.calls} LLM call(s)", file=sys.stderr, flush=True)


def _ocr_page(doc: Document, page: Page, scratch: Path, o: Options) -> PageText:
    image = render(doc, page, scratch)
    try:
        return ocr(image, lang=o.lang, timeout_s=o.page_timeout_s, dpi=page.dpi)
    finally:
        image.close()  # the page's pixels go before the next page is decoded
