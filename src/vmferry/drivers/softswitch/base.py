"""The softswitch interface: what vmferry needs from Open vSwitch (or anything like it).

Ports, flows and meters that vmferry installs are tagged (``external_ids:vmferry-owner`` on
rows, a cookie on flows) so they can be found and removed exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple, Self

from vmferry.errors import InputError

OWNER_KEY = "vmferry-owner"     # external_ids key on ports/interfaces we create
VLAN_MODES = frozenset({"trunk", "access", "native-tagged", "native-untagged", "dot1q-tunnel"})


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


def check_port_spec(spec: PortSpec) -> None:
    """Raises ``InputError`` for values OVSDB would reject (the IDL only logs those)."""
    if not spec.name or len(spec.name) > 15 or "/" in spec.name or " " in spec.name:
        raise InputError("port.name", f"{spec.name!r} is not a valid interface name")
    for vlan in ([spec.tag] if spec.tag is not None else []) + sorted(spec.trunks):
        if not 0 <= vlan <= 4095:
            raise InputError("port.vlan", f"{vlan} is not 0..4095")
    if spec.vlan_mode is not None and spec.vlan_mode not in VLAN_MODES:
        raise InputError("port.vlan_mode", f"{spec.vlan_mode!r} is not one of "
                         f"{', '.join(sorted(VLAN_MODES))}")
    if spec.mtu is not None and not 68 <= spec.mtu <= 65535:
        raise InputError("port.mtu", f"{spec.mtu} is not 68..65535")


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


@dataclass(frozen=True)
class FlowStats:
    """A flow as dumped, with its cookie and counters."""

    cookie: int
    flow: Flow
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class MeterStats:
    meter_id: int
    flows: int
    packets_in: int
    bytes_in: int
    band_packets: int          # packets the drop band dropped
    band_bytes: int


@dataclass(frozen=True)
class Tuple5:
    """One direction of a tracked connection. ICMP: ``sport`` is the echo id, ``dport`` is
    ``type << 8 | code`` (how ``dpctl/dump-conntrack`` prints them, packed)."""

    src: str
    dst: str
    sport: int = 0
    dport: int = 0


@dataclass(frozen=True)
class ConnEntry:
    """A connection-tracking entry: protocol (``tcp``, ``udp``, ``icmp``), both directions as
    the tracker saw them, its zone, and (TCP) its state, e.g. ``ESTABLISHED``."""

    protocol: str
    orig: Tuple5
    reply: Tuple5
    zone: int
    state: str | None = None


class FdbEntry(NamedTuple):
    """A learned MAC: the OpenFlow port number (or ``LOCAL``) it was seen on, and its VLAN.
    A tuple, so ``for port, vlan, mac in switch.fdb(bridge)`` reads naturally."""

    port: str
    vlan: int
    mac: str


class Softswitch(ABC):
    """One switch instance (one OVSDB). Errors become ``SoftswitchError`` at this boundary.

    Close it when done (or use it as a context manager). Implementations: ``OvsSoftswitch``
    (``vmferry.drivers.softswitch.ovs``), ``FakeSoftswitch`` (in memory, for unit tests).
    """

    # ---- lifecycle -----------------------------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Release the connection to the switch. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- bridges and ports ---------------------------------------------------------------------

    @abstractmethod
    def bridges(self) -> list[str]:
        """Names of all bridges, sorted."""

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
    def wait_for_port(self, bridge: str, port: str, timeout: float = 10) -> int:
        """Wait until the port has an OpenFlow number and return it. Raises ``WaitTimeout``,
        ``SoftswitchError`` if the switch failed to open the port or it is missing."""

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
    def flow_stats(self, bridge: str, cookie: int | None = None) -> list[FlowStats]:
        """Flows now installed with their cookies and counters (only ``cookie`` when given)."""

    def flow_cookies(self, bridge: str) -> set[int]:
        """The cookies of the flows now installed (0 for flows without one)."""
        return {stats.cookie for stats in self.flow_stats(bridge)}

    @abstractmethod
    def replace_meters(self, bridge: str, meters: list[Meter], owned: Collection[int],
                       actual: list[Meter] | None = None) -> list[Meter]:
        """Make the meters with ids in ``owned`` exactly ``meters``; ``actual``: the meters
        as just dumped (else they are dumped). Returns the bridge's meters afterwards."""

    @abstractmethod
    def dump_meters(self, bridge: str) -> list[Meter]:
        """Meters now on the bridge, sorted by id."""

    @abstractmethod
    def meter_stats(self, bridge: str) -> dict[int, MeterStats]:
        """Per-meter counters by meter id."""

    @abstractmethod
    def settle(self) -> None:
        """Wait until changes already made act on every packet (a switch caching datapath
        flows revalidates them)."""

    # ---- connection tracking -------------------------------------------------------------------

    @abstractmethod
    def dump_conntrack(self, zone: int) -> list[ConnEntry]:
        """The IPv4 TCP, UDP and ICMP connection-tracking entries of ``zone`` (others are
        left out). Raises ``SoftswitchError``."""

    # ---- MAC learning --------------------------------------------------------------------------

    @abstractmethod
    def fdb(self, bridge: str) -> list[FdbEntry]:
        """Learned MACs of the bridge."""

    @abstractmethod
    def flush_fdb(self, bridge: str, mac: str | None = None) -> None:
        """Forget learned MAC locations (one MAC, or all) so the next frame relearns it."""
