"""Small validated network values: VLAN ids, MAC addresses, CIDRs."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, Field

VLAN_MIN, VLAN_MAX = 1, 4094

VlanId = Annotated[int, Field(ge=VLAN_MIN, le=VLAN_MAX, description="802.1Q VLAN id, 1-4094")]

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def check_mac(value: str) -> str:
    mac = value.strip().lower()
    if not _MAC_RE.match(mac):
        raise ValueError(f"{value!r} is not a MAC address (expected six hex pairs like "
                         "52:54:00:12:34:56)")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"{value!r} is a multicast MAC address")
    return mac


def check_interface_cidr(value: str) -> str:
    """An address with its prefix, e.g. 192.0.2.10/24 (not the network or broadcast address)."""
    if "/" not in value:
        raise ValueError(f"{value!r} is not an address with a prefix length (like 192.0.2.10/24)")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid CIDR address: {exc}") from None
    net = iface.network
    if net.num_addresses > 2 and iface.ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"{value!r} is the network or broadcast address of {net}")
    return str(iface)


def check_network_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid network: {exc}") from None


def check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc


MacAddress = Annotated[str, AfterValidator(check_mac)]
InterfaceCidr = Annotated[str, AfterValidator(check_interface_cidr)]
NetworkCidr = Annotated[str, AfterValidator(check_network_cidr)]
IpAddress = Annotated[str, AfterValidator(check_ip)]


def mac_for(index: int, prefix: str = "52:54:00") -> str:
    """The ``index``-th MAC of a locally administered pool (QEMU's 52:54:00 OUI by default)."""
    if not 0 <= index < 2**24:
        raise ValueError("MAC pool exhausted")
    return f"{prefix}:{index >> 16 & 0xff:02x}:{index >> 8 & 0xff:02x}:{index & 0xff:02x}"


def short_ifname(prefix: str, name: str, limit: int = 15) -> str:
    """A Linux interface name (<= 15 chars) that stays unique for long ``name``s."""
    candidate = f"{prefix}{name}"
    if len(candidate) <= limit:
        return candidate
    digest = hashlib.sha1(name.encode()).hexdigest()[:5]
    return f"{prefix}{name[: limit - len(prefix) - 6]}-{digest}"
