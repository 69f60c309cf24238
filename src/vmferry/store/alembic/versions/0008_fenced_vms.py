"""The VMs a fenced host ran

A host's row keeps the VMs that were placed on it when it was fenced, so that a controller
restarted after the fence still restarts them elsewhere and cleans them off the host when it
returns (controller/hostwatch.py).

Revision ID: 0008_fenced_vms
Revises: 0007_fencing
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_fenced_vms"
down_revision: str | Sequence[str] | None = "0007_fencing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("fenced_vms", sa.JSON(), nullable=False,
                                   server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("fenced_vms")
