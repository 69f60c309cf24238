"""The host side of the make-before-break switchover (``vmferry.model.switchover``): the
destination host's gate for the arriving VM, on the uplink, by cookie.

    open_switchover(gate cookie)   arm: the closed gate (frames for the VM from the uplink are
                                   dropped); the controller does this before the fabric rules
                                   go in, long before the guest stops. For a port without a
                                   profile, beside it the guest's own first frame here opens
                                   the gate (``model.switchover.arrival_rules``) if the
                                   controller has not yet
    open_switchover(cookie)        open: the same match now hands the frames to the VM's tap
                                   (one OpenFlow bundle: the gate's flow out, this in)
    close_switchover(gate cookie)  remove the gate only (a guest with a port profile: its own
                                   flows deliver)
    close_switchover(cookie)       remove everything of the migration, gate included

The agent's routes call these (H4); the cookie says which rule is meant, so the route's
contract is unchanged."""

from __future__ import annotations

from vmferry.drivers.softswitch.base import Flow, PortState, Softswitch
from vmferry.errors import InputError, NotFoundError
from vmferry.model.switchover import (
    arrival_rules,
    gate_cookie,
    gate_rules,
    host_rules,
    is_gate_cookie,
    is_mbb_cookie,
)

# The key a port with a profile carries in its OVSDB row's external_ids (the OVS driver's
# ``profile_flows.KEY_PROFILE``; a softswitch without it has no profiled ports).
PROFILE_KEY = "vmferry-profile"


def _check(cookie: int) -> None:
    if not is_mbb_cookie(cookie):
        raise InputError("cookie", f"{cookie:#x} is not a switchover cookie")


def _ofports(states: dict[str, PortState], bridge: str, wanted: dict[str, str]
             ) -> dict[str, int]:
    """The OpenFlow numbers of ``wanted`` (port name -> what it is, for the error) among
    ``states`` (one OVSDB read: opening the gate is on the paused guest's path). Raises
    ``NotFoundError``."""
    found: dict[str, int] = {}
    for port, what in wanted.items():
        state = states.get(port)
        if state is None or state.ofport is None or state.ofport < 0:
            raise NotFoundError(what, f"no port {port} on {bridge}")
        found[port] = state.ofport
    return found


def install_host_rules(softswitch: Softswitch, bridge: str, uplink: str, tap: str, cookie: int,
                       vlan: int, mac: str) -> int:
    """Arm (a gate cookie) or open (the migration's cookie) the gate for ``mac`` tagged
    ``vlan`` entering ``uplink``; returns the number of rules. Raises ``InputError`` (not a
    switchover cookie, bad VLAN), ``NotFoundError`` (no tap or uplink on the bridge)."""
    _check(cookie)
    if not 1 <= vlan <= 4094:
        raise InputError("vlan", f"{vlan} is not a VLAN id 1-4094")
    arming = is_gate_cookie(cookie)
    states = softswitch.ports(bridge, [uplink, tap])
    ofports = _ofports(states, bridge, {uplink: "uplink"} if arming
                       else {uplink: "uplink", tap: "tap"})
    uplink_ofport = ofports[uplink]
    rules = gate_rules(uplink_ofport, vlan, mac)
    tap_state = states.get(tap)
    if (tap_state is not None and tap_state.ofport is not None and tap_state.ofport > 0
            and PROFILE_KEY not in tap_state.external_ids):
        # A port without a profile: the arriving guest may open its gate itself. (With a
        # profile, a rule on its frames would bypass the profile's flows.)
        rules += arrival_rules(uplink_ofport, tap_state.ofport, vlan, mac,
                               gate_cookie(cookie) if not arming else cookie)
    gate = [Flow(0, r.priority, r.match, r.actions) for r in rules]
    changes: dict[int, list[Flow]]
    actual: dict[int, list[Flow]]
    if arming:
        changes, actual = {cookie: gate}, {cookie: []}
        flows = gate
    else:
        flows = [Flow(0, r.priority, r.match, r.actions) for r in host_rules(
            uplink_ofport, ofports[tap], vlan, mac)]
        # One bundle, atomic: the gate's flow goes, the delivering one comes.
        changes = {cookie: flows, gate_cookie(cookie): []}
        actual = {cookie: [], gate_cookie(cookie): gate}
    # Written without reading the bridge's flows first (an ovs-ofctl call less: opening is on
    # the guest's switchover path); deleting a gate that is not there changes nothing.
    softswitch.replace_flows_many(bridge, changes, actual=actual)
    return len(flows)


def remove_host_rules(softswitch: Softswitch, bridge: str, cookie: int) -> None:
    """Remove the rules with ``cookie`` and, for a migration's cookie, its gate's too
    (idempotent). Raises ``InputError``."""
    _check(cookie)
    cookies = [cookie] if is_gate_cookie(cookie) else [cookie, gate_cookie(cookie)]
    softswitch.replace_flows_many(bridge, {c: [] for c in cookies})


def host_rule_cookies(softswitch: Softswitch, bridge: str) -> list[int]:
    """Cookies of the temporary switchover rules on the bridge."""
    cookies: set[int] = softswitch.flow_cookies(bridge)
    return sorted(c for c in cookies if is_mbb_cookie(c))
