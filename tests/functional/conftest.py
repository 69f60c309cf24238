"""Functional tests run heaviest file first.

`make test` spreads the functional files over two pytest-xdist workers a whole file at a time
(``--dist loadfile --no-loadscope-reorder``: the order below is the order they are handed out).
A long file handed out last would run alone at the end while the other core idles, so files
start in order of their cost on the 2-core CI machine, longest first; a file's own tests keep
their order (they share the file's module-scoped lab)."""

from __future__ import annotations

import pytest

# Rough seconds per file on CI, estimated from the last serial run's slowest tests and each
# file's number of tests (the CI log printed only the 40 slowest tests, not per-file totals);
# a file not listed counts as DEFAULT_COST. Only the order matters, so rough figures do: update
# them from `--durations=0` when a file grows.
COST = {
    "test_faults.py": 480,
    "test_crash_recovery.py": 330,
    "test_security.py": 240,
    "test_guest_and_qemu.py": 220,
    "test_make_before_break.py": 200,
    "test_bench_ovn.py": 200,
    "test_migration.py": 170,
    "test_host_failure.py": 150,
    "test_faults_store.py": 140,
    "test_placement.py": 400,
    "test_boundary.py": 160,
    "test_boundary_nat.py": 120,
    "test_boundary_dual.py": 150,
    "test_postcopy.py": 110,
    "test_migration_libvirt.py": 110,
    "test_profiles.py": 100,
    "test_lab.py": 100,
    "test_conntrack_move.py": 90,
    "test_bench_soak.py": 80,
    "test_demo.py": 72,
    "test_dashboard_browser.py": 69,
}
DEFAULT_COST = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: within a file the collected order stays.
    items.sort(key=lambda item: -COST.get(item.path.name, DEFAULT_COST))
