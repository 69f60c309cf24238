"""Bodies of the placement API: where a VM may go and why not, policies, drains, balancing,
host failures (``controller.placement``, ``controller.routes.placement``, ``cli.placement``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vmferry.api.boundary import CrossingOut
from vmferry.model.placement import VmPolicy

__all__ = ["BalanceOut", "DrainOut", "HostPlacementOut", "MoveOut", "PolicyBody",
           "ReasonOut", "VmPolicy", "WhereOut"]


class PolicyBody(BaseModel):
    """A VM's new policy, replacing the old one whole (changed live: no restart)."""

    model_config = ConfigDict(extra="forbid")
    policy: VmPolicy


class ReasonOut(BaseModel):
    code: str
    message: str


class HostPlacementOut(BaseModel):
    """One host's answer for one VM."""

    host: str
    ok: bool
    state: str
    rack: str
    zone: str | None
    free_mib: int
    reasons: list[ReasonOut]


class WhereOut(BaseModel):
    vm: str
    host: str
    policy: VmPolicy
    hosts: list[HostPlacementOut]
    crossings: list[CrossingOut] = Field(default_factory=list)   # moves across a boundary


class MoveOut(BaseModel):
    vm: str
    source: str
    destination: str
    memory_mib: int
    state: str = "planned"      # planned, running, completed, failed, rolled-back
    migration_id: int | None = None
    error: str | None = None
    bandwidth_mbps: int | None = None
    # When the mover launched it and when it saw it end (ISO 8601, UTC).
    started_at: str | None = None
    ended_at: str | None = None


class DrainOut(BaseModel):
    """A drain (or a failure restart): its moves and their progress. ``stuck``: VMs with
    nowhere to go, each with every host's refusal (the drain was refused up front)."""

    host: str
    state: str                  # refused, running, done, failed
    moves: list[MoveOut]
    stuck: dict[str, list[HostPlacementOut]] = Field(default_factory=dict)
    started_at: str | None = None
    ended_at: str | None = None
    bytes_total: int = 0
    link_mbps: int | None = None


class BalanceOut(BaseModel):
    dry_run: bool
    max_moves: int
    moves: list[MoveOut]
    # Per up host, before and after the moves: the larger of its memory and CPU shares, then
    # each (memory: used / capacity; CPU: its VMs' CPU load / its CPUs).
    load_before: dict[str, float]
    load_after: dict[str, float]
    memory_before: dict[str, float] = Field(default_factory=dict)
    memory_after: dict[str, float] = Field(default_factory=dict)
    cpu_before: dict[str, float] = Field(default_factory=dict)
    cpu_after: dict[str, float] = Field(default_factory=dict)
    state: str = "planned"


class HostStateOut(BaseModel):
    host: str
    state: str
    failure_state: str | None
    maintenance: bool
    vms: list[str]
