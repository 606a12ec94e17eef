#!/usr/bin/env bash
# The main job: real documents from ../shared/corpus through sealed, memory-capped job containers, end to end:
# a fresh Postgres, `jobcell run` as the dispatcher, `jobcell submit --wait`, and a readable result. Cells run
# with no network and no credentials: each gets its document on stdin and only the dispatcher stores results.
# Idempotent: each run starts from a fresh demo database. KEEP=1 leaves Postgres running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh >/dev/null
corpus=${JOBCELL_CORPUS:-../shared/corpus}
[[ -d $corpus ]] || { echo "[jobcell] ERROR: no corpus at $corpus (set JOBCELL_CORPUS)" >&2; exit 1; }

pg_image=$(cat .jobcell-pg-image 2>/dev/null || echo postgres:16)
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
docker rm -f jobcell-demo-postgres >/dev/null 2>&1 || true
docker run -d --name jobcell-demo-postgres -p "127.0.0.1:$port:5432" \
  -e POSTGRES_USER=jobcell -e POSTGRES_PASSWORD=jobcell-demo -e POSTGRES_DB=jobcell "$pg_image" >/dev/null

rm -rf var/demo && mkdir -p var/demo
export JOBCELL_DATABASE_URL="postgresql://jobcell:jobcell-demo@127.0.0.1:$port/jobcell"
export JOBCELL_CLASSES_FILE=examples/demo-classes.toml
export JOBCELL_STORE_DIR=var/demo/store
export JOBCELL_POOL=demo JOBCELL_DISPATCHER_ID=demo-dispatcher JOBCELL_MEMORY_BUDGET=2GiB
export JOBCELL_BACKOFF_EXPONENT=1
jobcell=.venv/bin/jobcell

cleanup() {
  [[ -n ${dispatcher:-} ]] && kill -TERM "$dispatcher" 2>/dev/null && wait "$dispatcher" 2>/dev/null
  [[ -n ${KEEP:-} ]] || docker rm -f jobcell-demo-postgres >/dev/null 2>&1 || true
}
trap cleanup EXIT

$jobcell migrate >/dev/null  # retries while Postgres starts
echo "== size classes (examples/demo-classes.toml)"
$jobcell classes
$jobcell run > var/demo/dispatcher.log 2>&1 &
dispatcher=$!

docs=(tesseract-phototest.tif tesseract-eurotext.tif ocrmypdf-linn.png ocrmypdf-multipage.pdf
      ocrmypdf-cardinal.pdf ocrmypdf-enormous.pdf
      pdf2image-test_corrupted.pdf pdf2image-test_locked_user_only.pdf ocrmypdf-hugemono.pdf)
echo
echo "== submitting ${#docs[@]} documents; the last three must be refused, each with its own reason"
$jobcell submit --wait "${docs[@]/#/$corpus/}" | tee var/demo/result.txt || true

echo
echo "== the document that needs a larger tier: its cell said so before rendering its one page, and moved (no OOM)"
enormous=$(grep -m1 'ocrmypdf-enormous.pdf' var/demo/result.txt | awk '{print $2}' | tr -d ':')
$jobcell show "$enormous"
echo
echo "== a cell that outgrows its cap with no warning (allocates 300 MiB on the 192 MiB tier): the kernel kills it"
$jobcell submit --wait --diag alloc_mib=300 | tee -a var/demo/result.txt || true
echo
echo "(dispatcher log: var/demo/dispatcher.log)"

# The demo passes only if every document ended as it should.
.venv/bin/python - <<'PY'
import os, sys
import psycopg
want = {"tesseract-phototest.tif": "succeeded", "tesseract-eurotext.tif": "succeeded",
        "ocrmypdf-linn.png": "succeeded", "ocrmypdf-multipage.pdf": "succeeded",
        "ocrmypdf-cardinal.pdf": "succeeded", "ocrmypdf-enormous.pdf": "succeeded",
        "pdf2image-test_corrupted.pdf": "failed", "pdf2image-test_locked_user_only.pdf": "failed",
        "ocrmypdf-hugemono.pdf": "failed"}
with psycopg.connect(os.environ["JOBCELL_DATABASE_URL"]) as c:
    want["diag:alloc_mib=300"] = "succeeded"  # 300 MiB: killed on small (192 MiB), succeeds on medium
    got = {os.path.basename(s): (st, n) for s, st, n in c.execute("SELECT source, state, attempt FROM jobs")}
    escalated = c.execute("SELECT count(*) FROM job_attempts WHERE outcome = 'oom'").fetchone()[0]
    moved = c.execute("SELECT count(*) FROM job_attempts WHERE outcome = 'needs_more'").fetchone()[0]
wrong = {k: got.get(k) for k, v in want.items() if got.get(k, ("missing",))[0] != v}
refused_twice = [k for k, v in want.items() if v == "failed" and got[k][1] != 1]
if wrong or refused_twice or not escalated or not moved:
    print(f"demo FAILED: unexpected {wrong}, retried bad input {refused_twice}, oom attempts {escalated}, "
          f"moved by their own estimate {moved}")
    sys.exit(1)
print(f"demo OK: 6 documents OCR'd, 3 refused after one attempt each, {moved} moved up by their "
      f"own estimate, {escalated} OOM kill(s) escalated")
PY
