"""The make-before-break switchover's rules, computed without I/O.

While a VM's guest is stopped for the last round of its migration, frames for its MAC on its
VLAN are delivered towards *both* hosts, so the frames sent during the pause wait in the
destination's tap instead of being lost at the stopped source. Every rule is temporary and
carries one cookie per migration (``mbb_cookie``); every rule matches its input port *and*
its VLAN, so a frame that NORMAL switching would drop (a frame tagged with the VM's VLAN
entering an access port of another VLAN, or a tagged frame on an access port) is never
matched and stays dropped: VLAN isolation holds at every instant.

    fabric switch on the path, for every port P   in_port=P,dl_vlan=V,dl_dst=MAC   (trunk P
    that carries V                                carrying V) or in_port=P,vlan_tci=0,
                                                  dl_dst=MAC (access port P of V) -> output to
                                                  the path's ports other than P (tagged)
    destination host, the gate                     in_port=UPLINK,dl_vlan=V,dl_dst=MAC ->
                                                  drop (closed: ``gate_rules``), then, once the
                                                  source stopped the guest, the same match ->
                                                  pop_vlan, output to the VM's tap (open:
                                                  ``host_rules``; one flow replaces the other)
    destination host, the arrival gate            in_port=TAP,vlan_tci=0,dl_src=MAC ->
    (a port without a profile)                    learn the open gate's match and delivery
                                                  (with the gate's cookie), NORMAL: the
                                                  guest's first frame at its resume opens the
                                                  gate if the controller has not yet
                                                  (``arrival_rules``)

    fabric switch on the path, the pin              the VM's MAC held (a static entry) at the
                                                  port towards the source from staging on, so
                                                  learning cannot flap it while frames from
                                                  both sides cross the switch; at arrival the
                                                  pin moves to the port towards the
                                                  destination, then goes (``pin_sides``)

The fabric rules may be in place long before the guest stops: while the gate is closed they
deliver nothing to the destination guest, so the switchover itself only has to open the gate.
The closed gate carries its own cookie (``gate_cookie``: the migration's with ``GATE_BIT``).

This module imports no driver: ports are plain data (``SwitchPorts``), rules are ``Rule``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vmferry.model.fabric import path_between
from vmferry.model.topology import Topology

# "mbb" in the top 24 bits, the migration id below: a cookie of its own per migration. The
# closed gate's cookie is the migration's with GATE_BIT set (so ids stay below it).
COOKIE_PREFIX = 0x6D6262 << 40
COOKIE_MASK = 0xFFFFFF << 40
GATE_BIT = 1 << 39
PRIORITY = 65000
VLAN_PRESENT = 0x1000         # OpenFlow 1.3 vlan_vid "tag present" bit
RESERVED_VLAN = 4095          # a trunk listing only this carries nothing (model.fabric)


def mbb_cookie(migration_id: int) -> int:
    """The cookie of one migration's temporary rules. Raises ``ValueError``."""
    if not 0 < migration_id < GATE_BIT:
        raise ValueError(f"migration id {migration_id} does not fit a switchover cookie")
    return COOKIE_PREFIX | migration_id


def is_mbb_cookie(cookie: int) -> bool:
    return cookie & COOKIE_MASK == COOKIE_PREFIX and migration_of(cookie) != 0


def migration_of(cookie: int) -> int:
    return cookie & ~COOKIE_MASK & ~GATE_BIT


def gate_cookie(cookie: int) -> int:
    """The cookie of the closed gate of the migration whose cookie is ``cookie``."""
    return cookie | GATE_BIT


def is_gate_cookie(cookie: int) -> bool:
    return is_mbb_cookie(cookie) and bool(cookie & GATE_BIT)


@dataclass(frozen=True)
class Rule:
    """One OpenFlow rule in ovs-ofctl syntax (table 0; the cookie is added on install)."""

    priority: int
    match: str
    actions: str


@dataclass(frozen=True)
class PortInfo:
    """What the rules need to know about one switch port."""

    ofport: int
    access_vlan: int | None = None             # an access port: its VLAN
    trunk_vlans: frozenset[int] | None = None  # a trunk: the VLANs it lists (None: access)


@dataclass(frozen=True)
class SwitchPorts:
    """A fabric switch's ports by name."""

    ports: Mapping[str, PortInfo] = field(default_factory=dict)


def carries(port: PortInfo, vlan: int) -> str | None:
    """How a frame of ``vlan`` enters ``port``: "tagged" (a trunk listing the VLAN),
    "untagged" (an access port of the VLAN), or None (NORMAL would drop it).

    A trunk with an empty list carries every VLAN in OVS; vmferry never leaves one empty
    (it writes the reserved 4095 instead), so an empty list is treated as carrying nothing:
    no rule may widen what a port admits."""
    if port.trunk_vlans is not None:
        return "tagged" if vlan in port.trunk_vlans and vlan != RESERVED_VLAN else None
    return "untagged" if port.access_vlan == vlan else None


def path_ports(topology: Topology, source: str, destination: str) -> dict[str, list[str]]:
    """Fabric switch -> its ports towards its neighbours on the path source .. destination.
    Raises ``KeyError``/``ValueError`` for nodes the topology does not join."""
    path = path_between(topology, source, destination)
    switches = {s.name for s in topology.switches}
    links: dict[frozenset[str], dict[str, str]] = {}
    for trunk in topology.trunks():
        links[frozenset((trunk.a, trunk.b))] = {trunk.a: trunk.a_port, trunk.b: trunk.b_port}
    result: dict[str, list[str]] = {}
    for index, node in enumerate(path):
        if node not in switches:
            continue
        ports: list[str] = []
        for neighbour in (path[index - 1] if index else None,
                          path[index + 1] if index + 1 < len(path) else None):
            if neighbour is not None:
                ports.append(links[frozenset((node, neighbour))][node])
        result[node] = ports
    return result


def pin_sides(topology: Topology, source: str, destination: str) -> dict[str, tuple[str, str]]:
    """Fabric switch on the path -> (its port towards the source, towards the destination):
    where the window pins the VM's MAC, and where the pin moves once the destination runs
    it. Raises ``KeyError``/``ValueError`` like ``path_ports``."""
    return {switch: (ports[0], ports[-1])
            for switch, ports in path_ports(topology, source, destination).items() if ports}


def switch_rules(on_path: list[str], ports: SwitchPorts, vlan: int, mac: str) -> list[Rule]:
    """The temporary rules of one fabric switch whose path ports are ``on_path``.

    Raises ``KeyError`` naming a path port the switch does not have, ``ValueError`` if a path
    port does not carry the VLAN (the VLAN must be extended before the window opens)."""
    mac = mac.lower()
    outputs: dict[str, int] = {}
    for name in on_path:
        info = ports.ports[name]
        if carries(info, vlan) != "tagged":
            raise ValueError(f"path port {name} does not carry VLAN {vlan}")
        outputs[name] = info.ofport
    rules: list[Rule] = []
    for name in sorted(ports.ports):
        info = ports.ports[name]
        how = carries(info, vlan)
        targets = [f"output:{ofport}" for port, ofport in outputs.items() if port != name]
        if how is None or not targets:
            continue
        if how == "tagged":
            rules.append(Rule(PRIORITY, f"in_port={info.ofport},dl_vlan={vlan},dl_dst={mac}",
                              ",".join(targets)))
        else:
            rules.append(Rule(PRIORITY, f"in_port={info.ofport},vlan_tci=0,dl_dst={mac}",
                              f"push_vlan:0x8100,set_field:{VLAN_PRESENT | vlan}->vlan_vid,"
                              + ",".join(targets)))
    return rules


def fabric_rules(topology: Topology, vlan: int, mac: str, source: str, destination: str,
                 ports: Mapping[str, SwitchPorts]) -> dict[str, list[Rule]]:
    """The temporary rules of every fabric switch on the path (switch -> rules).

    Raises ``KeyError`` naming a switch or port missing from ``ports``, ``ValueError`` for a
    path port without the VLAN."""
    return {switch: switch_rules(names, ports[switch], vlan, mac)
            for switch, names in path_ports(topology, source, destination).items()}


def _host_match(uplink_ofport: int, vlan: int, mac: str) -> str:
    return f"in_port={uplink_ofport},dl_vlan={vlan},dl_dst={mac.lower()}"


def gate_rules(uplink_ofport: int, vlan: int, mac: str) -> list[Rule]:
    """The destination host's closed gate: frames for the VM arriving tagged on the uplink
    (the fabric rules bring them there) are dropped, so none waits in the tap of a guest
    that the source still runs."""
    return [Rule(PRIORITY, _host_match(uplink_ofport, vlan, mac), "drop")]


def host_rules(uplink_ofport: int, tap_ofport: int, vlan: int, mac: str) -> list[Rule]:
    """The destination host's open gate: frames for the VM arriving tagged on the uplink go
    to its tap, untagged, as its access port would deliver them. Same priority and match as
    the closed gate, so adding it replaces the gate in one step."""
    return [Rule(PRIORITY, _host_match(uplink_ofport, vlan, mac),
                 f"pop_vlan,output:{tap_ofport}")]


def arrival_rules(uplink_ofport: int, tap_ofport: int, vlan: int, mac: str,
                  cookie: int) -> list[Rule]:
    """The gate the arriving guest opens itself (armed beside the closed gate, for a guest
    whose port has no profile): its first frame from the tap, sent when it runs here and so
    after the source stopped it (QEMU's announcement at resume), makes OVS add (``learn``,
    with ``cookie``) the open gate's delivery one priority above the closed gate. The
    controller opens the gate on the source's STOP; this bounds how late the gate can be
    when the controller's opening comes after the resume. The learned flow matches and does
    what ``host_rules`` does (VLAN id ``vlan`` tagged on the uplink, popped, into the tap)."""
    mac = mac.lower()
    learned = (f"learn(table=0,priority={PRIORITY + 1},cookie={cookie:#x},"
               f"in_port={uplink_ofport},NXM_OF_VLAN_TCI[0..12]={VLAN_PRESENT | vlan:#x},"
               f"NXM_OF_ETH_DST[]=NXM_OF_ETH_SRC[],load:0->NXM_OF_VLAN_TCI[],"
               f"output:NXM_OF_IN_PORT[])")
    # vlan_tci=0: the guest's untagged frames from its access port only (a tagged frame
    # there opens nothing and NORMAL still drops it).
    return [Rule(PRIORITY, f"in_port={tap_ofport},vlan_tci=0,dl_src={mac}",
                 f"{learned},NORMAL")]
