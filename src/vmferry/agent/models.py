"""What the controller and an agent say to each other."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vmferry.model.network import InterfaceCidr, IpAddress, MacAddress, VlanId


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GuestRequest(_Body):
    name: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    memory_mib: int = Field(ge=64, le=1024 * 1024)
    mac: MacAddress
    ip: InterfaceCidr
    gateway: IpAddress | None = None
    vlan: VlanId
    workload_mibps: int = Field(0, ge=0, le=10_000)
    incoming: bool = False          # start paused, waiting for a migration stream
    postcopy: bool = False          # the incoming stream may switch to postcopy
    profile: dict[str, Any] | None = None


class GuestInfo(BaseModel):
    name: str
    state: str
    pid: int | None = None
    tap: str | None = None
    port_present: bool = False
    incoming_uri: str | None = None
    memory_mib: int | None = None


class UplinkVlans(_Body):
    vlans: list[VlanId]


class MigrateRequest(_Body):
    uri: str
    max_downtime_ms: int = Field(300, ge=1, le=600_000)
    bandwidth_mbps: int | None = Field(None, ge=1)
    postcopy: bool = False
    auto_converge: bool = True


class HostReport(BaseModel):
    host: str
    qemu_version: str
    machine_types: list[str]
    memory_mib: int
    memory_used_mib: int
    guests: list[GuestInfo]
    shared_storage: str | None
    shared_storage_ok: bool
    migration_ip: str | None = None
