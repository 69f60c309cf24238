"""GET /v1/events/stream: audit events and migration progress as server-sent events."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient

from vmferry.controller import events


def read_events(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """Parse ``count`` SSE events (comments skipped) from a line iterator."""
    found: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in lines:
        if line.startswith((":", "retry:")):
            continue
        if not line:
            if current:
                found.append(current)
                current = {}
                if len(found) == count:
                    return found
            continue
        key, _, value = line.partition(": ")
        current[key] = json.loads(value) if key == "data" else value
    return found


def test_stream_carries_audit_events_and_migration_progress(client: TestClient) -> None:
    store = client.app.state.controller.store   # type: ignore[attr-defined]
    events.record(store, "alice", "vm.create", "old", "ok")   # before the stream: not sent
    hub = client.app.state.event_hub   # type: ignore[attr-defined]

    def produce() -> None:
        # Wait (bounded) until the stream subscribed, then publish from another thread, as the
        # migration threads do.
        for _ in range(500):
            if hub.subscribers:
                break
            threading.Event().wait(0.01)
        client.app.state.migrations.notify(   # type: ignore[attr-defined]
            {"id": 7, "vm": "web1", "state": "running", "phase": "precopy"})
        events.record(store, "alice", "vm.create", "web2", "ok", host="host1")

    producer = threading.Thread(target=produce)
    with client.stream("GET", "/v1/events/stream", params={"limit": 2}, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        producer.start()
        got = read_events(response.iter_lines(), 2)
    producer.join(10)
    kinds = {e["event"]: e for e in got}
    assert kinds["migration"]["data"]["phase"] == "precopy"
    assert kinds["audit"]["data"]["target"] == "web2"
    assert int(kinds["audit"]["id"]) == kinds["audit"]["data"]["id"]
    assert hub.subscribers == 0   # the stream unsubscribed when it ended


def test_last_event_id_resumes_without_loss(client: TestClient) -> None:
    store = client.app.state.controller.store   # type: ignore[attr-defined]
    for i in range(4):
        events.record(store, "alice", "vm.create", f"vm{i}", "ok")
    first = events.recent(store, limit=10)[0].id
    with client.stream("GET", "/v1/events/stream", params={"limit": 3},
                       headers={"Last-Event-ID": str(first)}, timeout=10) as response:
        got = read_events(response.iter_lines(), 3)
    assert [e["data"]["target"] for e in got] == ["vm1", "vm2", "vm3"]


def test_stream_needs_a_reader(client: TestClient) -> None:
    response = client.get("/v1/events/stream", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["detail"]["message"] == "unknown token"
