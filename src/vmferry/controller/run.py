"""One migration's bookkeeping: its record in the store, the in-memory copy listeners see, the
clients of its two hosts and its make-before-break. The phases (``controller.phases``) and the
way back (``controller.recovery``) act through a ``Run``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from vmferry.api.agent import GuestRequest, MigrationProgress
from vmferry.api.agent_client import AgentClient
from vmferry.api.controller import MigrationRecord
from vmferry.controller import nat
from vmferry.controller.profiles import stored_profile
from vmferry.controller.service import Controller
from vmferry.controller.switchover import MakeBeforeBreak, SwitchoverContext
from vmferry.errors import MigrationError, NotFoundError, VmferryError
from vmferry.model.migration import MigrationOptions, MigrationState, Phase, check_transition
from vmferry.store.db import Store
from vmferry.store.schema import MigrationRow, NatLeaseRow, VmRow

log = logging.getLogger(__name__)

# Progress reaches listeners (the event stream) at once, the store at most this often.
PROGRESS_PERSIST_S = 0.5
# How long a write waits for a store that is down (connection refused or dropped).
STORE_RETRY_S = 20.0
STORE_RETRY_POLL_S = 0.5
FINAL = {MigrationState.COMPLETED, MigrationState.ROLLED_BACK, MigrationState.FAILED}

Listener = Callable[[dict[str, Any]], None]
# Raises ``leader.Fenced`` when this controller may not write any more (LeaderLease.check).
Fence = Callable[[Session], None]


class Cancelled(MigrationError):
    pass


def record_of(row: MigrationRow) -> dict[str, Any]:
    """The API's view of a migration row (``MigrationRecord`` as JSON)."""
    return {"id": row.id, "vm": row.vm, "source": row.source, "destination": row.destination,
            "state": row.state, "phase": row.phase, "options": row.options,
            "phases": row.phases, "result": row.result, "error": row.error,
            "started_at": row.started_at.isoformat() if row.started_at else None,
            "ended_at": row.ended_at.isoformat() if row.ended_at else None}


def load(store: Store, migration_id: int) -> MigrationRecord:
    with store.session() as session:
        row = session.get(MigrationRow, migration_id)
        if row is None:
            raise NotFoundError("id", f"no migration {migration_id}")
        return MigrationRecord.model_validate(record_of(row))


class Run:
    """The state of one migration while a controller drives it."""

    def __init__(self, controller: Controller, migration_id: int, cancelled: threading.Event,
                 notify: Listener, fence: Fence | None = None) -> None:
        self.controller = controller
        self.fence = fence
        self.store = controller.store
        self.id = migration_id
        self.cancelled = cancelled
        self._notify = notify
        with self.store.session() as session:
            row = session.get(MigrationRow, migration_id)
            if row is None:
                raise NotFoundError("id", f"no migration {migration_id}")
            self.record: dict[str, Any] = record_of(row)
        self.vm: str = self.record["vm"]
        self.source: str = self.record["source"]
        self.destination: str = self.record["destination"]
        self.options = MigrationOptions.model_validate(self.record["options"])
        self.mbb: MakeBeforeBreak | None = None
        self._phase_started = 0.0
        self._persisted_at = 0.0
        self._cpu_started = time.thread_time()

    # ---- hosts --------------------------------------------------------------------------------

    @property
    def src(self) -> AgentClient:
        return self.controller.agent(self.source)

    @property
    def dst(self) -> AgentClient:
        return self.controller.agent(self.destination)

    def vm_row(self) -> VmRow:
        """A detached copy of the VM's row. Raises ``NotFoundError``."""
        with self.store.session() as session:
            vm = session.get(VmRow, self.vm)
            if vm is None:
                raise NotFoundError("vm", f"VM {self.vm} disappeared")
            session.expunge(vm)
            return vm

    def guest_request(self, *, incoming: bool) -> GuestRequest:
        vm = self.vm_row()
        with self.session() as session:        # moved by NAT: the rack's VLAN in the rack
            vlan = nat.vlan_at(self.controller.topology(), session.get(NatLeaseRow, self.vm),
                               vm.vlan, self.destination if incoming else self.source)
        return GuestRequest(name=self.vm, memory_mib=vm.memory_mib, mac=vm.mac, ip=vm.ip,
                            vlan=vlan, workload_mibps=vm.workload_mibps, incoming=incoming,
                            migration_peer=self.source if incoming else None,
                            postcopy=self.options.postcopy_allowed,
                            profile=stored_profile(self.store, vm.profile),
                            memcheck_mib=vm.memcheck_mib,
                            hotplug_ports=self.controller.topology().guest_hotplug)

    def last_event_seq(self, host: str) -> int:
        """The newest event number of the guest on ``host`` (0: none, or no events route)."""
        try:
            events = self.controller.agent(host).guest_events(self.vm, 0, 0)
        except VmferryError:
            return 0
        return events[-1].seq if events else 0

    def make_before_break(self) -> MakeBeforeBreak | None:
        """This run's make-before-break (None when the options turn it off)."""
        if self.mbb is None and self.options.make_before_break:
            vm = self.vm_row()
            self.mbb = MakeBeforeBreak(SwitchoverContext(
                migration_id=self.id, vm=self.vm, mac=vm.mac, vlan=vm.vlan, source=self.source,
                destination=self.destination, has_profile=vm.profile is not None,
                topology=self.controller.topology(), fabric=self.controller.fabric_driver(),
                agent=self.controller.agent, record=self.record_result))
        return self.mbb

    def close_switchover(self, arrived: bool = False) -> bool:
        """Remove the make-before-break rules and pins, wherever they are (every ending calls
        this; ``arrived``: the destination runs the guest, the pins move there first).
        True when a switch held the MAC pinned (it learns the new place from the pin)."""
        if not self.options.make_before_break:
            return False
        held = 0
        try:
            mbb = self.make_before_break()
            assert mbb is not None
            problems = mbb.close(arrived=arrived)
            held = mbb.pins_held
        except Exception as exc:  # an ending must not fail on its cleanup; recorded below
            log.exception("migration %s: closing the switchover rules failed", self.id)
            problems = [str(exc)]
        self.record_result(make_before_break="removed" if not problems else "removal-failed",
                           make_before_break_problems=problems)
        return held > 0

    # ---- the record ---------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A store session for a write of this run: fenced (``controller.leader``), so a
        controller that is not the leader any more cannot write."""
        with self.store.session() as session:
            if self.fence is not None:
                self.fence(session)
            yield session

    def _write(self, change: Callable[[MigrationRow], None]) -> None:
        # A store that is down for a moment (a database restart) is waited for, bounded: the
        # write is retried whole (nothing of it was committed). Longer than the leader lease,
        # the fence (``LeaderLease.check``) stops this controller anyway.
        deadline = time.monotonic() + STORE_RETRY_S
        while True:
            try:
                with self.session() as session:
                    row = session.get(MigrationRow, self.id)
                    assert row is not None
                    change(row)
                    session.flush()
                    self.record = record_of(row)
                break
            except OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("migration %s: the store refused a write (%s): retrying", self.id,
                            str(exc.orig or exc).splitlines()[0][:200])
                time.sleep(STORE_RETRY_POLL_S)
        self._persisted_at = time.monotonic()
        self._notify(self.record)

    def begin(self, phase: Phase) -> None:
        self._phase_started = time.monotonic()

        def change(row: MigrationRow) -> None:
            row.phase = phase.value
            row.phases = [*row.phases, {"phase": phase.value, "started": _now(), "ended": None,
                                        "ok": None}]
        self._write(change)

    def end(self, phase: Phase, *, ok: bool, error: str | None = None) -> None:
        duration_ms = round((time.monotonic() - self._phase_started) * 1000, 1)

        def change(row: MigrationRow) -> None:
            phases = [dict(p) for p in row.phases]
            for entry in reversed(phases):
                if entry["phase"] == phase.value and entry["ended"] is None:
                    entry.update(ended=_now(), ok=ok, duration_ms=duration_ms, error=error)
                    break
            row.phases = phases
        self._write(change)

    def set_state(self, state: MigrationState, error: str | None = None) -> None:
        def change(row: MigrationRow) -> None:
            current = MigrationState(row.state)
            if current is not state:
                check_transition(current, state)
            row.state = state.value
            if error is not None:
                row.error = error
            if state in FINAL:
                row.ended_at = datetime.now(UTC)
        self._write(change)

    def finish(self, state: MigrationState, error: str | None) -> None:
        """End the run: switchover rules gone, CPU time recorded, the final state set."""
        self.close_switchover()
        self.record_result(controller_cpu_ms=round(
            (time.thread_time() - self._cpu_started) * 1000, 1))
        self.set_state(state, error=error)
        if state is MigrationState.FAILED:
            with self.session() as session:
                vm = session.get(VmRow, self.vm)
                if vm is not None and vm.state == "migrating":
                    vm.state = "error"

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = self.record["result"]
        return result

    def record_result(self, **values: Any) -> None:
        def change(row: MigrationRow) -> None:
            row.result = {**row.result, **values}
        self._write(change)

    def record_event(self, name: str, timestamp: float) -> None:
        """A QMP event timestamp (``result.events``), the first of its kind only."""
        events = dict(self.result().get("events") or {})
        if events.get(name) is None:
            events[name] = timestamp
            self.record_result(events=events)

    def progress(self, progress: MigrationProgress) -> None:
        """New migration progress: listeners hear of it now, the store at a bounded rate."""
        data = progress.model_dump(mode="json")
        if time.monotonic() - self._persisted_at >= PROGRESS_PERSIST_S:
            self.record_result(progress=data)
            return
        self.record = {**self.record, "result": {**self.record["result"], "progress": data}}
        self._notify(self.record)


def _now() -> str:
    return datetime.now(UTC).isoformat()
