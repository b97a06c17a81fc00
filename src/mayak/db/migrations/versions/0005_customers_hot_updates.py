"""customers: no index on last_seen; PostgreSQL leaves room on each page for in-place updates

Every event moves its customer's ``last_seen``, so an index on it was rewritten on every event: on
SQLite two more random B-tree pages per event in the write-ahead log, on PostgreSQL no heap-only
(HOT) update, so every index of the table got a new entry per event. The customer list's
``seen_since`` filter reads the id-ordered scan instead.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 15:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_customers_ws_last_seen", table_name="customers")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE customers SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE customers RESET (fillfactor)")
    op.create_index("ix_customers_ws_last_seen", "customers", ["workspace_id", "last_seen"])
