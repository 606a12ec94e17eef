"""Decide, before any heavy work, whether a document can be processed, and at which dpi. By content only."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .contract import BadInput

_PAGE_SIZE = re.compile(r"^Page\s+(\d+) size$")
MAGIC = {
    b"%PDF-": "application/pdf",
    b"II*\x00": "image/tiff",
    b"MM\x00*": "image/tiff",
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
}


@dataclass(frozen=True)
class Limits:
    max_pages: int = 2000
    max_pixels: int = 40_000_000  # per page, as rendered: ~40 MB grayscale, a few times that inside tesseract
    dpi: int = 200
    min_dpi: int = 72


@dataclass(frozen=True)
class Page:
    number: int  # 1-based
    dpi: int  # render dpi for PDFs; the image's own for images
    width: int
    height: int


@dataclass(frozen=True)
class Document:
    path: Path
    media_type: str
    pages: tuple[Page, ...]


def sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(1024)
    if not head:
        raise BadInput("the file is empty")
    # PDFs may carry junk before the header; the spec allows it within the first 1024 bytes
    if b"%PDF-" in head:
        return "application/pdf"
    for magic, media_type in MAGIC.items():
        if head.startswith(magic):
            return media_type
    raise BadInput(f"unsupported file type (starts with {head[:8]!r}): expected PDF, TIFF, PNG or JPEG")


def inspect(path: Path, limits: Limits) -> Document:
    media_type = sniff(path)
    pages = _pdf_pages(path, limits) if media_type == "application/pdf" else _image_pages(path, limits)
    if not pages:
        raise BadInput("the document has no pages")
    if len(pages) > limits.max_pages:
        raise BadInput(f"the document has {len(pages)} pages, over the limit of {limits.max_pages} "
                       "(JOBCELL_MAX_PAGES)")
    return Document(path, media_type, tuple(pages))


def _pdf_pages(path: Path, limits: Limits) -> list[Page]:
    from pdf2image import pdfinfo_from_path
    from pdf2image.exceptions import PDFInfoNotInstalledError, PDFPageCountError, PDFSyntaxError

    try:
        info = pdfinfo_from_path(str(path), first_page=1, last_page=limits.max_pages + 1)
    except PDFInfoNotInstalledError as e:
        raise RuntimeError(f"poppler is missing from the image: {e}") from e
    except (PDFPageCountError, PDFSyntaxError) as e:
        text = str(e).lower()
        if "password" in text or "encrypt" in text:
            raise BadInput("the PDF is encrypted and needs a password") from None
        raise BadInput(f"the PDF is corrupt: {_last_line(str(e))}") from None
    count = int(info.get("Pages", 0))
    if count > limits.max_pages:
        raise BadInput(f"the document has {count} pages, over the limit of {limits.max_pages} (JOBCELL_MAX_PAGES)")
    # with -f/-l, pdfinfo prints every page's size ("Page    3 size: 612 x 792 pts"): pages may differ
    sizes = {int(m.group(1)): _pts(str(v)) for k, v in info.items() if (m := _PAGE_SIZE.match(k))}
    default = _pts(str(info.get("Page size", "")))
    return [_fit(n, *sizes.get(n, default), limits) for n in range(1, count + 1)]


def _pts(text: str) -> tuple[float, float]:
    # "612 x 792 pts (letter)" -> (612.0, 792.0)
    parts = text.split()
    try:
        return float(parts[0]), float(parts[2])
    except (IndexError, ValueError):
        return 612.0, 792.0


def _fit(n: int, w_pt: float, h_pt: float, limits: Limits) -> Page:
    """The highest dpi up to limits.dpi at which the page fits the pixel budget; refuse a page that never fits."""
    dpi = limits.dpi
    px = (w_pt / 72 * dpi) * (h_pt / 72 * dpi)
    if px > limits.max_pixels:
        dpi = int(dpi * (limits.max_pixels / px) ** 0.5)
    if dpi < limits.min_dpi:
        at_min = (w_pt / 72 * limits.min_dpi) * (h_pt / 72 * limits.min_dpi)
        raise BadInput(f"page {n} is {w_pt / 72:.0f} x {h_pt / 72:.0f} in: even at {limits.min_dpi} dpi it would be "
                       f"{at_min / 1e6:.0f} Mpx, over the {limits.max_pixels / 1e6:.0f} Mpx budget "
                       "(a decompression bomb, or a page too large to OCR)")
    return Page(n, dpi, int(w_pt / 72 * dpi), int(h_pt / 72 * dpi))


def _image_pages(path: Path, limits: Limits) -> list[Page]:
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning is too late: refuse
        try:
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > limits.max_pages:
                    raise BadInput(f"the image has {frames} frames, over the limit of {limits.max_pages}")
                pages = []
                for i in range(frames):
                    im.seek(i)
                    w, h = im.size
                    if w * h > limits.max_pixels:
                        raise BadInput(f"page {i + 1} is {w} x {h} px ({w * h / 1e6:.0f} Mpx), over the "
                                       f"{limits.max_pixels / 1e6:.0f} Mpx budget (a decompression bomb?)")
                    dpi = im.info.get("dpi", (0, 0))[0]
                    pages.append(Page(i + 1, int(dpi) or 0, w, h))
                return pages
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadInput(f"the image is too large to decode safely: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise BadInput(f"the image is corrupt: {_first_line(str(e))}") from None


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["unreadable"])[-1][:300]


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["unreadable"])[0][:300]
