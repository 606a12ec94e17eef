"""One page at a time: render or decode a single page, hand it over, let it go before the next."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from .contract import BadInput, TempFail
from .validate import Document, Page


def render(doc: Document, page: Page, scratch: Path) -> Image.Image:
    """The page as an 8-bit grayscale image. Only this page is ever decoded.

    A page whose data cannot be decoded is bad input: the same bytes will fail the same way on any retry."""
    if doc.media_type == "application/pdf":
        return _pdf_page(doc.path, page, scratch)
    try:
        with Image.open(doc.path) as im:
            im.seek(page.number - 1)
            return im.convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"page {page.number} of the image is corrupt: {e}") from None


def _pdf_page(path: Path, page: Page, scratch: Path) -> Image.Image:
    """pdftoppm for this one page, to a file on scratch (its output never sits in our memory twice). Run
    directly rather than through pdf2image: how it ended tells a memory kill from a page that cannot render."""
    out = scratch / f"p{page.number}"
    try:
        done = subprocess.run(["pdftoppm", "-r", str(page.dpi), "-f", str(page.number), "-l", str(page.number),
                               "-gray", "-singlefile", str(path), str(out)], capture_output=True, timeout=600,
                              check=False)
    except subprocess.TimeoutExpired:
        raise TempFail(f"rendering page {page.number} took longer than 600 s") from None
    if done.returncode in (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV):
        # killed by the memory cgroup, or a native allocation that failed: never the document's fault
        raise MemoryError(f"pdftoppm died by signal {-done.returncode} on page {page.number}")
    rendered = out.with_suffix(".pgm")
    if done.returncode != 0 or not rendered.exists():
        detail = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1][:200]
        raise BadInput(f"page {page.number} of the PDF cannot be rendered" + (f": {detail}" if detail else ""))
    try:
        with Image.open(rendered) as im:
            im.load()
            return im.convert("L") if im.mode != "L" else im.copy()
    finally:
        rendered.unlink(missing_ok=True)


def pending(doc: Document, done: set[int]) -> Iterator[Page]:
    """The pages still to do, in order: a retried job resumes at its first missing page."""
    return (p for p in doc.pages if p.number not in done)
