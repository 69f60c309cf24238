"""Which VLANs each trunk should carry, derived from where the VLANs' endpoints are.

A trunk carries a VLAN exactly when that VLAN has endpoints (VM ports on hosts, access ports
on switches) on both sides of it -- what VLAN pruning does in a real fabric. The answer is
computed from the endpoints as they are, never from counters that could drift.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from vmferry.model.topology import Topology, Trunk


@dataclass(frozen=True)
class Endpoint:
    """Something on a VLAN at a node: a VM port on a host, or an access port on a switch."""

    node: str
    vlan: int
    owner: str        # the VM or client it belongs to


def desired_trunk_vlans(topology: Topology,
                        endpoints: Iterable[Endpoint]) -> dict[str, frozenset[int]]:
    """Map trunk key -> the VLANs it must carry."""
    by_vlan: dict[int, set[str]] = defaultdict(set)
    for ep in endpoints:
        by_vlan[ep.vlan].add(ep.node)
    trunks = topology.trunks()
    result: dict[str, frozenset[int]] = {}
    for trunk in trunks:
        side_a = _side(trunks, trunk, trunk.a)
        result[trunk.key] = frozenset(
            vlan for vlan, nodes in by_vlan.items()
            if nodes & side_a and nodes - side_a)
    return result


def _side(trunks: list[Trunk], cut: Trunk, start: str) -> set[str]:
    """The nodes reachable from ``start`` without crossing ``cut`` (the graph is a tree)."""
    adjacency: dict[str, set[str]] = defaultdict(set)
    for t in trunks:
        if t is cut:
            continue
        adjacency[t.a].add(t.b)
        adjacency[t.b].add(t.a)
    seen = {start}
    stack = [start]
    while stack:
        for peer in adjacency[stack.pop()]:
            if peer not in seen:
                seen.add(peer)
                stack.append(peer)
    return seen


def path_between(topology: Topology, src: str, dst: str) -> list[str]:
    """Nodes on the fabric path from ``src`` to ``dst`` (both included)."""
    adjacency: dict[str, set[str]] = defaultdict(set)
    for t in topology.trunks():
        adjacency[t.a].add(t.b)
        adjacency[t.b].add(t.a)
    previous: dict[str, str | None] = {src: None}
    queue = [src]
    while queue:
        node = queue.pop(0)
        if node == dst:
            break
        for peer in sorted(adjacency[node]):
            if peer not in previous:
                previous[peer] = node
                queue.append(peer)
    if dst not in previous:
        return []
    path: list[str] = []
    cursor: str | None = dst
    while cursor is not None:
        path.append(cursor)
        cursor = previous[cursor]
    return list(reversed(path))


def client_endpoints(topology: Topology) -> list[Endpoint]:
    """Fixed endpoints: clients' access ports and routed racks' router legs."""
    legs = [Endpoint(node=switch, vlan=vlan, owner=rack.router)
            for rack in topology.routed_racks() if rack.uplink and rack.vlan
            for switch, vlan in ((rack.uplink.switch, rack.uplink.vlan), (rack.tor, rack.vlan))]
    return [Endpoint(node=c.switch, vlan=c.vlan, owner=c.name) for c in topology.clients] + legs


# Open vSwitch reads an empty trunk list as "every VLAN". A trunk that should carry none gets
# only VLAN 4095, which 802.1Q reserves and no endpoint can use.
RESERVED_VLAN = 4095
NO_VLANS: frozenset[int] = frozenset({RESERVED_VLAN})


def trunk_column(vlans: frozenset[int]) -> frozenset[int]:
    """What to write into a trunk port's ``trunks`` so it carries exactly ``vlans``."""
    return vlans if vlans else NO_VLANS


def carried_vlans(column: frozenset[int]) -> frozenset[int]:
    """The VLANs a trunk port really carries, from its ``trunks`` column."""
    return column - NO_VLANS
