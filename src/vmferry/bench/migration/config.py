"""The benchmark's configuration and its per-migration record (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOWN_VARIANTS = ("floor", "vmferry", "naive", "ovn")
# Ways across a subnet boundary the benchmark can move a guest by (model.boundary.Way).
BUILT_BOUNDARIES = ("stretch", "route", "nat", "dual")
UNBUILT_BOUNDARIES: tuple[str, ...] = ()
# Ways only the controller realizes (a lease, a translation, a hot-plugged NIC).
CONTROLLER_ONLY_BOUNDARIES = ("nat", "dual")
# The hand-driven variants wire trunks and ports only: they can stretch a VLAN, no more.
HAND_STRETCH_ONLY = ("floor", "naive")
# One address per variant so a client's ARP cache never carries a MAC across variants.
ADDRESSES = {"floor": "192.0.2.51/24", "vmferry": "192.0.2.52/24", "naive": "192.0.2.53/24",
             "ovn": "192.0.2.54/24"}
# How often the hand-driven variants ask QEMU whether the migration is done.
HAND_POLL_S = 0.01
ACTIVE_QEMU_STATES = {"setup", "active", "pre-switchover", "device", "postcopy-active",
                      "wait-unplug", "cancelling"}


@dataclass(frozen=True)
class BenchConfig:
    runs: int = 5
    memory_mib: int = 256
    workload_mibps: int = 0
    interval_ms: float = 2.0
    max_downtime_ms: int = 300
    variants: tuple[str, ...] = ("floor", "vmferry", "naive")
    lab_name: str = "bench"
    controller_port: int = 0            # 0: pick a free one
    topology: Path | None = None
    client: str = "client-100"
    vlan: int = 100
    warmup_s: float = 0.5               # probes run this long before each migration...
    tail_s: float = 2.0                 # ...and this long after it (> ping's 1 s in flight)
    migration_timeout_s: float = 120.0
    tcp_interval_ms: float = 10.0       # the TCP echo session sends this often
    # Move into a routed rack by this way (None: between two racks of one L2 fabric).
    boundary: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.runs <= 100:
            raise ValueError("runs must be between 1 and 100")
        if not 1.0 <= self.interval_ms <= 2.0:
            raise ValueError("the probe interval must be 1-2 ms")
        unknown = set(self.variants) - set(KNOWN_VARIANTS)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; known: "
                             f"{sorted(KNOWN_VARIANTS)}")
        if not self.variants:
            raise ValueError("variants: at least one is needed")
        if self.boundary in UNBUILT_BOUNDARIES:
            raise ValueError(f"boundary: {self.boundary!r} is not realized on the lab yet "
                             f"(built: {', '.join(BUILT_BOUNDARIES)})")
        if self.boundary is not None and self.boundary not in BUILT_BOUNDARIES:
            raise ValueError(f"boundary: {self.boundary!r} is not one of "
                             f"{', '.join(BUILT_BOUNDARIES + UNBUILT_BOUNDARIES)}")
        hand = sorted(set(self.variants) & set(HAND_STRETCH_ONLY))
        if self.boundary == "route" and hand:
            raise ValueError(f"boundary: the hand-driven variants ({', '.join(hand)}) only "
                             "stretch a VLAN; they do not wire the route way (leave them out)")
        if self.boundary in CONTROLLER_ONLY_BOUNDARIES and set(self.variants) - {"vmferry"}:
            raise ValueError(f"boundary: only the vmferry variant moves a guest by "
                             f"{self.boundary}; use --variants vmferry")
        if self.boundary is not None and "ovn" in self.variants:
            raise ValueError("boundary: the ovn peer has no routed rack; leave it out")


@dataclass
class Timing:
    """What a variant measured about one migration, besides the probes."""

    total_ms: float
    qemu: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    # QMP timestamps (epoch s): source_stop, destination_resume, source_completed.
    events: dict[str, float] = field(default_factory=dict)
    controller_cpu_ms: float | None = None
    completed_to_switchover_ms: float | None = None
    completed_to_switchover_how: str | None = None    # "engine" or how it was derived
    switchover_open_ms: float | None = None


@dataclass
class RunResult:
    variant: str
    run: int
    source: str
    destination: str
    ok: bool
    error: str | None = None
    # What a user feels (probe.py, tcpecho.py).
    interruption_ms: float | None = None
    lost: int | None = None
    duplicates: int | None = None
    late: int | None = None
    max_rtt_ms: float | None = None
    tcp_stall_ms: float | None = None
    # The interruption split by QMP timestamps (or derived from QEMU's downtime: ``split``).
    pause_ms: float | None = None
    network_share_ms: float | None = None
    lead_in_ms: float | None = None        # last timely probe sent -> source STOP
    resume_to_timely_ms: float | None = None   # destination RESUME -> first timely reply
    split: str | None = None
    events: dict[str, float] = field(default_factory=dict)
    mac_moves: dict[str, int] = field(default_factory=dict)
    mac_moves_max: int | None = None
    # Per switch and MAC, port changes in OVS's learning log over the same window, and the
    # log lines themselves (lab.mac_trace_read): which MAC moved, where, by which thread.
    mac_changes: dict[str, dict[str, int]] = field(default_factory=dict)
    mac_trace: list[dict[str, Any]] = field(default_factory=list)
    qemu_downtime_ms: float | None = None
    total_ms: float | None = None
    qemu_total_ms: float | None = None
    transferred_bytes: int | None = None
    bound_ms: float | None = None          # bytes QEMU sent / the migration link's rate
    controller_cpu_ms: float | None = None
    completed_to_switchover_ms: float | None = None
    completed_to_switchover_how: str | None = None
    switchover_open_ms: float | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    tcp: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
