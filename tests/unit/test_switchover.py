"""Make-before-break switchover rules: cookies, the path's ports, the flows, when to install."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.agent.switchover import host_flows
from vmferry.controller import switchover
from vmferry.controller.switchover import (
    PRIORITY,
    SwitchPorts,
    due,
    fabric_flows,
    is_mbb_cookie,
    mbb_cookie,
    migration_of,
    path_ports,
)
from vmferry.drivers.softswitch.base import Flow
from vmferry.drivers.softswitch.ovs import normalize_actions, normalize_match
from vmferry.model.topology import Topology, default_topology_path, load_topology

MAC = "52:54:00:AB:CD:EF"


@pytest.fixture
def topology() -> Topology:
    return load_topology(default_topology_path())


def ports() -> dict[str, SwitchPorts]:
    return {
        "tor1": SwitchPorts(ofports={"t-spine": 1, "h-host1": 2, "h-host2": 3,
                                     "a-client-100": 4, "a-client-200": 5},
                            access_vlans={"a-client-100": 100, "a-client-200": 200}),
        "spine": SwitchPorts(ofports={"t-tor1": 1, "t-tor2": 2}),
        "tor2": SwitchPorts(ofports={"t-spine": 1, "h-host3": 2, "h-host4": 3}),
    }


def test_cookie_round_trip_and_recognition() -> None:
    cookie = mbb_cookie(42)
    assert is_mbb_cookie(cookie)
    assert migration_of(cookie) == 42
    assert not is_mbb_cookie(42)
    assert not is_mbb_cookie(0)
    assert not is_mbb_cookie(switchover.COOKIE_PREFIX)     # no migration id
    assert mbb_cookie(1) != mbb_cookie(2)
    with pytest.raises(ValueError):
        mbb_cookie(0)
    with pytest.raises(ValueError):
        mbb_cookie(1 << 40)


def test_path_ports_across_the_spine(topology: Topology) -> None:
    assert path_ports(topology, "host1", "host3") == {
        "tor1": ["h-host1", "t-spine"], "spine": ["t-tor1", "t-tor2"],
        "tor2": ["t-spine", "h-host3"]}


def test_path_ports_within_a_rack(topology: Topology) -> None:
    assert path_ports(topology, "host1", "host2") == {"tor1": ["h-host1", "h-host2"]}


def test_fabric_flows_send_both_ways_and_tag_local_access_ports(topology: Topology) -> None:
    flows = fabric_flows(topology, 100, MAC, "host1", "host3", ports())
    assert set(flows) == {"tor1", "spine", "tor2"}
    mac = MAC.lower()
    assert flows["spine"] == [Flow(0, PRIORITY, f"dl_vlan=100,dl_dst={mac}",
                                   "output:1,output:2")]
    assert flows["tor2"] == [Flow(0, PRIORITY, f"dl_vlan=100,dl_dst={mac}",
                                  "output:1,output:2")]
    # The client of VLAN 100 on tor1 sends untagged frames: tagged before going out;
    # the client of VLAN 200 is left alone.
    assert flows["tor1"] == [
        Flow(0, PRIORITY, f"dl_vlan=100,dl_dst={mac}", "output:2,output:1"),
        Flow(0, PRIORITY, f"in_port=4,dl_dst={mac}",
             "push_vlan:0x8100,set_field:4196->vlan_vid,output:2,output:1")]


def test_fabric_flows_are_valid_ovs_syntax(topology: Topology) -> None:
    for flows in fabric_flows(topology, 100, MAC, "host3", "host1", ports()).values():
        for flow in flows:
            normalize_match(flow.match)
            normalize_actions(flow.actions)


def test_fabric_flows_name_a_missing_switch(topology: Topology) -> None:
    partial = {k: v for k, v in ports().items() if k != "spine"}
    with pytest.raises(KeyError, match="spine"):
        fabric_flows(topology, 100, MAC, "host1", "host3", partial)


def test_host_flow_pops_the_tag_into_the_tap() -> None:
    assert host_flows(7, 9, 100, MAC) == [
        Flow(0, PRIORITY, f"in_port=7,dl_vlan=100,dl_dst={MAC.lower()}", "pop_vlan,output:9")]


@pytest.mark.parametrize(("progress", "expected"), [
    ({"status": "setup"}, True),                                         # no rate yet
    ({"status": "active", "mbps": 0, "remaining_bytes": 1 << 30}, True),
    ({"status": "active", "mbps": 1000, "remaining_bytes": 50_000_000}, True),   # 0.4 s
    ({"status": "active", "mbps": 1000, "remaining_bytes": 500_000_000}, False),  # 4 s
    ({"status": "device", "mbps": 1, "remaining_bytes": 1 << 30}, True),
    ({"status": "pre-switchover"}, True),
])
def test_due(progress: dict[str, Any], expected: bool) -> None:
    assert due(progress) is expected


class _FakeFabric:
    def __init__(self, cookies: dict[str, set[int]]) -> None:
        self.cookies = cookies

    def flow_cookies(self, switch: str) -> set[int]:
        return self.cookies[switch]


def test_leftovers_skip_live_migrations_and_foreign_cookies() -> None:
    fabric = _FakeFabric({"tor1": {0, 5, mbb_cookie(3), mbb_cookie(4)}, "spine": set()})
    assert switchover.leftovers(fabric, ["tor1", "spine"], live={4}) == [
        ("tor1", mbb_cookie(3))]
