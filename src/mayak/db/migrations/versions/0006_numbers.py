"""customers and workspaces get numbers; events and identities point at customers by number, dedup
keys at workspaces by number

Every row and index entry of the hot tables carried a customer's 30-character public id, and the
customers table, keyed by that text, was a row-id table plus a separate index on the id, so every
profile read and update searched two B-trees. Customers now have ``key``, an integer (on SQLite the
row id), beside their public id (unique with the workspace); ``events.customer_key`` is the
pipeline's attribution (indexed instead of ``customer_id``) and ``identities.customer_key``
replaces ``identities.customer_id``; both are indexed by number alone (a number belongs to one
workspace). ``ix_customers_merged_into`` holds only merged-away customers. ``events.customer_id``
stays for events that name their customer themselves (admin changes, a bot's records, timers) and
is cleared for those the pipeline resolves by their identities. Existing customers keep their row
ids as numbers (SQLite). SQLite stores identities ``WITHOUT ROWID`` (a lookup is one search).

Workspaces are numbered in order of creation (``workspaces.number``), and ``dedup_keys`` is keyed
by ``(workspace_number, key)`` instead of the 29-character workspace id.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 09:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
# Attributed by their identities (eventlog.resolved_by_identities, as of this revision).
RESOLVED = (
    "type IN ('identify', 'track', 'page', 'screen', 'group', 'alias') "
    "AND source IN ('api', 'telegram', 'webchat', 'hook')"
)
MERGED = "merged_into IS NOT NULL"  # the only rows ix_customers_merged_into holds now
PROFILE = (
    "workspace_id, merged_into, identified, traits, trait_times, context, consents, preferences, stage, "
    "stage_at, first_seen, last_seen, created_at, updated_at"
)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        _upgrade_postgresql()
    else:
        _upgrade_sqlite()
    _number_workspaces(postgres)


def _number_workspaces(postgres: bool) -> None:
    op.add_column("workspaces", sa.Column("number", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE workspaces SET number = (SELECT count(*) FROM workspaces AS w "
        "WHERE (w.created_at, w.id) <= (workspaces.created_at, workspaces.id))"
    )
    with op.batch_alter_table("workspaces") as batch:
        batch.alter_column("number", existing_type=sa.Integer(), nullable=False)
    op.create_index("ix_workspaces_number", "workspaces", ["number"], unique=True)
    if postgres:
        op.execute("ALTER TABLE dedup_keys ADD COLUMN workspace_number INTEGER")
        op.execute(
            "UPDATE dedup_keys AS d SET workspace_number = w.number FROM workspaces AS w "
            "WHERE w.id = d.workspace_id"
        )
        op.execute("DELETE FROM dedup_keys WHERE workspace_number IS NULL")  # no such workspace
        op.execute("ALTER TABLE dedup_keys DROP CONSTRAINT dedup_keys_pkey")
        op.execute("ALTER TABLE dedup_keys DROP COLUMN workspace_id")
        op.execute("ALTER TABLE dedup_keys ALTER COLUMN workspace_number SET NOT NULL")
        op.execute("ALTER TABLE dedup_keys ADD PRIMARY KEY (workspace_number, key)")
        return
    _dedup_table("dedup_keys_numbered", numbered=True)
    op.execute(
        "INSERT INTO dedup_keys_numbered (workspace_number, key, seen_at) "
        "SELECT w.number, d.key, d.seen_at FROM dedup_keys AS d JOIN workspaces AS w ON w.id = d.workspace_id"
    )
    op.drop_table("dedup_keys")
    op.rename_table("dedup_keys_numbered", "dedup_keys")
    op.create_index("ix_dedup_keys_seen_at", "dedup_keys", ["seen_at"])


def _dedup_table(name: str, numbered: bool) -> None:
    op.create_table(
        name,
        sa.Column("workspace_number", sa.Integer(), nullable=False)
        if numbered
        else sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("seen_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("workspace_number" if numbered else "workspace_id", "key"),
    )


def _unnumber_workspaces(postgres: bool) -> None:
    if postgres:
        op.execute("ALTER TABLE dedup_keys ADD COLUMN workspace_id VARCHAR(40)")
        op.execute(
            "UPDATE dedup_keys AS d SET workspace_id = w.id FROM workspaces AS w "
            "WHERE w.number = d.workspace_number"
        )
        op.execute("DELETE FROM dedup_keys WHERE workspace_id IS NULL")
        op.execute("ALTER TABLE dedup_keys DROP CONSTRAINT dedup_keys_pkey")
        op.execute("ALTER TABLE dedup_keys DROP COLUMN workspace_number")
        op.execute("ALTER TABLE dedup_keys ALTER COLUMN workspace_id SET NOT NULL")
        op.execute("ALTER TABLE dedup_keys ADD PRIMARY KEY (workspace_id, key)")
    else:
        _dedup_table("dedup_keys_by_id", numbered=False)
        op.execute(
            "INSERT INTO dedup_keys_by_id (workspace_id, key, seen_at) "
            "SELECT w.id, d.key, d.seen_at FROM dedup_keys AS d JOIN workspaces AS w ON w.number = d.workspace_number"
        )
        op.drop_table("dedup_keys")
        op.rename_table("dedup_keys_by_id", "dedup_keys")
        op.create_index("ix_dedup_keys_seen_at", "dedup_keys", ["seen_at"])
    op.drop_index("ix_workspaces_number", table_name="workspaces")
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("number")


def _upgrade_postgresql() -> None:
    op.execute("ALTER TABLE customers DROP CONSTRAINT customers_pkey")
    op.execute("ALTER TABLE customers ADD COLUMN key BIGSERIAL")  # numbers the existing rows
    op.execute("ALTER TABLE customers ADD PRIMARY KEY (key)")
    op.execute("DROP INDEX ix_customers_ws_id")
    op.execute("CREATE UNIQUE INDEX ix_customers_ws_id ON customers (workspace_id, id)")
    op.execute("DROP INDEX ix_customers_merged_into")
    op.execute(
        f"CREATE INDEX ix_customers_merged_into ON customers (workspace_id, merged_into) WHERE {MERGED}"
    )

    op.execute("ALTER TABLE events ADD COLUMN customer_key BIGINT")
    op.execute(
        "UPDATE events AS e SET customer_key = c.key FROM customers AS c "
        "WHERE c.workspace_id = e.workspace_id AND c.id = e.customer_id"
    )
    op.execute(f"UPDATE events SET customer_id = NULL WHERE customer_id IS NOT NULL AND {RESOLVED}")
    op.execute("DROP INDEX ix_events_customer")
    op.execute("CREATE INDEX ix_events_customer ON events (customer_key, seq)")

    op.execute("ALTER TABLE identities ADD COLUMN customer_key BIGINT")
    op.execute(
        "UPDATE identities AS i SET customer_key = c.key FROM customers AS c "
        "WHERE c.workspace_id = i.workspace_id AND c.id = i.customer_id"
    )
    op.execute("DELETE FROM identities WHERE customer_key IS NULL")  # its customer is gone
    op.execute("ALTER TABLE identities ALTER COLUMN customer_key SET NOT NULL")
    op.execute("DROP INDEX ix_identities_customer")
    op.execute("ALTER TABLE identities DROP COLUMN customer_id")
    op.execute("CREATE INDEX ix_identities_customer ON identities (customer_key)")


def _customers_table(name: str, numbered: bool) -> None:
    first = (
        [sa.Column("key", sa.Integer(), primary_key=True, autoincrement=True)]
        if numbered
        else [sa.Column("id", sa.String(length=40), primary_key=True)]
    )
    op.create_table(
        name,
        *first,
        *([sa.Column("id", sa.String(length=40), nullable=False)] if numbered else []),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("merged_into", sa.String(length=40), nullable=True),
        sa.Column("identified", sa.Boolean(), nullable=False),
        sa.Column("traits", Json, nullable=False),
        sa.Column("trait_times", Json, nullable=False),
        sa.Column("context", Json, nullable=False),
        sa.Column("consents", Json, nullable=False),
        sa.Column("preferences", Json, nullable=False),
        sa.Column("stage", sa.String(length=40), nullable=True),
        sa.Column("stage_at", sa.BigInteger(), nullable=True),
        sa.Column("first_seen", sa.BigInteger(), nullable=True),
        sa.Column("last_seen", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sqlite_autoincrement=numbered,
    )


def _identities_table(name: str, numbered: bool) -> None:
    op.create_table(
        name,
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("value", sa.String(length=300), nullable=False),
        sa.Column("customer_key", sa.Integer(), nullable=False)
        if numbered
        else sa.Column("customer_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "kind", "value"),
        sqlite_with_rowid=not numbered,
    )


def _customer_indexes(numbered: bool) -> None:
    op.create_index("ix_customers_ws_id", "customers", ["workspace_id", "id"], unique=numbered)
    op.create_index(
        "ix_customers_merged_into",
        "customers",
        ["workspace_id", "merged_into"],
        sqlite_where=sa.text(MERGED) if numbered else None,
    )


def _upgrade_sqlite() -> None:
    # customers: rebuilt with the number as the row id (existing rows keep theirs)
    _customers_table("customers_numbered", numbered=True)
    op.execute(
        f"INSERT INTO customers_numbered (key, id, {PROFILE}) SELECT rowid, id, {PROFILE} FROM customers "
        "ORDER BY rowid"
    )
    op.drop_table("customers")
    op.rename_table("customers_numbered", "customers")
    _customer_indexes(numbered=True)

    op.execute("ALTER TABLE events ADD COLUMN customer_key INTEGER")
    op.execute(
        "UPDATE events SET customer_key = (SELECT c.key FROM customers AS c "
        "WHERE c.workspace_id = events.workspace_id AND c.id = events.customer_id) "
        "WHERE customer_id IS NOT NULL"
    )
    op.execute(f"UPDATE events SET customer_id = NULL WHERE customer_id IS NOT NULL AND {RESOLVED}")
    op.drop_index("ix_events_customer", table_name="events")
    op.create_index("ix_events_customer", "events", ["customer_key", "seq"])

    _identities_table("identities_numbered", numbered=True)
    op.execute(
        "INSERT INTO identities_numbered (workspace_id, kind, value, customer_key, created_at) "
        "SELECT i.workspace_id, i.kind, i.value, c.key, i.created_at FROM identities AS i "
        "JOIN customers AS c ON c.workspace_id = i.workspace_id AND c.id = i.customer_id"
    )
    op.drop_table("identities")
    op.rename_table("identities_numbered", "identities")
    op.create_index("ix_identities_customer", "identities", ["customer_key"])


def downgrade() -> None:
    """Back to public ids (numbers are dropped; events' attribution is written as the id again)."""
    postgres = op.get_bind().dialect.name == "postgresql"
    _unnumber_workspaces(postgres)
    id_of = (
        "(SELECT c.id FROM customers AS c WHERE c.workspace_id = {t}.workspace_id "
        "AND c.key = {t}.customer_key)"
    )
    op.execute(f"UPDATE events SET customer_id = {id_of.format(t='events')} WHERE customer_key IS NOT NULL")
    op.drop_index("ix_events_customer", table_name="events")
    op.create_index("ix_events_customer", "events", ["workspace_id", "customer_id", "seq"])
    if postgres:
        op.execute("ALTER TABLE events DROP COLUMN customer_key")
        op.execute("ALTER TABLE identities ADD COLUMN customer_id VARCHAR(40)")
        op.execute(f"UPDATE identities SET customer_id = {id_of.format(t='identities')}")
        op.execute("ALTER TABLE identities ALTER COLUMN customer_id SET NOT NULL")
        op.execute("DROP INDEX ix_identities_customer")
        op.execute("ALTER TABLE identities DROP COLUMN customer_key")
        op.execute("CREATE INDEX ix_identities_customer ON identities (workspace_id, customer_id)")
        op.execute("DROP INDEX ix_customers_ws_id")
        op.execute("ALTER TABLE customers DROP CONSTRAINT customers_pkey")
        op.execute("ALTER TABLE customers DROP COLUMN key")
        op.execute("ALTER TABLE customers ADD PRIMARY KEY (id)")
        op.execute("CREATE INDEX ix_customers_ws_id ON customers (workspace_id, id)")
        op.execute("DROP INDEX ix_customers_merged_into")
        op.execute("CREATE INDEX ix_customers_merged_into ON customers (workspace_id, merged_into)")
        return
    op.execute("ALTER TABLE events DROP COLUMN customer_key")
    _identities_table("identities_by_id", numbered=False)
    op.execute(
        "INSERT INTO identities_by_id (workspace_id, kind, value, customer_id, created_at) "
        "SELECT i.workspace_id, i.kind, i.value, c.id, i.created_at FROM identities AS i "
        "JOIN customers AS c ON c.key = i.customer_key"
    )
    op.drop_table("identities")
    op.rename_table("identities_by_id", "identities")
    op.create_index("ix_identities_customer", "identities", ["workspace_id", "customer_id"])
    _customers_table("customers_by_id", numbered=False)
    op.execute(
        f"INSERT INTO customers_by_id (id, {PROFILE}) SELECT id, {PROFILE} FROM customers ORDER BY key"
    )
    op.drop_table("customers")
    op.rename_table("customers_by_id", "customers")
    _customer_indexes(numbered=False)
