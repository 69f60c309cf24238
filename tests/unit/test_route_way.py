"""The "route" way across a boundary on a whole site in memory (enginekit on the routed-rack
example, ``FakeRouter``): the port in the rack's VLAN, the router's /32 and proxy entry from
the switchover to the return, nothing stretched, audit, rollback and leftovers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginekit import Site, site_at

from vmferry.controller import audit, route_way
from vmferry.errors import ConflictError
from vmferry.model.boundary import Way
from vmferry.model.topology import HOST_BRIDGE, default_topology_path

WAIT_S = 20
ROUTER = "rtr-rack3"
VM_IP = "192.0.2.10"          # enginekit's VM address
OLD_GATEWAY = "192.0.2.1"     # the router's leg in VLAN 100


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_at(tmp_path, default_topology_path().with_name("routed-rack.yaml"))


def move(site: Site, to: str, **options: object) -> dict[str, Any]:
    record = site.migrations.wait(site.migrate("vm1", to, **options).id, WAIT_S)
    assert record.state == "completed", (record.error, record.phases)
    return record.result.model_dump(mode="json")


def tag(site: Site, host: str) -> int | None:
    return site.softswitches[host].ports(HOST_BRIDGE)["vm-vm1"].tag


def carried(site: Site) -> dict[str, frozenset[int]]:
    return {t.key: site.fabric.trunk_vlans(t.a, t.a_port) for t in site.topology.trunks()
            if t.a in site.fabric.switches}


def test_a_move_by_route_routes_the_kept_address_and_the_return_removes_it(site: Site) -> None:
    site.create_vm()
    result = move(site, "host5", boundary="route")
    assert result["plan"]["crossing"] == "route"
    assert tag(site, "host5") == 300                    # the rack's VLAN, not the VM's
    assert site.router.routes[ROUTER] == {VM_IP}
    assert site.router.proxies[ROUTER] == {OLD_GATEWAY}
    assert site.router.announced == [(ROUTER, VM_IP, True)]
    tunnel = next(t.key for t in site.topology.trunks() if t.tunnel)
    assert carried(site)[tunnel] == frozenset()         # nothing stretched
    assert route_way.desired(site.controller)[ROUTER].routes == {VM_IP}
    assert audit.audit(site.controller) == []

    move(site, "host1", boundary="route")
    assert tag(site, "host1") == 100
    assert site.router.routes[ROUTER] == set() and site.router.proxies[ROUTER] == set()
    assert site.router.announced[-1] == (ROUTER, VM_IP, False)
    assert all(not vlans for vlans in carried(site).values() if 100 not in vlans)
    assert audit.audit(site.controller) == []


def test_leaving_a_routed_rack_for_elsewhere_removes_the_route(site: Site) -> None:
    site.create_vm()
    move(site, "host5", boundary="route")
    move(site, "host3")                 # rack2: the VM's own subnet, by the fabric
    assert site.router.routes[ROUTER] == set() and site.router.proxies[ROUTER] == set()
    assert tag(site, "host3") == 100
    assert audit.audit(site.controller) == []


def test_a_vm_deleted_while_routed_leaves_nothing_and_its_namesake_is_not_routed(
        site: Site) -> None:
    site.create_vm()
    move(site, "host5", boundary="route")
    site.controller.delete_vm("vm1", site.actor())
    assert site.router.routes[ROUTER] == set() and site.router.proxies[ROUTER] == set()
    site.create_vm(host="host5")        # a new VM of the same name, created in the rack
    assert route_way.desired(site.controller)[ROUTER].routes == frozenset()
    assert tag(site, "host5") == 100    # stretched, as any VM of VLAN 100 created there


def test_a_move_by_stretch_puts_nothing_on_the_router(site: Site) -> None:
    site.create_vm()
    result = move(site, "host5")
    assert result["plan"]["crossing"] == "stretch"
    assert tag(site, "host5") == 100
    assert site.router.routes[ROUTER] == set() and site.router.announced == []


def test_a_rolled_back_return_keeps_the_route_of_the_vm_still_in_the_rack(site: Site) -> None:
    site.create_vm()
    move(site, "host5", boundary="route")
    site.hold("host5", "vm1")
    record = site.migrate("vm1", "host1", boundary="route")
    site.wait_status("host5", "vm1", "active")
    site.migrations.cancel(record.id, site.actor())
    ended = site.migrations.wait(record.id, WAIT_S)
    assert ended.state == "rolled-back", (ended.error, ended.phases)
    assert site.router.routes[ROUTER] == {VM_IP}
    assert tag(site, "host5") == 300
    assert audit.audit(site.controller) == []


def test_audit_finds_router_leftovers_and_fix_removes_them(site: Site) -> None:
    site.router.routes[ROUTER].add("192.0.2.99")
    site.router.proxies[ROUTER].add("192.0.2.254")
    found = {(f.kind, f.where, f.what) for f in audit.audit(site.controller)}
    assert found == {("host-route", ROUTER, "192.0.2.99"), ("proxy-arp", ROUTER, "192.0.2.254")}
    assert audit.fix(site.controller, audit.audit(site.controller)) == []
    assert site.router.routes[ROUTER] == set() and site.router.proxies[ROUTER] == set()


def test_a_routed_vm_whose_route_went_missing_is_found_and_put_back(site: Site) -> None:
    site.create_vm()
    move(site, "host5", boundary="route")
    site.router.routes[ROUTER].clear()          # e.g. a router restarted
    found = [(f.kind, f.what) for f in audit.audit(site.controller)]
    assert found == [("host-route-missing", VM_IP)]
    assert route_way.reconcile(site.controller) == [f"{ROUTER}: +route {VM_IP}"]
    assert route_way.reconcile(site.controller) == []       # nothing differs any more


def test_an_unreachable_router_is_reported_by_audit(site: Site) -> None:
    site.router.fail.add(ROUTER)
    assert [(f.kind, f.where) for f in audit.audit(site.controller)] == \
        [("unreachable", "routers")]


def test_asking_for_a_way_that_cannot_take_the_move_is_refused_naming_why(site: Site) -> None:
    with pytest.raises(ConflictError) as info:
        route_way.plan_move(site.topology, "vm1", 100, "host1", "host3", "route")
    assert info.value.field == "boundary"
    assert "cannot cross by route: " in info.value.message
    assert route_way.plan_move(site.topology, "vm1", 100, "host5", "host1",
                               "route").way is Way.ROUTE      # the way back
    assert route_way.attachment_vlan(site.topology, 100, VM_IP, "host5", Way.ROUTE) == 300
    assert route_way.attachment_vlan(site.topology, 100, VM_IP, "host5", Way.STRETCH) == 100
    assert route_way.attachment_vlan(site.topology, 100, VM_IP, "host1", Way.ROUTE) == 100


def test_flows_still_translated_after_their_translation_went_are_found_and_flushed(
        site: Site) -> None:
    site.nat.flows[ROUTER] = {"192.0.2.77": "198.18.3.250"}     # no translation holds it
    found = [(f.kind, f.where, f.what) for f in audit.audit(site.controller)]
    assert found == [("router-flow", ROUTER, "192.0.2.77")]
    assert audit.fix(site.controller, audit.audit(site.controller)) == []
    assert site.nat.flows[ROUTER] == {}


def test_flows_of_a_held_translation_are_no_leftover_and_a_removal_flushes_them(
        site: Site) -> None:
    site.nat.add(ROUTER, "192.0.2.77/24", "198.18.3.250/24")
    site.nat.flows[ROUTER] = {"192.0.2.77": "198.18.3.250", "192.0.2.78": "198.18.3.249"}
    assert route_way.reconcile(site.controller) == \
        [f"{ROUTER}: -flows 192.0.2.78 -> 198.18.3.249"]       # the one nothing explains
    assert site.nat.flows[ROUTER] == {"192.0.2.77": "198.18.3.250"}
    site.nat.remove(ROUTER, "192.0.2.77")
    assert site.nat.flows[ROUTER] == {}
