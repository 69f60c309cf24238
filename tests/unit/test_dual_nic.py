"""The "dual NIC" way across a boundary on a whole site in memory (enginekit on the
routed-rack example; FakeHypervisor models the hot-plug, FakeSoftswitch the ports): the second
NIC on the source, the destination with both NICs, the failover and the old NIC's removal,
the VM's published identity, the way back, rollback and audit (controller/dual_nic.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginekit import Site, site_at

from vmferry import privileged
from vmferry.controller import audit, dual_nic, nat
from vmferry.controller.phases import STEPS
from vmferry.controller.run import Run
from vmferry.drivers.hypervisor.base import GuestNic
from vmferry.model.boundary import Way, crossing_facts, plan_crossing
from vmferry.model.migration import PHASES, MigrationOptions, Phase
from vmferry.model.names import aux_tap_name, tap_name
from vmferry.model.topology import HOST_BRIDGE, default_topology_path
from vmferry.store.schema import DualNicRow, MigrationRow, VmRow

WAIT_S = 20
ROUTER = "rtr-rack3"
VM_IP = "192.0.2.10/24"        # enginekit's VM address


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_at(tmp_path, default_topology_path().with_name("routed-rack.yaml"))


def move(site: Site, to: str, **options: object) -> dict[str, Any]:
    record = site.migrations.wait(site.migrate("vm1", to, **options).id, WAIT_S)
    assert record.state == "completed", (record.error, record.phases)
    return record.result.model_dump(mode="json")


def vm_row(site: Site) -> tuple[int, str, str]:
    with site.controller.store.session() as session:
        vm = session.get(VmRow, "vm1")
        assert vm is not None
        return vm.vlan, vm.ip, vm.mac


def rows(site: Site) -> list[tuple[str, str, str]]:
    with site.controller.store.session() as session:
        return [(r.vm, r.ip, r.state) for r in session.query(DualNicRow)]


def ports(site: Site, host: str) -> dict[str, int | None]:
    return {name: p.tag for name, p in site.softswitches[host].ports(HOST_BRIDGE).items()
            if name.startswith("vm-")}


def test_the_store_lets_dual_apply_on_a_qemu_destination(site: Site) -> None:
    facts = crossing_facts(site.topology, "vm1", 100, "host1", "host5")
    with site.controller.store.session() as session:
        facts = nat.with_address_pool(session, site.topology, facts)
    assert facts.guest_hotplug and facts.free_destination_address
    plan = plan_crossing(facts, Way.DUAL)
    assert plan.way is Way.DUAL and plan.reasons[Way.STRETCH] == "not asked for"


def test_a_move_by_dual_nic_swaps_the_nic_and_the_return_restores_the_home_one(
        site: Site) -> None:
    site.create_vm()
    home_vlan, home_ip, home_mac = vm_row(site)
    result = move(site, "host5", boundary="dual")
    assert result["plan"]["crossing"] == "dual"
    new_ip, new_mac = result["dual"]["address"], result["dual"]["mac"]
    assert new_ip.startswith("198.18.3.") and new_mac != home_mac
    # Published: the VM is now the rack's address and NIC; its home ones stay reserved.
    assert vm_row(site) == (300, new_ip, new_mac)
    assert rows(site) == [("vm1", new_ip, dual_nic.ACTIVE)]
    # host5: one NIC (the new one, on root port 1) and one port, the rack's VLAN.
    assert site.hypervisors["host5"].nics("vm1") == {1: new_mac}
    assert ports(site, "host5") == {tap_name("vm1"): 300}
    assert ports(site, "host1") == {}
    told = [line for _, _, line in site.nat.told]
    assert told == [f"addr add {new_ip} keep {new_mac}",
                    f"addr add {new_ip} 198.18.3.1 {new_mac}"]
    assert site.nat.translations(ROUTER) == {}          # nothing translates: not NAT
    assert audit.audit(site.controller) == []

    result = move(site, "host1")                         # the row says: back by dual NIC
    assert result["plan"]["crossing"] == "dual"
    assert vm_row(site) == (home_vlan, home_ip, home_mac)
    assert rows(site) == []
    assert site.hypervisors["host1"].nics("vm1") == {0: home_mac}
    assert ports(site, "host1") == {tap_name("vm1"): 100}
    assert ports(site, "host5") == {}
    assert site.nat.told[-1][2] == f"addr add {home_ip} none {home_mac}"
    assert audit.audit(site.controller) == []


def test_a_cancelled_move_in_unplugs_the_second_nic_and_gives_the_address_back(
        site: Site) -> None:
    site.create_vm()
    _, _, home_mac = vm_row(site)
    site.hold("host1", "vm1")
    record = site.migrate("vm1", "host5", boundary="dual")
    site.wait_status("host1", "vm1", "active")
    assert len(site.hypervisors["host1"].nics("vm1")) == 2     # the second NIC is in
    assert aux_tap_name("vm1") in ports(site, "host1")
    site.migrations.cancel(record.id, site.actor())
    ended = site.migrations.wait(record.id, WAIT_S)
    assert ended.state == "rolled-back", (ended.error, ended.phases)
    assert site.hypervisors["host1"].nics("vm1") == {0: home_mac}
    assert ports(site, "host1") == {tap_name("vm1"): 100}
    assert ports(site, "host5") == {}
    assert rows(site) == [] and vm_row(site)[1] == VM_IP
    assert audit.audit(site.controller) == []


def test_audit_finds_a_leftover_second_nic_port_and_row_and_fix_removes_them(
        site: Site) -> None:
    site.create_vm()
    site.agents["host5"].links.create_tap(None, aux_tap_name("vm1"))
    with site.controller.store.session() as session:
        session.add(DualNicRow(vm="vm1", router=ROUTER, home_vlan=100, home_ip=VM_IP,
                               home_mac="52:54:00:00:00:99", home_slot=0, vlan=300,
                               ip="198.18.3.254/24", mac="52:54:00:00:00:98",
                               gateway="198.18.3.1", state=dual_nic.ACTIVE, migration_id=None))
    found = {(f.kind, f.where, f.what) for f in audit.audit(site.controller)}
    assert found == {("tap", "host5", aux_tap_name("vm1")), ("dual-nic", ROUTER, "vm1")}
    assert audit.fix(site.controller, audit.audit(site.controller)) == []
    assert rows(site) == []


def test_the_fake_hypervisor_refuses_a_migration_whose_nics_differ(site: Site) -> None:
    hv = site.hypervisors["host1"]
    site.create_vm()
    hv.plug_nic("vm1", GuestNic("52:54:00:00:00:77", aux_tap_name("vm1"), 1))
    assert hv.nics("vm1")[1] == "52:54:00:00:00:77"
    hv.unplug_nic("vm1", 0)                     # the main NIC goes: the other is main
    assert hv.nics("vm1") == {1: "52:54:00:00:00:77"}
    assert hv.spec("vm1").tap == aux_tap_name("vm1")


def die_at(site: Site, phase: Phase) -> int:
    """Drive a move by dual NIC host1 -> host5 in this thread up to ``phase`` (acted, not
    ended), as a controller that died there would leave it."""
    site.create_vm()
    options = MigrationOptions.model_validate({"max_downtime_ms": 300, "boundary": "dual"})
    with site.store.session() as session:
        row = MigrationRow(vm="vm1", source="host1", destination="host5", state="running",
                           phase=Phase.PRECHECK.value, options=options.model_dump(mode="json"),
                           phases=[], result={})
        session.add(row)
        session.flush()
        migration_id = row.id
    run = Run(site.controller, migration_id, threading.Event(), lambda record: None)
    for current in PHASES[:PHASES.index(phase) + 1]:
        run.begin(current)
        STEPS[current](run)
        if current is not phase:
            run.end(current, ok=True)
    return migration_id


@pytest.mark.parametrize(("phase", "outcome"), [
    (Phase.PRESET_PORT, "rolled-back"),
    (Phase.START_DESTINATION, "rolled-back"),
    (Phase.PRECOPY, "completed"),
    (Phase.ANNOUNCE, "completed"),
])
def test_a_restarted_controller_finishes_or_undoes_the_nic_change(
        site: Site, phase: Phase, outcome: str) -> None:
    migration_id = die_at(site, phase)
    controller, migrations = site.new_controller()
    try:
        assert migrations.resume_unfinished() == [migration_id]
        record = migrations.wait(migration_id, WAIT_S)
    finally:
        controller.close()
    assert record.state == outcome, record.error
    if outcome == "completed":
        vlan, ip, mac = vm_row(site)
        assert vlan == 300 and site.hypervisors["host5"].nics("vm1") == {1: mac}
        assert ports(site, "host5") == {tap_name("vm1"): 300}
        assert rows(site) == [("vm1", ip, dual_nic.ACTIVE)]
    else:
        assert vm_row(site)[1] == VM_IP and rows(site) == []
        assert len(site.hypervisors["host1"].nics("vm1")) == 1
        assert ports(site, "host1") == {tap_name("vm1"): 100}
        assert ports(site, "host5") == {}
    assert audit.audit(site.controller) == []


@pytest.mark.parametrize("vm", ["vm1", "bench-vmferry", "a" * 12, "x" * 63])
def test_the_second_nics_tap_name_is_a_valid_interface_name(vm: str) -> None:
    name = aux_tap_name(vm)
    assert len(name) <= 15 and name != tap_name(vm)
    assert privileged.check_ifname(name) == name
