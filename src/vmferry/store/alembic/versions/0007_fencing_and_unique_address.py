"""Fenced leadership and one address per VLAN

The leader row gets an epoch (the fencing token every migration write checks); a VLAN's
address belongs to one VM at most (two concurrent creates cannot take the same IP); a VM's
memory check size (verified after every move).

Revision ID: 0007_fencing
Revises: 0006_placement
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_fencing"
down_revision: str | Sequence[str] | None = "0006_placement"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leader") as batch:
        batch.add_column(sa.Column("epoch", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("vms") as batch:
        batch.create_unique_constraint("uq_vms_vlan_ip", ["vlan", "ip"])
        batch.add_column(sa.Column("memcheck_mib", sa.Integer(), nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("memcheck_mib")
        batch.drop_constraint("uq_vms_vlan_ip", type_="unique")
    with op.batch_alter_table("leader") as batch:
        batch.drop_column("epoch")
