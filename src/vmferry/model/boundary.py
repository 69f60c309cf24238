"""Which way a move across a subnet or VLAN boundary takes, and why not the others (pure).

A move stays inside one L2 domain when a fabric path carries the VM's VLAN from its host to
the destination: then there is no boundary (``Way.SAME_L2``). Otherwise it is one of

- ``stretch``: the VM's VLAN is carried over a VXLAN tunnel between the two ToRs for as long as
  the VM is there; needs both ToRs able to tunnel and an IP path between them;
- ``route``: the VM keeps its address; the routers get a /32 to its new location and the
  destination's gateway answers ARP for its old gateway; needs routers on both sides;
- ``nat``: the VM takes an address of the destination subnet and the boundary translates the
  old one to it; needs a free destination address; the VM's own sessions may break;
- ``dual``: the VM gets a second NIC in the destination subnet and traffic fails over to it;
  needs a free destination address and a guest that takes a hot-plugged NIC; sessions may
  break.

``plan_crossing`` picks the first that applies in that order (most transparent first), or the
one asked for, and gives for every other way the reason it was not taken. The facts are
plain values so the controller (``vmferry where``, the migration's precheck) can fill them from
its topology and hosts, and tests without any.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field
from enum import StrEnum

from vmferry.errors import InputError
from vmferry.model.fabric import path_between
from vmferry.model.topology import Topology


class Way(StrEnum):
    SAME_L2 = "same-l2"
    STRETCH = "stretch"
    ROUTE = "route"
    NAT = "nat"
    DUAL = "dual"


ORDER = (Way.STRETCH, Way.ROUTE, Way.NAT, Way.DUAL)
# Ways that keep every session the VM has open (the others may break them).
KEEPS_SESSIONS = frozenset({Way.SAME_L2, Way.STRETCH, Way.ROUTE})


@dataclass(frozen=True)
class CrossingFacts:
    """What decides the way across: the VM's VLAN and subnet, where it goes, and what the
    fabric, the routers and the guest can do."""

    vm: str
    vlan: int
    subnet: str | None
    destination: str
    l2_path: bool                         # a fabric path carries the VLAN there already
    destination_subnet: str | None = None
    tunnel_endpoints: bool = False        # both ToRs can terminate a VXLAN tunnel
    routers: tuple[str, ...] = ()         # routers between the two subnets (host route)
    free_destination_address: bool = False
    guest_hotplug: bool = False           # the guest takes a hot-plugged NIC
    sessions_must_survive: bool = False   # policy: refuse ways that may break sessions


@dataclass(frozen=True)
class CrossingPlan:
    vm: str
    destination: str
    way: Way | None                        # None: no way applies (the move is refused)
    reasons: dict[Way, str] = field(default_factory=dict)   # why every other way was not taken

    def describe(self) -> str:
        """One line per way, the chosen one first: what ``vmferry where`` prints."""
        lines = [f"{self.vm} -> {self.destination}: "
                 f"{self.way.value if self.way else 'no way across'}"]
        lines += [f"  not {way.value}: {reason}" for way, reason in self.reasons.items()]
        return "\n".join(lines)


def why_not(way: Way, facts: CrossingFacts) -> str | None:
    """Why ``way`` cannot take this move, or None when it can."""
    if way is Way.SAME_L2:
        return None if facts.l2_path else f"no fabric path carries VLAN {facts.vlan} to " \
            f"{facts.destination}"
    if facts.sessions_must_survive and way not in KEEPS_SESSIONS:
        return "may break the VM's sessions, and the policy says they must survive"
    if way is Way.STRETCH:
        return None if facts.tunnel_endpoints else "the ToRs cannot terminate a VXLAN tunnel"
    if way is Way.ROUTE:
        if facts.subnet is None:
            return f"VLAN {facts.vlan} has no subnet to route"
        return None if facts.routers else "no router joins the two subnets"
    if facts.destination_subnet is None:
        return f"{facts.destination} serves no subnet to take an address from"
    if not facts.free_destination_address:
        return f"no free address in {facts.destination_subnet}"
    if way is Way.DUAL and not facts.guest_hotplug:
        return "the guest does not take a hot-plugged NIC"
    return None


def plan_crossing(facts: CrossingFacts, requested: Way | str | None = None) -> CrossingPlan:
    """The way this move takes and why not the others. With ``requested`` (an operator's
    option), that way or none. Raises ``InputError`` for an unknown way name."""
    if isinstance(requested, str) and not isinstance(requested, Way):
        try:
            requested = Way(requested)
        except ValueError as exc:
            raise InputError("boundary", f"{requested!r} is not one of "
                             f"{', '.join(w.value for w in Way)}") from exc
    if facts.l2_path and requested in (None, Way.SAME_L2):
        return CrossingPlan(facts.vm, facts.destination, Way.SAME_L2,
                            {w: "no boundary: the VLAN reaches the destination" for w in ORDER})
    candidates = ORDER if requested is None else (requested,)
    reasons: dict[Way, str] = {}
    if not facts.l2_path:
        reasons[Way.SAME_L2] = why_not(Way.SAME_L2, facts) or ""
    chosen: Way | None = None
    for way in ORDER:
        reason = why_not(way, facts)
        if chosen is None and way in candidates and reason is None:
            chosen = way
        elif way not in candidates:
            reasons[way] = "not asked for" if reason is None else reason
        else:
            reasons[way] = reason or f"{chosen.value if chosen else '?'} comes first"
    return CrossingPlan(facts.vm, facts.destination, chosen, reasons)


def crossing_facts(topology: Topology, vm: str, vlan: int, source: str,
                   destination: str) -> CrossingFacts:
    """The facts of moving ``vm`` (on ``vlan``) from host ``source`` to host ``destination``
    as the topology states them: a fabric path of plain trunks is the same L2 domain; one
    that crosses a tunnel link is a boundary the tunnel can stretch the VLAN over; a routed
    destination rack whose router has a leg in the VM's VLAN can route to it. vmferry keeps
    no address pool yet, so no way that needs a destination address applies."""
    path = path_between(topology, source, destination)
    tunnels = {frozenset((t.a, t.b)) for t in topology.trunks() if t.tunnel}
    hops = {frozenset(pair) for pair in itertools.pairwise(path)}
    rack = next(r for r in topology.racks if r.name == topology.host(destination).rack)
    routed_here = rack.routed and rack.uplink is not None and rack.uplink.vlan == vlan
    # The way back from a routed rack: its router joins the two subnets in this direction too.
    back = host_route(topology, "0.0.0.0", vlan, source)
    return CrossingFacts(
        vm=vm, vlan=vlan, subnet=topology.vlan_subnet(vlan), destination=destination,
        l2_path=bool(path) and not hops & tunnels,
        destination_subnet=rack.subnet if routed_here else None,
        tunnel_endpoints=bool(hops & tunnels),
        routers=(rack.router,) if routed_here else (back.router,) if back else ())


@dataclass(frozen=True)
class HostRoute:
    """A /32 the "route" way needs: ``router`` routes ``address`` into its rack, where the
    VM's port is in the rack's VLAN ``rack_vlan``; the router's rack leg answers ARP for
    ``gateway`` (the router's address in the VM's own subnet ``subnet``: the gateway the
    guest keeps)."""

    router: str
    address: str
    rack_vlan: int = 0
    gateway: str = ""
    subnet: str = ""


def host_route(topology: Topology, ip: str, vlan: int, host: str) -> HostRoute | None:
    """The host route a VM of ``vlan`` with address ``ip`` (CIDR or bare) needs on ``host``
    when it crossed by the "route" way: the router of the host's rack, if that rack is
    routed and its router has a leg in ``vlan``; None otherwise (also for a host the
    inventory no longer has)."""
    rack_name = next((h.rack for h in topology.hosts if h.name == host), None)
    rack = next((r for r in topology.racks if r.name == rack_name), None)
    if rack is None:
        return None
    if not rack.routed or rack.uplink is None or rack.uplink.vlan != vlan or rack.vlan is None:
        return None
    return HostRoute(rack.router, ip.split("/")[0], rack.vlan, rack.uplink.ip.split("/")[0],
                     str(ipaddress.ip_interface(rack.uplink.ip).network))
