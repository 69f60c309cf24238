"""A live profile update reaches every port: one agent call per host, hosts side by side, an
outcome recorded per port. Agents are faked; the store is a real SQLite file."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

from vmferry.api.agent import PortOutcome
from vmferry.controller.profiles import Profiles
from vmferry.errors import HostUnavailableError
from vmferry.model.profile import PortProfile, parse_profile
from vmferry.store.db import Store
from vmferry.store.profile_schema import PortRealizationRow
from vmferry.store.schema import HostRow, VmRow

PROFILE = parse_profile({"name": "web", "vlan": 100, "version": 3})


class FakeAgents:
    """Answers ``set_port_profiles``; host3 does not answer; vm-b2 fails on its host."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], PortProfile]] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def agent(self, host: str) -> SimpleNamespace:
        def set_port_profiles(vms: list[str], profile: PortProfile) -> list[PortOutcome]:
            return self.push(host, vms, profile)
        return SimpleNamespace(set_port_profiles=set_port_profiles)

    def push(self, host: str, vms: list[str], profile: PortProfile) -> list[PortOutcome]:
        with self._lock:
            self.calls.append((host, vms, profile))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(0.2)             # long enough for the hosts to overlap
            if host == "host3":
                raise HostUnavailableError(f"host {host}: its agent does not answer",
                                           host=host)
            return [PortOutcome(vm=vm, ok=vm != "vm-b2",
                                error="OVS refused a flow" if vm == "vm-b2" else None)
                    for vm in vms]
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
    controller = SimpleNamespace(store=store, agent=agents.agent,
                                 reconcile_fabric=lambda: None)
    results = Profiles(controller).push(PROFILE)       # type: ignore[arg-type]

    assert sorted(c[0] for c in agents.calls) == ["host1", "host2", "host3"]
    assert agents.most_active > 1, "hosts are pushed side by side"
    host1 = next(c for c in agents.calls if c[0] == "host1")
    assert sorted(host1[1]) == ["vm-a1", "vm-a2", "vm-a3"]
    assert host1[2].version == 3
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
