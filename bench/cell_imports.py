"""What a cell pays to start and import itself, inside the job image (issue 12).

    .venv/bin/python -m bench.cell_imports [--rounds 6] [--runs 5] [IMAGE ...]   (default: jobcell-job:dev)

Two imports: the entrypoint alone (what every cell imports: `python -X importtime -c 'import
job_image.entrypoint'`) and the entrypoint with the OCR pipeline (what a document cell imports). Each is run
`runs` times in one container per image and round (after a warm-up run, so the page cache is warm); with several
images the rounds alternate between them, so that other load on the machine falls on each alike. Printed per
image: the cumulative import time of the job's modules (importtime), and the whole interpreter's start and
import as the kernel counts it (CPU ms of the process, user + system, from rusage), each as min / median.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import docker

from ._support import JOB_IMAGE

SCRIPT = """
import json, resource, subprocess, sys
runs, out = int(sys.argv[1]), {}
for name, code in (("entrypoint", "import job_image.entrypoint"),
                   ("entrypoint+pipeline", "import job_image.entrypoint, job_image.pipeline")):
    samples = []
    for i in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True).stderr
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        mods = {"cpu_us": int(((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1e6)}
        for line in err.splitlines():
            if line.startswith("import time:") and "self [us]" not in line:
                parts = line[len("import time:"):].split("|")
                mods[parts[2].strip()] = int(parts[1])
        if i:
            samples.append(mods)
    out[name] = samples
print(json.dumps(out))
"""

WATCH = ("urllib.request", "job_image.probe", "job_image.diag", "traceback", "pydantic", "job_image.contract",
         "pytesseract", "PIL.Image", "openai")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("images", nargs="*", default=[JOB_IMAGE])
    a = ap.parse_args()
    client = docker.from_env()
    samples: dict[tuple[str, str], list[dict[str, int]]] = defaultdict(list)
    for r in range(a.rounds):
        for image in a.images if r % 2 == 0 else a.images[::-1]:
            raw = client.containers.run(image, entrypoint=["python", "-c", SCRIPT, str(a.runs)], remove=True,
                                        network_mode="none", read_only=True, user="10001:10001").decode()
            for name, runs in json.loads(raw).items():
                samples[(image, name)].extend(runs)
    summary = {}
    print(f"{a.rounds} rounds x {a.runs} runs per image; ms as min / median")
    for (image, name), runs in samples.items():
        jobs = [sum(s.get(m, 0) for m in ("job_image.entrypoint", "job_image.pipeline")) / 1000 for s in runs]
        cpu = [s["cpu_us"] / 1000 for s in runs]
        present = {m: statistics.median(s.get(m, 0) for s in runs) / 1000 for m in WATCH if any(m in s for s in runs)}
        summary[f"{image} {name}"] = {"import_ms_min": min(jobs), "import_ms_median": statistics.median(jobs),
                                      "process_cpu_ms_min": min(cpu), "process_cpu_ms_median": statistics.median(cpu),
                                      "modules_ms_median": present}
        print(f"{image:28s} import {name:20s}: job modules {min(jobs):6.1f} / {statistics.median(jobs):6.1f}; "
              f"whole process CPU {min(cpu):6.1f} / {statistics.median(cpu):6.1f}")
        print(f"{'':28s}   of which (median): " + ", ".join(f"{m} {v:.1f}" for m, v in present.items()))
    print("JSON " + json.dumps({"bench": "cell_imports", "rounds": a.rounds, "runs": a.runs, "results": summary}))


if __name__ == "__main__":
    main()
