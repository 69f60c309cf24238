"""Placement through the controller on the in-memory site (enginekit): policies stored and
enforced at create, where, the precheck's refusal, drains and balancing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginekit import Site, beat, site_at

from vmferry.agent.cpuload import CpuLoad
from vmferry.api.controller import VmCreate
from vmferry.controller.drain import Mover
from vmferry.controller.placement import Placement
from vmferry.errors import ConflictError, InputError, NotFoundError
from vmferry.model.placement import VmPolicy
from vmferry.model.topology import Topology


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    for s in site_at(tmp_path):
        data = s.topology.model_dump(mode="json")
        data["hosts"][3]["zone"] = "secure"          # host4
        s.topology = Topology.model_validate(data)
        s.controller.set_inventory(s.topology, s.actor())
        beat(s)
        yield s


def create(site: Site, name: str, host: str, ip: str, **policy: Any) -> None:
    site.controller.create_vm(VmCreate.model_validate(
        {"name": name, "host": host, "vlan": 100, "ip": f"192.0.2.{ip}/24", "memory_mib": 256,
         "policy": VmPolicy(**policy)}), site.actor())


def reasons(site: Site, vm: str) -> dict[str, list[str]]:
    out = Placement(site.controller).where(vm)
    return {h.host: [r.code for r in h.reasons] for h in out.hosts}


def test_policy_enforced_at_create_and_where_lists_reasons(site: Site) -> None:
    create(site, "a", "host1", "11", anti_affinity=["g"], forbidden_hosts=["host3"])
    with pytest.raises(ConflictError) as info:
        create(site, "b", "host1", "12", anti_affinity=["g"])
    assert "anti_affinity" in info.value.message
    with pytest.raises(ConflictError, match="zone"):
        create(site, "c", "host4", "13")
    with pytest.raises(NotFoundError, match=r"policy\.forbidden_hosts"):
        create(site, "d", "host2", "14", forbidden_hosts=["nohost"])
    assert [v.name for v in site.controller.vms()] == ["a"]
    assert reasons(site, "a") == {"host1": ["current"], "host2": [], "host3": ["forbidden"],
                                  "host4": ["zone"]}
    assert site.controller.vm("a").policy == VmPolicy(anti_affinity=["g"],
                                                     forbidden_hosts=["host3"])


def test_migrate_to_refused_host_fails_with_where_reason_and_changes_nothing(site: Site
                                                                              ) -> None:
    create(site, "a", "host1", "11", forbidden_hosts=["host3"])
    record = site.migrations.wait(site.migrate("a", to="host3").id, 30)
    assert record.state == "rolled-back"
    assert record.error is not None and "forbidden: host3 is among a's forbidden hosts" \
        in record.error
    assert site.controller.vm("a").host == "host1"
    assert site.controller.vm("a").state == "running"


def test_policy_changed_live_and_bad_policy_refused(site: Site) -> None:
    create(site, "a", "host1", "11")
    placement = Placement(site.controller)
    with pytest.raises(InputError, match=r"policy\.tier"):
        placement.set_policy("a", {"tier": 42}, site.actor())
    assert placement.policy("a") == VmPolicy()
    placement.set_policy("a", {"allowed_hosts": ["host1", "host2"]}, site.actor())
    assert reasons(site, "a")["host3"] == ["allowed"]


def test_drain_moves_every_vm_honouring_anti_affinity(site: Site) -> None:
    create(site, "a", "host1", "11", anti_affinity=["g"])
    create(site, "b", "host1", "12")
    create(site, "c", "host1", "13")
    create(site, "d", "host2", "14", anti_affinity=["g"])
    mover = Mover(site.migrations)
    job = mover.drain("host1", site.actor())
    assert len(job.moves) == 3
    deadline = time.monotonic() + 60
    while mover.drain_status("host1").state == "running" and time.monotonic() < deadline:
        beat(site)
        time.sleep(0.1)
    job = mover.drain_status("host1")
    assert job.state == "done", job
    hosts = {v.name: v.host for v in site.controller.vms()}
    assert "host1" not in hosts.values()
    assert hosts["a"] != hosts["d"]
    assert "host4" not in hosts.values()
    assert reasons(site, "d")["host1"] == ["state"]        # in maintenance
    mover.undrain("host1", site.actor())
    assert reasons(site, "d")["host1"] == []


def test_drain_refused_up_front_when_a_vm_has_nowhere_to_go(site: Site) -> None:
    create(site, "a", "host1", "11", allowed_hosts=["host1"])
    with pytest.raises(ConflictError) as info:
        Mover(site.migrations).drain("host1", site.actor())
    assert "a has nowhere to go" in info.value.message
    stuck = info.value.fields["stuck"]["a"]
    assert {h["host"]: [r["code"] for r in h["reasons"]] for h in stuck}["host2"] == ["allowed"]
    assert not any(h.maintenance for h in site.controller.hosts())


def test_balance_dry_run_plans_within_the_bound(site: Site) -> None:
    for i in range(4):
        create(site, f"v{i}", "host1", str(20 + i))
    out = Mover(site.migrations).balance(2, True, site.actor())
    assert len(out.moves) == 2 and out.state == "planned"
    assert out.load_before["host1"] == 0.5 and out.load_after["host1"] == 0.25
    assert {v.host for v in site.controller.vms()} == {"host1"}


def test_balance_reads_cpu_from_the_agents_and_moves_the_busy_vm(site: Site) -> None:
    clock = [0.0]
    for name, agent in site.agents.items():
        agent.cpu_load = CpuLoad(site.hypervisors[name], clock=lambda: clock[0])
    for i, vm in enumerate(("busy", "idle", "other")):
        create(site, vm, "host1" if vm != "other" else "host2", str(30 + i))
    beat(site)                                    # first readings: no load yet
    site.hypervisors["host1"].burn("busy", 3.0)
    clock[0] += 2.0
    beat(site)
    assert site.controller.host_report("host1").guests[0].cpu_load == 1.5
    out = Mover(site.migrations).balance(1, True, site.actor())
    assert [(m.vm, m.source) for m in out.moves] == [("busy", "host1")]
    assert out.cpu_before["host1"] > out.cpu_after["host1"]
    assert out.memory_before["host1"] > out.memory_after["host1"]
    assert {v.host for v in site.controller.vms() if v.name == "busy"} == {"host1"}
