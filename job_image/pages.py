"""One page at a time: render or decode a single page, hand it over, let it go before the next."""

from __future__ import annotations

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
    from pdf2image import convert_from_path
    from pdf2image.exceptions import PDFPopplerTimeoutError

    # to a file on scratch disk, not a pipe: pdftoppm's output then never sits in our memory twice
    try:
        rendered = convert_from_path(str(path), dpi=page.dpi, first_page=page.number, last_page=page.number,
                                     grayscale=True, fmt="ppm", output_folder=str(scratch), paths_only=True,
                                     output_file=f"p{page.number}", timeout=600)
    except PDFPopplerTimeoutError:
        raise TempFail(f"rendering page {page.number} took longer than 600 s") from None
    if not rendered:
        raise BadInput(f"page {page.number} of the PDF cannot be rendered")
    path_or_image = rendered[0]
    out = str(path_or_image)  # paths_only=True: a path, whatever the stubs say
    try:
        with Image.open(out) as im:
            im.load()
            return im.convert("L") if im.mode != "L" else im.copy()
    finally:
        Path(out).unlink(missing_ok=True)


def pending(doc: Document, done: set[int]) -> Iterator[Page]:
    """The pages still to do, in order: a retried job resumes at its first missing page."""
    return (p for p in doc.pages if p.number not in done)
