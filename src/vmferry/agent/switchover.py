"""The destination host's temporary switchover rule (make-before-break, contract H4).

While a VM moves here, frames for its MAC on its VLAN that arrive on the uplink go straight to
its tap (untagged, as its access port would deliver them), under the migration's cookie."""

from __future__ import annotations

from vmferry.drivers.softswitch.base import Flow, Softswitch
from vmferry.errors import InputError, NotFoundError
from vmferry.model.switchover import is_mbb_cookie

PRIORITY = 65000


def host_flows(uplink_ofport: int, tap_ofport: int, vlan: int, mac: str) -> list[Flow]:
    """Frames for the VM from the uplink go to its tap, untagged."""
    return [Flow(0, PRIORITY, f"in_port={uplink_ofport},dl_vlan={vlan},dl_dst={mac.lower()}",
                 f"pop_vlan,output:{tap_ofport}")]


def _check(cookie: int) -> None:
    if not is_mbb_cookie(cookie):
        raise InputError("cookie", f"{cookie:#x} is not a switchover cookie")


def install_host_rules(softswitch: Softswitch, bridge: str, uplink: str, tap: str, cookie: int,
                       vlan: int, mac: str) -> int:
    """Install the rule; returns the number of rules. Raises ``InputError`` (not a switchover
    cookie), ``NotFoundError`` (no such port)."""
    _check(cookie)
    ports = softswitch.ports(bridge)
    tap_port, uplink_port = ports.get(tap), ports.get(uplink)
    if tap_port is None or tap_port.ofport is None or uplink_port is None \
            or uplink_port.ofport is None:
        raise NotFoundError("vm", f"no port {tap} (or no uplink {uplink}) on {bridge}")
    flows = host_flows(uplink_port.ofport, tap_port.ofport, vlan, mac)
    softswitch.replace_flows(bridge, cookie, flows)
    return len(flows)


def remove_host_rules(softswitch: Softswitch, bridge: str, cookie: int) -> None:
    """Remove the rules with ``cookie`` (idempotent)."""
    _check(cookie)
    softswitch.replace_flows(bridge, cookie, [])


def host_rule_cookies(softswitch: Softswitch, bridge: str) -> list[int]:
    """Cookies of the switchover rules present on ``bridge``."""
    cookies: set[int] = softswitch.flow_cookies(bridge)
    return sorted(c for c in cookies if is_mbb_cookie(c))
