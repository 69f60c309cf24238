"""The web dashboard is served, and every API path it reads exists in the OpenAPI schema."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from vmferry.controller.app import create_app
from vmferry.controller.service import Controller
from vmferry.store.db import Store


def test_dashboard_reads_only_real_api_paths(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_schema()
    client = TestClient(create_app(Controller(store)))
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    paths = set(client.get("/openapi.json").json()["paths"])
    used = {m.split("?")[0] for m in re.findall(r'api\("([^"]+)"\)', page.text)}
    assert used == {"/v1/hosts", "/v1/vms", "/v1/migrations", "/v1/fabric", "/v1/events"}
    assert used <= paths
    # Without a token the API refuses with a reason the page can show.
    refused = client.get("/v1/vms")
    assert refused.status_code == 401 and refused.json()["detail"]["message"]
