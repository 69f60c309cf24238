"""Dual NIC moves: a VM's home VLAN, address and MAC reserved while it is in a routed rack
under a second NIC

Revision ID: 0010_dual_nic_moves
Revises: 0009_nat_leases
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_dual_nic_moves"
down_revision: str | Sequence[str] | None = "0009_nat_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dual_nic_moves",
        sa.Column("vm", sa.String(64), primary_key=True),
        sa.Column("router", sa.String(64), nullable=False),
        sa.Column("home_vlan", sa.Integer(), nullable=False),
        sa.Column("home_ip", sa.String(64), nullable=False),
        sa.Column("home_mac", sa.String(17), nullable=False),
        sa.Column("home_slot", sa.Integer(), nullable=False),
        sa.Column("vlan", sa.Integer(), nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("gateway", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("migration_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("vlan", "ip", name="uq_dual_nic_moves_vlan_ip"),
    )


def downgrade() -> None:
    op.drop_table("dual_nic_moves")
