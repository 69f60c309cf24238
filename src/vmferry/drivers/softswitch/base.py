"""The softswitch interface: what vmferry needs from Open vSwitch (or anything like it).

Ports, flows and meters that vmferry installs are tagged (``external_ids:vmferry-owner`` on
rows, a cookie on flows) so they can be found and removed exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

OWNER_KEY = "vmferry-owner"     # external_ids key on ports/interfaces we create


@dataclass(frozen=True)
class PortSpec:
    """A port as it should be."""

    name: str
    tag: int | None = None                     # access VLAN
    trunks: frozenset[int] = frozenset()       # trunk VLANs (empty + no tag: all VLANs)
    vlan_mode: str | None = None               # None, "access", "trunk", "native-untagged"...
    iface_type: str = ""                       # "" (system/tap), "internal", "patch"...
    options: dict[str, str] = field(default_factory=dict)
    external_ids: dict[str, str] = field(default_factory=dict)
    mtu: int | None = None


@dataclass(frozen=True)
class PortState:
    """A port as it is, read back from the switch."""

    name: str
    tag: int | None
    trunks: frozenset[int]
    vlan_mode: str | None
    iface_type: str
    ofport: int | None
    mac_in_use: str | None
    external_ids: dict[str, str]


@dataclass(frozen=True)
class Flow:
    """An OpenFlow rule in ovs-ofctl syntax, minus cookie (the driver adds it)."""

    table: int
    priority: int
    match: str                 # e.g. "in_port=3,dl_src=52:54:00:00:00:01"
    actions: str               # e.g. "NORMAL", "drop", "meter:1,NORMAL"


@dataclass(frozen=True)
class Meter:
    meter_id: int
    kbps: int | None = None    # rate in kbit/s (bands drop above the rate)
    pktps: int | None = None   # or in packets/s
    burst: int | None = None   # kbit or packets, as the unit above


class Softswitch(ABC):
    """One switch instance (one OVSDB). Errors become ``SoftswitchError`` at this boundary."""

    @abstractmethod
    def ensure_bridge(self, bridge: str, *, datapath_type: str = "netdev",
                      fail_mode: str | None = None) -> None:
        """Create the bridge if missing (idempotent)."""

    @abstractmethod
    def delete_bridge(self, bridge: str) -> None: ...

    @abstractmethod
    def ensure_port(self, bridge: str, port: PortSpec) -> None:
        """Make the port exist and match ``port`` (only the difference is written)."""

    def ensure_ports(self, bridge: str, ports: Iterable[PortSpec]) -> None:
        """``ensure_port`` for many ports; a switch that can, writes them in one transaction."""
        for port in ports:
            self.ensure_port(bridge, port)

    @abstractmethod
    def delete_port(self, bridge: str, port: str) -> None:
        """Remove the port (idempotent)."""

    @abstractmethod
    def ports(self, bridge: str, names: Collection[str] | None = None) -> dict[str, PortState]:
        """Every port of the bridge as it is now (only those in ``names`` when given)."""

    def port_external_ids(self, bridge: str) -> dict[str, dict[str, str]]:
        """Every port's ``external_ids`` by name; a switch may read these cheaper than
        ``ports``."""
        return {name: dict(state.external_ids) for name, state in self.ports(bridge).items()}

    @abstractmethod
    def set_trunks(self, bridge: str, port: str, vlans: frozenset[int]) -> None:
        """Set the VLANs a trunk port carries."""

    @abstractmethod
    def replace_flows(self, bridge: str, cookie: int, flows: list[Flow]) -> None:
        """Make the flows carrying ``cookie`` exactly ``flows`` (atomically, in one bundle)."""

    def replace_flows_many(self, bridge: str, flows: Mapping[int, list[Flow]],
                           actual: Mapping[int, list[Flow]] | None = None) -> None:
        """``replace_flows`` for many cookies; a switch that can, does it in one bundle.
        ``actual``: the flows as ``dump_flows_many`` just read them (a switch may skip its
        own read)."""
        for cookie, cookie_flows in flows.items():
            self.replace_flows(bridge, cookie, cookie_flows)

    def dump_flows_many(self, bridge: str, cookies: Collection[int]) -> dict[int, list[Flow]]:
        """The flows of each cookie; a switch that can, reads them at once."""
        return {cookie: self.dump_flows(bridge, cookie) for cookie in cookies}

    @abstractmethod
    def dump_flows(self, bridge: str, cookie: int | None = None) -> list[Flow]:
        """Flows now installed (only those with ``cookie`` when given)."""

    @abstractmethod
    def replace_meters(self, bridge: str, meters: list[Meter], owned: Collection[int],
                       actual: list[Meter] | None = None) -> list[Meter]:
        """Make the meters with ids in ``owned`` exactly ``meters``; ``actual``: the meters
        as just dumped (else they are dumped). Returns the bridge's meters afterwards."""

    @abstractmethod
    def dump_meters(self, bridge: str) -> list[Meter]: ...

    @abstractmethod
    def flush_fdb(self, bridge: str, mac: str | None = None) -> None:
        """Forget learned MAC locations (one MAC, or all) so the next frame relearns it."""
