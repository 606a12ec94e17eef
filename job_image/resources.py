"""What this container may use: CPUs by its cgroup quota, and how many pages fit side by side in its cap."""

from __future__ import annotations

import math
import os

from .validate import Page

# Measured in the job image (bench/page_memory): python, pdftoppm and tesseract's fixed cost, and what a page
# costs per pixel while it is rendered and OCR'd. Deliberately generous: too few workers is only slower.
BASE_BYTES = 80 * 1024 * 1024
BYTES_PER_PIXEL = 12


# What a cell needs with one page worker, for sizing (contract.Need): fitted to peaks measured in the job image
# under its cgroup (corpus pages of 0.3 to 36 Mpx peaked at 41 to 249 MiB: about 40 MiB plus 5 to 7 bytes a pixel
# for PDF pages rendered to scratch), rounded up so that it errs towards the larger tier.
NEED_BASE_BYTES = 48 * 1024 * 1024
NEED_BYTES_PER_PIXEL = 8


def need_bytes(pages: tuple[Page, ...]) -> int:
    """The memory one page worker needs for the largest of `pages`."""
    largest = max((p.width * p.height for p in pages), default=0)
    return NEED_BASE_BYTES + largest * NEED_BYTES_PER_PIXEL


def cpu_count() -> int:
    """CPUs this container may use: the CFS quota if one is set, else the affinity mask."""
    n = len(os.sched_getaffinity(0))
    for path, parse in (("/sys/fs/cgroup/cpu.max", _v2), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", _v1)):
        try:
            with open(path) as f:
                quota = parse(f.read(), path)
        except (OSError, ValueError):
            continue
        if quota:
            return max(1, min(n, math.ceil(quota)))
    return n


def cpus(counted: float | None) -> int:
    """Page workers: the CPUs admission counted this cell for (at least one), never more than it can use."""
    n = cpu_count()
    return n if counted is None else max(1, min(n, math.ceil(counted)))


def _v2(text: str, _path: str) -> float | None:
    quota, period = text.split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _v1(text: str, path: str) -> float | None:
    quota = int(text)
    if quota <= 0:
        return None
    with open(path.replace("cfs_quota_us", "cfs_period_us")) as f:
        return quota / int(f.read())


def page_bytes(page: Page) -> int:
    return page.width * page.height * BYTES_PER_PIXEL


def workers(pages: tuple[Page, ...], memory_limit_bytes: int, cpus: int) -> int:
    """As many pages at once as there are CPUs, but only as many of the largest page as fit the cap."""
    if not pages or memory_limit_bytes <= 0:
        return 1
    largest = max(page_bytes(p) for p in pages)
    fit = (memory_limit_bytes - BASE_BYTES) // max(largest, 1)
    return int(max(1, min(cpus, fit)))
