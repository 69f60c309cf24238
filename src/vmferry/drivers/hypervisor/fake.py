"""An in-memory Hypervisor for unit tests of the agent and the migration engine.

Guests have the states of the real driver; a migration is a script of QEMU statuses that
advances one step at a time, either when the test says so (``step``) or by itself while
someone waits for it (``auto_step=True``, the default). Fakes that share a ``FakeNetwork``
are linked: a destination started with ``incoming_uri`` listens on that URI, and a migration
that completes makes it run. Events carry seq numbers and the fake clock's timestamps, in
QEMU's order (source: MIGRATION setup, active..., STOP, pre-switchover, device, completed;
destination: MIGRATION active, completed, RESUME).

Failures a test can inject: ``kill`` a guest (a destination dying fails the migration at its
next step), ``FakeNetwork.break_link`` (the source fails; the destination, sent nothing,
keeps waiting in inmigrate; a postcopy pauses in "postcopy-paused" on both ends and can be
recovered as QEMU's: ``recover_incoming`` then ``resume_migration``; ``FakeNetwork.cut``
takes every port of an address down), a script that ends in
"failed", or one that never converges (``converge=False``: active until cancelled or timed
out), and ``fail_next_start``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from vmferry.drivers.hypervisor.base import (
    NIC_SLOTS,
    GuestEvent,
    GuestNic,
    GuestSpec,
    GuestState,
    Hypervisor,
    MigrationProgress,
    MigrationTuning,
    ProgressCallback,
)
from vmferry.drivers.hypervisor.fake_network import FakeNetwork
from vmferry.drivers.hypervisor.history import EventHistory
from vmferry.drivers.hypervisor.uri import validate_migration_uri
from vmferry.errors import HypervisorError, InputError, WaitTimeout

__all__ = ["DEFAULT_SCRIPT", "FakeHypervisor", "FakeMigration", "FakeNetwork"]

#: The statuses of an uneventful precopy migration ("pre-switchover" is added before
#: "device" when the tuning asks for the pause).
DEFAULT_SCRIPT = ("setup", "active", "active", "device", "completed")
_TERMINAL = frozenset({"completed", "failed", "cancelled"})


def nic_set(spec: GuestSpec) -> dict[int, str]:
    nics = {spec.nic_slot: spec.mac.lower()}
    if spec.aux_nic is not None:
        nics[spec.aux_nic.slot] = spec.aux_nic.mac.lower()
    return nics


@dataclass
class FakeMigration:
    """An outgoing migration of one guest: the statuses still to come and where it stands."""

    uri: str
    tuning: MigrationTuning
    script: list[str]
    destination: tuple[FakeHypervisor, str] | None
    status: str = "none"
    transferred_bytes: int = 0
    total_bytes: int = 0
    error: str | None = None
    converge: bool = True           # False: "active" for ever once the script has run out
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Guest:
    spec: GuestSpec
    pid: int
    state: GuestState
    incoming_uri: str | None = None
    tuning: MigrationTuning = field(default_factory=MigrationTuning)
    incoming_status: str | None = None     # a destination's view of its postcopy


class FakeHypervisor(Hypervisor):
    """See the module docstring. ``clock`` stamps events (QMP's wall clock in the real
    driver); ``interval`` bounds how long a wait sleeps between looks at the migration."""

    def __init__(self, host: str = "fake", *, network: FakeNetwork | None = None,
                 auto_step: bool = True, clock: Callable[[], float] = time.time,
                 version: str = "10.0.2", machines: Sequence[str] = ("pc", "q35"),
                 interval: float = 0.01) -> None:
        self.host = host
        self.network = network or FakeNetwork()
        self.auto_step = auto_step
        self.clock = clock
        self._version = version
        self._machines = list(machines)
        self.interval = interval
        self._guests: dict[str, _Guest] = {}
        self._migrations: dict[str, FakeMigration] = {}
        self._histories: dict[str, EventHistory] = {}
        self._scripts: dict[str, tuple[list[str], bool]] = {}
        self._start_failures: dict[str, str] = {}
        self.announcements: dict[str, int] = {}
        #: What each guest printed on its console here (a test writes it).
        self.consoles: dict[str, str] = {}
        #: CPU seconds each guest has used (a test advances it: ``burn``).
        self.cpu_used: dict[str, float] = {}
        self._pids = itertools.count(1000)
        self._changed = self.network.changed

    # ---- test controls ------------------------------------------------------------------

    def script_migration(self, name: str, statuses: Sequence[str] = DEFAULT_SCRIPT, *,
                         converge: bool = True) -> None:
        """The statuses the next migration of ``name`` goes through. With ``converge=False``
        it stays "active" after the script's last status until cancelled."""
        if not statuses:
            raise InputError("statuses", "at least one status")
        with self._changed:
            self._scripts[name] = (list(statuses), converge)

    def step(self, name: str) -> str:
        """Advance the migration of ``name`` by one status; returns the status now. It does
        not move past "pre-switchover" (continue_migration does) nor past an end."""
        with self._changed:
            migration = self._migration(name)
            self._advance(name, migration)
            self._changed.notify_all()
            return migration.status

    def run_migration(self, name: str) -> str:
        """Step until the migration ends or holds in pre-switchover; returns the status."""
        with self._changed:
            migration = self._migration(name)
            while True:
                status = self.step(name)
                if status in _TERMINAL or status == "pre-switchover" or not migration.script:
                    return status

    def kill(self, name: str) -> None:
        """The guest's QEMU dies (no cleanup of anything else): a migration it takes part
        in fails at its next step."""
        with self._changed:
            guest = self._guests.pop(name, None)
            self.cpu_used.pop(name, None)
            if guest is not None and guest.incoming_uri is not None:
                self.network.unlisten(guest.incoming_uri)
            self._changed.notify_all()

    def fail_next_start(self, name: str, cause: str = "injected failure") -> None:
        with self._changed:
            self._start_failures[name] = cause

    # ---- guests -------------------------------------------------------------------------

    def version(self) -> str:
        return self._version

    def machine_types(self) -> list[str]:
        return list(self._machines)

    def start(self, spec: GuestSpec, *, incoming_uri: str | None = None,
              tuning: MigrationTuning | None = None) -> int:
        if incoming_uri is not None:
            validate_migration_uri(incoming_uri)
        if spec.machine not in self._machines:
            raise InputError("machine", f"not a machine type: {spec.machine!r}", vm=spec.name)
        with self._changed:
            existing = self._guests.get(spec.name)
            if existing is not None:
                return existing.pid
            cause = self._start_failures.pop(spec.name, None)
            if cause is not None:
                raise HypervisorError(f"QEMU failed to start guest {spec.name}",
                                      host=self.host, vm=spec.name, cause=cause)
            if incoming_uri is not None:
                self.network.listen(incoming_uri, self, spec.name)
            self._history(spec.name).reset()
            self._migrations.pop(spec.name, None)
            guest = _Guest(spec=spec, pid=next(self._pids),
                           state=GuestState.RUNNING if incoming_uri is None
                           else GuestState.INMIGRATE,
                           incoming_uri=incoming_uri, tuning=tuning or MigrationTuning())
            self._guests[spec.name] = guest
            if incoming_uri is None:
                self._emit(spec.name, "RESUME")
            self._changed.notify_all()
            return guest.pid

    def stop(self, name: str) -> None:
        with self._changed:
            guest = self._guests.pop(name, None)
            if guest is not None and guest.incoming_uri is not None:
                self.network.unlisten(guest.incoming_uri)
            self._migrations.pop(name, None)
            self._changed.notify_all()

    def state(self, name: str) -> GuestState:
        with self._changed:
            guest = self._guests.get(name)
            return GuestState.ABSENT if guest is None else guest.state

    def guests(self) -> list[str]:
        with self._changed:
            return sorted(self._guests)

    def spec(self, name: str) -> GuestSpec:
        return self._guest(name).spec

    def resume(self, name: str) -> None:
        with self._changed:
            guest = self._guest(name)
            if guest.state is GuestState.INMIGRATE:
                raise HypervisorError(f"cont failed for guest {name}", host=self.host, vm=name,
                                      cause="Migration is not finalized yet")
            if guest.state is not GuestState.RUNNING:
                guest.state = GuestState.RUNNING
                self._emit(name, "RESUME")
                self._changed.notify_all()

    def console(self, name: str) -> str | None:
        with self._changed:
            return self.consoles.get(name)

    def burn(self, name: str, seconds: float) -> None:
        """The guest used ``seconds`` more CPU time (what ``cpu_seconds`` reads next)."""
        with self._changed:
            self._guest(name)
            self.cpu_used[name] = self.cpu_used.get(name, 0.0) + seconds

    def cpu_seconds(self, name: str) -> float | None:
        with self._changed:
            if name not in self._guests:
                return None
            return self.cpu_used.get(name, 0.0)

    def announce(self, name: str) -> None:
        with self._changed:
            self._guest(name)
            self.announcements[name] = self.announcements.get(name, 0) + 1

    def plug_nic(self, name: str, nic: GuestNic) -> None:
        with self._changed:
            guest = self._guest(name)
            if nic.slot == guest.spec.nic_slot or nic.slot not in NIC_SLOTS:
                raise HypervisorError(f"guest {name} has no free root port {nic.slot}",
                                      host=self.host, vm=name)
            guest.spec = replace(guest.spec, aux_nic=nic)

    def unplug_nic(self, name: str, slot: int) -> None:
        with self._changed:
            guest = self._guest(name)
            spec, aux = guest.spec, guest.spec.aux_nic
            if aux is not None and spec.nic_slot == slot:      # the main NIC goes
                guest.spec = replace(spec, mac=aux.mac, tap=aux.tap, nic_slot=aux.slot,
                                     aux_nic=None)
            elif aux is not None and aux.slot == slot:
                guest.spec = replace(spec, aux_nic=None)

    def nics(self, name: str) -> dict[int, str]:
        """slot -> MAC of the guest's NICs (what the migration stream must find alike)."""
        return nic_set(self.spec(name))

    def events(self, name: str, *, after: int = 0, timeout: float = 0.0) -> list[GuestEvent]:
        history = self._history(name)
        if self.state(name) is GuestState.ABSENT:
            return history.after(after)
        found, _ = history.wait(after, timeout)
        return found

    # ---- migration ----------------------------------------------------------------------

    def migrate(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        validate_migration_uri(uri)
        with self._changed:
            guest = self._guest(name)
            current = self._migrations.get(name)
            if current is not None and current.status not in _TERMINAL:
                raise HypervisorError(f"QMP migrate failed for guest {name}", host=self.host,
                                      vm=name, cause="There's a migration process in progress")
            if guest.state is not GuestState.RUNNING:
                raise HypervisorError(f"QMP migrate failed for guest {name}", host=self.host,
                                      vm=name, cause=f"guest is {guest.state.value}")
            peer = self.network.listener(uri)
            if peer is not None and name in peer[0]._guests \
                    and nic_set(peer[0]._guests[name].spec) != nic_set(guest.spec):
                # QEMU refuses a stream whose devices the destination does not have.
                raise HypervisorError(f"QMP migrate failed for guest {name}", host=self.host,
                                      vm=name, cause=f"NICs {nic_set(guest.spec)} here, "
                                      f"{nic_set(peer[0]._guests[name].spec)} there")
            statuses, converge = self._scripts.pop(name, (list(DEFAULT_SCRIPT), True))
            if tuning.pause_before_switchover and "pre-switchover" not in statuses \
                    and "device" in statuses:
                statuses.insert(statuses.index("device"), "pre-switchover")
            migration = FakeMigration(uri=uri, tuning=tuning, script=statuses,
                                      converge=converge, destination=self.network.listener(uri),
                                      total_bytes=guest.spec.memory_mib << 20)
            self._migrations[name] = migration
            # QEMU is in "setup" when migrate returns; a script may start elsewhere.
            if statuses[0] == "setup":
                self._set_status(name, migration, statuses.pop(0))
            self._changed.notify_all()

    def migration_progress(self, name: str) -> MigrationProgress:
        with self._changed:
            self._guest(name)
            migration = self._migrations.get(name)
            if migration is None:
                return MigrationProgress(status=self._guest(name).incoming_status or "none")
            return MigrationProgress(
                status=migration.status, transferred_bytes=migration.transferred_bytes,
                remaining_bytes=max(0, migration.total_bytes - migration.transferred_bytes),
                total_bytes=migration.total_bytes, error=migration.error,
                downtime_ms=1 if migration.status == "completed" else None)

    def wait_migration(self, name: str, *, timeout: float,
                       on_progress: ProgressCallback | None = None,
                       postcopy_after_s: float | None = None) -> MigrationProgress:
        deadline = time.monotonic() + timeout
        postcopy_requested = False
        while True:
            with self._changed:
                if self.auto_step and name in self._migrations:
                    self.step(name)
                progress = self.migration_progress(name)
                if on_progress is not None:
                    on_progress(progress)
                if progress.status in _TERMINAL or progress.status == "none":
                    return progress
                migration = self._migration(name)
                if (postcopy_after_s is not None and not postcopy_requested
                        and progress.status == "active"
                        and time.monotonic() - migration.started >= postcopy_after_s):
                    self.start_postcopy(name)
                    postcopy_requested = True
                left = deadline - time.monotonic()
                if left <= 0:
                    self.cancel_migration(name)
                    raise WaitTimeout(f"migration of guest {name} to finish "
                                      f"(was {progress.status}; cancelled)", timeout,
                                      host=self.host, vm=name)
                self._changed.wait(min(self.interval, left))

    def start_postcopy(self, name: str) -> None:
        with self._changed:
            migration = self._migration(name)
            dest_guest = self._destination_guest(migration)
            if not migration.tuning.postcopy or dest_guest is None \
                    or not dest_guest.tuning.postcopy:
                raise HypervisorError(f"QMP migrate-start-postcopy failed for guest {name}",
                                      host=self.host, vm=name,
                                      cause="Enable postcopy with migrate_set_capability "
                                            "before the start of migration")
            if migration.status != "active":
                raise HypervisorError(f"QMP migrate-start-postcopy failed for guest {name}",
                                      host=self.host, vm=name,
                                      cause=f"migration is {migration.status}")
            self._stop_source(name)
            self._set_status(name, migration, "postcopy-active")
            if migration.destination is not None:
                dest, dest_name = migration.destination
                dest._run_destination(dest_name, "postcopy-active")
            migration.script = ["completed"]
            self._changed.notify_all()

    def continue_migration(self, name: str) -> None:
        with self._changed:
            migration = self._migration(name)
            if migration.status != "pre-switchover":
                raise HypervisorError(f"QMP migrate-continue failed for guest {name}",
                                      host=self.host, vm=name,
                                      cause=f"Migration not in expected state: "
                                            f"{migration.status}")
            self._advance(name, migration, release=True)
            self._changed.notify_all()

    def cancel_migration(self, name: str) -> None:
        with self._changed:
            migration = self._migrations.get(name)
            if migration is None or migration.status in _TERMINAL:
                return
            self._end(name, migration, "cancelled", error=None)
            self._changed.notify_all()

    # ---- postcopy recovery --------------------------------------------------------------

    def pause_migration(self, name: str) -> None:
        with self._changed:
            migration = self._migrations.get(name)
            if migration is None or migration.status != "postcopy-active":
                raise HypervisorError(f"QMP migrate-pause failed for guest {name}",
                                      host=self.host, vm=name,
                                      cause="migrate-pause is currently only supported "
                                            "during postcopy-active state")
            self._pause_postcopy(name, migration, "paused by migrate-pause")
            self._changed.notify_all()

    def recover_incoming(self, name: str, uri: str) -> None:
        validate_migration_uri(uri)
        with self._changed:
            guest = self._guest(name)
            if guest.incoming_status != "postcopy-paused":
                raise HypervisorError(f"QMP migrate-recover failed for guest {name}",
                                      host=self.host, vm=name,
                                      cause="Migrate recover can only be run when postcopy "
                                            "is paused.")
            if guest.incoming_uri is not None:
                self.network.unlisten(guest.incoming_uri)
            self.network.listen(uri, self, name)
            guest.incoming_uri = uri

    def resume_migration(self, name: str, uri: str) -> None:
        validate_migration_uri(uri)
        with self._changed:
            migration = self._migration(name)
            if migration.status != "postcopy-paused":
                raise HypervisorError(f"QMP migrate failed for guest {name}", host=self.host,
                                      vm=name, cause="Cannot resume if there is no paused "
                                                     "migration")
            self._set_status(name, migration, "postcopy-recover-setup")
            listener = self.network.listener(uri)
            if listener is None or self.network.is_broken(uri):
                # As QEMU's: a connect that fails leaves the postcopy paused.
                self._set_status(name, migration, "postcopy-paused")
                migration.error = "Connection refused"
            else:
                migration.uri, migration.destination, migration.error = uri, listener, None
                self._set_status(name, migration, "postcopy-recover")
                self._set_status(name, migration, "postcopy-active")
                dest, dest_name = listener
                dest._run_destination(dest_name, "postcopy-active")
                migration.script = ["completed"]
            self._changed.notify_all()

    # ---- internals (called with the network's lock held) ------------------------------------

    def _pause_postcopy(self, name: str, migration: FakeMigration, cause: str) -> None:
        """As QEMU's: a postcopy that loses its stream pauses on both ends, each keeping
        its pages."""
        migration.error = cause
        self._set_status(name, migration, "postcopy-paused")
        dest = self._destination_guest(migration)
        if dest is not None and migration.destination is not None:
            dest_hv, dest_name = migration.destination
            dest.incoming_status = "postcopy-paused"
            dest_hv._emit(dest_name, "MIGRATION", "postcopy-paused")

    def _history(self, name: str) -> EventHistory:
        with self._changed:
            return self._histories.setdefault(name, EventHistory())

    def _emit(self, name: str, kind: str, status: str | None = None) -> None:
        self._history(name).record(kind, status, self.clock())

    def _guest(self, name: str) -> _Guest:
        guest = self._guests.get(name)
        if guest is None:
            raise HypervisorError(f"guest {name} is not running", host=self.host, vm=name,
                                  cause="no QEMU process")
        return guest

    def _migration(self, name: str) -> FakeMigration:
        self._guest(name)
        migration = self._migrations.get(name)
        if migration is None:
            raise HypervisorError(f"no migration of guest {name}", host=self.host, vm=name)
        return migration

    def _destination_guest(self, migration: FakeMigration) -> _Guest | None:
        if migration.destination is None:
            return None
        dest, dest_name = migration.destination
        return dest._guests.get(dest_name)

    def _set_status(self, name: str, migration: FakeMigration, status: str) -> None:
        if status != migration.status:
            migration.status = status
            self._emit(name, "MIGRATION", status)

    def _stop_source(self, name: str) -> None:
        guest = self._guest(name)
        if guest.state is GuestState.RUNNING:
            guest.state = GuestState.PAUSED
            self._emit(name, "STOP")

    def _run_destination(self, name: str, status: str) -> None:
        guest = self._guests.get(name)
        if guest is None:
            return
        self._emit(name, "MIGRATION", status)
        guest.incoming_status = status
        if status == "completed" and guest.incoming_uri is not None:
            self.network.unlisten(guest.incoming_uri)
            guest.incoming_uri = None
        if guest.state is not GuestState.RUNNING:
            guest.state = GuestState.RUNNING
            self._emit(name, "RESUME")

    def _broken_because(self, migration: FakeMigration) -> str | None:
        dest = self._destination_guest(migration)
        if migration.destination is None:
            return "Connection refused"
        if self.network.is_broken(migration.uri):
            return "Unable to write to socket: Connection reset by peer"
        if dest is None:
            return "Unable to write to socket: Broken pipe (destination gone)"
        return None

    def _advance(self, name: str, migration: FakeMigration, *, release: bool = False) -> None:
        if migration.status in _TERMINAL or migration.status == "postcopy-paused" or (
                migration.status == "pre-switchover" and not release):
            return
        cause = self._broken_because(migration)
        if cause is not None and migration.status == "postcopy-active":
            # As QEMU's: a postcopy that loses its stream pauses (both ends keep their pages).
            self._pause_postcopy(name, migration, cause)
            return
        if cause is not None:
            # A broken link sends the destination nothing: it keeps waiting, as QEMU does.
            self._end(name, migration, "failed", error=cause,
                      destination_ends=not self.network.is_broken(migration.uri))
            return
        if not migration.script:
            if not migration.converge:      # another pass that does not get anywhere
                self._pass(name, migration)
            return
        status = migration.script.pop(0)
        if status in ("failed", "cancelled"):
            self._end(name, migration, status,
                      error="injected failure" if status == "failed" else None)
            return
        if status in ("pre-switchover", "device"):
            self._stop_source(name)
        if status == "active":
            self._set_status(name, migration, status)
            self._pass(name, migration)
            return
        self._set_status(name, migration, status)
        if status == "completed":
            migration.transferred_bytes = migration.total_bytes
            self._guest(name).state = GuestState.POSTMIGRATE
            if migration.destination is not None:
                dest, dest_name = migration.destination
                dest._run_destination(dest_name, "completed")

    def _pass(self, name: str, migration: FakeMigration) -> None:
        if migration.status == "active" and migration.destination is not None \
                and migration.transferred_bytes == 0:
            dest, dest_name = migration.destination
            dest._emit(dest_name, "MIGRATION", "active")
        migration.transferred_bytes = min(migration.total_bytes,
                                          migration.transferred_bytes
                                          + max(1, migration.total_bytes // 4))
        self._emit(name, "MIGRATION_PASS")

    def _end(self, name: str, migration: FakeMigration, status: str, *,
             error: str | None, destination_ends: bool = True) -> None:
        """A migration that did not complete: the source runs again; the destination's QEMU
        ends itself when its stream was closed (``destination_ends``), as QEMU's does."""
        migration.error = error
        migration.script = []
        self._set_status(name, migration, status)
        guest = self._guest(name)
        if guest.state is GuestState.PAUSED:
            guest.state = GuestState.RUNNING
            self._emit(name, "RESUME")
        if migration.destination is not None and destination_ends:
            dest, dest_name = migration.destination
            dest_guest = dest._guests.get(dest_name)
            if dest_guest is not None and dest_guest.state is GuestState.INMIGRATE:
                dest._emit(dest_name, "MIGRATION", "failed")
                dest.kill(dest_name)
