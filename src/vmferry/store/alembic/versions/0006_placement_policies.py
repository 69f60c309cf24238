"""Placement: VM policies, host failure states

Revision ID: 0006_placement
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_placement"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("policy", sa.JSON(), nullable=True))
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("failure_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("failure_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("failure_at")
        batch.drop_column("failure_state")
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("policy")
