#!/usr/bin/env bash
# Everything the demo and the tests need, idempotently: a Docker engine, the base / Postgres / job images,
# and a Python virtualenv with jobcell installed. Fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-docker.sh
bash scripts/ensure-images.sh
# Host packages, installed where we can (root with apt; Debian's packages are reachable even when browsers and
# registries are not): Debian's chromium for the dashboard's browser tests, and tesseract and poppler for the
# process runtime, which runs the OCR pipeline on the host itself as a Render worker does.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr)
command -v pdftoppm >/dev/null 2>&1 || missing+=(poppler-utils)
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[jobcell] installing ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
      || echo "[jobcell] WARNING: could not install ${missing[*]}; the tests that need them will fail" >&2
  else
    echo "[jobcell] missing and not installable here (not root, or no apt-get): ${missing[*]}; install them" \
         "to run the dashboard tests (chromium) and real documents on the process runtime (tesseract, poppler)"
  fi
fi

py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "[jobcell] ERROR: Python >= 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
# Reinstall only when the dependencies changed.
want=$(sha256sum pyproject.toml | cut -c1-16)
if [[ $(cat .venv/.jobcell-installed 2>/dev/null) != "$want" ]]; then
  echo "[jobcell] installing Python dependencies into .venv"
  # (some machines' pip config names local package dirs that do not exist: pip warns once per package)
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev,job]' 2>&1 | { grep -v '^WARNING: Location' || true; }
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "[jobcell] ERROR: pip install failed" >&2; exit 1; }
  echo "$want" > .venv/.jobcell-installed
fi
echo "[jobcell] setup done"
