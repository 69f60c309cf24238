"""Live migration with the network in tow: ``Migrations`` starts them, runs each in a thread
and answers for them. The run itself is in ``controller.run`` (bookkeeping),
``controller.phases`` (one function per phase, ``STEPS``), ``controller.precopy`` (following
QEMU's events) and ``controller.recovery`` (forward, rollback, restart decisions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmferry.api.controller import MigrationRecord
from vmferry.controller import events
from vmferry.controller.auth import Principal
from vmferry.controller.leader import Fenced, LeaderLease
from vmferry.controller.recovery import forward, recover
from vmferry.controller.run import Cancelled, Run, load, record_of
from vmferry.controller.service import Controller, memory_used
from vmferry.errors import CapacityError, ConflictError, InputError, NotFoundError
from vmferry.model.migration import (
    DEFAULT_MAX_DOWNTIME_MS,
    PHASES,
    MigrationOptions,
    MigrationState,
    Phase,
    past_point_of_no_return,
)
from vmferry.model.topology import Topology
from vmferry.store.schema import MigrationRow, VmRow

log = logging.getLogger(__name__)

__all__ = ["Cancelled", "Migrations", "holds_slot", "slots_taken"]
# A run that breaks (not a phase failing: its bookkeeping, e.g. the store down) is resumed
# from the store this many times, the n-th after n * CRASH_BACKOFF_S seconds.
CRASH_RETRIES = 5
CRASH_BACKOFF_S = 1.0
LIVE = [MigrationState.RUNNING.value, MigrationState.ROLLING_BACK.value]
# A host's migration limit protects the copy (its CPUs and its migration link): a move holds
# a slot on both hosts until the guest has switched over. Announce, cleanup and verify need
# none, so the next move may start meanwhile; the store still lists the move as running.
SLOT_FREE_PHASES = frozenset(p.value for p in PHASES
                             if PHASES.index(p) > PHASES.index(Phase.SWITCHOVER))


def holds_slot(state: str, phase: str) -> bool:
    """Whether a migration in ``state`` at ``phase`` counts against its hosts' limits: a live
    one until it is past switchover (a rollback always holds its slots)."""
    if state not in LIVE:
        return False
    return state != MigrationState.RUNNING.value or phase not in SLOT_FREE_PHASES


def slots_taken(session: Session) -> dict[str, int]:
    """Migration slots taken per host, read from the store (so every controller agrees)."""
    taken: dict[str, int] = {}
    for m in session.scalars(select(MigrationRow).where(MigrationRow.state.in_(LIVE))):
        if holds_slot(m.state, m.phase):
            for host in (m.source, m.destination):
                taken[host] = taken.get(host, 0) + 1
    return taken


class Migrations:
    """Starts migrations, runs their phases in threads, rolls back or completes them."""

    def __init__(self, controller: Controller, lease: LeaderLease | None = None) -> None:
        self.controller = controller
        # With a lease, every write of a run is fenced by its epoch (controller.leader).
        self.lease = lease
        self.fence = lease.check if lease is not None else None
        self.store = controller.store
        self._cancel: dict[int, threading.Event] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    # ---- API --------------------------------------------------------------------------------

    def start(self, vm: str, destination: str, options: MigrationOptions,
              actor: Principal) -> MigrationRecord:
        """Record a migration and run it in the background; returns its record.

        Refuses (409) a second migration of the same VM and one beyond a host's limit."""
        topology = self.controller.topology()
        if destination not in {h.name for h in topology.hosts}:
            raise NotFoundError("to", f"unknown host {destination!r}")
        # The VM's lock is held for the whole run (released by its thread): a profile change,
        # a delete or a policy change of a migrating VM is refused meanwhile.
        vm_lock = self.controller.vm_lock(vm)
        if not vm_lock.acquire(blocking=False):
            with self.store.session() as session:
                if session.scalars(select(MigrationRow.id).where(
                        MigrationRow.vm == vm, MigrationRow.state.in_(LIVE))).first():
                    raise ConflictError("vm", f"VM {vm!r} is already migrating")
            raise ConflictError("vm", f"VM {vm!r} is being changed right now")
        try:
            migration_id = self._record(vm, destination, options, topology)
        except BaseException:
            vm_lock.release()
            raise
        events.record(self.store, actor.name, "migration.start", vm, "started",
                      migration=migration_id, source=self.get(migration_id).source,
                      destination=destination)
        self._launch(migration_id, actor.name, locked=True)
        return self.get(migration_id)

    def _record(self, vm: str, destination: str, options: MigrationOptions,
                topology: Topology) -> int:
        """Check the move may start and record it (running, precheck); returns its id."""
        with self._lock, self.store.session() as session:
            if self.fence is not None:
                self.fence(session)
            row = session.get(VmRow, vm)
            if row is None:
                raise NotFoundError("vm", f"no VM named {vm!r}")
            running = list(session.scalars(select(MigrationRow).where(
                MigrationRow.state.in_(LIVE))))
            if any(m.vm == vm for m in running):
                raise ConflictError("vm", f"VM {vm!r} is already migrating")
            if row.state != "running":
                raise ConflictError("vm", f"VM {vm!r} is {row.state}, not running")
            if row.host == destination:
                raise InputError("to", f"VM {vm} already runs on {destination}")
            used = memory_used(session, destination)
            free = topology.host(destination).memory_mib - used
            if row.memory_mib > free:
                raise CapacityError(f"to: host {destination} has {free} MiB free, {vm} needs "
                                    f"{row.memory_mib} MiB", field="to")
            taken = slots_taken(session)
            for host in (row.host, destination):
                busy, limit = taken.get(host, 0), topology.host(host).max_migrations
                if busy >= limit:
                    raise ConflictError("to", f"host {host} already runs {busy} migrations "
                                        f"not yet switched over (limit {limit})")
            if options.max_downtime_ms is None:
                options = options.model_copy(update={
                    "max_downtime_ms": row.max_downtime_ms or DEFAULT_MAX_DOWNTIME_MS})
            record = MigrationRow(vm=vm, source=row.host, destination=destination,
                                  state=MigrationState.RUNNING.value, phase=Phase.PRECHECK.value,
                                  options=options.model_dump(mode="json"), phases=[], result={})
            session.add(record)
            session.flush()
            return record.id

    def get(self, migration_id: int) -> MigrationRecord:
        return load(self.store, migration_id)

    def recent(self, limit: int = 100) -> list[MigrationRecord]:
        with self.store.session() as session:
            rows = session.scalars(select(MigrationRow).order_by(MigrationRow.id.desc())
                                   .limit(limit))
            return [MigrationRecord.model_validate(record_of(r)) for r in rows]

    def cancel(self, migration_id: int, actor: Principal) -> MigrationRecord:
        record = self.get(migration_id)
        if record.state != MigrationState.RUNNING.value:
            raise ConflictError("id", f"migration {migration_id} is {record.state}")
        if past_point_of_no_return(Phase(record.phase)):
            raise ConflictError("id", f"migration {migration_id} is past switchover "
                                "and can only complete")
        self._cancel.setdefault(migration_id, threading.Event()).set()
        events.record(self.store, actor.name, "migration.cancel", record.vm, "requested",
                      migration=migration_id)
        return self.get(migration_id)

    def wait(self, migration_id: int, timeout: float) -> MigrationRecord:
        thread = self._threads.get(migration_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(migration_id)

    def resume_unfinished(self) -> list[int]:
        """After a controller restart: finish or undo every migration a dead controller left."""
        with self.store.session() as session:
            ids = [m.id for m in session.scalars(select(MigrationRow).where(
                MigrationRow.state.in_(LIVE)))]
        for migration_id in ids:
            self._launch(migration_id, "controller-recovery", recovering=True)
        return ids

    # ---- the run ----------------------------------------------------------------------------

    def _launch(self, migration_id: int, actor: str, recovering: bool = False,
                locked: bool = False) -> None:
        self._cancel.setdefault(migration_id, threading.Event())
        thread = threading.Thread(target=self._locked_run,
                                  args=(migration_id, actor, recovering, locked),
                                  name=f"migration-{migration_id}", daemon=True)
        self._threads[migration_id] = thread
        thread.start()

    def _locked_run(self, migration_id: int, actor: str, recovering: bool,
                    locked: bool) -> None:
        """The run, holding its VM's lock (taken here for a resumed one)."""
        vm_lock = self.controller.vm_lock(self.get(migration_id).vm)
        if not locked:
            vm_lock.acquire()
        try:
            self._run(migration_id, actor, recovering)
        finally:
            vm_lock.release()

    def _run(self, migration_id: int, actor: str, recovering: bool) -> None:
        for attempt in range(CRASH_RETRIES + 1):
            try:
                # A fresh run each time: what the store says is where the last try got to.
                run = Run(self.controller, migration_id, self._cancel[migration_id],
                          self.notify, self.fence)
                if recovering:
                    recover(run)
                else:
                    forward(run, from_phase=Phase.PRECHECK)
                break
            except Fenced as exc:
                log.error("migration %s: stopped, %s", migration_id, exc)
                return          # the new leader resumes it
            except Exception:  # e.g. the store down: never leave the migration running
                log.exception("migration %s: the run broke (try %d)", migration_id,
                              attempt + 1)
                time.sleep(CRASH_BACKOFF_S * (attempt + 1))
                recovering = True     # whatever was done, the truth decides the way now
        else:
            self._give_up(migration_id)
        final = self.get(migration_id)
        events.record(self.store, actor, "migration.end", final.vm, final.state,
                      migration=migration_id, error=final.error)

    def _give_up(self, migration_id: int) -> None:
        """The last resort after every retry broke: failed, for an operator."""
        try:
            run = Run(self.controller, migration_id, self._cancel[migration_id], self.notify,
                      self.fence)
            if run.record["state"] in LIVE:
                run.finish(MigrationState.FAILED, "needs-operator: the run kept breaking "
                           "(see the controller log)")
        except Exception:
            log.exception("migration %s: could not record its failure", migration_id)

    def notify(self, record: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception:  # a slow or broken listener must not break a migration
                log.exception("migration listener failed")
