"""A port profile as OVS state, pure: the flows, meters and port row a profile needs on a port.

Everything installed for a port is tagged so it can be found and removed exactly:

- flows carry the port's cookie (``port_cookie``: a vmferry tag in the top 16 bits, a hash of
  the port name, which is derived from the VM name, below);
- meters use the port's block of ids (``meter_ids``), whose number is recorded in the port's
  ``external_ids:vmferry-meter-block`` and chosen deterministically (hash of the port name,
  then the next free block);
- the port's OVSDB row carries ``vmferry-profile``, ``-profile-version``, ``-cookie`` and
  ``-meter-block`` in ``external_ids``.

Pipeline (OpenFlow 1.3, tables other than 0 belong to vmferry profiles)::

    table 0   from the port: port security (MAC, IP source, ARP guard) -> 40 (IPv6: -> 39),
              else drop; to the VM's MAC: -> 42          (anything else: the bridge's NORMAL)
    table 39  IPv6 from the port: router advertisements and redirects dropped, neighbour
              advertisements only for the VM's own addresses with its MAC (unless the profile
              allows them) -> 40
    table 40  storm control: broadcast / multicast from the port through pktps meters -> 41
    table 41  from-VM ACL (conntrack zone of the port when stateful), rate meter, DSCP -> 42
    table 42  to-VM ACL for frames to a profiled VM's MAC, rate meter, NORMAL;
              frames from the port to anyone else: NORMAL

Forwarding stays NORMAL (MAC learning, VLANs) for everything allowed. ACL rules apply to IPv4;
IPv6 follows the direction's default action; non-IP frames (ARP, RARP) pass the ACLs.
Storm control of unknown unicast cannot be told apart from known unicast before NORMAL: it is
accepted but reported as not enforced.

Realizing it on a switch: ``vmferry.drivers.softswitch.ovs.profile``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from vmferry.drivers.softswitch.base import Flow, Meter, PortSpec, PortState
from vmferry.errors import SoftswitchError
from vmferry.model.profile import AclDirection, AclRule, PortProfile

TABLE_ENTRY = 0
TABLE_ND_GUARD = 39
TABLE_STORM = 40
TABLE_FROM_VM = 41
TABLE_TO_VM = 42

COOKIE_TAG = 0x7666             # "vf": the top 16 bits of every profile cookie
METER_BLOCKS = 4096
METER_BLOCK_SIZE = 8
METER_ROLES = ("to_vm", "from_vm", "broadcast", "multicast", "unknown_unicast")
CT_ZONE_BASE = 0x1000

KEY_PROFILE = "vmferry-profile"
KEY_VERSION = "vmferry-profile-version"
KEY_COOKIE = "vmferry-cookie"
KEY_BLOCK = "vmferry-meter-block"
PROFILE_KEYS = (KEY_PROFILE, KEY_VERSION, KEY_COOKIE, KEY_BLOCK)

BROADCAST = "ff:ff:ff:ff:ff:ff"
NO_MAC = "00:00:00:00:00:00"
ICMP6_ROUTER_ADVERT = 134
ICMP6_NEIGHBOR_ADVERT = 136
ICMP6_REDIRECT = 137
MULTICAST = "01:00:00:00:00:00/01:00:00:00:00:00"

# Priorities inside the ACL tables: established > rules (first rule highest) > default.
PRIO_CT = 3000
PRIO_RULE = 2000
PRIO_DEFAULT = 1000


@dataclass(frozen=True)
class Allocation:
    """What identifies one port's installation: its cookie, meter block and conntrack zone."""

    cookie: int
    block: int

    @property
    def zone(self) -> int:
        return CT_ZONE_BASE + self.block

    def meter_id(self, role: str) -> int:
        return self.block * METER_BLOCK_SIZE + METER_ROLES.index(role) + 1

    @property
    def meter_ids(self) -> set[int]:
        return {self.meter_id(role) for role in METER_ROLES}


@dataclass
class DesiredPort:
    spec: PortSpec
    flows: list[Flow]
    meters: list[Meter]
    not_enforced: list[str] = field(default_factory=list)




# ---- identifiers -------------------------------------------------------------------------------

def port_cookie(port: str) -> int:
    """The flow cookie of a port: the vmferry tag, then 48 bits of a hash of its name."""
    digest = int(hashlib.sha256(port.encode()).hexdigest()[:12], 16)
    return COOKIE_TAG << 48 | digest


def preferred_block(port: str) -> int:
    return int(hashlib.sha256(f"meters:{port}".encode()).hexdigest()[:8], 16) % METER_BLOCKS


def allocate(port: str, tags: Mapping[str, Mapping[str, str]]) -> Allocation:
    """The port's cookie and meter block: the recorded block if it has one, else the first
    free block from the one its name hashes to. ``tags``: the ``external_ids`` of the bridge's
    ports by name (of every port, unless this one has a block recorded). Raises
    ``SoftswitchError`` when all blocks are taken."""
    recorded = tags.get(port)
    if recorded is not None and KEY_BLOCK in recorded:
        return Allocation(port_cookie(port), int(recorded[KEY_BLOCK]))
    taken = {int(ids[KEY_BLOCK]) for name, ids in tags.items()
             if name != port and KEY_BLOCK in ids}
    start = preferred_block(port)
    for step in range(METER_BLOCKS):
        block = (start + step) % METER_BLOCKS
        if block not in taken:
            return Allocation(port_cookie(port), block)
    raise SoftswitchError(f"no free meter block for port {port}", cause="all blocks in use")


# ---- desired flows (pure) ----------------------------------------------------------------------

def port_range_masks(low: int, high: int) -> list[str]:
    """``tp_dst`` values covering [low, high] exactly: ``80`` or ``0x1f40/0xffc0``..."""
    result: list[str] = []
    while low <= high:
        size = 1
        while low % (size * 2) == 0 and low + size * 2 - 1 <= high:
            size *= 2
        if size == 1:
            result.append(str(low))
        else:
            result.append(f"0x{low:x}/0x{0xFFFF & ~(size - 1):x}")
        low += size
    return result


def _rule_matches(rule: AclRule, remote_field: str) -> list[str]:
    base: str = "ip" if rule.protocol == "any" else rule.protocol
    if rule.remote is not None and rule.remote != "0.0.0.0/0":
        base += f",{remote_field}={rule.remote}"
    port_range = rule.port_range
    if port_range is None:
        return [base]
    return [f"{base},tp_dst={value}" for value in port_range_masks(*port_range)]


def _acl_flows(table: int, selector: str, direction: AclDirection, *, stateful: bool,
               zone: int, remote_field: str, allow: str, deny: str = "drop") -> list[Flow]:
    """The IPv4 ACL of one direction. ``allow`` is the action list after the ACL."""
    meter, _, rest = allow.partition(",") if allow.startswith("meter:") else ("", "", allow)
    meter_prefix = f"{meter}," if meter else ""
    commit = f"{meter_prefix}ct(commit,zone={zone}),{rest}" if stateful else allow
    default = commit if direction.default == "allow" else deny
    tracked = f",ct_state=+new+trk,ct_zone={zone}" if stateful else ""
    flows: list[Flow] = []
    if stateful:
        flows.append(Flow(table, PRIO_CT + 100, f"{selector},ip,ct_state=-trk",
                          f"ct(table={table},zone={zone})"))
        for state in ("+est+trk", "+rel+trk"):
            flows.append(Flow(table, PRIO_CT, f"{selector},ip,ct_state={state},ct_zone={zone}",
                              allow))
        # Tracked in another port's zone (a profiled VM talking to this one): track it here.
        flows.append(Flow(table, PRIO_DEFAULT - 100, f"{selector},ip", f"ct(table={table},"
                          f"zone={zone})"))
        flows.append(Flow(table, PRIO_DEFAULT, f"{selector},ip,ct_state=+trk,ct_zone={zone}",
                          default))
    else:
        flows.append(Flow(table, PRIO_DEFAULT, f"{selector},ip", default))
    for index, rule in enumerate(direction.rules):
        action = commit if rule.action == "allow" else deny
        for match in _rule_matches(rule, remote_field):
            flows.append(Flow(table, PRIO_RULE - index, f"{selector},{match}{tracked}", action))
    return flows


def link_local(mac: str) -> str:
    """The IPv6 link-local address a MAC gives by EUI-64 (RFC 4291, appendix A)."""
    octets = bytearray(int(part, 16) for part in mac.split(":"))
    octets[0] ^= 0x02
    eui64 = bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\x00" * 6 + eui64))


def _nd_guard_flows(port: str, mac: str, own_v6: list[str], profile: PortProfile) -> list[Flow]:
    """Table 39: IPv6 from the port that passed the source guard. Router advertisements and
    redirects are dropped, and neighbour advertisements for targets that are not the VM's or
    naming another MAC as the target's, unless the profile allows them."""
    sec = profile.security
    go = f"goto_table:{TABLE_STORM}"
    flows = [Flow(TABLE_ND_GUARD, 10, port, go)]
    if not sec.allow_router_advertisements:
        flows += [Flow(TABLE_ND_GUARD, 300, f"{port},icmp6,icmp_type={kind}", "drop")
                  for kind in (ICMP6_ROUTER_ADVERT, ICMP6_REDIRECT)]
    if not sec.allow_foreign_neighbor_advertisements:
        # OVS matches nd_target only with icmp_code=0; a missing option reads as MAC 0.
        advert = f"{port},icmp6,icmp_type={ICMP6_NEIGHBOR_ADVERT},icmp_code=0"
        flows.append(Flow(TABLE_ND_GUARD, 200, advert, "drop"))
        flows += [Flow(TABLE_ND_GUARD, 210, f"{advert},nd_target={target},nd_tll={tll}", go)
                  for target in own_v6 for tll in (mac, NO_MAC)]
    return flows


def _security_flows(ofport: int, mac: str, ips: list[str], profile: PortProfile) -> list[Flow]:
    sec = profile.security
    port = f"in_port={ofport}"
    src = f"{port},dl_src={mac}" if sec.mac_antispoof else port
    go = f"goto_table:{TABLE_STORM}"
    v4 = [ip for ip in ips if ipaddress.ip_address(ip).version == 4]
    own_v6 = [*(ip for ip in ips if ipaddress.ip_address(ip).version == 6), link_local(mac)]
    nd_guard = not (sec.allow_router_advertisements and sec.allow_foreign_neighbor_advertisements)
    go_v6 = f"goto_table:{TABLE_ND_GUARD}" if nd_guard else go
    flows = [Flow(TABLE_ENTRY, 200, src, go),
             Flow(TABLE_ENTRY, 190, port, "drop" if sec.mac_antispoof else go)]
    if sec.arp_guard:
        for ip in [*v4, "0.0.0.0"]:
            flows.append(Flow(TABLE_ENTRY, 210, f"{src},arp,arp_spa={ip},arp_sha={mac}", go))
        flows.append(Flow(TABLE_ENTRY, 205, f"{src},arp", "drop"))
    if sec.ip_source_guard:
        for ip in v4:
            flows.append(Flow(TABLE_ENTRY, 210, f"{src},ip,nw_src={ip}", go))
        # DHCP discovery comes from 0.0.0.0.
        flows.append(Flow(TABLE_ENTRY, 210, f"{src},udp,nw_src=0.0.0.0,tp_src=68,tp_dst=67", go))
        flows.append(Flow(TABLE_ENTRY, 205, f"{src},ip", "drop"))
        # Link-local only the one the VM's MAC gives; "::" is duplicate address detection.
        for ip6 in [*dict.fromkeys(own_v6), "::"]:
            flows.append(Flow(TABLE_ENTRY, 210, f"{src},ipv6,ipv6_src={ip6}", go_v6))
        flows.append(Flow(TABLE_ENTRY, 205, f"{src},ipv6", "drop"))
    elif nd_guard:
        flows.append(Flow(TABLE_ENTRY, 201, f"{src},ipv6", go_v6))
    if nd_guard:
        flows += _nd_guard_flows(port, mac, list(dict.fromkeys(own_v6)), profile)
    return flows


def desired_flows(ofport: int, mac: str, ips: list[str], profile: PortProfile,
                  alloc: Allocation) -> list[Flow]:
    """Every flow the profile needs on the port numbered ``ofport`` (pure)."""
    mac = mac.lower()
    port = f"in_port={ofport}"
    flows = _security_flows(ofport, mac, ips, profile)
    flows.append(Flow(TABLE_ENTRY, 180, f"dl_dst={mac}", f"goto_table:{TABLE_TO_VM}"))

    storm = profile.storm_control
    to_acl = f"goto_table:{TABLE_FROM_VM}"
    if storm.broadcast_pps:
        flows.append(Flow(TABLE_STORM, 200, f"{port},dl_dst={BROADCAST}",
                          f"meter:{alloc.meter_id('broadcast')},{to_acl}"))
    if storm.multicast_pps:
        flows.append(Flow(TABLE_STORM, 100, f"{port},dl_dst={MULTICAST}",
                          f"meter:{alloc.meter_id('multicast')},{to_acl}"))
    flows.append(Flow(TABLE_STORM, 10, port, to_acl))

    qos = profile.qos
    from_meter = f"meter:{alloc.meter_id('from_vm')}," if qos.from_vm else ""
    to_meter = f"meter:{alloc.meter_id('to_vm')}," if qos.to_vm else ""
    dscp = f"set_field:{qos.dscp}->ip_dscp," if qos.dscp is not None else ""
    leave_from = f"goto_table:{TABLE_TO_VM}"
    acl = profile.acl
    flows += _acl_flows(TABLE_FROM_VM, port, acl.from_vm, stateful=acl.stateful,
                        zone=alloc.zone, remote_field="nw_dst",
                        allow=f"{from_meter}{dscp}{leave_from}")
    other_from = f"{from_meter}{leave_from}"
    flows.append(Flow(TABLE_FROM_VM, 900, f"{port},ipv6",
                      other_from if acl.from_vm.default == "allow" else "drop"))
    flows.append(Flow(TABLE_FROM_VM, 800, port, other_from))

    to_vm = f"dl_dst={mac}"
    flows += _acl_flows(TABLE_TO_VM, to_vm, acl.to_vm, stateful=acl.stateful, zone=alloc.zone,
                        remote_field="nw_src", allow=f"{to_meter}NORMAL")
    flows.append(Flow(TABLE_TO_VM, 800, f"{to_vm},ipv6",
                      f"{to_meter}NORMAL" if acl.to_vm.default == "allow" else "drop"))
    flows.append(Flow(TABLE_TO_VM, 700, to_vm, f"{to_meter}NORMAL"))
    flows.append(Flow(TABLE_TO_VM, 1, port, "NORMAL"))
    return flows


def desired_meters(profile: PortProfile, alloc: Allocation) -> list[Meter]:
    meters: list[Meter] = []
    for role, limit in (("to_vm", profile.qos.to_vm), ("from_vm", profile.qos.from_vm)):
        if limit is not None:
            burst = limit.burst_kb or max(limit.rate_kbps // 10, 64)
            meters.append(Meter(alloc.meter_id(role), kbps=limit.rate_kbps, burst=burst))
    storm = profile.storm_control
    for role, pps in (("broadcast", storm.broadcast_pps), ("multicast", storm.multicast_pps)):
        if pps:
            meters.append(Meter(alloc.meter_id(role), pktps=pps, burst=max(pps // 10, 1)))
    return meters


def desired_spec(actual: PortState, profile: PortProfile, alloc: Allocation) -> PortSpec:
    """The port's row with the profile's VLAN and MTU and the profile's tags."""
    ids = {k: v for k, v in actual.external_ids.items() if k not in PROFILE_KEYS}
    ids.update({KEY_PROFILE: profile.name, KEY_VERSION: str(profile.version or 0),
                KEY_COOKIE: f"0x{alloc.cookie:x}", KEY_BLOCK: str(alloc.block)})
    if profile.vlan is not None:
        return PortSpec(name=actual.name, tag=profile.vlan, vlan_mode="access",
                        iface_type=actual.iface_type, external_ids=ids, mtu=profile.mtu)
    return PortSpec(name=actual.name, trunks=frozenset(profile.trunks or []), vlan_mode="trunk",
                    iface_type=actual.iface_type, external_ids=ids, mtu=profile.mtu)


def desired_port(actual: PortState, ofport: int, mac: str, ips: list[str],
                 profile: PortProfile, alloc: Allocation) -> DesiredPort:
    not_enforced = (["storm_control.unknown_unicast_pps"]
                    if profile.storm_control.unknown_unicast_pps else [])
    return DesiredPort(spec=desired_spec(actual, profile, alloc),
                       flows=desired_flows(ofport, mac, ips, profile, alloc),
                       meters=desired_meters(profile, alloc), not_enforced=not_enforced)

