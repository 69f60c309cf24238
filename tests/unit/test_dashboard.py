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
    schema = client.get("/openapi.json").json()["paths"]
    # api(PATH) and api(PATH, METHOD, ...); template parts ${...} are path parameters.
    calls = re.findall(r'api\([`"]([^`"]+)[`"](?:, "([A-Z]+)")?', page.text)
    used = {(re.sub(r"\$\{[^}]+\}", "{migration_id}", path.split("?")[0]), method or "GET")
            for path, method in calls}
    assert {p for p, _ in used} >= {"/v1/hosts", "/v1/vms", "/v1/migrations", "/v1/fabric",
                                    "/v1/events", "/v1/audit", "/v1/whoami"}
    for path, method in used:
        assert method.lower() in schema.get(path, {}), f"{method} {path} is not in the API"
    assert "/v1/events/stream" in page.text and "/v1/events/stream" in schema
    # Without a token the API refuses with a reason the page can show.
    refused = client.get("/v1/vms")
    assert refused.status_code == 401 and refused.json()["detail"]["message"]
