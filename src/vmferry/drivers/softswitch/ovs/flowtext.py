"""Flow text of the OVS driver: pure functions, unit-tested without a switch.

Normalization (``normalize_match``/``normalize_actions``): OVS prints a flow back in its own
words, so both what is asked for and what is dumped are brought to one form before they are
compared. A ``replace_flows`` then ``dump_flows`` round trip compares equal under it:

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

Also here: a flow's identity (``flow_key``) and the bundle lines turning one cookie's flows into
others (``plan_flow_changes``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from vmferry.drivers.softswitch.base import Flow
from vmferry.errors import InputError

DEFAULT_PRIORITY = 32768
MAX_COOKIE = 2**64 - 2                     # all ones is reserved by OpenFlow

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
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def split_top_level(text: str) -> list[str]:
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


def parse_int(text: str) -> int | None:
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
        number = parse_int(value)
        if number is not None:
            return str(number)
        return value.upper() if value.upper() in _PORT_KEYWORDS else value
    if key == "dl_type":
        number = parse_int(value)
        return f"0x{number:04x}" if number is not None else value.lower()
    if key in _DECIMAL_FIELDS and "/" not in value:
        number = parse_int(value)
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
    for token in split_top_level(match):
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
    dl_type = parse_int(fields["dl_type"]) if "dl_type" in fields else None
    nw_proto = parse_int(fields["nw_proto"]) if "nw_proto" in fields else None
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
        number = parse_int(action)
        if number is not None:
            return f"output:{number}"
        return action if "(" in action else lower
    if lower == "output":
        if argument.upper() in _PORT_KEYWORDS:
            return argument.upper()
        number = parse_int(argument)
        return f"output:{number}" if number is not None else f"output:{argument}"
    if lower == "controller":
        return f"CONTROLLER:{argument}"
    if lower in ("set_field", "load"):
        value, arrow, target = argument.partition("->")
        if MAC_RE.match(value):
            value = value.lower()
        return f"{lower}:{value}{arrow}{target}"
    if lower in _SET_FIELD_ALIASES:
        # OpenFlow 1.3 has no mod_* actions: OVS turns them into set_field.
        value = argument.lower() if MAC_RE.match(argument) else argument
        return f"set_field:{value}->{_SET_FIELD_ALIASES[lower]}"
    return f"{lower}:{argument}"


def normalize_actions(actions: str) -> str:
    """The canonical form of an ovs-ofctl action list (see the module docstring)."""
    parts = [_normalize_action(part) for part in split_top_level(actions)]
    return ",".join(parts) if parts else "drop"


def normalize_flow(flow: Flow) -> Flow:
    """``flow`` with its match and actions in canonical form. Raises ``InputError``."""
    return Flow(table=flow.table, priority=flow.priority, match=normalize_match(flow.match),
                actions=normalize_actions(flow.actions))



def flow_key(flow: Flow) -> tuple[int, int, str]:
    """What makes two flows the same OpenFlow entry: table, priority, normalized match."""
    return (flow.table, flow.priority, normalize_match(flow.match))


def cookie_text(cookie: int) -> str:
    return f"0x{cookie:x}"


def flow_add_text(cookie: int, flow: Flow) -> str:
    """An ``add`` line for ``ovs-ofctl add-flows``."""
    match = f"{flow.match}," if flow.match.strip() else ""
    return (f"add cookie={cookie_text(cookie)},table={flow.table},priority={flow.priority},"
            f"{match}actions={flow.actions or 'drop'}")


def flow_delete_text(cookie: int, flow: Flow) -> str:
    """A ``delete_strict`` line that removes exactly this flow, and only with this cookie."""
    match = f",{flow.match}" if flow.match.strip() else ""
    return (f"delete_strict cookie={cookie_text(cookie)}/-1,table={flow.table},"
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

