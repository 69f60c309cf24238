"""Tables of the controller's store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class InventoryRow(Base):
    """The site's topology (one row): racks, switches, trunks, hosts, clients."""

    __tablename__ = "inventory"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    topology: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HostRow(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_url: Mapped[str] = mapped_column(String(512))
    agent_token_hash: Mapped[str | None] = mapped_column(String(128))
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    maintenance: Mapped[bool] = mapped_column(default=False)
    # Host failure handling (controller/hostwatch.py): suspected, fenced, cleaning; None: fine.
    failure_state: Mapped[str | None] = mapped_column(String(16))
    failure_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The VMs placed on the host when it was fenced (0008): kept so that a restarted
    # controller still restarts them elsewhere and cleans them off the host when it returns.
    fenced_vms: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")


class VmRow(Base):
    __tablename__ = "vms"
    # One address per VLAN (0007): two concurrent creates cannot take the same IP.
    __table_args__ = (UniqueConstraint("vlan", "ip", name="uq_vms_vlan_ip"),)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(64), ForeignKey("hosts.name"))
    memory_mib: Mapped[int]
    vlan: Mapped[int]
    ip: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    profile: Mapped[str | None] = mapped_column(String(64))
    workload_mibps: Mapped[int] = mapped_column(default=0)
    memcheck_mib: Mapped[int] = mapped_column(default=0, server_default="0")   # 0007
    max_downtime_ms: Mapped[int | None]
    state: Mapped[str] = mapped_column(String(32), default="creating")
    # The placement policy (model.placement.VmPolicy as JSON); None: the default policy.
    policy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MacPoolRow(Base):
    """The next MAC index to hand out: MACs are never reused while a VM holds them."""

    __tablename__ = "mac_pool"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_index: Mapped[int] = mapped_column(default=1)


class TokenRow(Base):
    __tablename__ = "tokens"
    __table_args__ = (UniqueConstraint("name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EventRow(Base):
    """The audit log: who did what, when, and how it ended."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class MigrationRow(Base):
    __tablename__ = "migrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))        # running, completed, rolled-back, failed
    phase: Mapped[str] = mapped_column(String(32))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    phases: Mapped[list[Any]] = mapped_column(default=list)   # [{phase, started, ended, ok}]
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LeaderRow(Base):
    """The controller lease: only the holder of a fresh lease may act on the site."""

    __tablename__ = "leader"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The fencing token: raised at every change of holder; a write by an older epoch is refused.
    epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class NatLeaseRow(Base):
    """An address of a routed rack's subnet lent to a VM that moved there by NAT (0009).

    The VM's row keeps its home VLAN and address (what its clients use); this row says that
    while the VM is in the rack its port is on ``vlan`` with ``ip``, and that ``router``
    translates ``home_ip`` to ``ip`` (controller/nat.py). ``state``: ``reserved`` (taken at
    the precheck of the move in), ``active`` (the VM is in the rack, the router translates),
    ``returning`` (the move back is under way)."""

    __tablename__ = "nat_leases"
    __table_args__ = (UniqueConstraint("vlan", "ip", name="uq_nat_leases_vlan_ip"),)
    vm: Mapped[str] = mapped_column(String(64), primary_key=True)
    router: Mapped[str] = mapped_column(String(64))
    home_vlan: Mapped[int]
    home_ip: Mapped[str] = mapped_column(String(64))
    vlan: Mapped[int]
    ip: Mapped[str] = mapped_column(String(64))
    gateway: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="reserved")
    migration_id: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DualNicRow(Base):
    """A move by "dual" NIC (0010): the VM took a second NIC with an address of a routed
    rack's subnet, and that became its NIC (controller/dual_nic.py).

    While the VM is in the rack its row holds the rack's VLAN, address and NIC MAC (what it is
    reached at); this row keeps its home ones reserved for the way back. ``state``:
    ``reserved`` (taken at the precheck of the move in), ``active`` (the VM is in the rack),
    ``returning`` (the move back is under way). ``home_slot``: the PCIe root port of its home
    NIC (the rack's NIC sits on the other)."""

    __tablename__ = "dual_nic_moves"
    __table_args__ = (UniqueConstraint("vlan", "ip", name="uq_dual_nic_moves_vlan_ip"),)
    vm: Mapped[str] = mapped_column(String(64), primary_key=True)
    router: Mapped[str] = mapped_column(String(64))
    home_vlan: Mapped[int]
    home_ip: Mapped[str] = mapped_column(String(64))
    home_mac: Mapped[str] = mapped_column(String(17))
    home_slot: Mapped[int]
    vlan: Mapped[int]
    ip: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(17))
    gateway: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="reserved")
    migration_id: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
