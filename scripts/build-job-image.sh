#!/usr/bin/env bash
# Build the job image only when its inputs changed, so CI and `make`-style reruns stay fast.
# The inputs' hash is stored as the image label jobcell.src-hash. FORCE=1 rebuilds anyway.
# Env: JOBCELL_JOB_IMAGE (default jobcell-job:dev), BASE_IMAGE (default debian:bookworm-slim).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[jobcell] $*"; }
image=${JOBCELL_JOB_IMAGE:-jobcell-job:dev}
base=${BASE_IMAGE:-debian:bookworm-slim}

# Everything COPY'd from job_image/ counts (not just *.py), minus what .dockerignore drops anyway.
hash=$({
  echo "$base"
  cat Dockerfile.job .dockerignore
  find job_image -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-16)

current=$(docker image inspect -f '{{ index .Config.Labels "jobcell.src-hash" }}' "$image" 2>/dev/null || true)
if [[ $current == "$hash" && -z ${FORCE:-} ]]; then
  log "$image: up to date ($hash)"
  exit 0
fi

t=$SECONDS
log "building $image ($hash)"
docker build -f Dockerfile.job --build-arg BASE_IMAGE="$base" --label jobcell.src-hash="$hash" -t "$image" . \
  >/tmp/jobcell-build-job.log 2>&1 \
  || { tail -40 /tmp/jobcell-build-job.log; echo "[jobcell] ERROR: job image build failed (log: /tmp/jobcell-build-job.log)" >&2; exit 1; }
log "$image: built ($((SECONDS - t)) s)"
