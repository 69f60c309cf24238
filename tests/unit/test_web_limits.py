"""The HTTP plumbing's bounds: odd headers never 500, 500s carry no internals, refusals are
recorded off the event loop and rate-limited, long waits and streams are capped per caller,
inventories are confined."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from vmferry.controller.inventory_rules import Confinement
from vmferry.errors import InputError, TooManyRequests
from vmferry.model.topology import Topology, default_topology_path, load_topology
from vmferry.web import ConcurrencyCap, install_error_handlers, parse_content_length


@pytest.mark.parametrize("header", ["²", "١٢", "-1", "1e3", " ", "0x10", "9" * 40])
def test_odd_content_length_is_a_400_naming_the_header(client: TestClient, header: str) -> None:
    response = client.post("/v1/tokens", content=b"{}", headers={
        "content-type": "application/json", "content-length": header.encode()})
    assert response.status_code in (400, 413), response.text
    assert response.json()["detail"]["field"] in ("content-length", "body")
    assert parse_content_length(header) is None or int(header) > 10**6


def test_odd_last_event_id_is_ignored_not_a_500(client: TestClient) -> None:
    client.post("/v1/tokens", json={"name": "ops", "role": "viewer"})   # one audit event
    response = client.get("/v1/events/stream?limit=1&after=0",
                          headers={"last-event-id": "²".encode()})
    assert response.status_code == 200


def test_a_500_says_nothing_of_the_exception() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("postgresql://user:hunter2@db/vmferry")

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 500
    assert "hunter2" not in response.text and "RuntimeError" not in response.text


def test_a_refusal_flood_is_rate_limited(client: TestClient) -> None:
    for _ in range(200):
        assert client.get("/v1/vms", headers={"Authorization": "Bearer wrong"}).status_code \
            == 401
    log = client.app.state.refusals  # type: ignore[attr-defined]
    log.flush()
    rows = [e for e in client.get("/v1/events?limit=10000").json()
            if e["outcome"] == "unauthorized"]
    # At most one burst per 10 s window (the flood may straddle two windows).
    assert 1 <= len(rows) <= 2 * log._burst < 200


def test_concurrency_cap_per_caller_and_total() -> None:
    cap = ConcurrencyCap("wait", per_key=2, total=3)
    cap.acquire("a")
    cap.acquire("a")
    with pytest.raises(TooManyRequests) as info:
        cap.acquire("a")
    assert info.value.http_status == 429 and info.value.field == "wait"
    cap.acquire("b")
    with pytest.raises(TooManyRequests):
        cap.acquire("c")
    cap.release("a")
    cap.acquire("c")
    assert cap.in_use() == 3


def inventory(tmp: Path, token_file: str, url: str) -> Topology:
    data = load_topology(default_topology_path()).model_dump(mode="json")
    for host in data["hosts"]:
        host["agent_token_file"] = token_file
        host["agent_url"] = url
    return Topology.model_validate(data)


def test_inventory_confinement(tmp_path: Path) -> None:
    secrets, run = tmp_path / "secrets", tmp_path / "run"
    secrets.mkdir()
    run.mkdir()
    (secrets / "a.token").write_text("x")
    rules = Confinement(secrets, run)
    rules.check(inventory(tmp_path, str(secrets / "a.token"), f"unix:{run}/a.sock"))
    rules.check(inventory(tmp_path, str(secrets / "a.token"), "https://host1.example:8471"))
    (secrets / "link").symlink_to("/etc/shadow")
    for token, url, field in [
            ("/etc/shadow", f"unix:{run}/a.sock", "agent_token_file"),
            (str(secrets / ".." / ".." / "etc" / "shadow"), f"unix:{run}/a.sock",
             "agent_token_file"),
            (str(secrets / "link"), f"unix:{run}/a.sock", "agent_token_file"),
            (str(secrets / "a.token"), "http://198.51.100.7:80", "agent_url"),
            (str(secrets / "a.token"), "unix:/tmp/elsewhere.sock", "agent_url"),
            (str(secrets / "a.token"), "ftp://x", "agent_url")]:
        with pytest.raises(InputError) as info:
            rules.check(inventory(tmp_path, token, url))
        assert info.value.field == f"hosts[0].{field}"
