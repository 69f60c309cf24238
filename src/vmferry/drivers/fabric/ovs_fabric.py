"""A fabric of Open vSwitch switches, reached through OVSDB (and unixctl for MAC learning)."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

from vmferry.drivers.fabric.base import Fabric
from vmferry.drivers.softswitch.base import Flow, PortState
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.errors import FabricError, VmferryError
from vmferry.model.fabric import carried_vlans, trunk_column
from vmferry.model.switchover import PortInfo, Rule, SwitchPorts
from vmferry.model.topology import SWITCH_BRIDGE, Topology


class OvsFabric(Fabric):
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._switches: dict[str, OvsSoftswitch] = {}
        self._lock = threading.Lock()

    def _switch(self, name: str) -> OvsSoftswitch:
        with self._lock:
            if name not in self._switches:
                spec = self.topology.switch(name)
                if not spec.ovsdb:
                    raise FabricError(f"switch {name} has no OVSDB address in the inventory",
                                      switch=name)
                rundir = Path(spec.openflow.removeprefix("unix:")).parent \
                    if spec.openflow and spec.openflow.startswith("unix:") else None
                self._switches[name] = OvsSoftswitch(
                    spec.ovsdb, rundir=rundir,
                    vswitchd_ctl=Path(spec.unixctl) if spec.unixctl else None,
                    openflow=spec.openflow if rundir is None else None)
            return self._switches[name]

    def trunk_vlans(self, switch: str, port: str) -> frozenset[int]:
        state = self._switch(switch).ports(SWITCH_BRIDGE).get(port)
        if state is None:
            raise FabricError(f"switch {switch} has no port {port}", switch=switch, port=port)
        return carried_vlans(state.trunks)

    def set_trunk_vlans(self, switch: str, port: str, vlans: frozenset[int]) -> None:
        try:
            self._switch(switch).set_trunks(SWITCH_BRIDGE, port, trunk_column(vlans))
        except VmferryError as exc:
            raise FabricError(f"cannot set VLANs on {switch}:{port}", switch=switch, port=port,
                              cause=exc.message) from exc

    def forget_mac(self, switch: str, mac: str) -> None:
        # Only the switch's unixctl socket can flush learned MACs; a site's switch reached
        # by OVSDB and OpenFlow alone relearns the MAC from the guest's RARP announcements.
        if self.topology.switch(switch).unixctl is None:
            return
        self._switch(switch).flush_fdb(SWITCH_BRIDGE, mac)

    # Pinned MACs: static entries of the switch's MAC table (``ovs-appctl fdb/*``).

    def pin_mac(self, switch: str, port: str, vlan: int, mac: str) -> bool:
        if self.topology.switch(switch).unixctl is None:
            return False            # reached by OVSDB and OpenFlow alone: no static entries
        self._appctl(switch, ["fdb/add", SWITCH_BRIDGE, port, str(vlan), mac.lower()],
                     f"pin {mac} at {switch}:{port}")
        return True

    def unpin_mac(self, switch: str, vlan: int, mac: str, drain: bool = False) -> None:
        if self.topology.switch(switch).unixctl is None:
            return
        if drain:
            # OVS learns also from the statistics of frames it forwarded, pushed by its
            # revalidator up to 500 ms later. The round in progress, or the next (a changed
            # flow table starts one at once), accounts for them while the pin holds.
            self._appctl(switch, ["revalidator/wait"], f"revalidate {switch}")
        self._appctl(switch, ["fdb/del", SWITCH_BRIDGE, str(vlan), mac.lower()],
                     f"unpin {mac} on {switch}", missing_ok="could not find static")

    def pinned_macs(self, switch: str) -> set[tuple[int, str]]:
        if self.topology.switch(switch).unixctl is None:
            return set()
        shown = self._appctl(switch, ["fdb/show", SWITCH_BRIDGE], f"read {switch}'s MACs")
        return parse_static_entries(shown)

    def _appctl(self, switch: str, args: list[str], what: str,
                missing_ok: str | None = None) -> str:
        """Run ``ovs-appctl`` on the switch's vswitchd; its output. Raises ``FabricError``
        (but not when the error says ``missing_ok``)."""
        ctl = self._switch(switch).vswitchd_ctl
        try:
            result = subprocess.run(["ovs-appctl", "-t", str(ctl), *args],
                                    capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            raise FabricError(f"cannot {what}", switch=switch, cause=str(exc)) from exc
        if result.returncode != 0 and not (missing_ok and missing_ok in result.stderr):
            raise FabricError(f"cannot {what}", switch=switch,
                              cause=(result.stderr or result.stdout).strip()[-300:])
        return result.stdout

    # Temporary switchover rules (vmferry.model.switchover) and MAC learning counters.

    def switch_ports(self, switch: str) -> SwitchPorts:
        try:
            states = self._switch(switch).ports(SWITCH_BRIDGE)
        except VmferryError as exc:
            raise FabricError(f"cannot read the ports of {switch}", switch=switch,
                              cause=exc.message) from exc
        return SwitchPorts({name: _port_info(state) for name, state in states.items()
                            if state.ofport is not None})

    def replace_rules(self, switch: str, cookie: int, rules: list[Rule],
                      known_empty: bool = False) -> None:
        flows = [Flow(0, rule.priority, rule.match, rule.actions) for rule in rules]
        try:
            self._switch(switch).replace_flows_many(
                SWITCH_BRIDGE, {cookie: flows}, actual={cookie: []} if known_empty else None)
        except VmferryError as exc:
            raise FabricError(f"cannot set rules with cookie {cookie:#x} on {switch}",
                              switch=switch, cause=exc.message) from exc

    def rule_cookies(self, switch: str) -> set[int]:
        try:
            return {stats.cookie for stats in self._switch(switch).flow_stats(SWITCH_BRIDGE)}
        except VmferryError as exc:
            raise FabricError(f"cannot read the flows of {switch}", switch=switch,
                              cause=exc.message) from exc

    def mac_moves(self, switch: str) -> int:
        return parse_mac_moves(self._appctl(switch, ["fdb/stats-show", SWITCH_BRIDGE],
                                            f"read the MAC learning statistics of {switch}"))

    def close(self) -> None:
        with self._lock:
            for switch in self._switches.values():
                switch.close()
            self._switches.clear()


_MOVED = re.compile(r"port moved MAC entries\s*:\s*(\d+)")


def parse_mac_moves(text: str) -> int:
    """The "Total number of port moved MAC entries" of ``ovs-appctl fdb/stats-show``.
    Raises ``FabricError`` when the line is missing."""
    match = _MOVED.search(text)
    if match is None:
        raise FabricError("fdb/stats-show printed no moved-MAC counter", cause=text[-300:])
    return int(match.group(1))


def parse_static_entries(text: str) -> set[tuple[int, str]]:
    """(VLAN, MAC) of the static entries ``ovs-appctl fdb/show`` prints (age "static")."""
    found: set[tuple[int, str]] = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3] == "static" and parts[1].isdigit():
            found.add((int(parts[1]), parts[2].lower()))
    return found


def _port_info(state: PortState) -> PortInfo:
    assert state.ofport is not None
    if state.vlan_mode in (None, "access") and state.tag is not None:
        return PortInfo(state.ofport, access_vlan=state.tag)
    if state.vlan_mode in (None, "trunk") and state.tag is None:
        return PortInfo(state.ofport, trunk_vlans=frozenset(state.trunks))
    # native-tagged/untagged and other modes: admit nothing through a temporary rule.
    return PortInfo(state.ofport, trunk_vlans=frozenset())
