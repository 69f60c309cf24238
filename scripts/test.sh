#!/usr/bin/env bash
# The whole suite: unit tests (no root), then functional tests on real QEMU, OVS and namespaces.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# Nothing the figures rest on may be skipped: no root, QEMU or PostgreSQL fails the suite.
export VMFERRY_REQUIRE_ALL=1
status=0
echo "== lint (ruff, mypy --strict, import layers, file and function sizes)"
.venv/bin/ruff check src tests || status=$?
.venv/bin/mypy src/vmferry || status=$?
.venv/bin/lint-imports || status=$?
$PY scripts/check_sizes.py src || status=$?
echo "== unit tests"
$PY -m pytest -q -p no:cacheprovider tests/unit || status=$?
echo "== functional tests"
$PY -m pytest -q -p no:cacheprovider --durations=40 tests/functional || status=$?
exit $status
