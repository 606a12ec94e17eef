#!/usr/bin/env bash
# The test command: set up (engine, images, venv), then lint, type-check and run the whole suite against a
# real Docker engine and a real Postgres. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export TESTCONTAINERS_RYUK_DISABLED=true  # the reaper image cannot be pulled without a registry

.venv/bin/ruff check .
# import contracts (pyproject.toml): the verdict only, or all of it when a contract breaks
contracts=$(.venv/bin/lint-imports --no-cache 2>&1) || { echo "$contracts"; exit 1; }
echo "$contracts" | tail -n 1
.venv/bin/deptry . 2>&1 | tail -n 1  # every import declared, nothing declared unused
[[ ${PIPESTATUS[0]} -eq 0 ]] || { .venv/bin/deptry .; exit 1; }
.venv/bin/mypy
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "[jobcell] ERROR: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit $rc
