"""Names vmferry gives to things on a host, shared by the agent, the controller and the bench.

A tap (and the OVS port of the same name) must fit Linux's 15 characters, so a long VM name is
shortened to a prefix of it plus a hash. A hash can collide; ``check_unique`` detects it: the
controller runs it over every VM of the site (a VM may migrate to any host) and the agent over
the guests of its host, and the second VM is refused (409 naming ``name``) before anything is
created. 35 bits of hash make an accidental collision unlikely (about 1 in 34 billion for two
names with the same first four characters).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from vmferry.errors import ConflictError

TAP_PREFIX = "vm-"
IFNAME_MAX = 15
_PREFIX_KEPT = 4          # characters of the VM name kept in a shortened tap name
_HASH_CHARS = 7           # base32 characters of the hash (35 bits)


def tap_name(vm: str) -> str:
    """The tap device of ``vm``'s NIC on its host (<= 15 characters)."""
    candidate = f"{TAP_PREFIX}{vm}"
    if len(candidate) <= IFNAME_MAX:
        return candidate
    digest = base64.b32encode(hashlib.sha256(vm.encode()).digest()).decode().lower()
    return f"{TAP_PREFIX}{vm[:_PREFIX_KEPT]}-{digest[:_HASH_CHARS]}"


def check_unique(vm: str, others: Iterable[str]) -> None:
    """Raise ConflictError("name") when one of ``others`` (other VMs' names) derives the same
    tap (and port) name as ``vm``."""
    tap = tap_name(vm)
    for other in others:
        if other != vm and tap_name(other) == tap:
            raise ConflictError("name", f"VM {other!r} already has the tap and port name "
                                f"{tap!r} that {vm!r} would get; choose another name")


def aux_tap_name(vm: str) -> str:
    """The tap (and port) of ``vm``'s second NIC during a move by "dual" NIC: its tap name
    with ".n" (no VM name has a "."), shortened with a hash like ``tap_name`` when long."""
    tap = tap_name(vm)
    if len(tap) + 2 <= IFNAME_MAX:
        return f"{tap}.n"
    digest = base64.b32encode(hashlib.sha256(vm.encode()).digest()).decode().lower()
    return f"{TAP_PREFIX}{vm[:2]}-{digest[:_HASH_CHARS]}.n"
