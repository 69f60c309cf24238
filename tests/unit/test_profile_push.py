"""A live profile update reaches every port: one agent call per host, hosts side by side, an
outcome recorded per port. Agents are faked; the store is a real SQLite file."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vmferry.controller.profiles import Profiles
from vmferry.errors import HostUnavailableError
from vmferry.model.profile import parse_profile
from vmferry.store.db import Store
from vmferry.store.profile_schema import PortRealizationRow
from vmferry.store.schema import HostRow, VmRow

PROFILE = parse_profile({"name": "web", "vlan": 100, "version": 3})


class FakeAgents:
    """Answers ``PUT /v1/port-profiles``; host3 does not answer; vm-b2 fails on its host."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, Any]] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def call_agent(self, host: str, method: str, path: str, *, json: Any = None,
                   timeout: float = 60) -> Any:
        with self._lock:
            self.calls.append((host, method, path, json))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(0.2)             # long enough for the hosts to overlap
            if host == "host3":
                raise HostUnavailableError(f"host {host}: its agent does not answer",
                                           host=host)
            return {"ports": [{"vm": vm, "ok": vm != "vm-b2",
                               "error": "OVS refused a flow" if vm == "vm-b2" else None}
                              for vm in json["vms"]]}
        finally:
            with self._lock:
                self.active -= 1


def test_push_is_one_call_per_host_in_parallel_with_outcomes_per_port(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_schema()
    placement = {"vm-a1": "host1", "vm-a2": "host1", "vm-a3": "host1",
                 "vm-b1": "host2", "vm-b2": "host2", "vm-c1": "host3"}
    with store.session() as session:
        for host in ("host1", "host2", "host3"):
            session.add(HostRow(name=host, agent_url=f"unix:/nonexistent/{host}"))
        session.flush()
        for index, (vm, host) in enumerate(placement.items()):
            session.add(VmRow(name=vm, host=host, memory_mib=128, vlan=100,
                              ip=f"192.0.2.{index + 10}/24", mac=f"52:54:00:00:00:{index:02x}",
                              profile="web", state="running"))
        session.add(VmRow(name="vm-off", host="host1", memory_mib=128, vlan=100,
                          ip="192.0.2.99/24", mac="52:54:00:00:00:99", profile="web",
                          state="stopped"))
    agents = FakeAgents()
    controller = SimpleNamespace(store=store, call_agent=agents.call_agent,
                                 reconcile_fabric=lambda: None)
    results = Profiles(controller).push(PROFILE)       # type: ignore[arg-type]

    assert sorted((c[0], c[2]) for c in agents.calls) == [
        ("host1", "/v1/port-profiles"), ("host2", "/v1/port-profiles"),
        ("host3", "/v1/port-profiles")]
    assert agents.most_active > 1, "hosts are pushed side by side"
    host1 = next(c[3] for c in agents.calls if c[0] == "host1")
    assert sorted(host1["vms"]) == ["vm-a1", "vm-a2", "vm-a3"]
    assert host1["profile"]["version"] == 3
    outcome = {r["vm"]: r for r in results}
    assert set(outcome) == set(placement)
    assert all(outcome[vm]["ok"] and outcome[vm]["version"] == 3
               for vm in ("vm-a1", "vm-a2", "vm-a3", "vm-b1"))
    assert not outcome["vm-b2"]["ok"] and "OVS refused" in outcome["vm-b2"]["error"]
    assert outcome["vm-b2"]["version"] is None
    assert not outcome["vm-c1"]["ok"] and "does not answer" in outcome["vm-c1"]["error"]
    with store.session() as session:
        rows = {row.vm: row for row in session.query(PortRealizationRow)}
    assert set(rows) == set(placement)
    assert rows["vm-a1"].version == 3 and rows["vm-c1"].version is None
    assert rows["vm-c1"].wanted == 3
