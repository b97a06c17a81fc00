"""The relational schema (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Conventions: every row carries ``workspace_id``; times are integer epoch milliseconds; ids are
prefixed ULID-style strings, except the event log's ``seq`` and the customers' ``key``, integers.
Tables that point at customers (``KEYED_TABLES`` by number, ``CUSTOMER_TABLES`` by public id) take
part in merge, export and erase.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ms = sa.BigInteger

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("settings", Json, nullable=False),
    sa.Column("created_at", Ms, nullable=False),
    # A small number beside the id, given at creation and never changed: what the dedup keys carry
    # instead of the 29-character id (Database.workspace_number).
    sa.Column("number", sa.Integer, nullable=False),
    sa.Index("ix_workspaces_number", "number", unique=True),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False, index=True),
    sa.Column("kind", sa.String(10), nullable=False),  # write | secret
    sa.Column("prefix", sa.String(16), nullable=False),  # shown in listings: wk_ab12…
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("revoked_at", Ms),
)

signing_secrets = sa.Table(
    "signing_secrets",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False, index=True),
    sa.Column("purpose", sa.String(40), nullable=False),
    sa.Column("ciphertext", sa.Text, nullable=False),
    sa.Column("created_at", Ms, nullable=False),
)

# Integer surrogate keys: customers are numbered (``customers.key``) beside their public ids, and the
# hot tables point at customers by that number: an 8-byte integer in every index entry instead of a
# 30-character text, and on SQLite the number is the row id, so a profile is one B-tree search away.
# The API, payloads and exports show only public ids (a read joins ``customers`` on the key).
Key = sa.BigInteger().with_variant(sa.Integer, "sqlite")

# The append-only log. ``customer_key`` is the pipeline's attribution (derived; moved on merge);
# ``customer_id`` is the customer a source named itself (an admin change, a bot's message, a timer),
# kept as written, and NULL for events the pipeline attributes by their identities.
events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", Key, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("name", sa.String(200)),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("customer_key", Key),
    sa.Column("timestamp", Ms, nullable=False),  # skew-corrected event time
    sa.Column("received_at", Ms, nullable=False),
    sa.Column("source", sa.String(40), nullable=False),  # api | admin | pipeline | timer | …
    sa.Column("actor", sa.String(40)),  # key id (or other actor) that caused it
    sa.Column("payload", sa.Text, nullable=False),  # the normalised event as JSON
    sa.Index("ix_events_ws_seq", "workspace_id", "seq"),
    # Without the workspace: a customer's number is unique across workspaces (queries still name it).
    sa.Index("ix_events_customer", "customer_key", "seq"),
    sqlite_autoincrement=True,  # never reuse a number (see eventlog.reserve_seqs)
)

# Per-source dedup keys (Segment messageId, Telegram update_id, …) within a window.
dedup_keys = sa.Table(
    "dedup_keys",
    metadata,
    sa.Column("workspace_number", sa.Integer, primary_key=True),  # workspaces.number
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("seen_at", Ms, nullable=False, index=True),
)

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("key", Key, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("merged_into", sa.String(40)),
    sa.Column("identified", sa.Boolean, nullable=False, default=False),  # has a user_id
    sa.Column("traits", Json, nullable=False),
    sa.Column("trait_times", Json, nullable=False),  # trait -> [event ms, seq]
    sa.Column("context", Json, nullable=False),  # derived: timezone, locale, device, location…
    sa.Column("consents", Json, nullable=False),  # channel -> purpose -> {granted, source, at}
    sa.Column("preferences", Json, nullable=False),
    sa.Column("stage", sa.String(40)),
    sa.Column("stage_at", Ms),
    sa.Column("first_seen", Ms),
    sa.Column("last_seen", Ms),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("updated_at", Ms, nullable=False),
    # The public id, unique (ids are global, the workspace comes first for per-workspace listing).
    sa.Index("ix_customers_ws_id", "workspace_id", "id", unique=True),
    # No index on last_seen: every event moves it (see migration 0005).
    # Only the merged-away: a new customer adds no entry (queries ask ``merged_into = …``).
    sa.Index(
        "ix_customers_merged_into",
        "workspace_id",
        "merged_into",
        sqlite_where=sa.text("merged_into IS NOT NULL"),
        postgresql_where=sa.text("merged_into IS NOT NULL"),
    ),
    postgresql_with={"fillfactor": 80},  # room on each page for heap-only (HOT) updates
    sqlite_autoincrement=True,  # a number is never given twice, even after an erasure
)

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("workspace_id", sa.String(40), primary_key=True),
    sa.Column("kind", sa.String(40), primary_key=True),
    sa.Column("value", sa.String(300), primary_key=True),
    sa.Column("customer_key", Key, nullable=False),
    sa.Column("created_at", Ms, nullable=False),
    sa.Index("ix_identities_customer", "customer_key"),
    # SQLite: rows live in the primary key's B-tree, so a lookup by (workspace, kind, value) finds
    # the owner in one search (a row-id table needs its key index, then the table).
    sqlite_with_rowid=False,
)

suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("workspace_id", sa.String(40), primary_key=True),
    sa.Column("hash", sa.String(64), primary_key=True),
    sa.Column("created_at", Ms, nullable=False),
)

consumer_cursors = sa.Table(
    "consumer_cursors",
    metadata,
    sa.Column("consumer", sa.String(60), primary_key=True),
    sa.Column("workspace_id", sa.String(40), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Ms, nullable=False),
)

UNDELIVERED_SQL = "status IN ('pending', 'in_flight', 'failed')"

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("kind", sa.String(40), nullable=False),  # webhook | message | …
    sa.Column("target", sa.String(40)),  # destination / channel id
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending|in_flight|sent|failed|dead
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", Ms, nullable=False),
    sa.Column("lease_until", Ms),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("updated_at", Ms, nullable=False),
    # Steps of a multi-step delivery that earlier attempts completed (the parts of a message cut in
    # several): a retry resumes after them (``mayak.delivery.outbox.step``).
    sa.Column("progress", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("workspace_id", "idempotency_key", name="uq_outbox_key"),
    sa.Index("ix_outbox_due", "status", "next_attempt_at"),
    sa.Index("ix_outbox_customer", "workspace_id", "customer_id"),
    sa.Index("ix_outbox_target", "workspace_id", "target", "id"),
    # Only the rows still to deliver: finding a lane's head, or whether a lane is busy, must cost what
    # the backlog costs, not what the delivery history costs (sent rows are kept).
    sa.Index(
        "ix_outbox_undelivered",
        "workspace_id",
        "customer_id",
        "target",
        "id",
        sqlite_where=sa.text(UNDELIVERED_SQL),
        postgresql_where=sa.text(UNDELIVERED_SQL),
    ),
)

outbox_attempts = sa.Table(
    "outbox_attempts",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("outbox_id", sa.String(40), nullable=False, index=True),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("at", Ms, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("duration_ms", sa.Integer, nullable=False),
)

timers = sa.Table(
    "timers",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("kind", sa.String(60), nullable=False),
    sa.Column("key", sa.String(200), nullable=False),
    sa.Column("fire_at", Ms, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | fired | cancelled
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("fired_at", Ms),
    sa.UniqueConstraint("workspace_id", "key", name="uq_timers_key"),
    sa.Index("ix_timers_due", "status", "fire_at"),
    sa.Index("ix_timers_customer", "workspace_id", "customer_id"),
)

destinations = sa.Table(
    "destinations",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("url", sa.String(2000), nullable=False),
    sa.Column("event_types", Json, nullable=False),  # [] = all
    sa.Column("event_names", Json, nullable=False),  # [] = all
    sa.Column("secret_id", sa.String(40), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_at", Ms, nullable=False),
)

# Idempotency-Key of POSTs that create something: the first answer is kept (encrypted) for a day.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("workspace_id", sa.String(40), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),  # method, path and body digest
    sa.Column("status", sa.Integer),  # null while the first request is still running
    sa.Column("response", sa.Text),  # encrypted JSON body
    sa.Column("created_at", Ms, nullable=False, index=True),
)

# -- bots, conversations, channels, inbound hooks ----------------------------------------------

bots = sa.Table(
    "bots",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("current_version", sa.Integer),  # the version new flows start on; null until published
    sa.Column("created_at", Ms, nullable=False),
    sa.UniqueConstraint("workspace_id", "name", name="uq_bots_name"),
)

# Published versions are immutable: only ``status`` (active | retired) and ``retired_at`` change.
bot_versions = sa.Table(
    "bot_versions",
    metadata,
    sa.Column("bot_id", sa.String(40), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False, index=True),
    sa.Column("definition", sa.Text, nullable=False),  # the validated bot as JSON
    sa.Column("digest", sa.String(64), nullable=False),  # SHA-256 of the definition
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("retired_at", Ms),
)

# One row per customer and bot: where the conversation stands (derived from the log by the bot
# router, in the pipeline's transaction).
conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("customer_id", sa.String(40), nullable=False),
    sa.Column("bot_id", sa.String(40), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # bot | waiting_human | human | ended
    sa.Column("state", sa.Text, nullable=False),  # JSON: flow, step, slots, stack, counters, wait…
    sa.Column("channel_id", sa.String(40)),  # where the customer spoke last
    sa.Column("address", sa.String(200)),  # their address on that channel (chat id, visitor id)
    sa.Column("queue", sa.String(100)),
    sa.Column("reason", sa.String(500)),
    sa.Column("handoff_at", Ms),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("updated_at", Ms, nullable=False),
    sa.Index("ix_conversations_customer", "workspace_id", "customer_id"),
    sa.Index("ix_conversations_status", "workspace_id", "status", "handoff_at"),
)

channels = sa.Table(
    "channels",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False, index=True),
    sa.Column("type", sa.String(20), nullable=False),  # webchat | telegram
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("bot_id", sa.String(40)),  # the bot that answers on this channel
    sa.Column("config", Json, nullable=False),  # non-secret settings (api_base_url, bot username…)
    sa.Column("secret_id", sa.String(40)),  # encrypted secret config (bot token, webhook secret)
    sa.Column("status", sa.String(16), nullable=False),  # active | disabled
    sa.Column("created_at", Ms, nullable=False),
)

# One-time tokens that link a channel address (a Telegram chat) to an existing customer.
link_tokens = sa.Table(
    "link_tokens",
    metadata,
    sa.Column("hash", sa.String(64), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False),
    sa.Column("customer_id", sa.String(40), nullable=False),
    sa.Column("expires_at", Ms, nullable=False),
    sa.Column("used_at", Ms),
    sa.Column("created_at", Ms, nullable=False),
    sa.Index("ix_link_tokens_customer", "workspace_id", "customer_id"),
)

# Signed generic inbound webhooks from business systems (POST /v1/hooks/{id}).
hooks = sa.Table(
    "hooks",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(40), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("mapping", Json, nullable=False),  # how a body becomes an event on a customer
    sa.Column("secret_id", sa.String(40), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_at", Ms, nullable=False),
)

# Tables that point at customers and move with a merge and go with an erase: by customer number
# (``customer_key``), and by public id (``customer_id``).
KEYED_TABLES = (events, identities)
CUSTOMER_TABLES = (outbox, timers, conversations, link_tokens)


def key_of(workspace_id: Any, customer_id: Any) -> sa.ScalarSelect[Any]:
    """The number of the customer with this public id (a scalar subquery; NULL when none)."""
    return (
        sa.select(customers.c.key)
        .where(customers.c.workspace_id == workspace_id, customers.c.id == customer_id)
        .scalar_subquery()
    )


def keys_of(workspace_id: Any, customer_ids: Sequence[str]) -> sa.Select[tuple[int]]:
    """The numbers of the customers with these public ids (for ``customer_key.in_(…)``)."""
    return sa.select(customers.c.key).where(
        customers.c.workspace_id == workspace_id, customers.c.id.in_(customer_ids)
    )
