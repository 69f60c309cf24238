"""Seed the MAC pool's single row

Created lazily it raced: two VMs created at once both inserted row 1 and one failed. With the
row always present, allocation locks it (SELECT ... FOR UPDATE on PostgreSQL) and serializes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

mac_pool = sa.table("mac_pool", sa.column("id", sa.Integer), sa.column("next_index", sa.Integer))


def upgrade() -> None:
    connection = op.get_bind()
    if connection.execute(sa.select(mac_pool.c.id).where(mac_pool.c.id == 1)).first() is None:
        op.bulk_insert(mac_pool, [{"id": 1, "next_index": 1}])


def downgrade() -> None:
    pass   # the row is harmless to an older schema
