"""What both ways across a routed boundary send and write in a router's namespace
(drivers/fabric/router_netns.py, nat.py): ARP frames, the merging nft script, and errors
that name the router. No namespace is entered: the frames and scripts are built as data."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from vmferry.drivers.fabric import router_netns as netns
from vmferry.drivers.fabric.nat import _merge_script, _ruleset
from vmferry.errors import FabricError

UP, RACK, VM = b"\x02" * 6, b"\x04" * 6, b"\x52\x54\x00\x00\x00\x01"
SUBNET = ipaddress.IPv4Network("192.0.2.0/29")


def arp_fields(frame: bytes) -> tuple[bytes, bytes, int, bytes, str, str]:
    """(dst MAC, src MAC, ARP op, sender MAC, sender IP, target IP)."""
    return (frame[:6], frame[6:12], int.from_bytes(frame[20:22], "big"), frame[22:28],
            socket.inet_ntoa(frame[28:32]), socket.inet_ntoa(frame[38:42]))


def test_an_arp_request_carries_the_sender_the_receivers_learn() -> None:
    frame = netns.arp_request(VM, RACK, RACK, "192.0.2.2", "192.0.2.5")
    assert len(frame) == 42 and frame[12:14] == b"\x08\x06"
    assert arp_fields(frame) == (VM, RACK, 1, RACK, "192.0.2.2", "192.0.2.5")


def test_into_the_rack_the_uplink_learns_the_router_and_the_vm_learns_its_subnet_there(
        ) -> None:
    frames = netns.into_rack_frames("192.0.2.5", VM, SUBNET, UP, RACK)
    leg, first = frames[0]
    assert leg == netns.UPLINK_LEG
    assert arp_fields(first) == (netns.BROADCAST, UP, 1, UP, "192.0.2.5", "192.0.2.5")
    rest = [arp_fields(frame) for leg, frame in frames[1:] if leg == netns.RACK_LEG]
    assert [f[4] for f in rest] == ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4",
                                    "192.0.2.6"]            # every peer, not the VM itself
    assert {(f[0], f[3], f[5]) for f in rest} == {(VM, RACK, "192.0.2.5")}
    unknown = netns.into_rack_frames("192.0.2.5", None, SUBNET, UP, RACK)
    assert {arp_fields(frame)[0] for _, frame in unknown} == {netns.BROADCAST}


def test_out_of_the_rack_the_uplink_learns_the_vm_and_the_vm_its_neighbours() -> None:
    client = b"\x06" * 6
    frames = netns.out_of_rack_frames("192.0.2.5", VM, [("192.0.2.2", client)], UP)
    assert [arp_fields(f) for _, f in frames] == [
        (netns.BROADCAST, UP, 1, VM, "192.0.2.5", "192.0.2.5"),
        (VM, UP, 1, client, "192.0.2.2", "192.0.2.5")]
    assert {leg for leg, _ in frames} == {netns.UPLINK_LEG}
    # The VM's MAC unknown: no claim for it, the neighbours told to every host of the VLAN.
    assert [arp_fields(f)[:4] for _, f in netns.out_of_rack_frames(
        "192.0.2.5", None, [("192.0.2.2", client)], UP)] == [(netns.BROADCAST, UP, 1, client)]


def test_the_switchover_script_adds_without_reading_and_keeps_one_rule_each() -> None:
    script = _merge_script({"192.0.2.30": "198.18.3.254"})
    assert "add element ip vmferry_nat home_to_new { 192.0.2.30 : 198.18.3.254 }" in script
    assert "add element ip vmferry_nat new_to_home { 198.18.3.254 : 192.0.2.30 }" in script
    # The chains are flushed before their rule is added: a second add leaves one rule.
    assert script.index("flush chain ip vmferry_nat prerouting") \
        < script.index("add rule ip vmferry_nat prerouting")
    assert script.count("dnat to ip daddr map @home_to_new") == 1
    assert script.count("snat to ip saddr map @new_to_home") == 1
    whole = _ruleset({"192.0.2.30": "198.18.3.254"})
    assert 'iifname "up0" dnat to ip daddr map @home_to_new' in whole


def test_a_router_that_is_not_there_is_named() -> None:
    routers = netns.RouterNamespaces({"rtr-a": "vmferry-test-no-such-namespace"})
    with pytest.raises(FabricError, match="no router rtr-b"):
        routers.run("rtr-b", "read", lambda: None)
    with pytest.raises(FabricError, match="router rtr-a: cannot read the routes"):
        routers.run("rtr-a", "read the routes", lambda: None)   # its namespace is gone
