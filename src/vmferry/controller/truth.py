"""Which way a migration goes when it cannot simply go on: decided from what the two QEMUs
report (their run state and ``query-migrate``), never from the recorded phase alone.

The one rule behind every case: the only running copy of a VM is never deleted, and a copy
that may still own guest pages (postcopy) is never touched by a guess.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmferry.api.agent_client import AgentClient
from vmferry.errors import AgentError, VmferryError

UNREACHABLE = "unreachable"
# Precopy statuses: QEMU is still copying and the source owns the VM; a cancel gives it back.
PRECOPY_ACTIVE = {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"}
# The destination runs (or may run) the VM and pulls pages from the source: only forward.
POSTCOPY = {"postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup"}
POSTCOPY_STUCK = {"postcopy-paused", "postcopy-recover", "postcopy-recover-setup"}
NOT_MIGRATING = {"none", "failed", "cancelled"}
# Destination states in which it can still become (or is) the running VM.
DESTINATION_USABLE = {"running", "paused", "inmigrate", "postmigrate"}
# How long the engine keeps asking a host that does not answer before it holds the migration
# for an operator (tests shorten it).
UNREACHABLE_WAIT_S = 60.0
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class End:
    """One end of the migration as its agent reports it."""

    state: str                 # the guest's run state, "absent", or UNREACHABLE
    migration: str = "none"    # QEMU's migration status on this end ("unknown": unreachable)
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.state != UNREACHABLE


@dataclass(frozen=True)
class Truth:
    source: End
    destination: End

    def describe(self) -> str:
        s, d = self.source, self.destination
        return (f"source {s.state}/{s.migration}, destination {d.state}"
                + (f" ({s.error})" if s.error and not s.reachable else "")
                + (f" ({d.error})" if d.error and not d.reachable else ""))


class Way(str, enum.Enum):
    FORWARD = "forward"              # QEMU completed: the destination is (about to be) the VM
    FOLLOW = "follow"                # postcopy is running: follow it to completed, then on
    ROLLBACK = "rollback"            # the source owns the VM: cancel, resume it, clean the rest
    RECOVER = "recover"              # postcopy paused: migrate-recover
    HOLD = "hold"                    # no automatic way out: an operator decides
    UNKNOWN = "unknown"              # an end does not answer: ask again later


@dataclass(frozen=True)
class Decision:
    way: Way
    reason: str


def read_end(client: Callable[[], AgentClient], vm: str) -> End:
    """The guest's state and migration status on one host."""
    try:
        agent = client()
        state = agent.guest_state(vm)
        if state == "absent":
            return End("absent")
        progress = agent.migration(vm)
        return End(state, progress.status, progress.error)
    except AgentError as exc:
        if exc.fields.get("status") == 404:      # gone between the two questions
            return End("absent")
        return End(UNREACHABLE, "unknown", exc.message)
    except VmferryError as exc:
        return End(UNREACHABLE, "unknown", exc.message)


def decide(truth: Truth, *, issued: bool, recoverable: bool = False) -> Decision:
    """The way out for a migration whose ends report ``truth``. ``issued``: this run started
    the outgoing migration (otherwise a "completed" status is the guest's own arrival)."""
    s, d = truth.source, truth.destination
    if not s.reachable:
        return Decision(Way.UNKNOWN, f"the source does not answer ({s.error})")
    status = s.migration if issued or s.migration != "completed" else "none"
    if status in POSTCOPY_STUCK:
        if recoverable and d.reachable and d.state != "absent":
            return Decision(Way.RECOVER, f"postcopy is {status}")
        return Decision(Way.HOLD, f"postcopy is {status}: both ends hold parts of the guest's "
                        "memory; recover it (migrate-recover) or decide which end to keep")
    if status == "postcopy-active":
        return Decision(Way.FOLLOW, "postcopy is running: the destination owns the VM")
    if status in PRECOPY_ACTIVE:
        if d.state == "running":
            return Decision(Way.HOLD, "the destination runs while the source still copies")
        return Decision(Way.ROLLBACK, f"QEMU is still copying ({status})")
    if status == "completed":
        if not d.reachable:
            return Decision(Way.UNKNOWN, f"QEMU completed; the destination does not answer "
                            f"({d.error})")
        if d.state in DESTINATION_USABLE:
            return Decision(Way.FORWARD, f"QEMU completed; the destination is {d.state}")
        return Decision(Way.ROLLBACK, f"QEMU completed but the destination is {d.state}: "
                        "the source resumes")
    # No migration under way on the source (none, failed, cancelled).
    if s.state == "absent":
        if d.state == "running":
            return Decision(Way.FORWARD, "the source is gone; the destination runs the VM")
        if not d.reachable:
            return Decision(Way.UNKNOWN, f"the source is gone; the destination does not "
                            f"answer ({d.error})")
        return Decision(Way.HOLD, f"no QEMU runs the VM (source absent, destination "
                        f"{d.state})")
    if d.state == "running":
        return Decision(Way.HOLD, f"both ends run a copy of the VM (source {s.state}, "
                        f"migration {status})")
    return Decision(Way.ROLLBACK, f"the source owns the VM (migration {status})")


def read_truth(src: Callable[[], AgentClient], dst: Callable[[], AgentClient],
               vm: str) -> Truth:
    return Truth(read_end(src, vm), read_end(dst, vm))


def decide_patiently(read: Callable[[], Truth], *, issued: bool, recoverable: bool = False,
                     wait_s: float | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> tuple[Decision, Truth]:
    """Decide; while an end does not answer, ask again with a bounded backoff. After
    ``wait_s`` an undecidable migration is held for an operator."""
    limit = UNREACHABLE_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + limit
    attempt = 0
    while True:
        truth = read()
        decision = decide(truth, issued=issued, recoverable=recoverable)
        if decision.way is not Way.UNKNOWN:
            return decision, truth
        left = deadline - time.monotonic()
        if left <= 0:
            return Decision(Way.HOLD, f"{decision.reason}; gave up after {limit:g}s"), truth
        sleep(min(left, BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]))
        attempt += 1
