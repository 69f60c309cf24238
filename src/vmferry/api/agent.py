"""What the controller (and the CLI, the benchmark) and a host agent say to each other."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from vmferry.drivers.hypervisor.uri import validate_migration_uri
from vmferry.errors import InputError
from vmferry.model.migration import MigrationOptions
from vmferry.model.network import InterfaceCidr, IpAddress, MacAddress, VlanId
from vmferry.model.profile import PortProfile

# Longest an events long poll may wait (seconds).
MAX_EVENTS_WAIT_S = 30.0
GUEST_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
HOST_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


def _tcp_uri(uri: str) -> str:
    # pydantic reports ValueErrors as the field's reason; QEMU would run exec: as a shell.
    try:
        return validate_migration_uri(uri)
    except InputError as exc:
        raise ValueError(exc.reason) from None


#: A QEMU migration URI: ``tcp:ADDR:PORT`` and nothing else.
MigrationUri = Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_tcp_uri)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuxNic(_Body):
    """A guest's second NIC (a move by "dual" NIC, controller/dual_nic.py): on PCIe root
    port ``slot``, its port on ``vlan``; its tap is ``model.names.aux_tap_name``."""

    mac: MacAddress
    vlan: VlanId
    slot: int = Field(ge=0, le=1)


class GuestRequest(_Body):
    name: str = Field(min_length=1, max_length=40, pattern=GUEST_NAME)
    memory_mib: int = Field(ge=64, le=1024 * 1024)
    mac: MacAddress
    ip: InterfaceCidr
    gateway: IpAddress | None = None
    vlan: VlanId
    workload_mibps: int = Field(0, ge=0, le=10_000)
    incoming: bool = False          # start paused, waiting for a migration stream
    # With TLS: the only source host (certificate name) the incoming stream may come from.
    migration_peer: str | None = Field(default=None, pattern=HOST_NAME)
    postcopy: bool = False          # the incoming stream may switch to postcopy
    profile: PortProfile | None = None
    # MiB the guest fills with known patterns and verifies for ever (image/init.sh; 0: none).
    memcheck_mib: int = Field(default=0, ge=0, le=1024 * 1024)
    nic_slot: int = Field(default=0, ge=0, le=1)     # the root port of the main NIC
    hotplug_ports: bool = False     # root ports for NIC hot-plug (the site's guest_hotplug)
    aux_nic: AuxNic | None = None                    # a second NIC, on the other slot


class MemcheckVerdict(BaseModel):
    """What the guest's memory check printed on this host's console (image/init.sh)."""

    available: bool                 # the console could be read
    passes: int = 0                 # "VMFERRY-MEMCHECK pass=..." lines on this host's console
    last_pass: int | None = None    # the guest's pass number of the last one
    failures: int = 0               # the guest's failure count in that line
    fail_lines: list[str] = []      # "VMFERRY-MEMCHECK-FAIL ..." lines (at most 20)


class GuestInfo(BaseModel):
    name: str
    state: str
    pid: int | None = None
    tap: str | None = None
    port_present: bool = False
    incoming_uri: str | None = None
    memory_mib: int | None = None
    # CPU seconds per second its QEMU used over the last interval (1.0: one CPU busy); None
    # until the agent has read it twice (``agent.cpuload``).
    cpu_load: float | None = None


class UplinkVlans(_Body):
    vlans: list[VlanId]


class MigrateRequest(_Body):
    """Start the outgoing migration of a guest to ``uri`` with the migration's options."""

    uri: MigrationUri
    # The destination host: with TLS its certificate must carry this name.
    peer: str | None = Field(default=None, pattern=HOST_NAME)
    options: MigrationOptions = Field(default_factory=lambda: MigrationOptions.model_validate({}))
    # Stop in QEMU's "pre-switchover" until continue_migration (make-before-break).
    pause_before_switchover: bool = False


class MigrationProgress(BaseModel):
    """Where a guest's migration stands, as QEMU's query-migrate says."""

    status: str
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    cpu_throttle_percent: int = 0
    dirty_sync_count: int = 0
    error: str | None = None
    extra: dict[str, int | float | str | list[str] | None] = Field(default_factory=dict)


class GuestEvent(BaseModel):
    """One QMP event of a guest (contract H1), numbered per guest by the agent's driver."""

    seq: int
    kind: str
    status: str | None = None
    timestamp: float


class HostReport(BaseModel):
    host: str
    qemu_version: str
    machine_types: list[str]
    memory_mib: int
    memory_used_mib: int
    guests: list[GuestInfo]
    shared_storage: str | None
    shared_storage_ok: bool
    migration_ip: str | None = None
    cpus: int | None = None       # CPUs the host's guests share (the guests' cpu_load is of one)


class MigrationResume(_Body):
    """Resume a paused postcopy from the source, to where its destination listens again."""

    uri: MigrationUri


class RecoveryListening(BaseModel):
    """Where the destination of a paused postcopy listens for the source to resume it."""

    uri: MigrationUri


class Accepted(BaseModel):
    """The answer of an action that was started or done: what state it is in now."""

    status: str


class PortProfileBody(_Body):
    """A profile to realize on one guest's port (None: remove any profile)."""

    profile: PortProfile | None


class PortProfiles(_Body):
    """One profile for many guests' ports at once (a live profile update)."""

    profile: PortProfile
    vms: list[str] = Field(min_length=1, max_length=4096)


class Realization(BaseModel):
    """What realizing (or removing) a profile on a port did."""

    port: str
    removed: bool | None = None
    profile: str | None = None
    version: int | None = None
    cookie: str | None = None
    meter_block: int | None = None
    flows: int | None = None
    meters: int | None = None
    seconds: float | None = None
    not_enforced: list[str] = Field(default_factory=list)


class PortOutcome(Realization):
    """One guest's outcome of a batch profile push."""

    vm: str
    ok: bool
    error: str | None = None
    port: str = ""


class PortOutcomes(BaseModel):
    ports: list[PortOutcome]


class MeterState(BaseModel):
    meter_id: int
    kbps: int | None = None
    pktps: int | None = None
    burst: int | None = None


class PortSide(BaseModel):
    """One side (desired or actual) of a port's state."""

    vlan: int | None = None
    trunks: list[int] = Field(default_factory=list)
    vlan_mode: str | None = None
    profile: str | None = None
    version: int | None = None
    cookie: str | None = None
    meter_block: int | None = None
    flows: list[str] = Field(default_factory=list)
    meters: list[MeterState] = Field(default_factory=list)


class PortStatus(BaseModel):
    """A guest port's desired and actual state, and whether they match."""

    port: str
    ofport: int | None = None
    desired: PortSide
    actual: PortSide
    match: bool
    missing_flows: list[str] = Field(default_factory=list)
    extra_flows: list[str] = Field(default_factory=list)
    not_enforced: list[str] = Field(default_factory=list)


class SwitchoverRules(_Body):
    """The destination's temporary rule during a make-before-break switchover."""

    cookie: int = Field(ge=1, le=2**64 - 2)
    vlan: VlanId
    mac: MacAddress


class SwitchoverRulesOut(BaseModel):
    rules: int


class SwitchoverCookies(BaseModel):
    cookies: list[int]


class HostLeftovers(BaseModel):
    """Everything vmferry put on a host, by the VM it belongs to, as found on it now."""

    guests: list[str]
    ports: list[str]
    taps: list[str]
    requests: list[str]
    carried: list[str] = Field(default_factory=list)   # VMs whose port has carry flows


class ConnTuple(_Body):
    """One direction of a tracked connection (ICMP: ``sport`` the echo id, ``dport`` the
    type << 8 | code)."""

    src: IpAddress
    dst: IpAddress
    sport: int = Field(0, ge=0, le=65535)
    dport: int = Field(0, ge=0, le=65535)


class ConnEntryBody(_Body):
    """A connection-tracking entry of a guest's port, as read on its host."""

    protocol: Literal["tcp", "udp", "icmp"]
    orig: ConnTuple
    reply: ConnTuple
    zone: int = Field(ge=0, le=65535)
    state: str | None = Field(None, max_length=40)


class ConnState(_Body):
    """The entries of a guest port's conntrack zone (read on the source, carried to the
    destination)."""

    entries: list[ConnEntryBody] = Field(default_factory=list, max_length=65536)


class ConnCarried(BaseModel):
    flows: int
