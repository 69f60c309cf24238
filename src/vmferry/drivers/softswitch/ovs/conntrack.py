"""Connection-tracking state that follows a VM: reading it on one switch, carrying it to
another.

A stateful port profile (``profile_flows``) tracks the port's IPv4 traffic in the port's own
conntrack zone and lets a packet of a direction whose default is deny through only when the
tracker knows its connection. On a migration's destination the tracker knows nothing, so the
first packet of a connection the VM had open arrives as ``+new`` and the default drops it.

Carrying the state: the source's entries of the port's zone are read
(``Softswitch.dump_conntrack``), and the destination port gets *carry flows*, one per
direction of each entry, with a cookie of their own (``carry_cookie``): a ``+new`` packet of
exactly that 5-tuple is committed in the destination port's zone and let through the way an
established one is. From then on the tracker knows the connection and the profile's own
``+est`` flows pass it. A carry flow that has matched a packet has done its work; ``sweep``
removes those (both directions of an entry), and all of them once the carried state would
have expired anyway; ``remove`` removes them outright (audit, port removal).

Only packets the tracker calls ``+new`` are matched: a packet it calls invalid stays invalid.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmferry.drivers.softswitch.base import ConnEntry, Flow, Softswitch, Tuple5
from vmferry.drivers.softswitch.ovs.flowtext import split_top_level
from vmferry.drivers.softswitch.ovs.profile_flows import (
    PRIO_CT,
    TABLE_FROM_VM,
    TABLE_TO_VM,
    port_cookie,
)
from vmferry.errors import InputError, SoftswitchError

CARRY_TAG = 0x7663            # "vc": the top 16 bits of every carry cookie
PRIO_CARRY = PRIO_CT + 50     # above the ACL rules and defaults; +new only, so apart from +est
PROTOCOLS = ("tcp", "udp", "icmp")
CARRIED_TCP_STATES = frozenset({"ESTABLISHED", None})

_ENTRY_RE = re.compile(r"^(?P<proto>tcp|udp|icmp),orig=\((?P<orig>[^)]*)\),"
                       r"reply=\((?P<reply>[^)]*)\)(?P<rest>.*)$")


def carry_cookie(port: str) -> int:
    """The cookie of a port's carry flows: the carry tag, then 48 bits of the port's hash (the
    same hash as its profile cookie, so one names the other)."""
    return CARRY_TAG << 48 | (port_cookie(port) & (1 << 48) - 1)


def is_carry_cookie(cookie: int) -> bool:
    return cookie >> 48 == CARRY_TAG


# ---- reading (pure) ----------------------------------------------------------------------------

def _fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _tuple(proto: str, text: str) -> Tuple5:
    fields = _fields(text)
    if proto == "icmp":
        kind = int(fields.get("type", 0)) << 8 | int(fields.get("code", 0))
        return Tuple5(fields["src"], fields["dst"], int(fields.get("id", 0)), kind)
    return Tuple5(fields["src"], fields["dst"], int(fields["sport"]), int(fields["dport"]))


def parse_dump_conntrack(text: str) -> list[ConnEntry]:
    """Parse ``ovs-appctl dpctl/dump-conntrack``: the IPv4 TCP, UDP and ICMP entries, e.g.
    ``tcp,orig=(src=A,dst=B,sport=1,dport=2),reply=(...),zone=4106,protoinfo=(state=...)``.
    Other protocols and IPv6 are left out. Raises ``SoftswitchError`` on a line it cannot
    read."""
    entries: list[ConnEntry] = []
    for line in text.splitlines():
        match = _ENTRY_RE.match(line.strip())
        if match is None:
            continue
        proto, rest = match["proto"], match["rest"]
        try:
            orig, reply = _tuple(proto, match["orig"]), _tuple(proto, match["reply"])
            if ipaddress.ip_address(orig.src).version != 4:
                continue
        except (KeyError, ValueError) as exc:
            raise SoftswitchError("cannot read a conntrack entry", cause=line.strip()) from exc
        zone = re.search(r",zone=(\d+)", rest)
        state = re.search(r"state(?:_orig)?=([A-Z_0-9]+)", rest)
        entries.append(ConnEntry(proto, orig, reply, int(zone[1]) if zone else 0,
                                 state[1] if state else None))
    return entries


# ---- carry flows (pure) ------------------------------------------------------------------------

def _tuple_match(proto: str, way: Tuple5) -> str:
    if proto == "icmp":
        return (f"icmp,nw_src={way.src},nw_dst={way.dst},icmp_type={way.dport >> 8},"
                f"icmp_code={way.dport & 0xFF}")
    return f"{proto},nw_src={way.src},nw_dst={way.dst},tp_src={way.sport},tp_dst={way.dport}"


def commit_then(zone: int, allow: str) -> str:
    """The actions of a carry flow: commit in ``zone``, then what the profile does with an
    allowed packet (``allow``). A meter of ``allow`` stays first: OpenFlow 1.1+ makes a meter
    an instruction that must precede the action list, and ovs-ofctl refuses
    ``ct(...),meter:N,...`` ("invalid instruction ordering")."""
    parts = split_top_level(allow)
    meters = [part for part in parts if part.strip().lower().startswith("meter:")]
    rest = [part for part in parts if part not in meters]
    return ",".join([*meters, f"ct(commit,zone={zone})", *rest])


@dataclass(frozen=True)
class PortPipeline:
    """What carry flows need of the destination port: its OpenFlow number, the VM's MAC and
    addresses, its zone, and what the profile does with an allowed packet in each table (the
    actions of its ``+est`` flows)."""

    ofport: int
    mac: str
    ips: frozenset[str]
    zone: int
    allow_from_vm: str
    allow_to_vm: str


def carry_flows(entries: Iterable[ConnEntry], pipe: PortPipeline) -> list[Flow]:
    """One flow per direction of each entry that involves the VM: from the VM in the from-VM
    table, to it in the to-VM table, each committing its ``+new`` packet in the port's zone
    and letting it through. ICMP replies are not matched (the tracker never calls them new).
    Raises ``InputError`` for an entry of another protocol."""
    flows: dict[tuple[int, str], Flow] = {}
    for entry in entries:
        if entry.protocol not in PROTOCOLS:
            raise InputError("conntrack.protocol", f"{entry.protocol!r} is not one of "
                             f"{', '.join(PROTOCOLS)}")
        if entry.protocol == "tcp" and entry.state not in CARRIED_TCP_STATES:
            continue      # closing or half-open: nothing worth keeping alive
        for way in (entry.orig, entry.reply):
            if entry.protocol == "icmp" and way.dport >> 8 in (0, 14, 16, 18):
                continue      # echo/timestamp/info/mask replies
            match = _tuple_match(entry.protocol, way)
            state = f"ct_state=+new+trk,ct_zone={pipe.zone}"
            if way.src in pipe.ips:
                flow = Flow(TABLE_FROM_VM, PRIO_CARRY, f"in_port={pipe.ofport},{match},{state}",
                            commit_then(pipe.zone, pipe.allow_from_vm))
            elif way.dst in pipe.ips:
                flow = Flow(TABLE_TO_VM, PRIO_CARRY, f"dl_dst={pipe.mac},{match},{state}",
                            commit_then(pipe.zone, pipe.allow_to_vm))
            else:
                continue
            flows[(flow.table, flow.match)] = flow
    return sorted(flows.values(), key=lambda f: (f.table, f.match))


def pipeline(profile_flows: Sequence[Flow], ofport: int, mac: str, ips: Iterable[str]
             ) -> PortPipeline:
    """The port's pipeline read from its installed profile flows. Raises ``SoftswitchError``
    when the port has no stateful profile (then there is no state to carry)."""
    mac = mac.lower()
    allow: dict[int, str] = {}
    zone: int | None = None
    for flow in profile_flows:
        if flow.priority == PRIO_CT and "ct_state=+est+trk" in flow.match:
            allow[flow.table] = flow.actions
            found = re.search(r"ct_zone=(\d+)", flow.match)
            zone = int(found[1]) if found else zone
    if zone is None or set(allow) != {TABLE_FROM_VM, TABLE_TO_VM}:
        raise SoftswitchError("the port has no stateful profile", cause="no +est flows")
    addresses = frozenset(str(ipaddress.ip_interface(ip).ip) for ip in ips)
    return PortPipeline(ofport, mac, addresses, zone, allow[TABLE_FROM_VM], allow[TABLE_TO_VM])


# ---- on a switch -------------------------------------------------------------------------------

def port_zone(softswitch: Softswitch, bridge: str, port: str) -> int | None:
    """The conntrack zone of the port's stateful profile, None without one. Raises
    ``SoftswitchError``."""
    for flow in softswitch.dump_flows(bridge, port_cookie(port)):
        if flow.priority == PRIO_CT and "ct_state=+est+trk" in flow.match:
            found = re.search(r"ct_zone=(\d+)", flow.match)
            if found:
                return int(found[1])
    return None


def read(softswitch: Softswitch, bridge: str, port: str) -> list[ConnEntry]:
    """The port's conntrack entries (none when its profile is not stateful). Raises
    ``SoftswitchError``."""
    zone = port_zone(softswitch, bridge, port)
    return [] if zone is None else softswitch.dump_conntrack(zone)


def install(softswitch: Softswitch, bridge: str, port: str, mac: str, ips: Iterable[str],
            entries: Iterable[ConnEntry]) -> int:
    """Install the carry flows of ``entries`` on the port (replacing any carried before);
    returns how many. Raises ``SoftswitchError`` (no such port, no stateful profile)."""
    entries = list(entries)
    if not entries:
        remove(softswitch, bridge, port)
        return 0
    state = softswitch.ports(bridge, [port]).get(port)
    if state is None or state.ofport is None or state.ofport < 0:
        raise SoftswitchError(f"port {port} is not on bridge {bridge}", cause="no such port")
    pipe = pipeline(softswitch.dump_flows(bridge, port_cookie(port)), state.ofport, mac, ips)
    flows = carry_flows(entries, pipe)
    softswitch.replace_flows(bridge, carry_cookie(port), flows)
    return len(flows)


def sweep(softswitch: Softswitch, bridge: str, port: str) -> int:
    """Remove the carry flows that have matched a packet (their connection is committed),
    with their entry's other direction; returns how many are left. Raises
    ``SoftswitchError``."""
    cookie = carry_cookie(port)
    stats = softswitch.flow_stats(bridge, cookie)
    done = {_conn_key(s.flow) for s in stats if s.packets > 0}
    left = [s.flow for s in stats if _conn_key(s.flow) not in done]
    if done:
        softswitch.replace_flows(bridge, cookie, left)
    return len(left)


def remove(softswitch: Softswitch, bridge: str, port: str) -> None:
    """Remove every carry flow of the port (idempotent). Raises ``SoftswitchError``."""
    softswitch.replace_flows(bridge, carry_cookie(port), [])


def carry_cookies(softswitch: Softswitch, bridge: str) -> list[int]:
    """Cookies of the carry flows present on the bridge."""
    return sorted(c for c in softswitch.flow_cookies(bridge) if is_carry_cookie(c))


def _conn_key(flow: Flow) -> tuple[str, frozenset[str]]:
    """Both directions of one entry give the same key: protocol, the two endpoints."""
    fields = _fields(flow.match)
    proto = next((p for p in PROTOCOLS if f",{p}," in f",{flow.match},"), "")
    ends = {f"{fields.get('nw_src')}:{fields.get('tp_src', '')}",
            f"{fields.get('nw_dst')}:{fields.get('tp_dst', '')}"}
    return proto, frozenset(ends)
