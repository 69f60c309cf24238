"""Addresses a VM borrows from a routed rack's subnet when it crosses into it by NAT (pure).

The pool of a routed rack is its subnet's host addresses less its gateway; an address is
free when no VM of the rack's VLAN has it and no NAT lease holds it. Leases are handed out
from the top of the subnet down, so they stay clear of the low addresses operators give VMs
created in the rack by hand. The controller's store keeps the leases (``nat_leases``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from vmferry.errors import InputError

# A /21 has 2046 hosts: enough for any rack, and a bound on the walk below.
MAX_POOL = 4096


@dataclass(frozen=True)
class NatAddress:
    """What a VM moved by NAT holds in the rack: its borrowed address and the translation
    the rack's router makes from its home address."""

    vm: str
    router: str
    home_vlan: int
    home_ip: str          # CIDR, as the VM has it at home
    vlan: int             # the routed rack's VLAN
    ip: str               # CIDR in the rack's subnet
    gateway: str          # the rack's gateway, bare

    @property
    def home_address(self) -> str:
        return bare(self.home_ip)

    @property
    def address(self) -> str:
        return bare(self.ip)


def bare(address: str) -> str:
    """``192.0.2.30/24`` -> ``192.0.2.30`` (a bare address passes through)."""
    return str(ipaddress.IPv4Interface(address).ip)


def pool(subnet: str, gateway: str | None) -> list[str]:
    """Every address a lease may take in ``subnet``, highest first. Raises ``InputError``
    for a subnet that is not IPv4 or larger than the pool bound."""
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise InputError("subnet", f"not an IPv4 subnet: {subnet!r}") from exc
    if network.num_addresses > MAX_POOL:
        raise InputError("subnet", f"{subnet} is larger than a NAT pool may be "
                         f"({MAX_POOL} addresses)")
    skip = {bare(gateway)} if gateway else set()
    return [str(a) for a in reversed(list(network.hosts())) if str(a) not in skip]


def free_address(subnet: str, gateway: str | None, taken: Iterable[str]) -> str | None:
    """The address (CIDR, with the subnet's prefix) a new lease takes, or None when the pool
    is exhausted. ``taken``: addresses (bare or CIDR) held by VMs of the rack and by leases."""
    used = {bare(a) for a in taken}
    prefix = ipaddress.IPv4Network(subnet).prefixlen
    for address in pool(subnet, gateway):
        if address not in used:
            return f"{address}/{prefix}"
    return None
