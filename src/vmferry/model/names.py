"""Names vmferry gives to things on a host, shared by the agent, the controller and the bench."""

from __future__ import annotations

from vmferry.model.network import short_ifname

TAP_PREFIX = "vm-"


def tap_name(vm: str) -> str:
    """The tap device of ``vm``'s NIC on its host (<= 15 characters)."""
    return short_ifname(TAP_PREFIX, vm)
