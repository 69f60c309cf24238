"""A routed rack in the topology: validation naming the field, the tunnel trunk, VLAN pruning
over the tunnel, and the way across the boundary that ``where`` reports."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from vmferry.bench.migration import BenchConfig
from vmferry.bench.migration.lab import BenchLab
from vmferry.controller.boundary import crossings
from vmferry.drivers.fabric.fake import FakeRouter
from vmferry.errors import ConflictError, FabricError, InputError
from vmferry.model.boundary import HostRoute, Way, crossing_facts, host_route, plan_crossing
from vmferry.model.fabric import Endpoint, client_endpoints, desired_trunk_vlans
from vmferry.model.topology import default_topology_path, load_topology

EXAMPLE = default_topology_path().with_name("routed-rack.yaml")


def example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return data


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(InputError) as info:
        load_topology(data)
    return str(info.value)


def test_the_example_has_a_tunnel_trunk_to_the_routed_rack() -> None:
    topo = load_topology(EXAMPLE)
    tunnels = [t for t in topo.trunks() if t.tunnel]
    assert [(t.a, t.a_port, t.b, t.b_port) for t in tunnels] == \
        [("tor1", "x-tor3", "tor3", "x-tor1")]
    assert [r.router for r in topo.routed_racks()] == ["rtr-rack3"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["racks"][2].pop("gateway"), "racks[2]: gateway: required"),
    (lambda d: d["racks"][2].update(gateway="10.0.0.1/24"), "racks[2]: gateway: 10.0.0.1/24"),
    (lambda d: d["racks"][2].update(transit="198.18.255.0/30"), "transit: 198.18.255.0/30"),
    (lambda d: d["racks"][2].update(vlan=100), "racks[2].vlan: a routed rack needs a VLAN"),
    (lambda d: d["racks"][2].update(vlan=301), "racks[2].vlan: VLAN 301 is not declared"),
    (lambda d: d["racks"][2]["uplink"].update(switch="tor9"), "racks[2].uplink.switch: unknown"),
    (lambda d: d["racks"][2]["uplink"].update(switch="tor3"), "racks[2].uplink.switch: the"),
    (lambda d: d["racks"][2]["uplink"].update(ip="198.18.3.9/24"), "racks[2].uplink.ip"),
    (lambda d: d["racks"][0].update(subnet="192.0.2.0/24"), "racks[0]: subnet: only a routed"),
    (lambda d: d["links"][2].update(tunnel=False), "links[2]: tor3 is the ToR of routed rack"),
    (lambda d: d["links"].append({"a": "tor2", "b": "spine", "tunnel": True}),
     "links[3].tunnel: a tunnel must end at a routed rack's ToR"),
    (lambda d: d["links"].__setitem__(2, {"a": "tor2", "b": "tor3", "tunnel": True}),
     "must end at its router's uplink switch 'tor1'"),
    (lambda d: d["clients"].append({"name": "rtr-rack3", "switch": "tor1", "vlan": 100,
                                    "ip": "192.0.2.9/24"}), "rtr-rack3"),
])
def test_bad_routed_racks_are_refused_naming_the_field(change: Any, message: str) -> None:
    data = copy.deepcopy(example())
    change(data)
    assert message in refused(data)


def test_the_tunnel_carries_a_vlan_only_while_a_vm_there_needs_it() -> None:
    topo = load_topology(EXAMPLE)
    key = next(t.key for t in topo.trunks() if t.tunnel)
    fixed = client_endpoints(topo)
    assert Endpoint("tor3", 300, "rtr-rack3") in fixed     # the router's leg in the rack
    assert desired_trunk_vlans(topo, [*fixed, Endpoint("host1", 100, "vm")])[key] == set()
    stretched = desired_trunk_vlans(topo, [*fixed, Endpoint("host5", 100, "vm")])
    assert stretched[key] == {100}
    uplink = next(t.key for t in topo.trunks() if t.a == "host5")
    assert stretched[uplink] == {100}


def test_a_move_into_the_routed_rack_stretches_and_says_why_not_the_others() -> None:
    topo = load_topology(EXAMPLE)
    plan = plan_crossing(crossing_facts(topo, "vm", 100, "host1", "host5"))
    assert plan.way is Way.STRETCH
    assert "no fabric path carries VLAN 100" in plan.reasons[Way.SAME_L2]
    assert plan.reasons[Way.ROUTE] == "stretch comes first"
    assert "no free address in 198.18.3.0/24" in plan.reasons[Way.NAT]
    back = plan_crossing(crossing_facts(topo, "vm", 100, "host5", "host1"))
    assert back.way is Way.STRETCH
    asked = plan_crossing(crossing_facts(topo, "vm", 100, "host1", "host5"), "route")
    assert asked.way is Way.ROUTE
    assert plan_crossing(crossing_facts(topo, "vm", 100, "host1", "host3")).way is Way.SAME_L2


def test_route_needs_the_router_in_the_vms_vlan() -> None:
    data = example()
    data["vlans"].append({"id": 200, "subnet": "198.51.100.0/24"})
    topo = load_topology(data)
    facts = crossing_facts(topo, "vm", 200, "host1", "host5")
    assert facts.routers == () and facts.tunnel_endpoints
    plan = plan_crossing(facts, "route")
    assert plan.way is None and plan.reasons[Way.ROUTE] == "no router joins the two subnets"


def test_where_lists_only_moves_across_a_boundary() -> None:
    topo = load_topology(EXAMPLE)
    out = crossings(topo, "vm", "host1", (100,))
    assert [(c.destination, c.way) for c in out] == [("host5", "stretch")]
    assert set(out[0].reasons) == {"same-l2", "route", "nat", "dual"}
    assert crossings(load_topology(default_topology_path()), "vm", "host1", (100,)) == []


def test_the_route_way_needs_a_host_route_only_in_a_routed_rack() -> None:
    topo = load_topology(EXAMPLE)
    assert host_route(topo, "192.0.2.30/24", 100, "host5") == HostRoute(
        "rtr-rack3", "192.0.2.30", rack_vlan=300, gateway="192.0.2.1", subnet="192.0.2.0/24")
    assert host_route(topo, "192.0.2.30/24", 100, "host1") is None
    assert host_route(topo, "198.18.3.9/24", 300, "host5") is None   # its own subnet


def test_the_fake_router_keeps_host_routes_and_fails_like_an_unreachable_one() -> None:
    routers = FakeRouter(["rtr-rack3"])
    routers.add_host_route("rtr-rack3", "192.0.2.30/24")
    routers.add_host_route("rtr-rack3", "192.0.2.30")
    assert routers.host_routes("rtr-rack3") == {"192.0.2.30"}
    routers.remove_host_route("rtr-rack3", "192.0.2.30")
    routers.remove_host_route("rtr-rack3", "192.0.2.30")
    assert routers.host_routes("rtr-rack3") == set()
    routers.add_proxy("rtr-rack3", "192.0.2.1/24")
    assert routers.proxy_entries("rtr-rack3") == {"192.0.2.1"}
    routers.remove_proxy("rtr-rack3", "192.0.2.1")
    routers.remove_proxy("rtr-rack3", "192.0.2.1")
    assert routers.proxy_entries("rtr-rack3") == set()
    routers.fail.add("rtr-rack3")
    with pytest.raises(FabricError):
        routers.host_routes("rtr-rack3")
    with pytest.raises(FabricError):
        routers.add_proxy("rtr-rack3", "192.0.2.1")
    with pytest.raises(FabricError):
        routers.add_host_route("rtr-x", "192.0.2.1")


def test_the_benchmark_takes_a_built_boundary_and_refuses_the_others_saying_why() -> None:
    assert BenchConfig(boundary="stretch").boundary == "stretch"
    assert BenchConfig(boundary="route", variants=("vmferry",)).boundary == "route"
    with pytest.raises(ValueError, match=r"hand-driven variants \(floor\) only stretch"):
        BenchConfig(boundary="route", variants=("floor", "vmferry"))
    assert BenchConfig(boundary="dual", variants=("vmferry",)).boundary == "dual"
    with pytest.raises(ValueError, match="only the vmferry variant moves a guest by dual"):
        BenchConfig(boundary="dual")
    with pytest.raises(ValueError, match="'teleport' is not one of stretch, route"):
        BenchConfig(boundary="teleport")
    with pytest.raises(ValueError, match="ovn peer has no routed rack"):
        BenchConfig(boundary="stretch", variants=("vmferry", "ovn"))


def test_the_benchmark_moves_into_the_routed_rack_by_the_way_asked() -> None:
    lab = BenchLab(load_topology(EXAMPLE), 1)
    assert lab.rack_hosts() == ("host1", "host3")
    assert lab.rack_hosts("stretch") == ("host1", "host5")
    assert lab.rack_hosts("dual") == ("host1", "host5")
    with pytest.raises(ConflictError, match="one of them routed"):
        BenchLab(load_topology(default_topology_path()), 1).rack_hosts("stretch")
