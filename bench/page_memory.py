"""Peak memory of the job against page count, side by side with rendering every page at once.

    .venv/bin/python -m bench.page_memory [--pages 5 50 150] [--dpi 200]

For each length, a generated 200-dpi scan goes through (a) the job image's page-at-a-time pipeline and
(b) the way the original worker did it, pdf2image.convert_from_path on the whole document at once, in the same
image with the same cgroup counter. Target: the job's 150-page peak within 1.25x of its 5-page peak.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import docker

from ._support import JOB_IMAGE, PEAK, mib, run_job, scanned_pdf

ALL_AT_ONCE = f"""
import sys
from pdf2image import convert_from_path
pages = convert_from_path(sys.argv[1], dpi=int(sys.argv[2]))  # every page rendered and held at once
print(len(pages), "pages rendered")
print("{PEAK}" + open("/sys/fs/cgroup/memory/memory.max_usage_in_bytes").read().strip()
      if __import__("os").path.exists("/sys/fs/cgroup/memory/memory.max_usage_in_bytes")
      else "{PEAK}" + open("/sys/fs/cgroup/memory.peak").read().strip())
"""


def all_at_once(client: docker.DockerClient, store: Path, name: str, dpi: int, memory: str = "12g") -> int:
    out = client.containers.run(JOB_IMAGE, entrypoint=["python", "-c", ALL_AT_ONCE, f"/store/{name}", str(dpi)],
                                remove=True, network_mode="none", mem_limit=memory, memswap_limit=memory,
                                volumes={str(store): {"bind": "/store", "mode": "ro"}},
                                tmpfs={"/tmp": "size=64m"}, read_only=True).decode()
    return int(next(line for line in out.splitlines() if line.startswith(PEAK)).removeprefix(PEAK))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, nargs="+", default=[5, 50, 150])
    ap.add_argument("--dpi", type=int, default=200)
    a = ap.parse_args()
    client = docker.from_env()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        store.chmod(0o755)
        for n in a.pages:
            name = f"scan-{n}.pdf"
            scanned_pdf(store / name, n, a.dpi).chmod(0o644)
            job_peak, seconds, _ = run_job(client, store, name, memory="2g")
            naive = all_at_once(client, store, name, a.dpi)
            rows.append((n, job_peak, seconds, naive))
            print(f"{n:4d} pages: job peak {mib(job_peak):>9s} ({seconds:5.1f} s)   all at once {mib(naive):>9s}",
                  flush=True)
    base = rows[0][1]
    print()
    print(f"{'pages':>5s}  {'job peak':>9s}  {'x first':>7s}  {'all at once':>11s}  {'all-at-once / job':>17s}")
    for n, peak, _, naive in rows:
        print(f"{n:5d}  {mib(peak):>9s}  {peak / base:7.2f}  {mib(naive):>11s}  {naive / peak:17.1f}")
    print(f"\njob peak at {rows[-1][0]} pages / at {rows[0][0]} pages = {rows[-1][1] / base:.2f} (target <= 1.25)")


if __name__ == "__main__":
    main()
