"""Bodies the controller's API takes and gives."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vmferry.model.network import InterfaceCidr, IpAddress, VlanId

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
    runtime: dict[str, Any] | None = None


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
    error: str | None = None


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


class MigrationCreate(_Body):
    vm: str = Field(min_length=1, max_length=64)
    to: str = Field(min_length=1, max_length=64)
    max_downtime_ms: int | None = Field(None, ge=1, le=600_000)
    bandwidth_mbps: int | None = Field(None, ge=1, le=1_000_000)
    postcopy: Literal["auto", "never"] = "never"
    timeout_s: float = Field(300, gt=0, le=86_400)
    # Deliver the VM's frames to both hosts during switchover (controller/switchover.py).
    make_before_break: bool = True
    # How long before QEMU's expected end the rules go in (default 1 s).
    make_before_break_lead_s: float | None = Field(None, gt=0, le=3600)
