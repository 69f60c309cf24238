"""GET /metrics: migration outcomes, downtime and duration, heartbeats, audit findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vmferry.controller import auth
from vmferry.controller.app import create_app
from vmferry.controller.service import Controller
from vmferry.store.db import Store


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def record(migration_id: int, state: str, **extra: Any) -> dict[str, Any]:
    return {"id": migration_id, "vm": "web1", "state": state, "phase": "precheck",
            "phases": [], "result": {}, "started_at": "2026-01-01T00:00:00+00:00",
            "ended_at": None, **extra}


def test_migration_outcomes_are_counted_once(client: TestClient) -> None:
    notify = client.app.state.migrations.notify   # type: ignore[attr-defined]
    notify(record(1, "running"))
    notify(record(1, "running", phase="precopy"))
    done = record(1, "completed", ended_at="2026-01-01T00:00:12+00:00",
                  result={"qemu": {"downtime_ms": 40}},
                  phases=[{"phase": "precheck", "duration_ms": 250.0}])
    notify(done)
    notify(done)   # a late duplicate notification changes nothing
    notify(record(2, "running"))
    notify(record(2, "rolled-back", ended_at="2026-01-01T00:00:03+00:00"))
    notify(record(3, "failed", ended_at="2026-01-01T00:00:01+00:00"))
    got = samples(client)
    assert got[("vmferry_migrations_total", (("outcome", "started"),))] == 3
    assert got[("vmferry_migrations_total", (("outcome", "completed"),))] == 1
    assert got[("vmferry_migrations_total", (("outcome", "rolled-back"),))] == 1
    assert got[("vmferry_migrations_total", (("outcome", "failed"),))] == 1
    assert got[("vmferry_migration_downtime_seconds_count", ())] == 1
    assert got[("vmferry_migration_downtime_seconds_sum", ())] == pytest.approx(0.04)
    assert got[("vmferry_migration_downtime_seconds_bucket", (("le", "0.05"),))] == 1
    assert got[("vmferry_migration_duration_seconds_sum", (("outcome", "completed"),))] == 12
    assert got[("vmferry_migration_phase_duration_seconds_count", (("phase", "precheck"),))] == 1


def test_heartbeats_counted_and_aged(client: TestClient, tmp_path: Path) -> None:
    token_file = tmp_path / "host1.token"
    token_file.write_text("agent-secret\n")
    inventory = {"name": "site", "kind": "site",
                 "switches": [{"name": "tor1", "role": "tor", "rack": "rack1",
                               "ovsdb": "unix:/nonexistent.sock"}],
                 "racks": [{"name": "rack1", "tor": "tor1"}],
                 "hosts": [{"name": "host1", "rack": "rack1", "agent_url": "unix:/nonexistent",
                            "agent_token_file": str(token_file)}]}
    response = client.put("/v1/inventory", json=inventory)
    assert response.status_code == 200, response.text
    assert not any(name == "vmferry_agent_heartbeat_age_seconds" for name, _ in samples(client))
    report = {"host": "host1", "qemu_version": "8.0", "machine_types": ["q35"],
              "memory_mib": 4096, "memory_used_mib": 0, "guests": [], "shared_storage": None,
              "shared_storage_ok": True}
    for _ in range(2):
        response = client.post("/v1/agents/host1/heartbeat", json=report,
                               headers={"Authorization": "Bearer agent-secret"})
        assert response.status_code == 204, response.text
    got = samples(client)
    assert got[("vmferry_agent_heartbeats_total", (("host", "host1"),))] == 2
    assert 0 <= got[("vmferry_agent_heartbeat_age_seconds", (("host", "host1"),))] < 5
    # The audit cannot reach host1's agent nor the switch: "unreachable" findings.
    findings = client.get("/v1/audit")
    assert findings.status_code == 200, findings.text
    got = samples(client)
    assert got[("vmferry_audit_findings", (("kind", "unreachable"),))] >= 1
    assert got[("vmferry_audit_findings", (("kind", "total"),))] == len(findings.json())


def test_metrics_need_a_token_and_apps_do_not_share_a_registry(client: TestClient,
                                                                tmp_path: Path) -> None:
    response = client.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 401
    assert "bearer" in response.json()["detail"]["message"]
    admin = client.headers["Authorization"].removeprefix("Bearer ")
    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    other.create_schema()
    auth.ensure_bootstrap_token(other, admin)
    with TestClient(create_app(Controller(other))) as second:
        second.app.state.migrations.notify(record(9, "running"))  # type: ignore[attr-defined]
        second.headers["Authorization"] = f"Bearer {admin}"
        assert 'outcome="started"} 1.0' in second.get("/metrics").text
    assert samples(client)[("vmferry_migrations_total", (("outcome", "started"),))] == 0
    other.dispose()


def test_ports_realized_and_drifted(client: TestClient) -> None:
    from vmferry.store.profile_schema import PortRealizationRow, ProfileRow
    store = client.app.state.controller.store   # type: ignore[attr-defined]
    with store.session() as session:
        session.add(ProfileRow(name="web", version=3, spec={}))
        session.add(PortRealizationRow(vm="a", host="h1", profile="web", version=3, wanted=3,
                                       ok=True))
        session.add(PortRealizationRow(vm="b", host="h1", profile="web", version=2, wanted=3,
                                       ok=False, error="host down"))
        session.add(PortRealizationRow(vm="c", host="h2", profile="web", version=2, wanted=2,
                                       ok=True))
    got = samples(client)
    assert got[("vmferry_ports", (("status", "realized"),))] == 1
    assert got[("vmferry_ports", (("status", "drifted"),))] == 2
