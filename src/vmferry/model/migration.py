"""The migration state machine: its phases in order, and which transitions are legal.

    precheck -> extend_vlan -> preset_port -> start_destination -> precopy -> switchover
      -> announce -> clean_source -> prune_vlan -> verify

Up to and including ``precopy`` the VM still belongs to the source: any failure rolls back and
leaves everything as it was. ``switchover`` is the point of no return: from there on a failure
is completed forward (every phase is idempotent), never rolled back.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vmferry.errors import ConflictError

DEFAULT_MAX_DOWNTIME_MS = 300


class Phase(str, enum.Enum):
    PRECHECK = "precheck"
    EXTEND_VLAN = "extend_vlan"
    PRESET_PORT = "preset_port"
    START_DESTINATION = "start_destination"
    PRECOPY = "precopy"
    SWITCHOVER = "switchover"
    ANNOUNCE = "announce"
    CLEAN_SOURCE = "clean_source"
    PRUNE_VLAN = "prune_vlan"
    VERIFY = "verify"


PHASES: list[Phase] = list(Phase)
POINT_OF_NO_RETURN = Phase.SWITCHOVER


class MigrationState(str, enum.Enum):
    RUNNING = "running"
    ROLLING_BACK = "rolling-back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"          # could neither complete nor roll back cleanly: needs an operator


FINAL_STATES = {MigrationState.COMPLETED, MigrationState.ROLLED_BACK, MigrationState.FAILED}

_LEGAL: dict[MigrationState, set[MigrationState]] = {
    MigrationState.RUNNING: {MigrationState.ROLLING_BACK, MigrationState.COMPLETED,
                             MigrationState.FAILED},
    # Back to running: the rollback found QEMU completed (a cancel that came too late).
    MigrationState.ROLLING_BACK: {MigrationState.ROLLED_BACK, MigrationState.FAILED,
                                  MigrationState.RUNNING},
    MigrationState.COMPLETED: set(),
    MigrationState.ROLLED_BACK: set(),
    MigrationState.FAILED: set(),
}


def check_transition(current: MigrationState, new: MigrationState) -> None:
    """Raises ConflictError for a transition the state machine does not allow."""
    if new not in _LEGAL[current]:
        raise ConflictError("state", f"a migration cannot go from {current.value} to {new.value}")


def next_phase(phase: Phase) -> Phase | None:
    index = PHASES.index(phase)
    return PHASES[index + 1] if index + 1 < len(PHASES) else None


def past_point_of_no_return(phase: Phase) -> bool:
    return PHASES.index(phase) >= PHASES.index(POINT_OF_NO_RETURN)


class MigrationOptions(BaseModel):
    """How one migration runs: the same model from the CLI through the controller's API, the
    store and the engine to the source agent's ``MigrateRequest``."""

    model_config = ConfigDict(extra="forbid")
    # None: the VM's policy, else DEFAULT_MAX_DOWNTIME_MS (the controller resolves it at start).
    max_downtime_ms: int | None = Field(None, ge=1, le=600_000)
    bandwidth_mbps: int | None = Field(None, ge=1, le=1_000_000)
    postcopy: Literal["auto", "never"] = "never"
    # With postcopy "auto": switch to postcopy after this long (default: a third of the
    # timeout, at least 5 s).
    postcopy_after_s: float | None = Field(None, gt=0, le=86_400)
    timeout_s: float = Field(300, gt=0, le=86_400)
    auto_converge: bool = True
    # Deliver the VM's frames to both hosts during switchover (controller/switchover.py).
    make_before_break: bool = True
    # How long before QEMU's expected end the switchover rules may go in (default 1 s).
    make_before_break_lead_s: float | None = Field(None, gt=0, le=3600)
    # Carry the VM's connection-tracking state to the destination (stateful profiles), so
    # connections it has open survive a to-VM default of deny (controller/phases.py).
    carry_conntrack: bool = True
    # Cross a subnet boundary by this way (model.boundary.Way); None: the first that applies.
    boundary: Literal["stretch", "route", "nat", "dual"] | None = None

    @property
    def postcopy_allowed(self) -> bool:
        return self.postcopy == "auto"

    def postcopy_after(self) -> float:
        if self.postcopy_after_s is not None:
            return self.postcopy_after_s
        return max(5.0, self.timeout_s / 3)
