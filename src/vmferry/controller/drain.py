"""Moving many VMs: a host's drain (maintenance) and a balancing plan, run as live migrations
several at a time, within each host's migration limit and its migration link's bandwidth.

Destinations come from the placement model (``plan_drain``/``plan_balance``); each migration's
precheck asks placement again, so a plan overtaken by events is refused, not carried out: the
move is planned again once against the site as it is then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from vmferry.api.placement import BalanceOut, DrainOut, HostPlacementOut, MoveOut
from vmferry.controller import events
from vmferry.controller.auth import Principal
from vmferry.controller.migration import LIVE, Migrations, holds_slot, slots_taken
from vmferry.controller.placement import Placement, snapshot, verdict_out
from vmferry.errors import ConflictError, NotFoundError, VmferryError
from vmferry.model.migration import MigrationOptions, MigrationState
from vmferry.model.placement import HostState
from vmferry.model.placement_plans import plan_drain
from vmferry.store.schema import HostRow

log = logging.getLogger(__name__)

MOVE_TIMEOUT_S = 600.0
# A move's end wakes the drain at once (a migration listener); this bounds the wait for ends
# it cannot hear of (another controller's migrations holding a slot).
POLL_S = 0.5


class Mover:
    """Drains hosts and carries out balancing plans; one job per host at a time."""

    def __init__(self, migrations: Migrations) -> None:
        self.migrations = migrations
        self.controller = migrations.controller
        self.placement = Placement(self.controller)
        self._jobs: dict[str, DrainOut] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        # One per running job, set whenever some migration ends: a freed slot is taken at
        # once, not at the next poll.
        self._wakers: set[threading.Event] = set()
        migrations.listeners.append(self._on_migration)

    def _on_migration(self, record: dict[str, object]) -> None:
        # A slot frees when a move switches over, not only when it ends (migration.holds_slot).
        if not holds_slot(str(record.get("state")), str(record.get("phase"))):
            for waker in list(self._wakers):
                waker.set()

    # ---- drain ------------------------------------------------------------------------------

    def drain(self, host: str, actor: Principal) -> DrainOut:
        """Put ``host`` in maintenance and move every VM away. Refused (409, nothing changed)
        when some VM has nowhere to go: the error carries every host's reasons per VM."""
        self.controller.topology().host(host)
        with self._lock:
            thread = self._threads.get(host)
            if thread is not None and thread.is_alive():
                raise ConflictError("host", f"host {host} is already being drained")
            cluster = snapshot(self.controller)
            cluster.hosts[host].state = HostState.MAINTENANCE
            plan = plan_drain(cluster, host)
            if plan.stuck:
                stuck = {vm: [verdict_out(cluster, v) for v in verdicts]
                         for vm, verdicts in plan.stuck.items()}
                events.record(self.controller.store, actor.name, "host.drain", host, "refused",
                              stuck=sorted(stuck))
                raise ConflictError("host", f"cannot drain {host}: "
                                    + "; ".join(f"{vm} has nowhere to go ({_summary(v)})"
                                                for vm, v in stuck.items()),
                                    stuck={vm: [v.model_dump() for v in vs]
                                           for vm, vs in stuck.items()})
            self._set_maintenance(host, True)
            job = DrainOut(host=host, state="running", started_at=_now(),
                           link_mbps=self.controller.topology().host(host).migration_mbps,
                           moves=[MoveOut(vm=m.vm, source=m.source, destination=m.destination,
                                          memory_mib=m.memory_mib) for m in plan.moves])
            self._jobs[host] = job
            events.record(self.controller.store, actor.name, "host.drain", host, "started",
                          moves=[m.model_dump() for m in job.moves])
            self._start(host, lambda: self._run(job, actor))
        return job.model_copy(deep=True)

    def drain_status(self, host: str) -> DrainOut:
        with self._lock:
            job = self._jobs.get(host)
            if job is None:
                raise NotFoundError("host", f"no drain of {host} since the controller started")
            return job.model_copy(deep=True)

    def wait(self, host: str, timeout: float) -> DrainOut:
        """The drain of ``host`` once it has ended (or ``timeout`` s passed: still running)."""
        with self._lock:
            thread = self._threads.get(host)
        if thread is not None:
            thread.join(timeout)
        return self.drain_status(host)

    def undrain(self, host: str, actor: Principal) -> None:
        """Take ``host`` out of maintenance (after its drain has ended)."""
        self.controller.topology().host(host)
        with self._lock:
            thread = self._threads.get(host)
            if thread is not None and thread.is_alive():
                raise ConflictError("host", f"host {host} is being drained right now")
        self._set_maintenance(host, False)
        events.record(self.controller.store, actor.name, "host.undrain", host, "ok")

    def _set_maintenance(self, host: str, on: bool) -> None:
        with self.controller.store.session() as session:
            row = session.get(HostRow, host)
            if row is None:
                raise NotFoundError("host", f"unknown host {host!r}")
            row.maintenance = on

    # ---- balance ----------------------------------------------------------------------------

    def balance(self, max_moves: int, dry_run: bool, actor: Principal) -> BalanceOut:
        _, out = self.placement.balance_plan(max_moves)
        out.dry_run = dry_run
        if dry_run or not out.moves:
            out.state = "planned" if dry_run else "done"
            return out
        with self._lock:
            busy = [h for h, t in self._threads.items() if t.is_alive()]
            if busy:
                raise ConflictError("balance", f"drains or balancing run on {sorted(busy)}")
            job = DrainOut(host="*balance*", state="running", started_at=_now(),
                           moves=[m.model_copy() for m in out.moves])
            self._jobs[job.host] = job
            events.record(self.controller.store, actor.name, "balance", "site", "started",
                          moves=[m.model_dump() for m in out.moves])
        self._run(job, actor)          # the caller waits: balancing is bounded in moves
        out.moves = job.moves
        out.state = job.state
        return out

    # ---- running moves ----------------------------------------------------------------------

    def _start(self, key: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"drain-{key}", daemon=True)
        self._threads[key] = thread
        thread.start()

    def _run(self, job: DrainOut, actor: Principal) -> None:
        try:
            self._execute(job, actor)
        except Exception:  # the job must record every ending
            log.exception("moves of %s crashed", job.host)
            with self._lock:
                job.state = "failed"
        with self._lock:
            if job.state == "running":
                failed = [m for m in job.moves if m.state != MigrationState.COMPLETED.value]
                job.state = "failed" if failed else "done"
            job.ended_at = _now()
            job.bytes_total = self._bytes(job)
        events.record(self.controller.store, actor.name,
                      "balance" if job.host == "*balance*" else "host.drain", job.host,
                      job.state, moves=[m.model_dump() for m in job.moves])

    def _execute(self, job: DrainOut, actor: Principal) -> None:
        """Start moves whenever both ends have a free migration slot (a move frees its slots
        once its guest has switched over: ``migration.holds_slot``); each gets its share of
        the source's migration link. Woken by every switchover and end; ends when every move
        has ended."""
        ended = threading.Event()
        self._wakers.add(ended)
        try:
            self._moves(job, actor, ended)
        finally:
            self._wakers.discard(ended)

    def _moves(self, job: DrainOut, actor: Principal, ended: threading.Event) -> None:
        topology = self.controller.topology()
        deadline = time.monotonic() + MOVE_TIMEOUT_S * max(1, len(job.moves))
        replanned: set[str] = set()
        while time.monotonic() < deadline:
            # Cleared before the states are read: an end after the read wakes the wait below.
            ended.clear()
            self._follow(job, replanned)
            pending = [m for m in job.moves if m.state == "planned"]
            running = [m for m in job.moves if m.state == "running"]
            if not pending and not running:
                return
            with self.controller.store.session() as session:
                busy = slots_taken(session)
            for move in pending:
                src, dst = topology.host(move.source), topology.host(move.destination)
                if busy.get(move.source, 0) >= src.max_migrations or \
                        busy.get(move.destination, 0) >= dst.max_migrations:
                    continue
                # The link is shared by the moves that copy on it (a move past switchover
                # sends nothing more), this one and those that will start beside it.
                sharing = min(src.max_migrations, len(pending) + busy.get(move.source, 0))
                move.bandwidth_mbps = max(1, min(src.migration_mbps, dst.migration_mbps)
                                          // max(1, sharing))
                self._launch(move, actor)
                busy[move.source] = busy.get(move.source, 0) + 1
                busy[move.destination] = busy.get(move.destination, 0) + 1
            ended.wait(POLL_S)
        with self._lock:
            job.state = "failed"

    def _launch(self, move: MoveOut, actor: Principal) -> None:
        options = MigrationOptions.model_validate({"bandwidth_mbps": move.bandwidth_mbps})
        move.started_at = _now()
        try:
            record = self.migrations.start(move.vm, move.destination, options, actor)
        except VmferryError as exc:
            with self._lock:
                move.state, move.error, move.ended_at = "failed", exc.message, _now()
            return
        with self._lock:
            move.state, move.migration_id = "running", record.id

    def _follow(self, job: DrainOut, replanned: set[str]) -> None:
        """Read the running moves' ends; a failed move is planned once more."""
        for move in [m for m in job.moves if m.state == "running" and m.migration_id]:
            assert move.migration_id is not None
            record = self.migrations.get(move.migration_id)
            if record.state in LIVE:
                continue
            with self._lock:
                move.state, move.error, move.ended_at = record.state, record.error, _now()
        for move in [m for m in job.moves if m.state in ("failed", "rolled-back")]:
            if move.vm in replanned or job.host == "*balance*":
                continue
            replanned.add(move.vm)
            cluster = snapshot(self.controller)
            cluster.hosts[job.host].state = HostState.MAINTENANCE
            target = cluster.best_host(move.vm) if move.vm in cluster.vms else None
            if target is not None:
                with self._lock:
                    move.destination, move.state, move.error = target, "planned", None
                    move.migration_id = move.started_at = move.ended_at = None

    def _bytes(self, job: DrainOut) -> int:
        """Bytes QEMU sent for the job's completed migrations (its own figure)."""
        total = 0
        for move in job.moves:
            if move.migration_id is None:
                continue
            qemu = self.migrations.get(move.migration_id).result.qemu
            if qemu is not None:
                total += qemu.transferred_bytes
        return total


def _summary(verdicts: list[HostPlacementOut]) -> str:
    """How many hosts refuse for each reason, for a one-line message."""
    counts: dict[str, int] = {}
    for verdict in verdicts:
        for reason in verdict.reasons:
            counts[reason.code] = counts.get(reason.code, 0) + 1
    return ", ".join(f"{code} on {n} hosts" for code, n in sorted(counts.items()))


def _now() -> str:
    return datetime.now(UTC).isoformat()
