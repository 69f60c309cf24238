"""Open vSwitch as a ``Softswitch``: OVSDB through ovsdbapp, OpenFlow through ``ovs-ofctl``.

OVSDB (bridges, ports, VLANs) goes through ovsdbapp's IDL, never ``ovs-vsctl``. Every write
first reads the switch, computes the difference to what is wanted and writes only that, in one
transaction; nothing to change means no transaction at all. A transaction that changes what
ovs-vswitchd acts on (a new port, a VLAN, an interface type...) waits until ovs-vswitchd has
applied it (ovsdbapp's ``OvsVsctlTransaction``, through ``next_cfg``/``cur_cfg``), so a port has
its OpenFlow number when ``ensure_port`` returns; one that only rewrites ``external_ids`` (tags
ovs-vswitchd ignores) returns as soon as ovsdb-server has committed it.

Flows and meters go through ``ovs-ofctl -O OpenFlow13`` on the bridge's management socket
``unix:<rundir>/<bridge>.mgmt``; there is no OpenFlow library worth depending on. Flow changes
for one cookie, or for many (``replace_flows_many``), are applied in one OpenFlow bundle
(atomic). OpenFlow 1.3 cannot bundle meter changes: each is its own ``ovs-ofctl`` call, so
independent ones run side by side (at most ``PARALLEL_TOOLS`` at a time).

Flow text normalization (``normalize_match``/``normalize_actions``): OVS prints a flow back in
its own words, so both what is asked for and what is dumped are brought to one form before they
are compared. A ``replace_flows`` then ``dump_flows`` round trip compares equal under it:

- protocol shorthands: ``dl_type=0x0800`` becomes ``ip``, ``dl_type=0x0800,nw_proto=6``
  becomes ``tcp`` (also arp, rarp, icmp, udp, sctp, ipv6, tcp6, udp6, icmp6, sctp6, mpls);
  the shorthand goes first, other fields follow in OVS's print order.
- field synonyms: eth_src/eth_dst/eth_type, ip_src/ip_dst/ip_proto, tcp_dst/udp_dst... become
  dl_src, nw_src, nw_proto, tp_dst...; in ARP flows nw_src/nw_dst/nw_proto become
  arp_spa/arp_tpa/arp_op, in ICMP flows tp_src/tp_dst become icmp_type/icmp_code.
- values: MACs lower case, an all-ones mask dropped; IP masks as prefix lengths, a host mask
  dropped; numbers decimal (dl_type hex); reserved port names upper case; ct_state flags in
  bit order.
- actions: empty means ``drop``; ``output:LOCAL`` is ``LOCAL``, ``3`` is ``output:3``,
  ``controller`` is ``CONTROLLER:65535``,
  ``mod_dl_src:M``/``mod_nw_dst:A``... are ``set_field:M->eth_src``/``set_field:A->ip_dst``,
  keywords upper case, MACs lower case.

Not normalized (write these the way OVS prints them in OpenFlow 1.3): ``mod_vlan_vid``,
``mod_tp_*`` and other OpenFlow 1.0 actions OVS rewrites, ``vlan_tci`` matches OVS prints as
``dl_vlan`` and the order of actions. Such a flow still installs correctly; it is only rewritten
on every replace. Ports are named by number only (``in_port=3``, ``output:3``): flows are
written and dumped with ``--no-names``, so a port name in a flow is refused by ``ovs-ofctl``.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import re
import subprocess
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from ovsdbapp.backend.ovs_idl import command as idl_command
from ovsdbapp.backend.ovs_idl import connection as idl_connection
from ovsdbapp.backend.ovs_idl import event as idl_event
from ovsdbapp.backend.ovs_idl import idlutils
from ovsdbapp.backend.ovs_idl import transaction as idl_transaction
from ovsdbapp.schema.open_vswitch import impl_idl

from vmferry.drivers.softswitch.base import Flow, Meter, PortSpec, PortState, Softswitch
from vmferry.errors import ConflictError, InputError, SoftswitchError, WaitTimeout

LOG = logging.getLogger(__name__)

T = TypeVar("T")

OPENFLOW = "OpenFlow13"
DEFAULT_PRIORITY = 32768
MAX_COOKIE = 2**64 - 2                     # all ones is reserved by OpenFlow
VLAN_MODES = frozenset({"trunk", "access", "native-tagged", "native-untagged", "dot1q-tunnel"})
FAIL_MODES = frozenset({"standalone", "secure"})
PARALLEL_TOOLS = 8                         # ovs-ofctl calls run side by side at most


# ================================================================================================
# Flow text: pure functions, unit-tested without a switch
# ================================================================================================

# shorthand -> (dl_type, nw_proto)
_PROTOCOLS: dict[str, tuple[int, int | None]] = {
    "ip": (0x0800, None), "ipv6": (0x86DD, None), "arp": (0x0806, None),
    "rarp": (0x8035, None), "mpls": (0x8847, None), "mplsm": (0x8848, None),
    "icmp": (0x0800, 1), "tcp": (0x0800, 6), "udp": (0x0800, 17), "sctp": (0x0800, 132),
    "icmp6": (0x86DD, 58), "tcp6": (0x86DD, 6), "udp6": (0x86DD, 17), "sctp6": (0x86DD, 132),
}
_SHORTHAND = {value: name for name, value in _PROTOCOLS.items()}

_SYNONYMS = {
    "eth_src": "dl_src", "eth_dst": "dl_dst", "eth_type": "dl_type",
    "ip_src": "nw_src", "ip_dst": "nw_dst",
    "ip_proto": "nw_proto", "vlan_pcp": "dl_vlan_pcp",
    "tcp_src": "tp_src", "tcp_dst": "tp_dst", "udp_src": "tp_src", "udp_dst": "tp_dst",
    "sctp_src": "tp_src", "sctp_dst": "tp_dst",
    "icmpv6_type": "icmp_type", "icmpv6_code": "icmp_code",
}

# The order ovs-ofctl prints fields in (lib/match.c, match_format); unknown fields go last.
_FIELD_ORDER = [
    "recirc_id", "dp_hash", "conj_id", "skb_priority", "pkt_mark",
    "ct_state", "ct_zone", "ct_mark", "ct_label", "ct_nw_src", "ct_nw_dst", "ct_ipv6_src",
    "ct_ipv6_dst", "ct_nw_proto", "ct_tp_src", "ct_tp_dst",
    "tun_id", "tun_src", "tun_dst", "tun_ipv6_src", "tun_ipv6_dst", "tun_flags",
    "metadata", "in_port", "actset_output",
    "dl_vlan", "dl_vlan_pcp", "vlan_tci", "dl_src", "dl_dst", "dl_type",
    "ipv6_src", "ipv6_dst", "ipv6_label", "nw_src", "nw_dst", "arp_spa", "arp_tpa",
    "arp_sha", "arp_tha", "arp_op", "nd_target", "nd_sll", "nd_tll", "nw_proto",
    "nw_tos", "ip_dscp", "nw_ecn", "ip_ecn", "nw_ttl", "mpls_label", "mpls_tc", "mpls_bos",
    "nw_frag", "icmp_type", "icmp_code", "tp_src", "tp_dst", "tcp_flags",
]
_ORDER = {name: index for index, name in enumerate(_FIELD_ORDER)}

_MAC_FIELDS = {"dl_src", "dl_dst", "arp_sha", "arp_tha", "nd_sll", "nd_tll"}
_IPV4_FIELDS = {"nw_src", "nw_dst", "arp_spa", "arp_tpa", "ct_nw_src", "ct_nw_dst",
                "tun_src", "tun_dst"}
_IPV6_FIELDS = {"ipv6_src", "ipv6_dst", "nd_target", "ct_ipv6_src", "ct_ipv6_dst",
                "tun_ipv6_src", "tun_ipv6_dst"}
_DECIMAL_FIELDS = {"dl_vlan", "dl_vlan_pcp", "nw_proto", "nw_tos", "ip_dscp", "nw_ecn",
                   "ip_ecn", "nw_ttl", "tp_src", "tp_dst", "icmp_type", "icmp_code", "arp_op",
                   "ct_zone", "conj_id", "mpls_label", "mpls_tc", "mpls_bos", "ct_nw_proto",
                   "ct_tp_src", "ct_tp_dst", "skb_priority"}
_PORT_KEYWORDS = {"LOCAL", "IN_PORT", "NORMAL", "FLOOD", "ALL", "CONTROLLER", "ANY", "NONE"}
_CT_STATE_BITS = ["new", "est", "rel", "rpl", "inv", "trk", "snat", "dnat"]
# Fields OVS silently drops from a match lacking the protocol they belong to.
_PREREQUISITES: list[tuple[frozenset[str], frozenset[str]]] = [
    (frozenset({"tp_src", "tp_dst", "tcp_flags"}),
     frozenset({"tcp", "udp", "sctp", "tcp6", "udp6", "sctp6"})),
    (frozenset({"icmp_type", "icmp_code"}), frozenset({"icmp", "icmp6"})),
    (frozenset({"nw_src", "nw_dst", "nw_proto", "nw_tos", "ip_dscp", "nw_ecn", "ip_ecn",
                "nw_ttl", "nw_frag"}),
     frozenset({"ip", "icmp", "tcp", "udp", "sctp", "ipv6", "icmp6", "tcp6", "udp6", "sctp6"})),
    (frozenset({"ipv6_src", "ipv6_dst", "ipv6_label", "nd_target", "nd_sll", "nd_tll"}),
     frozenset({"ipv6", "icmp6", "tcp6", "udp6", "sctp6"})),
    (frozenset({"arp_spa", "arp_tpa", "arp_sha", "arp_tha", "arp_op"}),
     frozenset({"arp", "rarp"})),
]
_NOT_MATCH_FIELDS = {"table", "priority", "cookie", "actions", "idle_timeout",
                     "hard_timeout", "importance", "out_port", "out_group"}

_SET_FIELD_ALIASES = {"mod_dl_src": "eth_src", "mod_dl_dst": "eth_dst",
                      "mod_nw_src": "ip_src", "mod_nw_dst": "ip_dst"}

_ALL_ONES_MAC = "ff:ff:ff:ff:ff:ff"
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (actions like ``ct(commit,zone=1)``)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [part for part in parts if part]


def _int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


def _normalize_mac(value: str) -> str:
    address, _, mask = value.lower().partition("/")
    if mask and mask != _ALL_ONES_MAC:
        return f"{address}/{mask}"
    return address


def _normalize_ip(value: str, version: int) -> str:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value.lower()        # a non-contiguous mask: leave it as written
    if network.version != version:
        return value.lower()
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _normalize_ct_state(value: str) -> str:
    flags = re.findall(r"([+-])([a-z]+)", value.lower())
    if not flags:
        return value.lower()
    rank = {name: index for index, name in enumerate(_CT_STATE_BITS)}
    flags.sort(key=lambda sign_name: rank.get(sign_name[1], len(rank)))
    return "".join(sign + name for sign, name in flags)


def _normalize_value(key: str, value: str) -> str:
    if key in _MAC_FIELDS:
        return _normalize_mac(value)
    if key in _IPV4_FIELDS:
        return _normalize_ip(value, 4)
    if key in _IPV6_FIELDS:
        return _normalize_ip(value, 6)
    if key == "ct_state":
        return _normalize_ct_state(value)
    if key in ("in_port", "actset_output"):
        number = _int(value)
        if number is not None:
            return str(number)
        return value.upper() if value.upper() in _PORT_KEYWORDS else value
    if key == "dl_type":
        number = _int(value)
        return f"0x{number:04x}" if number is not None else value.lower()
    if key in _DECIMAL_FIELDS and "/" not in value:
        number = _int(value)
        return str(number) if number is not None else value.lower()
    return value.lower()


def normalize_match(match: str) -> str:
    """The canonical form of an ovs-ofctl match (see the module docstring).

    Raises ``InputError`` if the match names a flow attribute (priority, table, cookie...)
    that belongs outside the match, or a field without its protocol (``tp_dst`` without
    ``tcp``...), which OVS would silently drop.
    """
    fields: dict[str, str] = {}
    flags: list[str] = []
    protocol: str | None = None
    for token in _split_top_level(match):
        key, sep, value = token.partition("=")
        key = key.strip().lower()
        if not sep:
            if key in _PROTOCOLS:
                protocol = key
            else:
                flags.append(key)
            continue
        if key in _NOT_MATCH_FIELDS:
            raise InputError("flow.match", f"{key!r} is a flow attribute, not a match field")
        fields[_SYNONYMS.get(key, key)] = value.strip()

    # Fold protocol shorthand, dl_type and nw_proto into one shorthand where OVS has one.
    dl_type = _int(fields["dl_type"]) if "dl_type" in fields else None
    nw_proto = _int(fields["nw_proto"]) if "nw_proto" in fields else None
    if protocol is not None:
        dl_type, implied = _PROTOCOLS[protocol]
        nw_proto = implied if implied is not None else nw_proto
    if dl_type is not None:
        if (dl_type, nw_proto) in _SHORTHAND:
            protocol = _SHORTHAND[(dl_type, nw_proto)]
            fields.pop("nw_proto", None)
            fields.pop("dl_type", None)
        elif (dl_type, None) in _SHORTHAND:
            protocol = _SHORTHAND[(dl_type, None)]
            fields.pop("dl_type", None)
            if nw_proto is not None:
                fields["nw_proto"] = str(nw_proto)
        else:
            protocol = None
            fields["dl_type"] = f"0x{dl_type:04x}"

    if protocol in ("arp", "rarp"):
        for ip_name, arp_name in (("nw_src", "arp_spa"), ("nw_dst", "arp_tpa"),
                                  ("nw_proto", "arp_op")):
            if ip_name in fields:
                fields[arp_name] = fields.pop(ip_name)
    if protocol in ("icmp", "icmp6"):
        for tp_name, icmp_name in (("tp_src", "icmp_type"), ("tp_dst", "icmp_code")):
            if tp_name in fields:
                fields[icmp_name] = fields.pop(tp_name)

    for needing, protocols in _PREREQUISITES:
        missing = sorted(needing & fields.keys())
        if missing and protocol not in protocols:
            raise InputError("flow.match", f"{', '.join(missing)} needs one of "
                             f"{', '.join(sorted(protocols))} in the match: {match!r}")

    ordered = sorted(fields, key=lambda name: (_ORDER.get(name, len(_ORDER)), name))
    parts = ([protocol] if protocol else []) + sorted(flags)
    parts += [f"{name}={_normalize_value(name, fields[name])}" for name in ordered]
    return ",".join(parts)


def _normalize_action(action: str) -> str:
    name, sep, argument = action.partition(":")
    lower = name.strip().lower()
    if not sep:
        if lower == "controller":
            return "CONTROLLER:65535"
        if action.upper() in _PORT_KEYWORDS:
            return action.upper()
        number = _int(action)
        if number is not None:
            return f"output:{number}"
        return action if "(" in action else lower
    if lower == "output":
        if argument.upper() in _PORT_KEYWORDS:
            return argument.upper()
        number = _int(argument)
        return f"output:{number}" if number is not None else f"output:{argument}"
    if lower == "controller":
        return f"CONTROLLER:{argument}"
    if lower in ("set_field", "load"):
        value, arrow, target = argument.partition("->")
        if _MAC_RE.match(value):
            value = value.lower()
        return f"{lower}:{value}{arrow}{target}"
    if lower in _SET_FIELD_ALIASES:
        # OpenFlow 1.3 has no mod_* actions: OVS turns them into set_field.
        value = argument.lower() if _MAC_RE.match(argument) else argument
        return f"set_field:{value}->{_SET_FIELD_ALIASES[lower]}"
    return f"{lower}:{argument}"


def normalize_actions(actions: str) -> str:
    """The canonical form of an ovs-ofctl action list (see the module docstring)."""
    parts = [_normalize_action(part) for part in _split_top_level(actions)]
    return ",".join(parts) if parts else "drop"


def normalize_flow(flow: Flow) -> Flow:
    """``flow`` with its match and actions in canonical form. Raises ``InputError``."""
    return Flow(table=flow.table, priority=flow.priority, match=normalize_match(flow.match),
                actions=normalize_actions(flow.actions))


@dataclass(frozen=True)
class FlowStats:
    """A flow as dumped, with its cookie and counters."""

    cookie: int
    flow: Flow
    packets: int = 0
    bytes: int = 0


# Header fields ovs-ofctl prints before the match ("cookie=0x5, duration=1.2s, table=0, ...").
_HEADER_FIELDS = {"cookie", "duration", "table", "n_packets", "n_bytes", "idle_timeout",
                  "hard_timeout", "idle_age", "hard_age", "importance", "priority"}
_HEADER_FLAGS = {"send_flow_rem", "check_overlap", "reset_counts", "no_packet_counts",
                 "no_byte_counts"}


def parse_flow_line(line: str) -> FlowStats | None:
    """Parse one line of ``ovs-ofctl dump-flows`` into normalized ``FlowStats``.

    Returns None for lines that are not flows (the reply header).
    """
    line = line.strip()
    head, sep, actions = line.partition(" actions=")
    if not sep:
        if line.startswith("actions="):
            head, actions = "", line[len("actions="):]
        else:
            return None
    values: dict[str, str] = {}
    match_parts: list[str] = []
    for token in re.split(r",\s*", head.strip()):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if eq and key in _HEADER_FIELDS:
            values[key] = value
        elif not eq and key in _HEADER_FLAGS:
            continue
        else:
            match_parts.append(token)
    if "priority" not in values and not match_parts and not actions:
        return None
    flow = Flow(table=int(values.get("table", "0")),
                priority=int(values.get("priority", str(DEFAULT_PRIORITY))),
                match=normalize_match(",".join(match_parts)),
                actions=normalize_actions(actions.strip()))
    return FlowStats(cookie=int(values.get("cookie", "0"), 0), flow=flow,
                     packets=int(values.get("n_packets", "0")),
                     bytes=int(values.get("n_bytes", "0")))


_COOKIE_RE = re.compile(r"^\s*cookie=(0x[0-9a-fA-F]+|\d+)")


def parse_dump_flows(text: str, cookies: Collection[int] | None = None) -> list[FlowStats]:
    """Parse ``ovs-ofctl dump-flows`` output (with or without ``--no-stats``).

    With ``cookies``, only flows carrying one of them are parsed and returned; the others are
    skipped before the (costly) normalization.
    """
    lines = text.splitlines()
    if cookies is not None:
        wanted = set(cookies)
        # --no-stats leaves out a zero cookie.
        lines = [line for line in lines
                 if (((found := _COOKIE_RE.match(line)) and int(found.group(1), 0)) or 0) in wanted]
    parsed = (parse_flow_line(line) for line in lines)
    return [stats for stats in parsed if stats is not None]


def flow_key(flow: Flow) -> tuple[int, int, str]:
    """What makes two flows the same OpenFlow entry: table, priority, normalized match."""
    return (flow.table, flow.priority, normalize_match(flow.match))


def _cookie_text(cookie: int) -> str:
    return f"0x{cookie:x}"


def flow_add_text(cookie: int, flow: Flow) -> str:
    """An ``add`` line for ``ovs-ofctl add-flows``."""
    match = f"{flow.match}," if flow.match.strip() else ""
    return (f"add cookie={_cookie_text(cookie)},table={flow.table},priority={flow.priority},"
            f"{match}actions={flow.actions or 'drop'}")


def flow_delete_text(cookie: int, flow: Flow) -> str:
    """A ``delete_strict`` line that removes exactly this flow, and only with this cookie."""
    match = f",{flow.match}" if flow.match.strip() else ""
    return (f"delete_strict cookie={_cookie_text(cookie)}/-1,table={flow.table},"
            f"priority={flow.priority}{match}")


def plan_flow_changes(cookie: int, actual: Iterable[Flow], desired: Iterable[Flow]) -> list[str]:
    """Bundle lines turning the flows with ``cookie`` from ``actual`` into ``desired``.

    Unchanged flows are left alone (their counters survive); deletes come before adds.
    Raises ``InputError`` if ``desired`` holds two different flows for one table, priority and
    match (OpenFlow keeps only one).
    """
    wanted: dict[tuple[int, int, str], tuple[Flow, str]] = {}
    for flow in desired:
        key = flow_key(flow)
        actions = normalize_actions(flow.actions)
        if key in wanted and wanted[key][1] != actions:
            raise InputError("flows", f"two flows for table {key[0]}, priority {key[1]}, "
                             f"match {key[2]!r} with different actions")
        wanted[key] = (flow, actions)
    have = {flow_key(flow): (flow, normalize_actions(flow.actions)) for flow in actual}
    deletes = [flow_delete_text(cookie, flow) for key, (flow, _) in sorted(have.items())
               if key not in wanted]
    adds = [flow_add_text(cookie, flow) for key, (flow, actions) in sorted(wanted.items())
            if key not in have or have[key][1] != actions]
    return deletes + adds


# ---- meters ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeterStats:
    meter_id: int
    flows: int
    packets_in: int
    bytes_in: int
    band_packets: int          # packets the drop band dropped
    band_bytes: int


def check_meter(meter: Meter) -> None:
    """Raises ``InputError`` unless exactly one of kbps/pktps is a positive rate."""
    if meter.meter_id < 1 or meter.meter_id > 0xFFFF0000:
        raise InputError("meter.meter_id", f"{meter.meter_id} is not 1..0xffff0000")
    if (meter.kbps is None) == (meter.pktps is None):
        raise InputError(f"meter.{meter.meter_id}", "give exactly one of kbps and pktps")
    rate = meter.kbps if meter.kbps is not None else meter.pktps
    if rate is None or rate <= 0:
        raise InputError(f"meter.{meter.meter_id}", "rate must be positive")
    if meter.burst is not None and meter.burst <= 0:
        raise InputError(f"meter.{meter.meter_id}", "burst must be positive")


def meter_text(meter: Meter) -> str:
    """The ``add-meter``/``mod-meter`` argument: one drop band, stats on."""
    unit = "kbps" if meter.kbps is not None else "pktps"
    rate = meter.kbps if meter.kbps is not None else meter.pktps
    burst_flag = "burst," if meter.burst is not None else ""
    burst_size = f",burst_size={meter.burst}" if meter.burst is not None else ""
    return (f"meter={meter.meter_id},{unit},{burst_flag}stats,"
            f"bands=type=drop,rate={rate}{burst_size}")


def parse_dump_meters(text: str) -> list[Meter]:
    """Parse ``ovs-ofctl dump-meters``: a ``meter=`` line, then one ``type=`` line per band.

    Only the first drop band is kept (vmferry writes one).
    """
    meters: list[Meter] = []
    current: tuple[int, set[str]] | None = None
    band_seen = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("meter="):
            head = line.split()
            current = (int(head[0].split("=", 1)[1]), set(head[1:]))
            band_seen = False
        elif line.startswith("type=") and current is not None and not band_seen:
            band = dict(token.split("=", 1) for token in line.split() if "=" in token)
            if band.get("type") != "drop":
                continue
            band_seen = True
            meter_id, flags = current
            rate = int(band.get("rate", "0"))
            burst = int(band["burst_size"]) if "burst" in flags and "burst_size" in band else None
            if "pktps" in flags:
                meters.append(Meter(meter_id, pktps=rate, burst=burst))
            else:
                meters.append(Meter(meter_id, kbps=rate, burst=burst))
    return sorted(meters, key=lambda m: m.meter_id)


def parse_meter_stats(text: str) -> dict[int, MeterStats]:
    """Parse ``ovs-ofctl meter-stats``: a ``meter:`` line, then ``N: packet_count:...`` bands."""
    found: dict[int, MeterStats] = {}
    head: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("meter:"):
            head = dict(token.split(":", 1) for token in line.split() if ":" in token)
        elif head is not None and re.match(r"^\d+:", line):
            band = dict(token.split(":", 1) for token in line.split()[1:] if ":" in token)
            meter_id = int(head["meter"])
            found[meter_id] = MeterStats(
                meter_id=meter_id, flows=int(head.get("flow_count", "0")),
                packets_in=int(head.get("packet_in_count", "0")),
                bytes_in=int(head.get("byte_in_count", "0")),
                band_packets=int(band.get("packet_count", "0")),
                band_bytes=int(band.get("byte_count", "0")))
            head = None
    return found


def meters_after(actual: Iterable[Meter], desired: Iterable[Meter],
                 owned: Collection[int]) -> list[Meter]:
    """The meters on a bridge once ``plan_meter_changes(actual, desired, owned)`` is applied."""
    kept = [meter for meter in actual if meter.meter_id not in owned]
    return sorted([*kept, *desired], key=lambda m: m.meter_id)


def plan_meter_changes(actual: Iterable[Meter], desired: Iterable[Meter],
                       owned: Collection[int]) -> list[tuple[str, str]]:
    """``(ovs-ofctl command, argument)`` pairs making ``owned`` meters exactly ``desired``.

    Meters outside ``owned`` are never touched. Raises ``InputError`` for a desired meter
    whose id is not owned, or an invalid meter.
    """
    wanted = {}
    for meter in desired:
        check_meter(meter)
        if meter.meter_id not in owned:
            raise InputError("meters", f"meter {meter.meter_id} is not among the owned ids")
        wanted[meter.meter_id] = meter
    have = {meter.meter_id: meter for meter in actual if meter.meter_id in owned}
    changes: list[tuple[str, str]] = []
    for meter_id in sorted(owned):
        if meter_id in have and meter_id not in wanted:
            changes.append(("del-meter", f"meter={meter_id}"))
        elif meter_id in wanted and meter_id not in have:
            changes.append(("add-meter", meter_text(wanted[meter_id])))
        elif meter_id in wanted and have[meter_id] != wanted[meter_id]:
            changes.append(("mod-meter", meter_text(wanted[meter_id])))
    return changes


# ---- fdb ---------------------------------------------------------------------------------------

def parse_fdb_show(text: str) -> list[tuple[str, int, str]]:
    """Parse ``ovs-appctl fdb/show``: ``(port, vlan, mac)`` per learned entry."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and _MAC_RE.match(parts[2]) and parts[1].isdigit():
            entries.append((parts[0], int(parts[1]), parts[2].lower()))
    return entries


# ================================================================================================
# Ports: desired vs actual, pure
# ================================================================================================

@dataclass(frozen=True)
class PortRecord:
    """The OVSDB columns of a port and its interface that vmferry manages, as stored."""

    name: str
    port: dict[str, Any]            # tag, trunks, vlan_mode, external_ids
    iface: dict[str, Any]           # type, options, external_ids, mtu_request
    ofport: int | None = None
    mac_in_use: str | None = None
    error: str | None = None

    def state(self) -> PortState:
        tag = self.port["tag"]
        mode = self.port["vlan_mode"]
        return PortState(name=self.name, tag=tag[0] if tag else None,
                         trunks=frozenset(self.port["trunks"]),
                         vlan_mode=mode[0] if mode else None, iface_type=self.iface["type"],
                         ofport=self.ofport, mac_in_use=self.mac_in_use,
                         external_ids=dict(self.port["external_ids"]))


@dataclass(frozen=True)
class PortChanges:
    """Columns to write, only those that differ. ``create``: the port does not exist yet."""

    create: bool
    port: dict[str, Any] = field(default_factory=dict)
    iface: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.create or bool(self.port) or bool(self.iface)

    @property
    def needs_vswitchd(self) -> bool:
        """Whether ovs-vswitchd acts on these changes (so a commit should wait for it):
        anything but a rewrite of ``external_ids``, which only vmferry reads."""
        return self.create or bool((set(self.port) | set(self.iface)) - {"external_ids"})


def check_port_spec(spec: PortSpec) -> None:
    """Raises ``InputError`` for values OVSDB would reject (the IDL only logs those)."""
    if not spec.name or len(spec.name) > 15 or "/" in spec.name or " " in spec.name:
        raise InputError("port.name", f"{spec.name!r} is not a valid interface name")
    for vlan in ([spec.tag] if spec.tag is not None else []) + sorted(spec.trunks):
        if not 0 <= vlan <= 4095:
            raise InputError("port.vlan", f"{vlan} is not 0..4095")
    if spec.vlan_mode is not None and spec.vlan_mode not in VLAN_MODES:
        raise InputError("port.vlan_mode", f"{spec.vlan_mode!r} is not one of "
                         f"{', '.join(sorted(VLAN_MODES))}")
    if spec.mtu is not None and not 68 <= spec.mtu <= 65535:
        raise InputError("port.mtu", f"{spec.mtu} is not 68..65535")


def desired_columns(spec: PortSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Port and Interface columns ``spec`` stands for, in IDL (python) form."""
    port = {
        "tag": [spec.tag] if spec.tag is not None else [],
        "trunks": sorted(spec.trunks),
        "vlan_mode": [spec.vlan_mode] if spec.vlan_mode else [],
        "external_ids": dict(spec.external_ids),
    }
    iface = {
        "type": spec.iface_type,
        "options": dict(spec.options),
        "external_ids": dict(spec.external_ids),
        "mtu_request": [spec.mtu] if spec.mtu is not None else [],
    }
    return port, iface


def diff_port(spec: PortSpec, actual: PortRecord | None) -> PortChanges:
    """What to write so the port matches ``spec``: nothing for columns already right.

    Raises ``InputError`` for an invalid spec.
    """
    check_port_spec(spec)
    port, iface = desired_columns(spec)
    if actual is None:
        return PortChanges(create=True, port={k: v for k, v in port.items() if v},
                           iface=iface)
    return PortChanges(
        create=False,
        port={k: v for k, v in port.items() if _column(actual.port.get(k)) != _column(v)},
        iface={k: v for k, v in iface.items() if _column(actual.iface.get(k)) != _column(v)})


def _column(value: Any) -> Any:
    """Compare sets as sets: the IDL may hand back a set column in any order."""
    if isinstance(value, list | tuple | set | frozenset):
        return sorted(value)
    return value


# ================================================================================================
# ovsdbapp plumbing
# ================================================================================================

class _CheckedTransaction(impl_idl.OvsVsctlTransaction):  # type: ignore[misc]
    """Raises when ovs-vswitchd fails an interface or does not catch up; ovsdbapp only logs."""

    def post_commit(self, txn: Any) -> None:
        idl_transaction.Transaction.post_commit(self, txn)
        self.do_post_commit(txn)

    def post_commit_failed_interfaces(self, txn: Any) -> list[str]:
        # ovsdbapp compares the ofport column with -1, but the Python IDL hands back [-1],
        # so its check never fires.
        failed = []
        rows = self.api.idl.tables["Interface"].rows
        for provisional in txn.expected_ifaces:
            uuid = txn.get_insert_uuid(provisional)
            iface = rows.get(uuid) if uuid else None
            if iface is not None and _one(iface.ofport) in (None, -1):
                failed.append(f"{iface.name} ({_one(iface.error) or 'no ofport'})")
        return failed


class _OvsdbApi(impl_idl.OvsdbIdl):  # type: ignore[misc]
    """ovsdbapp's Open_vSwitch API with one connection per instance.

    ovsdbapp keeps the connection on the class, so every instance in a process would share
    the first switch's connection; vmferry talks to several switches from one process.
    """

    @property
    def ovsdb_connection(self) -> Any:
        return self.__dict__.get("_vmferry_connection")

    @ovsdb_connection.setter
    def ovsdb_connection(self, connection: Any) -> None:
        self.__dict__["_vmferry_connection"] = connection

    def create_transaction(self, check_error: bool = False, log_errors: bool = True,
                           wait_for_vswitchd: bool = True, **kwargs: Any) -> Any:
        if not wait_for_vswitchd:
            # No next_cfg bump and no wait for cur_cfg: ovsdb-server's commit is the end.
            return idl_transaction.Transaction(self, self.ovsdb_connection,
                                               check_error=check_error, log_errors=log_errors)
        return _CheckedTransaction(self, self.ovsdb_connection, check_error=check_error,
                                   log_errors=log_errors)


class _NotifyingIdl(idl_connection.OvsdbIdl):  # type: ignore[misc]
    """The IDL, forwarding row changes to a handler so waits are on events, not polls."""

    def __init__(self, remote: str, helper: Any, handler: Any) -> None:
        super().__init__(remote, helper)
        self._vmferry_handler = handler

    def notify(self, event: str, row: Any, updates: Any = None) -> None:
        self._vmferry_handler.notify(event, row, updates)


class _SetColumnsCommand(idl_command.BaseCommand):  # type: ignore[misc]
    """Overwrite columns of one row exactly (ovsdbapp's db_set merges maps instead)."""

    def __init__(self, api: Any, table: str, record: str, columns: dict[str, Any]) -> None:
        super().__init__(api)
        self.table = table
        self.record = record
        self.columns = columns

    def run_idl(self, txn: Any) -> None:
        row = self.api.lookup(self.table, self.record)
        for column, value in self.columns.items():
            self.set_column(row, column, value)


class _InterfaceReadyEvent(idl_event.WaitEvent):  # type: ignore[misc]
    """Fires once an Interface row named ``name`` has an ofport (a number, or -1 on failure)."""

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__((self.ROW_CREATE, self.ROW_UPDATE), "Interface",
                         (("name", "=", name),), timeout=timeout)
        self.event_name = f"interface-ready-{name}"

    def match_fn(self, event: str, row: Any, old: Any) -> bool:
        return bool(getattr(row, "ofport", None))


def _one(value: Any) -> Any:
    """An optional OVSDB column comes back as a list of 0 or 1 items."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


# ================================================================================================
# The driver
# ================================================================================================

class OvsSoftswitch(Softswitch):
    """One Open vSwitch (one OVSDB) as a ``Softswitch``. Close it, or use it as a context.

    Raises ``SoftswitchError`` if the database cannot be reached.
    """

    def __init__(self, db_socket: Path | str, *, rundir: Path | None = None,
                 vswitchd_ctl: Path | None = None, timeout: float = 10) -> None:
        text = str(db_socket)
        self.remote = text if re.match(r"^(unix|tcp|ssl):", text) else f"unix:{text}"
        socket_path = Path(text.split(":", 1)[1]) if text.startswith("unix:") else Path(text)
        self.rundir = Path(rundir) if rundir is not None else socket_path.parent
        self.vswitchd_ctl = (Path(vswitchd_ctl) if vswitchd_ctl is not None
                             else self.rundir / "ovs-vswitchd.ctl")
        self.timeout = timeout
        self.write_transactions = 0       # committed OVSDB write transactions, for tests
        self._closed = False
        self._lock = threading.Lock()
        self._handler = idl_event.RowEventHandler()
        try:
            helper = idlutils.get_schema_helper(self.remote, "Open_vSwitch")
            helper.register_all()
            idl = _NotifyingIdl(self.remote, helper, self._handler)
            self._api = _OvsdbApi(idl_connection.Connection(idl, timeout=timeout))
        except Exception as exc:  # ovsdbapp raises bare Exception/RuntimeError subclasses
            self._handler.shutdown()
            atexit.unregister(self._handler.shutdown)
            raise SoftswitchError(f"cannot connect to OVSDB at {self.remote}",
                                  cause=str(exc) or type(exc).__name__) from exc

    # ---- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the OVSDB connection thread and the event thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._api.ovsdb_connection.stop(timeout=self.timeout)
        self._handler.shutdown()
        self._handler.notify_thread.join(timeout=self.timeout)
        # ovsdbapp registers every handler with atexit; drop ours so it can be collected.
        atexit.unregister(self._handler.shutdown)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- OVSDB helpers -------------------------------------------------------------------------

    def _read(self, reader: Callable[[], T]) -> T:
        """Run ``reader`` on the IDL cache while the connection thread cannot update it."""
        if self._closed:
            raise SoftswitchError(f"OVSDB connection to {self.remote} is closed")
        with self._api.ovsdb_connection.lock:
            return reader()

    def _commit(self, what: str, commands: list[Any], *, wait_for_vswitchd: bool = True) -> None:
        """Run ``commands`` in one transaction; with ``wait_for_vswitchd``, return only once
        ovs-vswitchd has applied it. Raises ``SoftswitchError``."""
        if not commands:
            return
        if self._closed:
            raise SoftswitchError(f"OVSDB connection to {self.remote} is closed")
        try:
            with self._api.transaction(check_error=True, log_errors=False,
                                       wait_for_vswitchd=wait_for_vswitchd) as txn:
                for cmd in commands:
                    txn.add(cmd)
        except Exception as exc:  # ovsdbapp raises RuntimeError and its own exceptions
            raise SoftswitchError(f"OVSDB transaction failed: {what}",
                                  cause=str(exc) or type(exc).__name__) from exc
        self.write_transactions += 1

    def _bridge_row(self, bridge: str) -> Any:
        return idlutils.row_by_value(self._api.idl, "Bridge", "name", bridge, None)

    def _require_bridge(self, bridge: str) -> Any:
        row = self._bridge_row(bridge)
        if row is None:
            raise SoftswitchError(f"bridge {bridge} does not exist", cause="no such bridge")
        return row

    @staticmethod
    def _record(port_row: Any) -> PortRecord:
        ifaces = list(port_row.interfaces)
        iface = next((i for i in ifaces if i.name == port_row.name), ifaces[0] if ifaces else None)
        port = {"tag": list(port_row.tag), "trunks": sorted(port_row.trunks),
                "vlan_mode": list(port_row.vlan_mode), "external_ids": dict(port_row.external_ids)}
        if iface is None:
            return PortRecord(port_row.name, port, {"type": "", "options": {},
                                                    "external_ids": {}, "mtu_request": []})
        iface_cols = {"type": iface.type, "options": dict(iface.options),
                      "external_ids": dict(iface.external_ids),
                      "mtu_request": list(iface.mtu_request)}
        return PortRecord(port_row.name, port, iface_cols, ofport=_one(iface.ofport),
                          mac_in_use=_one(iface.mac_in_use), error=_one(iface.error))

    def _port_records(self, bridge: str,
                      names: Collection[str] | None = None) -> dict[str, PortRecord]:
        """Records of the bridge's ports (only those in ``names`` when given: reading a row
        through the IDL converts every column, which adds up on a bridge of many ports)."""
        row = self._require_bridge(bridge)
        records = {}
        for port in row.ports:
            name = port.name
            if name != bridge and (names is None or name in names):
                records[name] = self._record(port)
        return records

    def _port_owner(self, port: str) -> str | None:
        """The bridge holding a port of that name, if any."""
        for row in self._api.tables["Bridge"].rows.values():
            if any(p.name == port for p in row.ports):
                return str(row.name)
        return None

    # ---- bridges -------------------------------------------------------------------------------

    def bridges(self) -> list[str]:
        """Names of all bridges."""
        return sorted(self._read(lambda: [str(r.name) for r in
                                          self._api.tables["Bridge"].rows.values()]))

    def ensure_bridge(self, bridge: str, *, datapath_type: str = "netdev",
                      fail_mode: str | None = None) -> None:
        """Create the bridge, or bring datapath_type and fail_mode to the given values.

        ``fail_mode=None`` means OVS's default (standalone). Raises ``SoftswitchError``,
        ``InputError`` for a bad fail_mode.
        """
        if fail_mode is not None and fail_mode not in FAIL_MODES:
            raise InputError("bridge.fail_mode", f"{fail_mode!r} is not standalone or secure")
        if not bridge or len(bridge) > 15:
            raise InputError("bridge", f"{bridge!r} is not a valid bridge name")
        wanted_mode = [fail_mode] if fail_mode else []

        def plan() -> list[Any]:
            row = self._bridge_row(bridge)
            if row is None:
                cmds = [self._api.add_br(bridge, may_exist=True, datapath_type=datapath_type)]
                if fail_mode:
                    cmds.append(self._api.db_set("Bridge", bridge, ("fail_mode", fail_mode)))
                return cmds
            changes: dict[str, Any] = {}
            if row.datapath_type != datapath_type:
                changes["datapath_type"] = datapath_type
            if list(row.fail_mode) != wanted_mode:
                changes["fail_mode"] = wanted_mode
            return [_SetColumnsCommand(self._api, "Bridge", bridge, changes)] if changes else []

        self._commit(f"ensure bridge {bridge}", self._read(plan))

    def delete_bridge(self, bridge: str) -> None:
        """Delete the bridge and its ports (idempotent). Raises ``SoftswitchError``."""
        if self._read(lambda: self._bridge_row(bridge)) is None:
            return
        self._commit(f"delete bridge {bridge}", [self._api.del_br(bridge, if_exists=True)])

    # ---- ports ---------------------------------------------------------------------------------

    def ports(self, bridge: str, names: Collection[str] | None = None) -> dict[str, PortState]:
        """Every port of the bridge except its own internal port (only those named in
        ``names`` when given), as stored now.

        ``ofport`` is None until ovs-vswitchd numbered the port, -1 if it failed to open it.
        Raises ``SoftswitchError`` if the bridge does not exist.
        """
        records = self._read(lambda: self._port_records(bridge, names))
        return {name: record.state() for name, record in sorted(records.items())}

    def port_external_ids(self, bridge: str) -> dict[str, dict[str, str]]:
        """Every port's ``external_ids`` by name (two columns per port, not all of them).
        Raises ``SoftswitchError`` if the bridge does not exist."""
        def read() -> dict[str, dict[str, str]]:
            ports = self._require_bridge(bridge).ports
            return {name: dict(p.external_ids) for p in ports if (name := p.name) != bridge}
        return self._read(read)

    def port_record(self, bridge: str, port: str) -> PortRecord | None:
        """All managed columns of one port (None if it is not on the bridge)."""
        return self._read(lambda: self._port_records(bridge, {port}).get(port))

    def ensure_port(self, bridge: str, port: PortSpec) -> None:
        """Create the port or write only the columns that differ from ``port``; no-op if none.

        Maps (options, external_ids) are made exactly equal, not merged. Waits for
        ovs-vswitchd unless only ``external_ids`` change. Raises ``InputError`` for a bad spec,
        ``ConflictError`` if the port is on another bridge, ``SoftswitchError`` if OVSDB or
        ovs-vswitchd (cannot open the device) fails.
        """
        self.ensure_ports(bridge, [port])

    def ensure_ports(self, bridge: str, ports: Iterable[PortSpec]) -> None:
        """``ensure_port`` for many ports in one transaction (all or none are written).

        Raises what ``ensure_port`` raises, and ``InputError`` for a port named twice.
        """
        specs = list(ports)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise InputError("ports", "a port is named twice")
        for spec in specs:
            check_port_spec(spec)

        def plan() -> list[tuple[PortSpec, PortChanges]]:
            records = self._port_records(bridge, set(names))
            planned = []
            for spec in specs:
                record = records.get(spec.name)
                if record is None:
                    owner = self._port_owner(spec.name)
                    if owner is not None:
                        raise ConflictError("port", f"{spec.name} is on bridge {owner}, "
                                            f"not {bridge}")
                planned.append((spec, diff_port(spec, record)))
            return planned

        changed = [(spec, changes) for spec, changes in self._read(plan) if changes]
        if not changed:
            return
        cmds: list[Any] = []
        for spec, changes in changed:
            if changes.create:
                cmds.append(self._api.add_port(bridge, spec.name, may_exist=False,
                                               **changes.iface))
            elif changes.iface:
                cmds.append(_SetColumnsCommand(self._api, "Interface", spec.name,
                                               changes.iface))
            if changes.port:
                cmds.append(_SetColumnsCommand(self._api, "Port", spec.name, changes.port))
        what = (f"ensure port {changed[0][0].name} on {bridge}" if len(changed) == 1
                else f"ensure {len(changed)} ports on {bridge}")
        try:
            self._commit(what, cmds,
                         wait_for_vswitchd=any(c.needs_vswitchd for _, c in changed))
        except SoftswitchError as exc:
            for spec, changes in changed:
                if not (changes.create or changes.iface):
                    continue
                record = self.port_record(bridge, spec.name)
                if record is not None and record.error:
                    raise SoftswitchError(f"ovs-vswitchd cannot use port {spec.name} on "
                                          f"{bridge}", cause=record.error) from exc
            raise

    def delete_port(self, bridge: str, port: str) -> None:
        """Remove the port from the bridge (idempotent). Raises ``SoftswitchError``."""
        present = self._read(lambda: port in self._port_records(bridge, {port})
                             if self._bridge_row(bridge) is not None else False)
        if present:
            self._commit(f"delete port {port} from {bridge}",
                         [self._api.del_port(port, bridge=bridge, if_exists=True)])

    def set_trunks(self, bridge: str, port: str, vlans: frozenset[int]) -> None:
        """Set the VLANs a trunk port carries (empty: all VLANs, as OVS defines it).

        Writes nothing when unchanged. Raises ``SoftswitchError`` if the port is missing,
        ``InputError`` for a VLAN outside 0..4095.
        """
        for vlan in vlans:
            if not 0 <= vlan <= 4095:
                raise InputError("trunks", f"{vlan} is not 0..4095")

        def current() -> list[int]:
            record = self._port_records(bridge, {port}).get(port)
            if record is None:
                raise SoftswitchError(f"port {port} is not on bridge {bridge}",
                                      cause="no such port")
            return sorted(record.port["trunks"])

        if self._read(current) == sorted(vlans):
            return
        self._commit(f"set trunks of {port} on {bridge}",
                     [_SetColumnsCommand(self._api, "Port", port, {"trunks": sorted(vlans)})])

    def wait_for_port(self, bridge: str, port: str, timeout: float = 10) -> int:
        """Wait (on an OVSDB row event) until the port's interface has an OpenFlow number.

        Returns the ofport. Raises ``WaitTimeout`` after ``timeout`` seconds,
        ``SoftswitchError`` if ovs-vswitchd failed to open the interface (ofport -1).
        """
        ready = _InterfaceReadyEvent(port, timeout)
        # Watch before looking, so an update landing in between is not missed.
        self._handler.watch_event(ready)
        try:
            record = self.port_record(bridge, port)
            if record is None or record.ofport is None:
                if not ready.wait():
                    raise WaitTimeout(f"port {port} on {bridge} to get an OpenFlow port number",
                                      timeout)
                record = self.port_record(bridge, port)
        finally:
            self._handler.unwatch_event(ready)
        if record is None or record.ofport is None:
            raise SoftswitchError(f"port {port} is not on bridge {bridge}", cause="no such port")
        if record.ofport < 0:
            raise SoftswitchError(f"ovs-vswitchd cannot use port {port} on {bridge}",
                                  cause=record.error or "ofport -1")
        return record.ofport

    # ---- OpenFlow ------------------------------------------------------------------------------

    def mgmt_target(self, bridge: str) -> str:
        """The OpenFlow management socket of a bridge, as ovs-ofctl takes it."""
        return f"unix:{self.rundir / bridge}.mgmt"

    def _tool(self, argv: list[str], what: str,
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run an OVS command-line tool, bounded by the switch timeout."""
        limit = self.timeout
        try:
            result = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                    timeout=limit, check=False)
        except subprocess.TimeoutExpired as exc:
            raise WaitTimeout(f"{argv[0]} to {what}", limit) from exc
        except OSError as exc:
            raise SoftswitchError(f"cannot run {argv[0]} to {what}", cause=str(exc)) from exc
        if result.returncode != 0:
            raise SoftswitchError(f"{argv[0]} failed to {what}",
                                  cause=(result.stderr or result.stdout).strip()[-800:],
                                  argv=argv)
        return result

    def _tools(self, calls: list[tuple[list[str], str]]) -> None:
        """Run independent tool calls side by side (at most ``PARALLEL_TOOLS`` at a time).

        Every call runs to its end even if one fails; then the first failure is raised.
        """
        if len(calls) <= 1:
            for argv, what in calls:
                self._tool(argv, what)
            return
        with ThreadPoolExecutor(max_workers=min(PARALLEL_TOOLS, len(calls)),
                                thread_name_prefix="ovs-ofctl") as pool:
            futures = [pool.submit(self._tool, argv, what) for argv, what in calls]
        for future in futures:
            future.result()

    def _ofctl_argv(self, bridge: str, args: list[str]) -> list[str]:
        subcommand, *rest = args
        return ["ovs-ofctl", "-O", OPENFLOW, subcommand, self.mgmt_target(bridge), *rest]

    def _ofctl(self, bridge: str, args: list[str], what: str) -> subprocess.CompletedProcess[str]:
        return self._tool(self._ofctl_argv(bridge, args), what)

    def _dump(self, bridge: str, cookie: int | None, stats: bool,
              cookies: Collection[int] | None = None) -> list[FlowStats]:
        """Flows of the bridge: those with ``cookie`` (filtered by the switch), or those with
        any of ``cookies`` (filtered here), or all."""
        flags = [] if stats else ["--no-stats"]
        argv = ["ovs-ofctl", "-O", OPENFLOW, "--no-names", *flags, "dump-flows",
                self.mgmt_target(bridge)]
        if cookie is not None:
            argv.append(f"cookie={_cookie_text(cookie)}/-1")
        result = self._tool(argv, f"dump flows of {bridge}")
        return parse_dump_flows(result.stdout, cookies)

    def dump_flows(self, bridge: str, cookie: int | None = None) -> list[Flow]:
        """Flows now installed (only those with ``cookie`` when given), normalized, sorted.

        Raises ``SoftswitchError``.
        """
        flows = [stats.flow for stats in self._dump(bridge, cookie, stats=False)]
        return sorted(flows, key=lambda f: (f.table, -f.priority, f.match, f.actions))

    def flow_stats(self, bridge: str, cookie: int | None = None) -> list[FlowStats]:
        """Flows with their packet and byte counters. Raises ``SoftswitchError``."""
        return self._dump(bridge, cookie, stats=True)

    def replace_flows(self, bridge: str, cookie: int, flows: list[Flow]) -> None:
        """Make the flows carrying ``cookie`` exactly ``flows``, in one OpenFlow bundle.

        Only the difference is sent; unchanged flows keep their counters. A flow naming a
        meter needs that meter to exist first (``replace_meters``). Raises ``InputError`` for
        a bad cookie or conflicting flows, ``SoftswitchError`` if OVS rejects a flow or
        rewrites its match (a match missing its prerequisites, e.g. tp_dst without tcp).
        """
        self.replace_flows_many(bridge, {cookie: flows})

    def dump_flows_many(self, bridge: str, cookies: Collection[int]) -> dict[int, list[Flow]]:
        """The flows of each cookie (normalized), in one dump. Raises ``SoftswitchError``."""
        if not cookies:
            return {}
        if len(cookies) == 1:
            dumped = self._dump(bridge, next(iter(cookies)), stats=False)
        else:
            dumped = self._dump(bridge, None, stats=False, cookies=cookies)
        found: dict[int, list[Flow]] = {cookie: [] for cookie in cookies}
        for stats in dumped:
            found[stats.cookie].append(stats.flow)
        return found

    def replace_flows_many(self, bridge: str, flows: Mapping[int, list[Flow]],
                           actual: Mapping[int, list[Flow]] | None = None) -> None:
        """``replace_flows`` for many cookies at once: one flow dump, one bundle for all.

        ``actual``: the flows of these cookies as just dumped (``dump_flows_many``), else
        they are dumped. The bundle is atomic: if OVS rejects one flow, no cookie's flows
        change. Raises what ``replace_flows`` raises.
        """
        for cookie in flows:
            if not 0 < cookie <= MAX_COOKIE:
                raise InputError("cookie", f"{cookie} is not 1..2^64-2")
        if not flows:
            return
        if actual is None:
            actual = self.dump_flows_many(bridge, flows.keys())
        deletes: list[str] = []
        adds: list[str] = []
        for cookie in sorted(flows):
            for line in plan_flow_changes(cookie, actual.get(cookie, []), flows[cookie]):
                (deletes if line.startswith("delete") else adds).append(line)
        lines = deletes + adds
        if not lines:
            return
        what = (f"replace flows with cookie {_cookie_text(next(iter(flows)))} on {bridge}"
                if len(flows) == 1 else f"replace flows of {len(flows)} cookies on {bridge}")
        # --no-names: flows name ports by number, and looking names up costs ovs-ofctl a
        # port-description round trip (about 10 ms) on every call.
        result = self._tool(["ovs-ofctl", "-O", OPENFLOW, "--no-names", "--bundle", "add-flows",
                             self.mgmt_target(bridge), "-"], what,
                            stdin="\n".join(lines) + "\n")
        # ovs-ofctl accepts a match missing its prerequisites and silently drops fields from
        # it ("normalization changed ofp_match"); the flow installed is not the one asked for.
        if "normalization changed" in result.stderr:
            raise SoftswitchError(f"OVS changed the match of a flow on {bridge}",
                                  cause=result.stderr.strip()[-800:])

    def replace_meters(self, bridge: str, meters: list[Meter], owned: Collection[int],
                       actual: list[Meter] | None = None) -> list[Meter]:
        """Make the meters with ids in ``owned`` exactly ``meters``; others are untouched.

        ``actual`` is the bridge's meters as just dumped (``dump_meters``, or what an earlier
        call returned); without it they are dumped. Returns the bridge's meters afterwards,
        to pass as ``actual`` to the next call. Deleting a meter also deletes the flows that
        use it (OpenFlow). Meter changes cannot be bundled in OpenFlow 1.3: each is its own
        ovs-ofctl call, run side by side. Raises ``InputError``, ``SoftswitchError``.
        """
        before = self.dump_meters(bridge) if actual is None else actual
        changes = plan_meter_changes(before, meters, owned)
        self._tools([(self._ofctl_argv(bridge, [command, argument]),
                      f"{command} {argument} on {bridge}") for command, argument in changes])
        return meters_after(before, meters, owned)

    def dump_meters(self, bridge: str) -> list[Meter]:
        """Meters now on the bridge, by id. Raises ``SoftswitchError``."""
        result = self._ofctl(bridge, ["dump-meters"], f"dump meters of {bridge}")
        return parse_dump_meters(result.stdout)

    def meter_stats(self, bridge: str) -> dict[int, MeterStats]:
        """Per-meter counters (packets in, packets dropped by the band). Raises
        ``SoftswitchError``."""
        result = self._ofctl(bridge, ["meter-stats"], f"read meter stats of {bridge}")
        return parse_meter_stats(result.stdout)

    def settle(self) -> None:
        """Wait until ovs-vswitchd has revalidated the datapath flows it cached.

        Changes (flows, trunks, ports) reach the OpenFlow tables when the call making them
        returns; packets matching datapath flows cached earlier follow the old rules until
        the revalidators catch up, usually within milliseconds. This waits for a full
        revalidation round (``revalidator/wait``, about 0.5 s). Raises ``SoftswitchError``,
        ``WaitTimeout``.
        """
        self._appctl(["revalidator/wait"], "revalidate datapath flows")

    # ---- fdb -----------------------------------------------------------------------------------

    def _appctl(self, args: list[str], what: str) -> subprocess.CompletedProcess[str]:
        return self._tool(["ovs-appctl", "-t", str(self.vswitchd_ctl), *args], what)

    def fdb(self, bridge: str) -> list[tuple[str, int, str]]:
        """Learned MACs: ``(port number or LOCAL, vlan, mac)``. Raises ``SoftswitchError``."""
        return parse_fdb_show(self._appctl(["fdb/show", bridge], f"show fdb of {bridge}").stdout)

    def flush_fdb(self, bridge: str, mac: str | None = None) -> None:
        """Forget learned MACs so the next frame relearns them.

        OVS 3.1 cannot forget one learned MAC (``fdb/del`` only removes static entries), so
        with ``mac`` the whole bridge is flushed if that MAC is learned there, and nothing
        happens if it is not. Raises ``SoftswitchError``, ``InputError`` for a malformed MAC.
        """
        if mac is not None:
            if not _MAC_RE.match(mac):
                raise InputError("mac", f"{mac!r} is not a MAC address")
            if all(learned != mac.lower() for _, _, learned in self.fdb(bridge)):
                return
        self._appctl(["fdb/flush", bridge], f"flush fdb of {bridge}")
