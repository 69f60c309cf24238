"""The hypervisor interface: what the host agent needs from QEMU (or anything like it)."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from vmferry.errors import HypervisorError

#: PCIe root ports every guest gets, so a NIC can be hot-plugged (and unplugged) on q35: the
#: VM's NIC sits on one, the other is free for the second NIC of a move by "dual" NIC.
NIC_SLOTS = (0, 1)


@dataclass(frozen=True)
class GuestNic:
    """A NIC besides the guest's main one: on root port ``slot``, on this host's ``tap``."""

    mac: str
    tap: str
    slot: int


@dataclass(frozen=True)
class GuestSpec:
    """What a guest is made of. The disk-less lab guest takes its identity on the kernel
    command line; ``shared_dir`` is the storage both hosts see (checked, not copied)."""

    name: str
    memory_mib: int
    mac: str
    tap: str                       # tap device on this host that the guest's NIC uses
    ip_cidr: str                   # e.g. "192.0.2.10/24"
    gateway: str | None = None
    workload_mibps: int = 0        # memory the guest dirties per second (0: idle)
    vcpus: int = 1
    machine: str = "q35"
    memcheck_mib: int = 0          # memory the guest fills and verifies for ever (0: none)
    nic_slot: int = 0              # the root port the main NIC sits on (NIC_SLOTS)
    hotplug_ports: bool = False    # root ports for NIC hot-plug (q35; Topology.guest_hotplug)
    aux_nic: GuestNic | None = None   # a second NIC (a move by "dual" NIC), on the other slot


class GuestState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"        # destination waiting for the incoming stream
    POSTMIGRATE = "postmigrate"    # source after a completed migration
    SHUTDOWN = "shutdown"
    ABSENT = "absent"              # no process


@dataclass(frozen=True)
class MigrationTuning:
    max_downtime_ms: int = 300
    bandwidth_mbps: int | None = None     # None: unlimited
    postcopy: bool = False                # allow switching to postcopy when not converging
    auto_converge: bool = True            # throttle the guest's vCPUs when not converging
    # Stop in status "pre-switchover" (guest already stopped on the source) until
    # Hypervisor.continue_migration: the moment to redirect the network. Both sides need it.
    pause_before_switchover: bool = False
    # With TLS configured in the driver: on the destination, the only client certificate name
    # (CN) it accepts; on the source, the name the destination's certificate must carry
    # (None: the address in the URI must be in the destination certificate's SANs).
    tls_peer_name: str | None = None


@dataclass(frozen=True)
class GuestEvent:
    """One QMP event of a guest, as the driver recorded it."""

    seq: int            # per guest, strictly increasing from 1 within one driver process
    kind: str           # QMP event name: "MIGRATION", "STOP", "RESUME", "MIGRATION_PASS", ...
    status: str | None  # for MIGRATION: QEMU's status ("setup", "active", "pre-switchover",
                        # "device", "completed", "failed", "cancelled", "postcopy-active", ...)
    timestamp: float    # QMP's own event timestamp (seconds since the epoch, microseconds)


@dataclass
class MigrationProgress:
    status: str                    # QEMU's: setup, active, postcopy-active, completed, failed...
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_pages_rate: int = 0      # pages/s
    mbps: float = 0.0
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None       # measured, once completed
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    cpu_throttle_percent: int = 0
    dirty_sync_count: int = 0
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


ProgressCallback = Callable[[MigrationProgress], None]


class Hypervisor(ABC):
    """Runs guests on one host. Implementations translate their library errors into
    ``HypervisorError`` (or ``WaitTimeout``) at this boundary."""

    @abstractmethod
    def version(self) -> str:
        """The hypervisor's version, e.g. "10.0.2"."""

    @abstractmethod
    def machine_types(self) -> list[str]:
        """Machine types this hypervisor can run and accept migrations for."""

    @abstractmethod
    def start(self, spec: GuestSpec, *, incoming_uri: str | None = None,
              tuning: MigrationTuning | None = None) -> int:
        """Start a guest (idempotent for a running one); with ``incoming_uri`` (e.g.
        ``tcp:203.0.113.2:49152``) it waits paused for a migration stream. Returns the pid.
        ``tuning`` is for a destination: capabilities both sides need (postcopy) are set
        before it starts listening, so pass the tuning the source will migrate with."""

    @abstractmethod
    def stop(self, name: str) -> None:
        """Stop the guest and remove every file of it (idempotent)."""

    @abstractmethod
    def state(self, name: str) -> GuestState:
        """The guest's run state (ABSENT when no process)."""

    @abstractmethod
    def guests(self) -> list[str]:
        """Names of the guests with a process on this host."""

    @abstractmethod
    def migrate(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        """Start an outgoing live migration to ``uri``; returns once it has started."""

    @abstractmethod
    def migration_progress(self, name: str) -> MigrationProgress:
        """Where an outgoing (or incoming) migration stands."""

    @abstractmethod
    def wait_migration(self, name: str, *, timeout: float,
                       on_progress: ProgressCallback | None = None,
                       postcopy_after_s: float | None = None) -> MigrationProgress:
        """Wait (bounded) for the outgoing migration to end: completed, failed or cancelled.
        Switches to postcopy after ``postcopy_after_s`` seconds when it was allowed.
        Raises ``WaitTimeout`` (after cancelling) when it does not end in time."""

    @abstractmethod
    def start_postcopy(self, name: str) -> None:
        """Switch a running outgoing migration to postcopy: the destination runs from now on
        and pulls the remaining pages. Needs ``MigrationTuning.postcopy`` on both sides."""

    @abstractmethod
    def continue_migration(self, name: str) -> None:
        """``migrate-continue`` from status "pre-switchover" (only reached with
        ``MigrationTuning.pause_before_switchover``): the source sends the last state and the
        destination runs. Raises HypervisorError when the migration is not in that status."""

    @abstractmethod
    def events(self, name: str, *, after: int = 0, timeout: float = 0.0) -> list[GuestEvent]:
        """Events of the guest with seq > ``after``, oldest first; waits up to ``timeout``
        seconds for at least one (returns [] when none came). The history is bounded (the
        last ~1000 per guest) and starts when the guest is started (seq keeps counting).
        Events QEMU emits while no driver process is connected are lost; a driver that
        connects to a running guest records a "VMFERRY_RESYNC" event whose status is the
        migration status at that moment (timestamp: the local clock)."""

    @abstractmethod
    def cancel_migration(self, name: str) -> None:
        """Cancel an outgoing migration; the source guest keeps running."""

    @abstractmethod
    def resume(self, name: str) -> None:
        """Resume a paused guest (e.g. the destination after switchover if needed)."""

    # ---- postcopy recovery: not abstract, a driver that cannot recover says so --------------

    def pause_migration(self, name: str) -> None:
        """``migrate-pause`` on either end of a migration in postcopy-active: breaks a stream
        that hangs (a link that drops packets without a reset) so that both ends go to
        "postcopy-paused" and can be recovered. Raises HypervisorError otherwise."""
        raise HypervisorError(f"{type(self).__name__} cannot pause a postcopy migration",
                              vm=name, cause="postcopy recovery is not supported")

    def recover_incoming(self, name: str, uri: str) -> None:
        """``migrate-recover`` on the destination of a paused postcopy: listen on ``uri``
        for the source to resume the stream. Raises HypervisorError when the incoming
        migration is not postcopy-paused (or the driver cannot), InputError for a bad URI."""
        raise HypervisorError(f"{type(self).__name__} cannot recover a postcopy migration",
                              vm=name, cause="postcopy recovery is not supported")

    def resume_migration(self, name: str, uri: str) -> None:
        """``migrate`` with ``resume``: the source of a paused postcopy reconnects to a
        destination listening on ``uri`` (``recover_incoming``) and the postcopy goes on;
        returns once the attempt has started (status "postcopy-recover-setup"; a connect
        that fails goes back to "postcopy-paused"). Raises HypervisorError when the
        outgoing migration is not postcopy-paused, InputError for a bad URI."""
        raise HypervisorError(f"{type(self).__name__} cannot resume a postcopy migration",
                              vm=name, cause="postcopy recovery is not supported")

    def console(self, name: str) -> str | None:
        """The guest's console output on this host so far; None when the driver cannot read
        it. Not abstract: drivers without a console file keep this."""
        return None

    def cpu_seconds(self, name: str) -> float | None:
        """CPU time (user + system, seconds) the guest has cost this host since it started;
        None when it has no process or the driver cannot tell. The agent turns two readings
        into a load (``agent.cpuload``). Not abstract: a driver that cannot tell keeps this."""
        return None

    def plug_nic(self, name: str, nic: GuestNic) -> None:
        """Hot-plug a virtio NIC on root port ``nic.slot`` backed by ``nic.tap`` (idempotent:
        a NIC already there is left). Raises HypervisorError. Not abstract: a driver that
        cannot hot-plug keeps this."""
        raise HypervisorError(f"{type(self).__name__} cannot hot-plug a NIC", vm=name)

    def unplug_nic(self, name: str, slot: int) -> None:
        """Hot-unplug the NIC on root port ``slot`` and wait until the guest released it
        (idempotent: no NIC there is success). Raises HypervisorError, WaitTimeout."""
        raise HypervisorError(f"{type(self).__name__} cannot hot-unplug a NIC", vm=name)

    @abstractmethod
    def announce(self, name: str) -> None:
        """Make the guest's NIC announce its MAC (RARP/GARP) so switches learn where it is."""
