"""OCR of one page with tesseract: the text, and every word with its box and confidence."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytesseract
from PIL import Image

from .contract import BadInput, TempFail


@dataclass(frozen=True)
class PageText:
    text: str
    words: list[dict[str, Any]]
    mean_confidence: float | None
    seconds: float


def ocr(image: Image.Image, lang: str = "eng", timeout_s: float = 300, dpi: int = 0) -> PageText:
    started = time.monotonic()
    config = f"--psm 3 --dpi {dpi}" if dpi else "--psm 3"
    if image.format is None:  # decoded or converted here: handed to tesseract as PNM, not PNG (issue 12)
        # pytesseract writes the page to a file for tesseract to read; as PNG that costs about 60 ms of zlib a
        # letter page and as much again to decode, PNM a copy (the file goes to the cell's capped scratch)
        image.format = "PPM"
    try:
        data = pytesseract.image_to_data(image, lang=lang, config=config, timeout=timeout_s,
                                         output_type=pytesseract.Output.DICT)
    except pytesseract.TesseractError as e:
        if e.status in (-9, 137):  # SIGKILLed: in a capped container, the memory cgroup's doing
            raise MemoryError(f"tesseract was killed on a {image.width}x{image.height} page") from e
        if e.status in (-6, 134) and "malloc" in str(e.message):  # an allocation failed under RLIMIT
            raise MemoryError(f"tesseract ran out of memory on a {image.width}x{image.height} page") from e
        if "Failed loading language" in str(e.message):
            raise BadInput(f"OCR language {lang!r} is not installed in the job image") from None
        raise
    except RuntimeError as e:
        if "timeout" in str(e).lower():
            raise TempFail(f"tesseract took longer than {timeout_s:.0f} s on one page") from e
        raise
    words: list[dict[str, Any]] = []
    lines: dict[tuple[int, int, int], list[str]] = {}
    for i, word in enumerate(data["text"]):
        if not str(word).strip():
            continue
        conf = float(data["conf"][i])
        words.append({"text": str(word), "left": int(data["left"][i]), "top": int(data["top"][i]),
                      "width": int(data["width"][i]), "height": int(data["height"][i]), "conf": conf})
        lines.setdefault((data["block_num"][i], data["par_num"][i], data["line_num"][i]), []).append(str(word))
    text = _join(lines)
    confs = [w["conf"] for w in words if w["conf"] >= 0]
    return PageText(text, words, sum(confs) / len(confs) if confs else None, time.monotonic() - started)


def _join(lines: dict[tuple[int, int, int], list[str]]) -> str:
    out: list[str] = []
    last_par: tuple[int, int] | None = None
    for (block, par, _), words in lines.items():
        if last_par is not None and (block, par) != last_par:
            out.append("")
        out.append(" ".join(words))
        last_par = (block, par)
    return "\n".join(out)
