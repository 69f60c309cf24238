"""Shared test setup: where state goes, and skipping root-only tests with a reason.

Under ``make test`` (scripts/test.sh sets ``VMFERRY_REQUIRE_ALL=1``) nothing may be skipped:
a missing root, QEMU or PostgreSQL fails the suite instead of quietly shrinking it."""

from __future__ import annotations

import os

import pytest

REQUIRE_ALL = "VMFERRY_REQUIRE_ALL"


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL, "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    reason = "needs root: real QEMU, Open vSwitch and namespaces"
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(marker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """With VMFERRY_REQUIRE_ALL, a skipped functional test (a skip marker, or pytest.skip in
    the test or its fixtures: no root, QEMU, PostgreSQL) is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    # Functional tests skip only for a missing environment (root, QEMU, OVS, PostgreSQL,
    # libvirt); a unit test's skip (e.g. "root may write anywhere") stays a skip.
    environmental = "functional" in item.path.parts or "root" in item.keywords
    if require_all() and environmental and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under {REQUIRE_ALL}=1 (make test needs everything): {reason}"
