#!/usr/bin/env bash
# The whole suite: lint, unit tests (no root), then functional tests on real QEMU, OVS and
# namespaces; `scripts/test.sh functional` (or unit, lint) runs one stage.
# Both test stages run on VMFERRY_TEST_WORKERS pytest-xdist workers (default 2: the machine's
# 2 cores; 1 runs them in one process as before). Functional tests are handed out a whole file
# at a time (--dist loadfile): a file's lab name is fixed and its tests share one lab.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
stage=${1:-all}
# Nothing the figures rest on may be skipped: no root, QEMU or PostgreSQL fails the suite.
export VMFERRY_REQUIRE_ALL=1
workers=${VMFERRY_TEST_WORKERS:-2}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers")
status=0
if [ "$stage" = all ] || [ "$stage" = lint ]; then
  echo "== lint (ruff, mypy --strict, import layers, file and function sizes)"
  .venv/bin/ruff check src tests || status=$?
  .venv/bin/mypy src/vmferry || status=$?
  .venv/bin/lint-imports || status=$?
  $PY scripts/check_sizes.py src || status=$?
fi
if [ "$stage" = all ] || [ "$stage" = unit ]; then
  echo "== unit tests"
  # A wide console: CLI errors are checked for the file they name, and Rich would break a long
  # temporary path (xdist's have popen-gwN/ in them) in the middle.
  COLUMNS=200 $PY -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/unit || status=$?
fi
if [ "$stage" = all ] || [ "$stage" = functional ]; then
  echo "== functional tests"
  # Heaviest files first (tests/functional/conftest.py orders them): no long file starts last.
  # A short base for temporary paths: a lab's unix sockets must fit in 107 bytes, and xdist
  # adds popen-gwN/ to every path.
  base=$(mktemp -d /tmp/vft.XXXXXX)
  $PY -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    ${parallel[@]:+--dist loadfile --no-loadscope-reorder} --basetemp "$base/t" \
    --durations=25 tests/functional || status=$?
  rm -rf "$base"
fi
exit $status
