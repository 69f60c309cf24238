"""Fixtures for unit tests of the controller's HTTP API (in-process, SQLite in a tmp dir)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vmferry.controller import auth
from vmferry.controller.app import create_app
from vmferry.controller.service import Controller
from vmferry.store.db import Store

ADMIN = "admin-secret"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """A controller app with an empty store, called with the admin's token."""
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_schema()
    auth.ensure_bootstrap_token(store, ADMIN)
    with TestClient(create_app(Controller(store))) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        yield client
    store.dispose()
