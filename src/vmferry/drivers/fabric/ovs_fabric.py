"""A fabric of Open vSwitch switches, reached through OVSDB (and unixctl for MAC learning)."""

from __future__ import annotations

import threading
from pathlib import Path

from vmferry.drivers.fabric.base import Fabric
from vmferry.drivers.softswitch.base import Flow, PortState
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.errors import FabricError, VmferryError
from vmferry.model.fabric import carried_vlans, trunk_column
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
                    vswitchd_ctl=Path(spec.unixctl) if spec.unixctl else None)
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
        self._switch(switch).flush_fdb(SWITCH_BRIDGE, mac)

    # Temporary forwarding rules (make-before-break switchover, controller/switchover.py).

    def ports(self, switch: str) -> dict[str, PortState]:
        """The switch's ports as they are now. Raises ``FabricError``."""
        try:
            return self._switch(switch).ports(SWITCH_BRIDGE)
        except VmferryError as exc:
            raise FabricError(f"cannot read the ports of {switch}", switch=switch,
                              cause=exc.message) from exc

    def replace_flows(self, switch: str, cookie: int, flows: list[Flow]) -> None:
        """Make the switch's flows with ``cookie`` exactly ``flows`` (one bundle).
        Raises ``FabricError``."""
        try:
            self._switch(switch).replace_flows(SWITCH_BRIDGE, cookie, flows)
        except VmferryError as exc:
            raise FabricError(f"cannot set flows with cookie {cookie:#x} on {switch}",
                              switch=switch, cause=exc.message) from exc

    def flow_cookies(self, switch: str) -> set[int]:
        """The cookies of the switch's flows. Raises ``FabricError``."""
        try:
            return {stats.cookie for stats in self._switch(switch).flow_stats(SWITCH_BRIDGE)}
        except VmferryError as exc:
            raise FabricError(f"cannot read the flows of {switch}", switch=switch,
                              cause=exc.message) from exc

    def close(self) -> None:
        with self._lock:
            for switch in self._switches.values():
                switch.close()
            self._switches.clear()
