"""outbox: a partial index over the rows still to deliver

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UNDELIVERED_SQL = "status IN ('pending', 'in_flight', 'failed')"


def upgrade() -> None:
    op.create_index(
        "ix_outbox_undelivered",
        "outbox",
        ["workspace_id", "customer_id", "target", "id"],
        unique=False,
        sqlite_where=sa.text(UNDELIVERED_SQL),
        postgresql_where=sa.text(UNDELIVERED_SQL),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_undelivered", table_name="outbox")
