"""Server admins move VMs, network admins own profiles and the fabric, viewers only look;
every refusal names the reason and is written to the audit log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vmferry.controller import auth
from vmferry.controller.app import create_app
from vmferry.controller.service import Controller
from vmferry.store.db import Store


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_schema()
    tokens = {role: auth.create_token(store, f"{role}-user", role)
              for role in ("viewer", "server-admin", "network-admin", "admin")}
    with TestClient(create_app(Controller(store))) as client:
        yield client, tokens


def call(client: TestClient, token: str, method: str, path: str,
         json: object = None) -> tuple[int, dict[str, object]]:
    response = client.request(method, path, json=json,
                              headers={"Authorization": f"Bearer {token}"})
    body = response.json() if response.content else {}
    return response.status_code, body


def refusals(client: TestClient, admin: str) -> list[dict[str, object]]:
    client.app.state.refusals.flush()     # written by a worker thread  # type: ignore[attr-defined]
    _, events = call(client, admin, "GET", "/v1/events?limit=1000")
    return [e for e in events if e["outcome"] in ("forbidden", "unauthorized")]  # type: ignore[union-attr,index]


PROFILE = {"profiles": [{"name": "web", "vlan": 100}]}


def test_viewer_cannot_migrate(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    status, body = call(client, tokens["viewer"], "POST", "/v1/migrations",
                        {"vm": "web1", "to": "host3"})
    assert status == 403
    assert "viewer" in body["detail"]["message"] and "migrate" in body["detail"]["message"]  # type: ignore[index]
    logged = refusals(client, tokens["admin"])
    assert logged[-1]["actor"] == "viewer-user" and logged[-1]["target"] == "/v1/migrations"


def test_server_admin_cannot_edit_a_profile(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    status, body = call(client, tokens["server-admin"], "PUT", "/v1/profiles", PROFILE)
    assert status == 403 and "network-admin" in body["detail"]["message"]  # type: ignore[index]
    assert refusals(client, tokens["admin"])[-1]["actor"] == "server-admin-user"
    status, _ = call(client, tokens["network-admin"], "PUT", "/v1/profiles", PROFILE)
    assert status == 200


def test_network_admin_cannot_delete_a_vm(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    status, body = call(client, tokens["network-admin"], "DELETE", "/v1/vms/web1")
    assert status == 403 and "delete VMs" in body["detail"]["message"]  # type: ignore[index]
    assert refusals(client, tokens["admin"])[-1]["actor"] == "network-admin-user"


def test_revoked_and_unknown_tokens_are_refused(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    assert call(client, tokens["viewer"], "GET", "/v1/vms")[0] == 200
    assert call(client, tokens["admin"], "DELETE", "/v1/tokens/viewer-user")[0] == 204
    status, body = call(client, tokens["viewer"], "GET", "/v1/vms")
    assert status == 401 and "revoked" in body["detail"]["message"]  # type: ignore[index]
    status, body = call(client, "not-a-token", "GET", "/v1/vms")
    assert status == 401 and "unknown token" in body["detail"]["message"]  # type: ignore[index]
    assert client.get("/v1/vms").status_code == 401
    logged = refusals(client, tokens["admin"])
    assert [e["outcome"] for e in logged[-3:]] == ["unauthorized"] * 3


def test_only_admin_manages_tokens(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    for role in ("viewer", "server-admin", "network-admin"):
        status, _ = call(client, tokens[role], "POST", "/v1/tokens",
                         {"name": "x", "role": "admin"})
        assert status == 403
    status, body = call(client, tokens["admin"], "POST", "/v1/tokens",
                        {"name": "ops", "role": "wizard"})
    assert status == 422 and body["detail"]["field"] == "role"  # type: ignore[index]


def test_expired_token_is_refused(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    status, body = call(client, tokens["admin"], "POST", "/v1/tokens",
                        {"name": "shortlived", "role": "viewer", "expires_in_s": 3})
    expiry = time.monotonic() + 3
    assert status == 201
    short = str(body["token"])
    # 3 s, not less: on a loaded 2-core machine the first call alone took over 0.2 s.
    assert call(client, short, "GET", "/v1/vms")[0] == 200
    time.sleep(max(0.0, expiry - time.monotonic()) + 0.3)
    status, body = call(client, short, "GET", "/v1/vms")
    assert status == 401 and "expired" in body["detail"]["message"]  # type: ignore[index]
    assert refusals(client, tokens["admin"])[-1]["outcome"] == "unauthorized"


def test_oversized_and_non_json_bodies_are_refused(
        api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    headers = {"Authorization": f"Bearer {tokens['admin']}"}
    big = client.post("/v1/tokens", headers={**headers, "content-type": "application/json"},
                      content=b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    assert big.status_code == 413 and big.json()["detail"]["field"] == "body"
    form = client.post("/v1/tokens", headers=headers, data={"name": "x", "role": "viewer"})
    assert form.status_code == 415 and "application/json" in form.json()["detail"]["message"]
    unknown = client.post("/v1/tokens", headers=headers,
                          json={"name": "x", "role": "viewer", "colour": "blue"})
    assert unknown.status_code == 422 and unknown.json()["detail"]["field"] == "body.colour"
    _, listed = call(client, tokens["admin"], "GET", "/v1/tokens")
    assert "x" not in [t["name"] for t in listed]  # type: ignore[index,union-attr]
