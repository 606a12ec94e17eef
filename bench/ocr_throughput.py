"""Pages per second of the job against the raw `tesseract` CLI with one thread, on the same rendered pages.

    .venv/bin/python -m bench.ocr_throughput [--pages 20] [--dpi 200]

The pages of a generated scan are rendered once to grayscale PNGs. The raw side runs `tesseract page.png`
over them one after another (OMP_THREAD_LIMIT=1) inside the job image; the job side gets the same pixels as one
multi-page TIFF and runs its whole pipeline (decode one frame, OCR, words with boxes) with one CPU, then with
every CPU the machine has. Target: job (1 CPU) / raw >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import docker
from PIL import Image

from ._support import JOB_IMAGE, run_job, scanned_pdf

RAW = 'for f in /store/p-*.png; do tesseract "$f" - --dpi {dpi} -l eng > /dev/null 2>&1 || exit 1; done'


def render_pages(client: docker.DockerClient, store: Path, pdf: str, dpi: int) -> list[Path]:
    client.containers.run(JOB_IMAGE, entrypoint=["pdftoppm", "-gray", "-png", "-r", str(dpi), f"/store/{pdf}",
                                                 "/store/p"], user="0:0", remove=True, network_mode="none",
                          volumes={str(store): {"bind": "/store", "mode": "rw"}})
    return sorted(store.glob("p-*.png"))


def raw_tesseract(client: docker.DockerClient, store: Path, dpi: int) -> float:
    t0 = time.monotonic()
    client.containers.run(JOB_IMAGE, entrypoint=["sh", "-c", RAW.format(dpi=dpi)], remove=True,
                          network_mode="none", environment={"OMP_THREAD_LIMIT": "1"}, nano_cpus=int(1e9),
                          volumes={str(store): {"bind": "/store", "mode": "ro"}})
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--dpi", type=int, default=200)
    a = ap.parse_args()
    client = docker.from_env()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        store.chmod(0o777)
        scanned_pdf(store / "scan.pdf", a.pages, a.dpi)
        pngs = render_pages(client, store, "scan.pdf", a.dpi)
        frames = [Image.open(p) for p in pngs]
        frames[0].save(store / "scan.tif", save_all=True, append_images=frames[1:], compression="tiff_deflate",
                       dpi=(a.dpi, a.dpi))
        for p in store.iterdir():
            p.chmod(0o644)
        raw1_s = raw_tesseract(client, store, a.dpi)
        _, job1_s, _ = run_job(client, store, "scan.tif", memory="2g", cpus=1.0, ocr_workers=1)
        cpus = os.cpu_count() or 1
        _, jobn_s, _ = run_job(client, store, "scan.tif", memory="2g")
        raw2_s = raw_tesseract(client, store, a.dpi)  # again after the job: drift shows as a difference
    raw_s = min(raw1_s, raw2_s)
    n = len(pngs)
    print(f"{n} pages at {a.dpi} dpi")
    print(f"raw tesseract, 1 thread:      {n / raw_s:5.2f} pages/s  "
          f"(best of {raw1_s:.1f} s before the job, {raw2_s:.1f} s after)")
    print(f"job, 1 CPU, 1 worker:         {n / job1_s:5.2f} pages/s  ({job1_s:.1f} s)")
    print(f"job, {cpus} CPUs, {cpus} workers:      {n / jobn_s:5.2f} pages/s  ({jobn_s:.1f} s)")
    print(f"\njob (1 CPU) / raw = {raw_s / job1_s:.2f} (target >= 0.9); job ({cpus} CPUs) / raw = {raw_s / jobn_s:.2f}")


if __name__ == "__main__":
    main()
