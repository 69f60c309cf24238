"""Transition shim: the profile pipeline's entry points that still take a profile as a raw
dict (what the agent holds today). Parse once with ``PortProfile`` and call
``vmferry.drivers.softswitch.ovs.profile`` instead; this module goes once the agent passes the
typed model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmferry.drivers.softswitch.base import Softswitch
from vmferry.drivers.softswitch.ovs.profile import (
    PortRequest,
    RealizationReport,
    apply,
    port_status,
    realize_each,
    remove,
)
from vmferry.model.profile import PortProfile, parse_profile

__all__ = ["PortRequest", "RealizationReport", "apply_profile", "port_status", "profile_from",
           "realize_each", "remove"]


def profile_from(data: dict[str, Any] | None) -> PortProfile | None:
    """The profile a guest request carries (None: no profile). Raises ``InputError``."""
    return None if data is None else parse_profile(data, "profile")


def apply_profile(softswitch: Softswitch, bridge: str, port: str, vm_mac: str,
                  vm_ips: Iterable[str], data: dict[str, Any] | None) -> dict[str, Any]:
    """``profile.apply`` for a profile still in dict form. Raises ``InputError``,
    ``SoftswitchError``, ``WaitTimeout``."""
    return apply(softswitch, bridge, port, vm_mac, vm_ips, profile_from(data))
