"""The pure placement model: every reason a host is refused, and the plans built on it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vmferry.model.placement import (
    Cluster,
    Code,
    HostFacts,
    HostState,
    VmFacts,
    VmPolicy,
    network_view,
    profile_needs,
)
from vmferry.model.placement_plans import (
    plan_balance,
    plan_drain,
    plan_restart,
    pressure,
)
from vmferry.model.profile import PortProfile
from vmferry.model.topology import load_topology

# Three racks; rack3 is the secure zone and its ToR link allows only VLAN 300.
TOPO = load_topology({
    "name": "p3", "vlans": [{"id": 100}, {"id": 200}, {"id": 300}],
    "switches": [{"name": "spine", "role": "spine"}, {"name": "tor1", "rack": "r1"},
                 {"name": "tor2", "rack": "r2"}, {"name": "tor3", "rack": "r3"}],
    "racks": [{"name": "r1", "tor": "tor1"}, {"name": "r2", "tor": "tor2"},
              {"name": "r3", "tor": "tor3"}],
    "links": [{"a": "tor1", "b": "spine"}, {"a": "tor2", "b": "spine"},
              {"a": "tor3", "b": "spine", "vlans": [300]}],
    "hosts": [{"name": "h1", "rack": "r1", "memory_mib": 1024},
              {"name": "h2", "rack": "r1", "memory_mib": 1024},
              {"name": "h3", "rack": "r2", "memory_mib": 1024, "softswitch_features": []},
              {"name": "h4", "rack": "r2", "memory_mib": 512},
              {"name": "h5", "rack": "r3", "memory_mib": 1024, "zone": "secure"}],
    "clients": [{"name": "c100", "switch": "tor1", "vlan": 100, "ip": "192.0.2.1/24"}],
})


def host(name: str, **kw: Any) -> HostFacts:
    spec = TOPO.host(name)
    base: dict[str, Any] = dict(
        name=name, rack=spec.rack, zone=spec.zone, memory_mib=spec.memory_mib,
        features=frozenset(spec.softswitch_features), qemu_version="10.0.2",
        machine_types=frozenset({"q35", "pc"}), shared_storage="/srv/shared",
        shared_storage_ok=True, migration_ip=f"203.0.113.{name[1:]}/24")
    base.update(kw)
    return HostFacts(**base)


def cluster(vms: list[VmFacts], **host_overrides: dict[str, Any]) -> Cluster:
    hosts = [host(h.name, **host_overrides.get(h.name, {})) for h in TOPO.hosts]
    return Cluster(hosts, vms, network_view(TOPO))


def vm(name: str, on: str, memory: int = 256, vlan: int = 100, **policy: Any) -> VmFacts:
    return VmFacts(name, on, memory, (vlan,), VmPolicy(**policy))


def codes(c: Cluster, name: str) -> dict[str, set[Code]]:
    return {v.host: {r.code for r in v.reasons} for v in c.where(name)}


def test_where_gives_every_reason_per_host() -> None:
    c = cluster([vm("web", "h1", anti_affinity=["web"]), vm("web2", "h2", anti_affinity=["web"]),
                 vm("big", "h4", memory=400)],
                h3={"qemu_version": "9.2.0"})
    web = PortProfile.model_validate({"name": "web", "vlan": 100,
                                      "qos": {"to_vm": {"rate_kbps": 1000}}})
    c.vms["web"].needs = profile_needs(web)
    got = codes(c, "web")
    assert got["h1"] == {Code.CURRENT}
    assert got["h2"] == {Code.ANTI_AFFINITY}
    assert got["h3"] == {Code.PROFILE, Code.QEMU}
    assert got["h4"] == {Code.CAPACITY}
    assert got["h5"] == {Code.ZONE, Code.VLAN}
    h5 = next(v for v in c.where("web") if v.host == "h5")
    assert not h5.ok
    assert any("VLAN 100" in r.message for r in h5.reasons)


def test_zone_vm_only_in_its_zone_and_vlan_must_reach() -> None:
    c = cluster([vm("db", "h5", vlan=300, zone="secure"), vm("x", "h1")])
    got = codes(c, "db")
    assert got["h1"] == {Code.ZONE}      # VLAN 300 reaches rack1 (no clients of it elsewhere)
    assert all(Code.ZONE in got[h] for h in ("h1", "h2", "h3", "h4"))


def test_host_states_allowed_forbidden_and_report_facts() -> None:
    c = cluster([vm("a", "h1", allowed_hosts=["h1", "h2"], forbidden_hosts=["h3"])],
                h2={"state": HostState.MAINTENANCE, "shared_storage_ok": False,
                    "migration_ip": None, "machine_types": frozenset({"pc"})})
    got = codes(c, "a")
    assert got["h2"] == {Code.STATE, Code.STORAGE, Code.MIGRATION_ADDRESS, Code.MACHINE}
    assert got["h3"] == {Code.FORBIDDEN, Code.ALLOWED}
    assert Code.ALLOWED in got["h4"]


def test_affinity_follows_peers_on_up_hosts_only() -> None:
    c = cluster([vm("a", "h1", affinity=["g"]), vm("b", "h2", affinity=["g"])])
    assert codes(c, "a")["h2"] == set()
    assert Code.AFFINITY in codes(c, "a")["h3"]
    c.hosts["h2"].state = HostState.DOWN
    assert Code.AFFINITY not in codes(c, "a")["h3"]


def test_downtime_needs_a_link_faster_than_the_dirty_rate() -> None:
    c = cluster([VmFacts("busy", "h1", 256, (100,), VmPolicy(max_downtime_ms=50),
                         workload_mibps=200)], h2={"migration_mbps": 1000})
    reasons = next(v for v in c.where("busy") if v.host == "h2").reasons
    assert [r.code for r in reasons] == [Code.DOWNTIME]
    assert "50 ms" in reasons[0].message
    assert Code.DOWNTIME not in codes(c, "busy")["h3"]


@pytest.mark.parametrize("policy,field", [
    ({"affinity": ["g"], "anti_affinity": ["g"]}, "affinity"),
    ({"allowed_hosts": ["h1"], "forbidden_hosts": ["h1"]}, "forbidden"),
    ({"allowed_hosts": []}, "allowed_hosts"),
    ({"tier": 10}, "tier"),
    ({"zone": "bad zone"}, "zone"),
    ({"colour": "red"}, "colour"),
])
def test_bad_policy_is_refused_naming_the_field(policy: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        VmPolicy(**policy)
    assert field in str(info.value)


def test_drain_honours_anti_affinity_and_refuses_with_reasons() -> None:
    c = cluster([vm("a", "h1", anti_affinity=["g"]), vm("b", "h1"), vm("c", "h1"),
                 vm("d", "h2", anti_affinity=["g"])])
    c.hosts["h1"].state = HostState.MAINTENANCE
    plan = plan_drain(c, "h1")
    assert not plan.stuck
    dest = {m.vm: m.destination for m in plan.moves}
    assert set(dest) == {"a", "b", "c"}
    assert dest["a"] != "h2" and "h5" not in dest.values()
    assert not c.on_host["h1"]

    tight = cluster([vm("z", "h5", vlan=300, zone="secure")])
    tight.hosts["h5"].state = HostState.MAINTENANCE
    plan = plan_drain(tight, "h5")
    assert list(plan.stuck) == ["z"] and not plan.moves
    assert all(not v.ok for v in plan.stuck["z"])


def test_restart_by_tier_when_capacity_is_short() -> None:
    c = cluster([vm("low", "h4", memory=300, tier=5), vm("high", "h4", memory=200, tier=0),
                 vm("f1", "h1", memory=900), vm("f2", "h2", memory=900),
                 vm("f3", "h3", memory=800)])
    c.hosts["h4"].state = HostState.FENCED
    plan = plan_restart(c, "h4")
    assert [m.vm for m in plan.moves] == ["high"]
    assert list(plan.stuck) == ["low"]


def test_balance_evens_memory_within_the_move_bound() -> None:
    c = cluster([vm(f"v{i}", "h1", memory=128) for i in range(8)])
    plan = plan_balance(c, max_moves=3)
    assert len(plan.moves) == 3
    assert plan.load_before["h1"] == 1.0 and plan.load_after["h1"] == 0.625
    assert max(plan.load_after.values()) < max(plan.load_before.values())


def busy(name: str, on: str, cpu: float, **kw: Any) -> VmFacts:
    facts = vm(name, on, **kw)
    facts.cpu = cpu
    return facts


TWO_CPUS = {h.name: {"cpus": 2} for h in TOPO.hosts}


def test_balance_moves_the_busy_vm_off_the_cpu_loaded_host() -> None:
    # h1 and h2 hold the same memory; h1's "busy" keeps one of its two CPUs busy. A plan on
    # memory alone would take "a1" (first by name): as good for memory, no help for CPU.
    c = cluster([busy("busy", "h1", 1.0), busy("a1", "h1", 0.02), busy("a2", "h2", 0.02),
                 busy("a3", "h2", 0.02)], **TWO_CPUS)
    assert pressure(c, "h1") > pressure(c, "h2")      # equal memory: CPU breaks the tie
    plan = plan_balance(c, max_moves=1)
    assert [(m.vm, m.source) for m in plan.moves] == [("busy", "h1")]
    assert plan.cpu_before["h1"] == 0.51 and plan.cpu_after["h1"] == 0.01
    assert plan.memory_before["h1"] == 0.5 and plan.memory_after["h1"] == 0.25
    dest = plan.moves[0].destination
    assert plan.cpu_after[dest] == 0.5 and plan.load_after[dest] == 0.5
    assert max(plan.load_after.values()) < max(plan.load_before.values())


def test_cpu_balancing_honours_policies_and_the_move_bound() -> None:
    def vms() -> list[VmFacts]:      # a plan moves the facts it was given: new ones each time
        return [busy("busy", "h1", 1.6, forbidden_hosts=["h2"]), busy("a1", "h1", 0.1),
                busy("a2", "h1", 0.1)]
    plan = plan_balance(cluster(vms(), **TWO_CPUS), max_moves=1)
    # h2 is forbidden, h4 lacks the memory to be cooler after, h5 is another zone: h3.
    assert [(m.vm, m.destination) for m in plan.moves] == [("busy", "h3")]
    plan = plan_balance(cluster(vms(), **TWO_CPUS), max_moves=5)
    assert len(plan.moves) <= 5
    assert all(not (m.vm == "busy" and m.destination == "h2") for m in plan.moves)
    assert all(m.destination != "h5" for m in plan.moves)
    assert max(plan.load_after.values()) < max(plan.load_before.values())


def test_balance_leaves_a_lone_busy_vm_where_it_is() -> None:
    # Moving the only VM of a host just moves its load: nothing gets cooler.
    c = cluster([busy("busy", "h1", 1.0, memory=128)], **TWO_CPUS)
    assert plan_balance(c, max_moves=3).moves == []


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    """Valid clusters: every VM placed where the rules allow it."""
    names = [h.name for h in TOPO.hosts]
    vms: list[VmFacts] = []
    used = dict.fromkeys(names, 0)
    groups: set[tuple[str, str]] = set()
    for i in range(draw(st.integers(0, 12))):
        on = draw(st.sampled_from(names[:4]))
        memory = draw(st.sampled_from([64, 128, 256]))
        anti = draw(st.sampled_from([[], ["g1"], ["g2"]]))
        if used[on] + memory > TOPO.host(on).memory_mib or any((on, g) in groups for g in anti):
            continue
        used[on] += memory
        groups |= {(on, g) for g in anti}
        vms.append(vm(f"v{i}", on, memory=memory, anti_affinity=anti))
    return cluster(vms)


@settings(max_examples=60, deadline=None)
@given(clusters(), st.sampled_from(["h1", "h2", "h3", "h4"]))
def test_plans_never_break_a_rule(c: Cluster, drained: str) -> None:
    c.hosts[drained].state = HostState.MAINTENANCE
    plan = plan_drain(c, drained)
    for name in c.on_host[drained]:
        assert name in plan.stuck
    for h, spec in c.hosts.items():
        assert c.used[h] <= spec.memory_mib or h == drained
        for group in ("g1", "g2"):
            assert c.members[group].get(h, 0) <= 1 or h == drained
    # every planned VM: its destination had to be feasible, so where() would now say CURRENT
    for move in plan.moves:
        assert move.destination != drained


@settings(max_examples=60, deadline=None)
@given(clusters(), st.sampled_from(["h1", "h2", "h3", "h4"]))
def test_where_is_yes_exactly_when_there_are_no_reasons(c: Cluster, drained: str) -> None:
    if c.vms:
        c.where(next(iter(c.vms)))      # the indexes are built before the plan moves VMs
    c.hosts[drained].state = HostState.MAINTENANCE
    plan_drain(c, drained)
    for name in c.vms:
        # where's set-based shortcut answers exactly as host-by-host verdicts do
        assert [(v.host, v.ok, v.reasons) for v in c.where(name)] == \
            [(h, v.ok, v.reasons) for h in sorted(c.hosts) for v in [c.verdict(name, h)]]
        for verdict in c.where(name):
            assert verdict.ok == (not verdict.reasons)
            quick = c.verdict(name, verdict.host, first_only=True)
            assert quick.ok == verdict.ok
