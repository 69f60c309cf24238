"""Live migration with the network in tow: one function per phase, run in the order of
``vmferry.model.migration.PHASES``. Each phase is recorded in the store before it acts and is
safe to run twice, so a restarted controller can finish (or undo) what a dead one began.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from vmferry import failpoints
from vmferry.agent.models import GuestRequest, MigrateRequest
from vmferry.controller import events, switchover
from vmferry.controller.auth import Principal
from vmferry.controller.profiles import profile_spec
from vmferry.controller.service import Controller
from vmferry.errors import (
    AgentError,
    CapacityError,
    ConflictError,
    InputError,
    MigrationError,
    NotFoundError,
    VmferryError,
    WaitTimeout,
)
from vmferry.model.fabric import path_between
from vmferry.model.migration import (
    PHASES,
    MigrationState,
    Phase,
    check_transition,
    past_point_of_no_return,
)
from vmferry.store.schema import HostRow, MigrationRow, VmRow

log = logging.getLogger(__name__)

DEFAULT_MAX_DOWNTIME_MS = 300
PROGRESS_INTERVAL_S = 0.05
SWITCHOVER_WAIT_S = 15.0
ACTIVE_QEMU_STATES = {"setup", "active", "pre-switchover", "device", "postcopy-active",
                      "postcopy-paused", "postcopy-recover", "wait-unplug", "cancelling"}


class Cancelled(MigrationError):
    pass


class Migrations:
    """Starts migrations, runs their phases in threads, rolls back or completes them."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.store = controller.store
        self._cancel: dict[int, threading.Event] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    # ---- API --------------------------------------------------------------------------------

    def start(self, vm: str, destination: str, options: dict[str, Any],
              actor: Principal) -> dict[str, Any]:
        """Record a migration and run it in the background; returns its record.

        Refuses (409) a second migration of the same VM and one beyond a host's limit."""
        topology = self.controller.topology()
        if destination not in {h.name for h in topology.hosts}:
            raise NotFoundError("to", f"unknown host {destination!r}")
        with self._lock, self.store.session() as session:
            row = session.get(VmRow, vm)
            if row is None:
                raise NotFoundError("vm", f"no VM named {vm!r}")
            running = list(session.scalars(select(MigrationRow).where(
                MigrationRow.state.in_([MigrationState.RUNNING.value,
                                        MigrationState.ROLLING_BACK.value]))))
            if any(m.vm == vm for m in running):
                raise ConflictError("vm", f"VM {vm!r} is already migrating")
            if row.state != "running":
                raise ConflictError("vm", f"VM {vm!r} is {row.state}, not running")
            if row.host == destination:
                raise InputError("to", f"VM {vm} already runs on {destination}")
            used = sum(v.memory_mib for v in session.scalars(
                select(VmRow).where(VmRow.host == destination)))
            free = topology.host(destination).memory_mib - used
            if row.memory_mib > free:
                raise CapacityError(f"to: host {destination} has {free} MiB free, {vm} needs "
                                    f"{row.memory_mib} MiB", field="to")
            for host in (row.host, destination):
                busy = sum(1 for m in running if host in (m.source, m.destination))
                limit = topology.host(host).max_migrations
                if busy >= limit:
                    raise ConflictError("to", f"host {host} already runs {busy} migrations "
                                        f"(limit {limit})")
            options = {**options}
            options.setdefault("max_downtime_ms", row.max_downtime_ms or DEFAULT_MAX_DOWNTIME_MS)
            record = MigrationRow(vm=vm, source=row.host, destination=destination,
                                  state=MigrationState.RUNNING.value, phase=Phase.PRECHECK.value,
                                  options=options, phases=[], result={})
            session.add(record)
            session.flush()
            migration_id = record.id
        events.record(self.store, actor.name, "migration.start", vm, "started",
                      migration=migration_id, source=row.host, destination=destination)
        self._launch(migration_id, actor.name)
        return self.get(migration_id)

    def get(self, migration_id: int) -> dict[str, Any]:
        with self.store.session() as session:
            row = session.get(MigrationRow, migration_id)
            if row is None:
                raise NotFoundError("id", f"no migration {migration_id}")
            return _out(row)

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.store.session() as session:
            rows = session.scalars(select(MigrationRow).order_by(MigrationRow.id.desc())
                                   .limit(limit))
            return [_out(r) for r in rows]

    def cancel(self, migration_id: int, actor: Principal) -> dict[str, Any]:
        record = self.get(migration_id)
        if record["state"] != MigrationState.RUNNING.value:
            raise ConflictError("id", f"migration {migration_id} is {record['state']}")
        if past_point_of_no_return(Phase(record["phase"])):
            raise ConflictError("id", f"migration {migration_id} is past switchover "
                                "and can only complete")
        self._cancel.setdefault(migration_id, threading.Event()).set()
        events.record(self.store, actor.name, "migration.cancel", record["vm"], "requested",
                      migration=migration_id)
        return self.get(migration_id)

    def wait(self, migration_id: int, timeout: float) -> dict[str, Any]:
        thread = self._threads.get(migration_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(migration_id)

    def resume_unfinished(self) -> list[int]:
        """After a controller restart: finish or undo every migration a dead controller left."""
        with self.store.session() as session:
            ids = [m.id for m in session.scalars(select(MigrationRow).where(
                MigrationRow.state.in_([MigrationState.RUNNING.value,
                                        MigrationState.ROLLING_BACK.value])))]
        for migration_id in ids:
            self._launch(migration_id, "controller-recovery", recovering=True)
        return ids

    # ---- the run ----------------------------------------------------------------------------

    def _launch(self, migration_id: int, actor: str, recovering: bool = False) -> None:
        self._cancel.setdefault(migration_id, threading.Event())
        thread = threading.Thread(target=self._run, args=(migration_id, actor, recovering),
                                  name=f"migration-{migration_id}", daemon=True)
        self._threads[migration_id] = thread
        thread.start()

    def _run(self, migration_id: int, actor: str, recovering: bool) -> None:
        run = _Run(self, migration_id)
        try:
            if recovering:
                run.recover()
            else:
                run.forward(from_phase=Phase.PRECHECK)
        except Exception as exc:  # the thread must record every ending
            log.exception("migration %s crashed", migration_id)
            run.finish(MigrationState.FAILED, f"internal error: {exc}")
        final = self.get(migration_id)
        events.record(self.store, actor, "migration.end", final["vm"], final["state"],
                      migration=migration_id, error=final["error"])

    def notify(self, record: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception:  # a slow or broken listener must not break a migration
                log.exception("migration listener failed")


class _Run:
    """One migration's phases. ``forward`` runs them; ``rollback`` undoes the first ones."""

    def __init__(self, owner: Migrations, migration_id: int) -> None:
        self.owner = owner
        self.controller = owner.controller
        self.store = owner.store
        self.id = migration_id
        record = owner.get(migration_id)
        self.vm: str = record["vm"]
        self.source: str = record["source"]
        self.destination: str = record["destination"]
        self.options: dict[str, Any] = record["options"]
        self.cancelled = owner._cancel.setdefault(migration_id, threading.Event())
        self._phase_started = 0.0

    # ---- driving ----------------------------------------------------------------------------

    def forward(self, from_phase: Phase) -> None:
        steps: dict[Phase, Callable[[], None]] = {
            Phase.PRECHECK: self.precheck,
            Phase.EXTEND_VLAN: self.extend_vlan,
            Phase.PRESET_PORT: self.preset_port,
            Phase.START_DESTINATION: self.start_destination,
            Phase.PRECOPY: self.precopy,
            Phase.SWITCHOVER: self.switchover,
            Phase.ANNOUNCE: self.announce,
            Phase.CLEAN_SOURCE: self.clean_source,
            Phase.PRUNE_VLAN: self.prune_vlan,
            Phase.VERIFY: self.verify,
        }
        for phase in PHASES[PHASES.index(from_phase):]:
            self.begin(phase)
            try:
                if self.cancelled.is_set() and not past_point_of_no_return(phase):
                    raise Cancelled("cancelled by the operator", vm=self.vm, phase=phase.value)
                failpoints.reached(f"hold-before:{phase.value}")
                steps[phase]()
                failpoints.reached(f"hold-after:{phase.value}")
            except VmferryError as exc:
                self.end(phase, ok=False, error=exc.message)
                if past_point_of_no_return(phase):
                    # The VM already runs on the destination: never roll back from here.
                    self.finish(MigrationState.FAILED,
                                f"{phase.value} failed after switchover: {exc.message}")
                    return
                self.rollback(f"{phase.value}: {exc.message}")
                return
            self.end(phase, ok=True)
        self.finish(MigrationState.COMPLETED, None)

    def recover(self) -> None:
        """Decide from what the hosts report, not from the journal alone, which way to go."""
        record = self.owner.get(self.id)
        phase = Phase(record["phase"])
        if record["state"] == MigrationState.ROLLING_BACK.value:
            self.rollback(record["error"] or "controller restarted during rollback")
            return
        if past_point_of_no_return(phase):
            self.forward(from_phase=phase)
            return
        if phase is Phase.PRECOPY and self._destination_took_over():
            # QEMU finished while the controller was away: the VM lives on the destination.
            self.forward(from_phase=Phase.SWITCHOVER)
            return
        self.rollback("the controller restarted before switchover")

    def _destination_took_over(self) -> bool:
        try:
            dst = self._agent(self.destination, "GET", f"/v1/guests/{self.vm}")
            src_state = self._guest_state(self.source)
        except VmferryError:
            return False
        return dst.get("state") == "running" and src_state in {"postmigrate", "absent",
                                                               "paused", "shutdown"}

    def rollback(self, reason: str) -> None:
        """Undo everything done for the destination; the VM keeps running on the source."""
        self._set_state(MigrationState.ROLLING_BACK, error=reason)
        problems: list[str] = []
        try:
            if self._guest_state(self.source) not in {"absent"}:
                progress = self._agent(self.source, "GET", f"/v1/guests/{self.vm}/migration")
                if progress.get("status") in ACTIVE_QEMU_STATES:
                    self._agent(self.source, "POST", f"/v1/guests/{self.vm}/migration/cancel")
                    self._wait_source_settled()
                if self._guest_state(self.source) == "paused":
                    self._agent(self.source, "POST", f"/v1/guests/{self.vm}/resume")
        except VmferryError as exc:
            problems.append(f"source: {exc.message}")
        try:
            self._agent(self.destination, "DELETE", f"/v1/guests/{self.vm}")
        except VmferryError as exc:
            problems.append(f"destination: {exc.message}")
        try:
            self.controller.reconcile_fabric()
        except VmferryError as exc:
            problems.append(f"fabric: {exc.message}")
        with self.store.session() as session:
            vm = session.get(VmRow, self.vm)
            if vm is not None:
                vm.state = "running"
                vm.host = self.source
        if problems:
            self.finish(MigrationState.FAILED, f"{reason}; rollback incomplete: "
                        + "; ".join(problems))
        else:
            self.finish(MigrationState.ROLLED_BACK, reason)

    # ---- the phases -------------------------------------------------------------------------

    def precheck(self) -> None:
        """Refuse with a reason before anything changes."""
        topology = self.controller.topology()
        with self.store.session() as session:
            vm = session.get(VmRow, self.vm)
            if vm is None:
                raise NotFoundError("vm", f"no VM named {self.vm!r}")
            if self.destination == vm.host:
                raise InputError("to", f"VM {self.vm} already runs on {self.destination}")
            used = sum(v.memory_mib for v in session.scalars(
                select(VmRow).where(VmRow.host == self.destination)))
            dst_host = session.get(HostRow, self.destination)
            src_host = session.get(HostRow, self.source)
            memory = vm.memory_mib
            vlan = vm.vlan
            if dst_host is not None and dst_host.maintenance:
                raise ConflictError("to", f"host {self.destination} is in maintenance")
            vm.state = "migrating"
        free = topology.host(self.destination).memory_mib - used
        if memory > free:
            raise CapacityError(f"host {self.destination} has {free} MiB free, "
                                f"{self.vm} needs {memory} MiB", field="to")
        if not path_between(topology, self.source, self.destination):
            raise MigrationError(f"VLAN {vlan} cannot be carried from {self.source} to "
                                 f"{self.destination}: no fabric path", vm=self.vm)
        src = self._report(self.source, src_host.report if src_host else {})
        dst = self._report(self.destination, dst_host.report if dst_host else {})
        if not dst.get("shared_storage_ok") or dst.get("shared_storage") != \
                src.get("shared_storage"):
            raise MigrationError(f"{self.destination} does not see the shared storage "
                                 f"{src.get('shared_storage')}", vm=self.vm)
        if not dst.get("migration_ip"):
            raise MigrationError(f"{self.destination} has no migration network address",
                                 vm=self.vm)
        src_major = _major(src.get("qemu_version", "0"))
        dst_major = _major(dst.get("qemu_version", "0"))
        if dst_major < src_major:
            raise MigrationError(f"QEMU {dst.get('qemu_version')} on {self.destination} cannot "
                                 f"take a guest from QEMU {src.get('qemu_version')}", vm=self.vm)
        machines = dst.get("machine_types") or []
        if machines and "q35" not in machines and not any(m.startswith("pc-q35") for m in
                                                          machines):
            raise MigrationError(f"{self.destination} cannot run machine type q35", vm=self.vm)
        self._record_result(plan={"vlan": vlan, "path": path_between(
            topology, self.source, self.destination)})

    def extend_vlan(self) -> None:
        """Carry the VM's VLAN on every trunk between the source and the destination: the
        store now says this migration's destination is an endpoint of the VM's VLAN."""
        self.controller.reconcile_fabric()

    def preset_port(self) -> None:
        """The destination port exists, with the VM's VLAN, before the VM does."""
        self._agent(self.destination, "PUT", f"/v1/ports/{self.vm}",
                    json=self._guest_request(incoming=True))

    def start_destination(self) -> None:
        info = self._agent(self.destination, "PUT", f"/v1/guests/{self.vm}",
                           json=self._guest_request(incoming=True), timeout=120)
        if not info.get("incoming_uri") and info.get("state") != "inmigrate":
            raise MigrationError(f"destination QEMU on {self.destination} is not waiting for "
                                 f"the stream (state {info.get('state')})", vm=self.vm)
        self._record_result(incoming_uri=info.get("incoming_uri"))

    def precopy(self) -> None:
        """Copy memory while the VM runs; QEMU stops it for the last round (stop-and-copy)."""
        record = self.owner.get(self.id)
        uri = record["result"].get("incoming_uri")
        if not uri:
            info = self._agent(self.destination, "GET", f"/v1/guests/{self.vm}")
            uri = info.get("incoming_uri")
        # A guest that itself arrived by migration reports that incoming migration as
        # "completed": only what this run recorded says whether the outgoing one was issued.
        if not record["result"].get("migrate_issued"):
            self._record_result(migrate_issued=True)
            body = MigrateRequest(uri=uri, max_downtime_ms=self.options["max_downtime_ms"],
                                  bandwidth_mbps=self.options.get("bandwidth_mbps"),
                                  postcopy=self.options.get("postcopy") == "auto",
                                  auto_converge=True)
            self._agent(self.source, "POST", f"/v1/guests/{self.vm}/migrate",
                        json=body.model_dump(mode="json"))
        timeout = float(self.options.get("timeout_s", 300))
        postcopy_after = float(self.options.get("postcopy_after_s", max(5.0, timeout / 3)))
        started = time.monotonic()
        postcopy_requested = False
        while True:
            progress = self._agent(self.source, "GET", f"/v1/guests/{self.vm}/migration")
            self._record_result(progress=progress)
            status = progress.get("status")
            switchover.during_precopy(self, progress)
            if status == "completed":
                self._record_result(qemu=progress)
                return
            if status in {"failed", "cancelled"}:
                raise MigrationError(f"QEMU migration {status}: "
                                     f"{progress.get('error') or 'no reason given'}", vm=self.vm)
            if status not in ACTIVE_QEMU_STATES:
                raise MigrationError(f"source QEMU reports migration status {status!r}",
                                     vm=self.vm)
            if self._guest_state(self.destination) == "absent":
                raise MigrationError(f"destination QEMU on {self.destination} died", vm=self.vm)
            elapsed = time.monotonic() - started
            if self.cancelled.is_set() and status != "postcopy-active":
                raise Cancelled("cancelled by the operator", vm=self.vm, phase="precopy")
            if (self.options.get("postcopy") == "auto" and not postcopy_requested
                    and elapsed > postcopy_after and status == "active"):
                self._agent(self.source, "POST", f"/v1/guests/{self.vm}/migration/postcopy")
                postcopy_requested = True
            if elapsed > timeout and status != "postcopy-active":
                raise WaitTimeout(f"the migration of {self.vm} to converge "
                                  f"(dirty rate {progress.get('dirty_pages_rate')} pages/s, "
                                  f"{progress.get('remaining_bytes')} bytes left)", timeout)
            time.sleep(PROGRESS_INTERVAL_S)

    def switchover(self) -> None:
        """The point of no return: the destination runs the VM; the store says so.

        QEMU reports "completed" on the source a few milliseconds before the destination
        leaves ``inmigrate``, so wait (bounded) for the destination to run."""
        deadline = time.monotonic() + SWITCHOVER_WAIT_S
        state = self._guest_state(self.destination)
        while state == "inmigrate" and time.monotonic() < deadline:
            time.sleep(0.02)
            state = self._guest_state(self.destination)
        if state == "paused":
            self._agent(self.destination, "POST", f"/v1/guests/{self.vm}/resume")
            state = self._guest_state(self.destination)
        if state not in {"running", "postmigrate"}:
            raise MigrationError(f"destination guest is {state}, not running "
                                 f"(waited {SWITCHOVER_WAIT_S:g}s)", vm=self.vm)
        with self.store.session() as session:
            vm = session.get(VmRow, self.vm)
            if vm is not None:
                vm.host = self.destination

    def announce(self) -> None:
        """Tell the fabric where the VM's MAC is now: RARPs from the guest's new port, and the
        switches on the old path forget the old location instead of waiting for it to age."""
        self._agent(self.destination, "POST", f"/v1/guests/{self.vm}/announce")
        mac = self._vm_row()["mac"]
        topology = self.controller.topology()
        switches = {s.name for s in topology.switches}
        fabric = self.controller.fabric_driver()
        for node in path_between(topology, self.source, self.destination):
            if node in switches:
                fabric.forget_mac(node, mac)
        switchover.close(self)      # the destination is confirmed: both-ways delivery ends

    def clean_source(self) -> None:
        """Stop the source QEMU and remove its port, flows, meters and tap."""
        self._agent(self.source, "DELETE", f"/v1/guests/{self.vm}")

    def prune_vlan(self) -> None:
        """The source is no endpoint any more (the VM's host changed at switchover)."""
        with self.store.session() as session:
            vm = session.get(VmRow, self.vm)
            if vm is not None:
                vm.state = "running"
        self.controller.reconcile_fabric()

    def verify(self) -> None:
        info = self._agent(self.destination, "GET", f"/v1/guests/{self.vm}")
        if info.get("state") != "running" or not info.get("port_present"):
            raise MigrationError(f"{self.vm} on {self.destination} is {info.get('state')}, "
                                 f"port present: {info.get('port_present')}", vm=self.vm)
        if self._guest_state(self.source) != "absent":
            raise MigrationError(f"{self.vm} still has a guest on {self.source}", vm=self.vm)

    # ---- bookkeeping ------------------------------------------------------------------------

    def begin(self, phase: Phase) -> None:
        self._phase_started = time.monotonic()
        with self.store.session() as session:
            row = session.get(MigrationRow, self.id)
            assert row is not None
            row.phase = phase.value
            row.phases = [*row.phases, {"phase": phase.value, "started": _now(), "ended": None,
                                        "ok": None}]
        self._notify()

    def end(self, phase: Phase, *, ok: bool, error: str | None = None) -> None:
        duration_ms = round((time.monotonic() - self._phase_started) * 1000, 1)
        with self.store.session() as session:
            row = session.get(MigrationRow, self.id)
            assert row is not None
            phases = [dict(p) for p in row.phases]
            for entry in reversed(phases):
                if entry["phase"] == phase.value and entry["ended"] is None:
                    entry.update(ended=_now(), ok=ok, duration_ms=duration_ms, error=error)
                    break
            row.phases = phases
        self._notify()

    def finish(self, state: MigrationState, error: str | None) -> None:
        switchover.close(self)      # every ending, also rollback, cancel and recovery
        self._set_state(state, error=error)
        if state is MigrationState.FAILED:
            with self.store.session() as session:
                vm = session.get(VmRow, self.vm)
                if vm is not None and vm.state == "migrating":
                    vm.state = "error"

    def _set_state(self, state: MigrationState, error: str | None = None) -> None:
        with self.store.session() as session:
            row = session.get(MigrationRow, self.id)
            assert row is not None
            current = MigrationState(row.state)
            if current is not state:
                check_transition(current, state)
            row.state = state.value
            if error is not None:
                row.error = error
            if state in {MigrationState.COMPLETED, MigrationState.ROLLED_BACK,
                         MigrationState.FAILED}:
                row.ended_at = datetime.now(UTC)
        self._notify()

    def _record_result(self, **values: Any) -> None:
        with self.store.session() as session:
            row = session.get(MigrationRow, self.id)
            assert row is not None
            row.result = {**row.result, **values}
        self._notify()

    def _notify(self) -> None:
        if self.owner.listeners:
            self.owner.notify(self.owner.get(self.id))

    def _vm_row(self) -> dict[str, Any]:
        with self.store.session() as session:
            vm = session.get(VmRow, self.vm)
            if vm is None:
                raise NotFoundError("vm", f"VM {self.vm} disappeared")
            return {"vlan": vm.vlan, "mac": vm.mac, "memory_mib": vm.memory_mib, "ip": vm.ip,
                    "workload_mibps": vm.workload_mibps, "profile": vm.profile}

    def _guest_request(self, *, incoming: bool) -> dict[str, Any]:
        vm = self._vm_row()
        return GuestRequest(name=self.vm, memory_mib=vm["memory_mib"], mac=vm["mac"],
                            ip=vm["ip"], vlan=vm["vlan"], workload_mibps=vm["workload_mibps"],
                            incoming=incoming, postcopy=self.options.get("postcopy") == "auto",
                            profile=profile_spec(self.store, vm["profile"]),
                            ).model_dump(mode="json")

    def _agent(self, host: str, method: str, path: str, *, json: Any = None,
               timeout: float = 30) -> Any:
        return self.controller.call_agent(host, method, path, json=json, timeout=timeout)

    def _guest_state(self, host: str) -> str:
        try:
            info = self._agent(host, "GET", f"/v1/guests/{self.vm}")
        except AgentError as exc:
            if exc.fields.get("status") == 404:
                return "absent"
            raise
        return str(info.get("state"))

    def _report(self, host: str, cached: dict[str, Any]) -> dict[str, Any]:
        try:
            report: dict[str, Any] = self._agent(host, "GET", "/v1/report", timeout=15)
            return report
        except VmferryError:
            if cached:
                return cached
            raise

    def _wait_source_settled(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            progress = self._agent(self.source, "GET", f"/v1/guests/{self.vm}/migration")
            if progress.get("status") not in ACTIVE_QEMU_STATES:
                return
            time.sleep(0.1)
        raise WaitTimeout(f"the source QEMU of {self.vm} to cancel its migration", timeout)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _out(row: MigrationRow) -> dict[str, Any]:
    return {"id": row.id, "vm": row.vm, "source": row.source, "destination": row.destination,
            "state": row.state, "phase": row.phase, "options": row.options,
            "phases": row.phases, "result": row.result, "error": row.error,
            "started_at": row.started_at.isoformat() if row.started_at else None,
            "ended_at": row.ended_at.isoformat() if row.ended_at else None}
