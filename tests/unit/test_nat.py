"""The "NAT" way across a boundary: the address pool, the lease in the store, the VLAN a VM's
port has where, and what audit calls a leftover (controller/nat.py, drivers/fabric/nat.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmferry.bench.migration import BenchConfig
from vmferry.bench.migration.lab import BenchLab
from vmferry.controller import nat
from vmferry.drivers.fabric.nat import FakeNat, _ruleset
from vmferry.errors import FabricError, InputError
from vmferry.model.addresses import bare, free_address, pool
from vmferry.model.boundary import Way, crossing_facts, plan_crossing
from vmferry.model.migration import MigrationOptions
from vmferry.model.topology import Topology, default_topology_path, load_topology
from vmferry.store.db import Store
from vmferry.store.schema import HostRow, NatLeaseRow, VmRow

EXAMPLE = default_topology_path().with_name("routed-rack.yaml")


def topology() -> Topology:
    return load_topology(EXAMPLE)


def test_the_pool_is_the_subnet_less_its_gateway_highest_first() -> None:
    assert pool("198.18.3.0/29", "198.18.3.1/29") == [
        "198.18.3.6", "198.18.3.5", "198.18.3.4", "198.18.3.3", "198.18.3.2"]
    assert free_address("198.18.3.0/29", "198.18.3.1/29", []) == "198.18.3.6/29"
    assert free_address("198.18.3.0/29", "198.18.3.1", ["198.18.3.6/29", "198.18.3.5"]) \
        == "198.18.3.4/29"


def test_an_exhausted_pool_has_no_free_address() -> None:
    assert free_address("198.18.3.0/30", "198.18.3.1/30", ["198.18.3.2/30"]) is None


@pytest.mark.parametrize("subnet", ["not-a-subnet", "10.0.0.0/8"])
def test_a_bad_or_huge_subnet_is_refused_naming_the_field(subnet: str) -> None:
    with pytest.raises(InputError, match="subnet"):
        pool(subnet, None)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_schema()
    with store.session() as session:
        for host in ("host1", "host3", "host5"):
            session.add(HostRow(name=host, agent_url="http://x", report={}))
    yield store
    store.dispose()


def add_vm(store: Store, name: str, host: str, vlan: int, ip: str, mac: str) -> None:
    with store.session() as session:
        session.add(VmRow(name=name, host=host, memory_mib=128, vlan=vlan, ip=ip, mac=mac,
                          state="running"))


def lease(vm: str, ip: str, state: str = nat.ACTIVE) -> NatLeaseRow:
    return NatLeaseRow(vm=vm, router="rtr-rack3", home_vlan=100, home_ip="192.0.2.30/24",
                       vlan=300, ip=ip, gateway="198.18.3.1", state=state, migration_id=None)


def test_the_store_decides_whether_nat_has_an_address(store: Store) -> None:
    topo = topology()
    facts = crossing_facts(topo, "web", 100, "host1", "host5")
    assert not facts.free_destination_address        # the model alone knows no pool
    with store.session() as session:
        facts = nat.with_address_pool(session, topo, facts)
    assert facts.free_destination_address
    assert plan_crossing(facts, Way.NAT).way is Way.NAT
    # Fill rack3's /24: VMs of VLAN 300 and leases both take addresses.
    with store.session() as session:
        taken = pool("198.18.3.0/24", "198.18.3.1/24")
        for i, address in enumerate(taken[:200]):
            session.add(VmRow(name=f"r{i}", host="host5", memory_mib=64, vlan=300,
                              ip=f"{address}/24", mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}",
                              state="running"))
        for i, address in enumerate(taken[200:]):
            session.add(lease(f"away{i}", f"{address}/24"))
    with store.session() as session:
        facts = nat.with_address_pool(session, topo, facts)
    plan = plan_crossing(facts, Way.NAT)
    assert plan.way is None
    assert plan.reasons[Way.NAT] == "no free address in 198.18.3.0/24"


def test_a_vm_away_by_nat_has_the_racks_vlan_there_and_its_own_elsewhere() -> None:
    topo = topology()
    away = lease("web", "198.18.3.254/24")
    assert nat.vlan_at(topo, away, 100, "host5") == 300
    assert nat.vlan_at(topo, away, 100, "host1") == 100
    assert nat.vlan_at(topo, None, 100, "host5") == 100     # stretched: its own VLAN


def test_the_fake_nat_keeps_translations_and_proxy_entries() -> None:
    fake = FakeNat()
    fake.add("rtr-rack3", "192.0.2.30/24", "198.18.3.254/24")
    assert fake.translations("rtr-rack3") == {"192.0.2.30": "198.18.3.254"}
    assert fake.proxied("rtr-rack3") == {"192.0.2.30"}
    fake.remove("rtr-rack3", "192.0.2.30")
    fake.remove("rtr-rack3", "192.0.2.30")                  # idempotent
    assert fake.translations("rtr-rack3") == {}
    assert fake.tell_guest("rtr-rack3", "192.0.2.30/24", "addr add x").startswith(
        "VMFERRY-TALK started")
    fake.guest_refuses = True
    with pytest.raises(FabricError):
        fake.tell_guest("rtr-rack3", "192.0.2.30", "addr add x")


def test_the_router_ruleset_translates_only_on_the_uplink_leg() -> None:
    script = _ruleset({"192.0.2.30": "198.18.3.254"})
    assert "192.0.2.30 : 198.18.3.254" in script and "198.18.3.254 : 192.0.2.30" in script
    assert 'iifname "up0" dnat to ip daddr map @home_to_new' in script
    assert 'oifname "up0" snat to ip saddr map @new_to_home' in script


class AuditController:
    """What ``nat.leftovers`` reads of a controller: its store, topology and NAT driver."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.nat = FakeNat()

    def topology(self) -> Topology:
        return topology()

    def nat_driver(self) -> FakeNat:
        return self.nat


def test_audit_reports_translations_and_leases_no_move_explains(store: Store) -> None:
    controller = AuditController(store)
    add_vm(store, "web", "host5", 100, "192.0.2.30/24", "52:54:00:00:00:01")
    with store.session() as session:
        session.add(lease("web", "198.18.3.254/24"))
    controller.nat.add("rtr-rack3", "192.0.2.30", "198.18.3.254")
    assert nat.leftovers(controller) == []                  # type: ignore[arg-type]
    controller.nat.add("rtr-rack3", "192.0.2.99", "198.18.3.250")
    controller.nat.remove("rtr-rack3", "192.0.2.30")
    kinds = sorted((kind, what) for kind, _, what, _ in
                   nat.leftovers(controller))               # type: ignore[arg-type]
    assert kinds == [("nat-missing", "192.0.2.30"), ("nat-proxy", "192.0.2.99"),
                     ("nat-rule", "192.0.2.99")]
    for kind, where, what, _ in nat.leftovers(controller):  # type: ignore[arg-type]
        nat.fix(controller, kind, where, what)              # type: ignore[arg-type]
    assert nat.leftovers(controller) == []                  # type: ignore[arg-type]
    with store.session() as session:                        # the VM is home: a stale lease
        row = session.get(VmRow, "web")
        assert row is not None
        row.host = "host1"
    found = nat.leftovers(controller)                       # type: ignore[arg-type]
    assert [f[0] for f in found] == ["nat-lease", "nat-rule", "nat-proxy"]


def test_a_migration_may_ask_for_a_way_and_the_benchmark_moves_by_nat() -> None:
    assert MigrationOptions(boundary="nat").boundary == "nat"
    with pytest.raises(ValueError):
        MigrationOptions.model_validate({"boundary": "teleport"})
    assert BenchConfig(boundary="nat", variants=("vmferry",)).boundary == "nat"
    with pytest.raises(ValueError, match="only the vmferry variant"):
        BenchConfig(boundary="nat")
    assert BenchLab(topology(), 1).rack_hosts("nat") == ("host1", "host5")


@pytest.mark.parametrize(("line", "error"), [
    ("addr swap 198.18.3.254/24", "bad addr operation 'swap'"),
    ("addr add 198.18.3.254", "bad address '198.18.3.254'"),
    ("addr add 198.18.3.254/2x", "bad address"),
    ("addr del 198.18.3.254/24 1.2.3.4;reboot", "bad gateway"),
])
def test_the_guest_refuses_a_bad_address_request_before_changing_anything(
        line: str, error: str) -> None:
    init = Path(nat.__file__).parents[1] / "image" / "init.sh"
    result = subprocess.run(["sh", str(init), "--talk"], input=line + "\n",
                            capture_output=True, text=True, timeout=10)
    assert result.stdout.strip().startswith("VMFERRY-TALK error " + error), result.stdout
    assert bare("198.18.3.254/24") == "198.18.3.254"
