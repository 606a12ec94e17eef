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
# Two passes: everything but the disruptive tests side by side on JOBCELL_TEST_WORKERS processes (pytest-xdist;
# each has its own Postgres; most tests wait on containers and timers, not on CPU), then the disruptive ones
# (they restart the engine) alone. A pass that selects nothing is fine only if the other ran tests.
workers=${JOBCELL_TEST_WORKERS:-3}
set +e
.venv/bin/python -m pytest -p no:cacheprovider -n "$workers" --dist load -m "not disruptive" "$@"
rc1=$?
.venv/bin/python -m pytest -p no:cacheprovider -m disruptive "$@"
rc2=$?
set -e
if [[ $rc1 -eq 5 && $rc2 -eq 5 ]]; then
  echo "[jobcell] ERROR: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
for rc in $rc1 $rc2; do
  [[ $rc -eq 0 || $rc -eq 5 ]] || exit "$rc"
done
exit 0
