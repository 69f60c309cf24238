"""Shared test setup: where state goes, and skipping root-only tests with a reason."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: real QEMU, Open vSwitch and namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
