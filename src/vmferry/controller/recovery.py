"""Driving a run: forward through the phases, back (rollback) before the point of no
return, and the decision a restarted controller makes about a migration a dead one left."""

from __future__ import annotations

import time

from vmferry import failpoints
from vmferry.controller.phases import STEPS
from vmferry.controller.precopy import ACTIVE_QEMU_STATES
from vmferry.controller.run import Cancelled, Run
from vmferry.errors import VmferryError, WaitTimeout
from vmferry.model.migration import PHASES, MigrationState, Phase, past_point_of_no_return
from vmferry.store.schema import VmRow

SETTLE_TIMEOUT_S = 20.0


def forward(run: Run, from_phase: Phase) -> None:
    """Run the phases from ``from_phase`` on; roll back on a failure before switchover."""
    for phase in PHASES[PHASES.index(from_phase):]:
        run.begin(phase)
        try:
            if run.cancelled.is_set() and not past_point_of_no_return(phase):
                raise Cancelled("cancelled by the operator", vm=run.vm, phase=phase.value)
            failpoints.reached(f"hold-before:{phase.value}")
            STEPS[phase](run)
            failpoints.reached(f"hold-after:{phase.value}")
        except VmferryError as exc:
            run.end(phase, ok=False, error=exc.message)
            if past_point_of_no_return(phase):
                # The VM already runs on the destination: never roll back from here.
                run.finish(MigrationState.FAILED,
                           f"{phase.value} failed after switchover: {exc.message}")
                return
            rollback(run, f"{phase.value}: {exc.message}")
            return
        run.end(phase, ok=True)
    run.finish(MigrationState.COMPLETED, None)


def recover(run: Run) -> None:
    """Decide from what the hosts report, not from the journal alone, which way to go."""
    phase = Phase(run.record["phase"])
    if run.record["state"] == MigrationState.ROLLING_BACK.value:
        rollback(run, run.record["error"] or "controller restarted during rollback")
        return
    if past_point_of_no_return(phase):
        forward(run, from_phase=phase)
        return
    if phase is Phase.PRECOPY and destination_took_over(run):
        # QEMU finished while the controller was away: the VM lives on the destination.
        forward(run, from_phase=Phase.SWITCHOVER)
        return
    rollback(run, "the controller restarted before switchover")


def destination_took_over(run: Run) -> bool:
    try:
        destination = run.dst.guest_state(run.vm)
        source = run.src.guest_state(run.vm)
    except VmferryError:
        return False
    return destination == "running" and source in {"postmigrate", "absent", "paused",
                                                   "shutdown"}


def rollback(run: Run, reason: str) -> None:
    """Undo everything done for the destination; the VM keeps running on the source."""
    run.set_state(MigrationState.ROLLING_BACK, error=reason)
    problems: list[str] = []
    try:
        if run.src.guest_state(run.vm) != "absent":
            if run.src.migration(run.vm).status in ACTIVE_QEMU_STATES:
                run.src.cancel_migration(run.vm)
                wait_source_settled(run)
            if run.src.guest_state(run.vm) == "paused":
                run.src.resume(run.vm)
    except VmferryError as exc:
        problems.append(f"source: {exc.message}")
    try:
        run.dst.delete_guest(run.vm)
    except VmferryError as exc:
        problems.append(f"destination: {exc.message}")
    try:
        run.controller.reconcile_fabric()
    except VmferryError as exc:
        problems.append(f"fabric: {exc.message}")
    with run.store.session() as session:
        vm = session.get(VmRow, run.vm)
        if vm is not None:
            vm.state = "running"
            vm.host = run.source
    if problems:
        run.finish(MigrationState.FAILED, f"{reason}; rollback incomplete: "
                   + "; ".join(problems))
    else:
        run.finish(MigrationState.ROLLED_BACK, reason)


def wait_source_settled(run: Run, timeout: float = SETTLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.src.migration(run.vm).status not in ACTIVE_QEMU_STATES:
            return
        time.sleep(0.1)
    raise WaitTimeout(f"the source QEMU of {run.vm} to cancel its migration", timeout)
