"""The document workload: validate, then OCR page by page, emitting each page as soon as it is done.

Only a page at a time per worker is ever decoded; workers = CPUs, bounded by how many of the document's
largest page fit in the cell's memory cap. The dispatcher stores each page as it arrives (the checkpoint) and
tells a retried attempt which pages are done, so it resumes at the first missing one.
"""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cell_io import Channel
from .contract import EXIT_OK, BadInput, DocumentInfo, Header, JobOptions, PageResult, Word
from .ocr import PageText, ocr
from .pages import pending, render
from .resources import cpus, need_bytes, workers
from .validate import Document, Limits, Page, inspect


def _lang(header: Header) -> str:
    lang = header.params.get("lang")
    if not lang:
        return header.options.ocr_lang
    if not isinstance(lang, str) or not re.fullmatch(r"[A-Za-z_]+(\+[A-Za-z_]+)*", lang):
        raise BadInput(f"invalid OCR language {lang!r}: expected tesseract codes such as eng or eng+deu")
    return lang


def run(header: Header, document: Path, channel: Channel, scratch: Path) -> int:
    o = header.options
    lang = _lang(header)
    doc = inspect(document, Limits(max_pages=o.max_pages, max_pixels=o.max_pixels, dpi=o.dpi))
    channel.emit(DocumentInfo(job=channel.job, attempt=channel.attempt, media_type=doc.media_type,
                              pages=len(doc.pages)))
    done = set(header.done_pages)
    todo = list(pending(doc, done))
    largest = max(todo, key=lambda p: p.width * p.height, default=None)
    why = f"page {largest.number} is {largest.width} x {largest.height} px" if largest else "no page left"
    need = need_bytes(tuple(todo))
    move_up = channel.need(need)
    if move_up:  # the pages that fit this cap first; a larger tier resumes at the first that does not
        todo = todo[:next(i for i, p in enumerate(todo) if need_bytes((p,)) > header.memory_limit_bytes)]
    n = workers(tuple(todo) or doc.pages, header.memory_limit_bytes, o.ocr_workers or cpus(header.cpus))
    pages = f"{len(doc.pages)} page{'s' if len(doc.pages) != 1 else ''}"
    print(f"{doc.media_type}, {pages}, {len(done & {p.number for p in doc.pages})} already stored, "
          f"{n} worker{'s' if n != 1 else ''}", file=sys.stderr, flush=True)

    def one(page: Page) -> tuple[Page, PageText]:
        return page, _ocr_page(doc, page, scratch, o, lang)

    with ThreadPoolExecutor(n, thread_name_prefix="page") as pool:
        # map() yields in page order while up to n pages are in flight; each is emitted as it comes
        for page, result in pool.map(one, todo):
            channel.emit(PageResult(job=channel.job, attempt=channel.attempt, page=page.number, dpi=page.dpi,
                                    width=page.width, height=page.height, text=result.text,
                                    words=[Word(**w) for w in result.words],
                                    mean_confidence=result.mean_confidence, ocr_seconds=result.seconds))
            print(f"page {page.number}/{len(doc.pages)}: {len(result.words)} words in {result.seconds:.1f} s",
                  file=sys.stderr, flush=True)
    if move_up:  # no page was rendered past the cap: nothing was lost, nothing ran out
        return channel.ask_for_more(need, why)
    channel.done()
    return EXIT_OK


def _ocr_page(doc: Document, page: Page, scratch: Path, o: JobOptions, lang: str) -> PageText:
    image = render(doc, page, scratch)
    try:
        return ocr(image, lang=lang, timeout_s=o.page_timeout_s, dpi=page.dpi)
    finally:
        image.close()  # the page's pixels go before the next page is decoded
