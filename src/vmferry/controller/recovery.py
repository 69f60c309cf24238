"""Driving a run: forward through the phases, and -- when a phase fails before switchover, or a
restarted controller finds a migration a dead one left -- the way out the two QEMUs' own state
decides (``controller.truth``): forward, follow the postcopy, re-link a paused postcopy
(``recover_postcopy``), roll back, or hold for an operator. Never from the recorded phase
alone: a rollback must not delete the running VM."""

from __future__ import annotations

import logging
import time

from vmferry import failpoints
from vmferry.controller import dual_nic, nat, route_way
from vmferry.controller import truth as truths
from vmferry.controller.leader import Fenced
from vmferry.controller.migration_uri import incoming_uri
from vmferry.controller.phases import STEPS
from vmferry.controller.run import Cancelled, Run
from vmferry.controller.truth import (
    BACKOFF_S,
    DESTINATION_USABLE,
    POSTCOPY_STUCK,
    PRECOPY_ACTIVE,
    Decision,
    End,
    Truth,
    Way,
    decide,
    decide_patiently,
    read_end,
    read_truth,
)
from vmferry.errors import HostUnavailableError, VmferryError, WaitTimeout
from vmferry.model.migration import PHASES, MigrationState, Phase, past_point_of_no_return
from vmferry.store.schema import VmRow

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 20.0
# How many times one run may turn around (forward -> decision -> forward ...) before an
# operator is asked: a decision that keeps failing must not loop for ever.
MAX_TURNS = 3
NEEDS_OPERATOR = "needs-operator"
# How long a paused postcopy waits for its link to come back before it is held for an
# operator (both halves kept).
RECOVER_WAIT_S = 120.0
# Postcopy statuses of a re-link under way (QEMU >= 9.1 has the setup step).
RELINKING = {"postcopy-recover-setup", "postcopy-recover"}
# Longest wait for the source's next event while a re-link is under way.
RELINK_EVENT_S = 5.0


def forward(run: Run, from_phase: Phase, turns: int = 0) -> None:
    """Run the phases from ``from_phase`` on. A failure before switchover is settled by the
    hypervisors' truth; after it, the VM runs on the destination and is completed forward."""
    for phase in PHASES[PHASES.index(from_phase):]:
        run.begin(phase)
        try:
            # A turn decided by QEMU's truth (e.g. a cancel that came after completion)
            # goes on whatever the operator asked.
            if turns == 0 and run.cancelled.is_set() and not past_point_of_no_return(phase):
                raise Cancelled("cancelled by the operator", vm=run.vm, phase=phase.value)
            failpoints.reached(f"hold-before:{phase.value}")
            _step(run, phase)
            failpoints.reached(f"hold-after:{phase.value}")
        except Fenced:
            raise               # not the leader any more: stop at once, decide nothing
        except Exception as exc:  # every error, not only ours, goes through the decision
            message = exc.message if isinstance(exc, VmferryError) else \
                f"internal error: {type(exc).__name__}: {exc}"
            if not isinstance(exc, VmferryError):
                log.exception("migration %s: %s failed", run.id, phase.value)
            run.end(phase, ok=False, error=message)
            if past_point_of_no_return(phase):
                # The VM already runs on the destination: never roll back from here.
                run.finish(MigrationState.FAILED, f"{NEEDS_OPERATOR}: {phase.value} failed "
                           f"after switchover: {message}")
                return
            settle(run, f"{phase.value}: {message}", turns)
            return
        run.end(phase, ok=True)
    run.finish(MigrationState.COMPLETED, None)


def _step(run: Run, phase: Phase) -> None:
    """One phase. After switchover a host that does not answer is waited for (bounded):
    every phase there is idempotent and the only way is forward."""
    deadline = time.monotonic() + truths.UNREACHABLE_WAIT_S
    attempt = 0
    while True:
        try:
            STEPS[phase](run)
            return
        except HostUnavailableError:
            if not past_point_of_no_return(phase) or time.monotonic() >= deadline:
                raise
        time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        attempt += 1


def recover(run: Run) -> None:
    """A migration a dead controller left: past switchover it goes on; before, the two
    QEMUs decide."""
    phase = Phase(run.record["phase"])
    if run.record["state"] == MigrationState.ROLLING_BACK.value:
        settle(run, run.record["error"] or "the controller restarted during rollback")
        return
    if past_point_of_no_return(phase):
        forward(run, from_phase=phase)
        return
    settle(run, "the controller restarted before switchover")


def truth_of(run: Run) -> Truth:
    return read_truth(lambda: run.src, lambda: run.dst, run.vm)


def settle(run: Run, reason: str, turns: int = 0) -> None:
    """The way out of a migration that cannot go on as it was, from the QEMUs' state."""
    decision, truth = decide_patiently(lambda: truth_of(run),
                                       issued=bool(run.result().get("migrate_issued")),
                                       recoverable=recoverable(run))
    _note(run, decision, truth)
    take(run, decision, reason, turns)


def recoverable(run: Run) -> bool:
    """A paused postcopy can be re-linked by vmferry only between two QEMU hosts."""
    topology = run.controller.topology()
    return all(topology.host(h).hypervisor == "qemu" for h in (run.source, run.destination))


def take(run: Run, decision: Decision, reason: str, turns: int) -> None:
    if decision.way in {Way.FORWARD, Way.FOLLOW}:
        if turns >= MAX_TURNS:
            hold(run, reason, Decision(Way.HOLD, f"{decision.reason}, but going forward "
                                       f"failed {turns} times"))
            return
        if run.record["state"] == MigrationState.ROLLING_BACK.value:
            run.set_state(MigrationState.RUNNING)
        run.record_result(turned_forward=reason)
        forward(run, Phase.SWITCHOVER if decision.way is Way.FORWARD else Phase.PRECOPY,
                turns + 1)
    elif decision.way is Way.ROLLBACK:
        rollback(run, reason, turns)
    elif decision.way is Way.RECOVER:
        recover_postcopy(run, reason, turns)
    else:
        hold(run, reason, decision)


def recover_postcopy(run: Run, reason: str, turns: int) -> None:
    """A paused postcopy: the destination runs the guest, the source holds the pages not yet
    sent. Re-link them -- ``migrate-recover`` on the destination, ``migrate`` with resume on
    the source -- as soon as the link lets a connection through, then follow the postcopy
    to completed. No QEMU is stopped, resumed or deleted here; a link that stays down for
    RECOVER_WAIT_S holds the migration for an operator with both halves kept."""
    run.record_result(postcopy_paused=reason)
    deadline = time.monotonic() + RECOVER_WAIT_S
    cursor = run.last_event_seq(run.source)
    attempts, next_attempt = 0, 0.0
    while True:
        truth = truth_of(run)
        s = truth.source
        if s.reachable and s.migration not in POSTCOPY_STUCK:
            # Going again (or over): QEMU's truth says what comes next. The follower starts
            # after the pause's events, which it would take for a new failure.
            run.record_result(postcopy_relinks=attempts,
                              source_event_seq=run.last_event_seq(run.source))
            decision = decide(truth, issued=True)
            _note(run, decision, truth)
            take(run, decision, reason, turns)
            return
        if run.cancelled.is_set():
            # Nothing can be given back to the source now: the operator decides.
            hold(run, reason, Decision(Way.HOLD, f"postcopy is {s.migration} and the "
                                       "migration was cancelled: both ends keep their part "
                                       "of the guest"))
            return
        now = time.monotonic()
        if now >= deadline:
            hold(run, reason, Decision(Way.HOLD, f"postcopy is {s.migration} and could not "
                                       f"be re-linked in {RECOVER_WAIT_S:g}s ({attempts} "
                                       "attempts): both ends keep their part of the guest"))
            return
        if s.migration == "postcopy-paused" and now >= next_attempt:
            attempts += 1
            _relink(run, truth.destination)
            next_attempt = time.monotonic() + BACKOFF_S[min(attempts, len(BACKOFF_S) - 1)]
        # Paused: the next attempt comes after a backoff. Re-linking (or the source away):
        # its next event says how it went. Either way the source's next MIGRATION event
        # wakes this up early.
        until = next_attempt if s.migration == "postcopy-paused" else now + RELINK_EVENT_S
        wait = max(0.05, min(until, deadline) - time.monotonic())
        cursor = _wait_source_event(run, cursor, wait)


def _relink(run: Run, destination: End) -> None:
    """One attempt to reconnect a paused postcopy (failures are logged: the next attempt
    or the deadline decides)."""
    try:
        if destination.migration == "postcopy-active":
            # Its end of a hung stream has not failed yet: break it so it can listen.
            run.dst.pause_migration(run.vm)
            return
        if destination.migration == "postcopy-paused":
            reported = run.dst.recover_incoming(run.vm)
            run.record_result(recover_uri=incoming_uri(
                run.controller.topology(), run.destination, reported, vm=run.vm))
        elif destination.migration not in RELINKING:
            log.warning("migration %s: destination is %s/%s: cannot re-link", run.id,
                        destination.state, destination.migration)
            return
        uri = run.result().get("recover_uri")
        if uri:
            run.src.resume_migration(run.vm, str(uri))
    except VmferryError as exc:
        log.info("migration %s: postcopy re-link failed: %s", run.id, exc.message)


def _wait_source_event(run: Run, cursor: int, wait: float) -> int:
    """Wait (at most ``wait`` s) for the source guest's next event; returns the new cursor."""
    try:
        events = run.src.guest_events(run.vm, cursor, wait)
    except VmferryError:
        time.sleep(wait)        # no events route (or the agent is away): wait it out
        return cursor
    return events[-1].seq if events else cursor


def hold(run: Run, reason: str, decision: Decision) -> None:
    """No automatic way out: the migration fails with what an operator must decide. Nothing
    is deleted and no guest is resumed."""
    log.warning("migration %s held for an operator: %s", run.id, decision.reason)
    run.finish(MigrationState.FAILED, f"{NEEDS_OPERATOR}: {decision.reason} ({reason})")


def rollback(run: Run, reason: str, turns: int = 0) -> None:
    """Give the VM back to the source: cancel a copy in progress, resume the source, remove
    what was made for the destination -- each step re-checked against QEMU's state."""
    if run.record["state"] != MigrationState.ROLLING_BACK.value:
        run.set_state(MigrationState.ROLLING_BACK, error=reason)
    issued = bool(run.result().get("migrate_issued"))
    source = read_end(lambda: run.src, run.vm)
    if issued and source.migration in PRECOPY_ACTIVE:
        try:
            run.src.cancel_migration(run.vm)
            wait_source_settled(run)
        except VmferryError as exc:
            log.warning("migration %s: cancel failed: %s", run.id, exc.message)
        # The cancel may have come after QEMU completed: the truth decides again.
        decision, truth = decide_patiently(lambda: truth_of(run), issued=issued)
        if decision.way is not Way.ROLLBACK:
            _note(run, decision, truth)
            take(run, decision, reason, turns)
            return
        source = truth.source
    problems: list[str] = []
    if source.state == "postmigrate":
        destination = read_end(lambda: run.dst, run.vm)
        if issued and not destination.reachable:
            # QEMU completed after this rollback was decided: the truth decides again, as
            # patiently as the first time, before anything is held.
            decision, truth = decide_patiently(lambda: truth_of(run), issued=issued)
            if decision.way is not Way.ROLLBACK:
                _note(run, decision, truth)
                take(run, decision, reason, turns)
                return
            source, destination = truth.source, truth.destination
    if source.state == "postmigrate":
        if not destination.reachable or destination.state in DESTINATION_USABLE:
            hold(run, reason, Decision(Way.HOLD, "the source finished its migration and the "
                                       f"destination is {destination.state}"))
            return
    if source.state in {"paused", "postmigrate"}:
        try:
            run.src.resume(run.vm)
        except VmferryError as exc:
            problems.append(f"source: {exc.message}")
    elif not source.reachable:
        problems.append(f"source: {source.error}")
    problem = _clean_destination(run)
    if problem:
        problems.append(problem)
    problem = nat.rollback(run)           # a NAT move: the guest's extra address, the lease
    if problem:
        problems.append(problem)
    problem = dual_nic.rollback(run)      # a dual NIC move: the source's second NIC, the row
    if problem:
        problems.append(problem)
    try:
        # Best effort: a VLAN left on a trunk is drift (recorded, shown by ``fabric show``,
        # fixed by the next reconcile), not a reason to fail a rollback that saved the VM.
        run.controller.reconcile_fabric(())
    except VmferryError as exc:
        problems.append(f"fabric: {exc.message}")
    if run.controller.fabric_drift:
        run.record_result(fabric_drift=dict(run.controller.fabric_drift))
    try:
        route_way.reconcile(run.controller)     # routers hold what the store says again
    except VmferryError as exc:
        problems.append(f"routers: {exc.message}")
    with run.session() as session:
        vm = session.get(VmRow, run.vm)
        if vm is not None:
            vm.state = "running"
            vm.host = run.source
    if problems:
        run.finish(MigrationState.FAILED, f"{NEEDS_OPERATOR}: {reason}; rollback incomplete: "
                   + "; ".join(problems))
    else:
        run.finish(MigrationState.ROLLED_BACK, reason)


def _clean_destination(run: Run) -> str | None:
    """Delete what the destination holds of the VM -- unless it runs it. An agent that does
    not answer is asked again (bounded). Returns the problem, if any."""
    deadline = time.monotonic() + truths.UNREACHABLE_WAIT_S
    attempt = 0
    while True:
        end = read_end(lambda: run.dst, run.vm)
        if end.state == "running":
            return "destination: it runs the VM; not deleted"
        if end.reachable:
            try:
                run.dst.delete_guest(run.vm)
                return None
            except HostUnavailableError as exc:
                message = exc.message
            except VmferryError as exc:
                return f"destination: {exc.message}"
        else:
            message = end.error or "does not answer"
        if time.monotonic() >= deadline:
            return f"destination: {message}"
        time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        attempt += 1


def _note(run: Run, decision: Decision, truth: Truth) -> None:
    decisions = list(run.result().get("decisions") or [])
    decisions.append({"way": decision.way.value, "reason": decision.reason,
                      "truth": truth.describe()})
    run.record_result(decisions=decisions)


def wait_source_settled(run: Run, timeout: float = SETTLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.src.migration(run.vm).status not in PRECOPY_ACTIVE:
            return
        time.sleep(0.1)
    raise WaitTimeout(f"the source QEMU of {run.vm} to cancel its migration", timeout)
