"""Bodies the controller's API takes and gives (its clients: the CLI, the dashboard, the lab)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vmferry.api.agent import GuestInfo, MigrationProgress, PortStatus
from vmferry.model.migration import MigrationOptions
from vmferry.model.network import InterfaceCidr, IpAddress, VlanId
from vmferry.model.placement import VmPolicy
from vmferry.model.profile import PortProfile

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VmCreate(_Body):
    name: str = Field(min_length=1, max_length=40, pattern=NAME_PATTERN)
    host: str = Field(min_length=1, max_length=64)
    memory_mib: int = Field(256, ge=64, le=1024 * 1024)
    vlan: VlanId | None = None
    profile: str | None = Field(None, min_length=1, max_length=64)
    ip: InterfaceCidr
    gateway: IpAddress | None = None
    workload_mibps: int = Field(0, ge=0, le=10_000)
    max_downtime_ms: int | None = Field(None, ge=1, le=600_000)
    policy: VmPolicy | None = None      # placement policy (controller.placement)
    # MiB the guest fills with known patterns and verifies for ever: checked after every move.
    memcheck_mib: int = Field(default=0, ge=0, le=1024 * 1024)


class VmOut(BaseModel):
    name: str
    host: str
    memory_mib: int
    vlan: int
    ip: str
    mac: str
    profile: str | None
    workload_mibps: int
    max_downtime_ms: int | None
    state: str
    created_at: str
    runtime: GuestInfo | None = None
    runtime_error: str | None = None
    policy: VmPolicy | None = None


class HostOut(BaseModel):
    name: str
    rack: str
    agent_url: str
    agent_alive: bool
    last_heartbeat: str | None
    memory_mib: int
    memory_used_mib: int | None
    qemu_version: str | None
    vms: list[str]
    maintenance: bool


class TrunkOut(BaseModel):
    a: str
    a_port: str
    b: str
    b_port: str
    desired: list[int]
    actual_a: list[int] | None
    actual_b: list[int] | None
    in_sync: bool
    # Per end: whether it could be read, and why it is unknown or out of line (None: fine).
    a_reachable: bool = True
    b_reachable: bool = True
    a_reason: str | None = None
    b_reason: str | None = None
    error: str | None = None          # both ends' reasons, "node:port: why; ..."


class TokenCreate(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    role: str
    expires_in_s: float | None = Field(None, gt=0, le=10 * 365 * 86400)


class EventOut(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]


class MigrationCreate(MigrationOptions):
    """Move ``vm`` to host ``to`` with these options (max_downtime_ms: the VM's policy)."""

    vm: str = Field(min_length=1, max_length=64)
    to: str = Field(min_length=1, max_length=64)

    def options(self) -> MigrationOptions:
        return MigrationOptions.model_validate(self.model_dump(exclude={"vm", "to"}))


class PhaseRecord(BaseModel):
    phase: str
    started: str
    ended: str | None = None
    ok: bool | None = None
    duration_ms: float | None = None
    error: str | None = None


class MigrationEvents(BaseModel):
    """QMP timestamps (seconds since the epoch) of the moments that split the interruption."""

    source_stop: float | None = None
    source_completed: float | None = None
    destination_resume: float | None = None


class MigrationPlan(BaseModel):
    vlan: int
    path: list[str]
    crossing: str | None = None      # the way across a boundary (model.boundary.Way)


class MigrationResult(BaseModel):
    """What a migration found and measured along the way. Other parts (the switchover) may
    record more under their own keys: those are kept."""

    model_config = ConfigDict(extra="allow")
    plan: MigrationPlan | None = None
    incoming_uri: str | None = None
    migrate_issued: bool = False
    progress: MigrationProgress | None = None
    qemu: MigrationProgress | None = None
    events: MigrationEvents = Field(default_factory=MigrationEvents)
    # CPU time the migration's own thread used in the controller (time.thread_time()).
    controller_cpu_ms: float | None = None
    # From QEMU's "completed" event (its timestamp) to the switchover phase starting.
    completed_to_switchover_ms: float | None = None
    make_before_break: str | None = None
    make_before_break_cookie: str | None = None
    make_before_break_problems: list[str] = Field(default_factory=list)


class MigrationRecord(BaseModel):
    id: int
    vm: str
    source: str
    destination: str
    state: str
    phase: str
    options: MigrationOptions
    phases: list[PhaseRecord]
    result: MigrationResult
    error: str | None = None
    started_at: str | None = None
    ended_at: str | None = None


class InventoryLoaded(BaseModel):
    status: str
    hosts: list[str]


class Health(BaseModel):
    status: str


class WhoAmI(BaseModel):
    """The caller's name and role: the dashboard offers only the actions the role may do."""

    name: str
    role: str


class TokenCreated(BaseModel):
    name: str
    role: str
    token: str


class TokenOut(BaseModel):
    name: str
    role: str
    created_at: str
    revoked: bool
    expires_at: str | None = None


class FindingOut(BaseModel):
    """Something the audit found that should not be there (or is missing)."""

    kind: str
    where: str
    what: str
    detail: str


class PortRealizationOut(BaseModel):
    """The outcome of realizing a profile on one VM's port, as recorded."""

    vm: str
    host: str
    profile: str
    version: int | None
    wanted: int
    ok: bool | None
    error: str | None = None


class ProfileOut(PortProfile):
    """A stored profile and the VMs that use it."""

    vms: list[str]


class ProfileDetail(ProfileOut):
    ports: list[PortRealizationOut]


class ProfileApplied(BaseModel):
    name: str
    version: int
    changed: bool
    ports: list[PortRealizationOut]


class VmProfileBody(_Body):
    profile: str = Field(min_length=1, max_length=64)


class PortView(PortStatus):
    """A VM's port as its host sees it (desired vs actual) and the profile version realized."""

    vm: str
    host: str
    profile: str | None
    latest_version: int | None
    realized: PortRealizationOut | None
