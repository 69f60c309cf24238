"""The host side of the make-before-break switchover (``vmferry.model.switchover``): the
destination host's temporary rule that hands frames for the arriving VM from the uplink to
its tap, installed, removed and listed by cookie. The agent's routes call these (H4)."""

from __future__ import annotations

from vmferry.drivers.softswitch.base import Flow, Softswitch
from vmferry.errors import InputError, NotFoundError
from vmferry.model.switchover import host_rules, is_mbb_cookie


def _check(cookie: int) -> None:
    if not is_mbb_cookie(cookie):
        raise InputError("cookie", f"{cookie:#x} is not a switchover cookie")


def install_host_rules(softswitch: Softswitch, bridge: str, uplink: str, tap: str, cookie: int,
                       vlan: int, mac: str) -> int:
    """Deliver frames for ``mac`` tagged ``vlan`` entering ``uplink`` straight to ``tap``
    (untagged); returns the number of rules. Raises ``InputError`` (not a switchover cookie),
    ``NotFoundError`` (no tap or uplink on the bridge)."""
    _check(cookie)
    if not 1 <= vlan <= 4094:
        raise InputError("vlan", f"{vlan} is not a VLAN id 1-4094")
    ports = softswitch.ports(bridge, [uplink, tap])
    tap_state, uplink_state = ports.get(tap), ports.get(uplink)
    if tap_state is None or tap_state.ofport is None:
        raise NotFoundError("tap", f"no port {tap} on {bridge}")
    if uplink_state is None or uplink_state.ofport is None:
        raise NotFoundError("uplink", f"no port {uplink} on {bridge}")
    flows = [Flow(0, rule.priority, rule.match, rule.actions)
             for rule in host_rules(uplink_state.ofport, tap_state.ofport, vlan, mac)]
    # The window opens once per migration while its guest is stopped: add without reading
    # the bridge's flows first (an ovs-ofctl call less; adding an existing flow replaces it).
    softswitch.replace_flows_many(bridge, {cookie: flows}, actual={cookie: []})
    return len(flows)


def remove_host_rules(softswitch: Softswitch, bridge: str, cookie: int) -> None:
    """Remove the rules with ``cookie`` (idempotent). Raises ``InputError``."""
    _check(cookie)
    softswitch.replace_flows(bridge, cookie, [])


def host_rule_cookies(softswitch: Softswitch, bridge: str) -> list[int]:
    """Cookies of the temporary switchover rules on the bridge."""
    cookies: set[int] = softswitch.flow_cookies(bridge)
    return sorted(c for c in cookies if is_mbb_cookie(c))
