"""NAT leases: addresses of a routed rack lent to VMs that moved there by NAT

Revision ID: 0009_nat_leases
Revises: 0008_fenced_vms
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_nat_leases"
down_revision: str | Sequence[str] | None = "0008_fenced_vms"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nat_leases",
        sa.Column("vm", sa.String(64), primary_key=True),
        sa.Column("router", sa.String(64), nullable=False),
        sa.Column("home_vlan", sa.Integer(), nullable=False),
        sa.Column("home_ip", sa.String(64), nullable=False),
        sa.Column("vlan", sa.Integer(), nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("gateway", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("migration_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("vlan", "ip", name="uq_nat_leases_vlan_ip"),
    )


def downgrade() -> None:
    op.drop_table("nat_leases")
