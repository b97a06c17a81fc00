"""The admin view of customers: read, look up, list, change (through the log), export, erase, replay.

Changes made here are events first: the service appends ``customer.*_set`` events (with the acting
key as ``actor``) and waits until the pipeline has applied them, so a caller reads its own write.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mayak.db.database import Database
from mayak.db.schema import (
    CUSTOMER_TABLES,
    KEYED_TABLES,
    consumer_cursors,
    conversations,
    customers,
    events,
    identities,
    key_of,
    keys_of,
    outbox,
    suppressions,
    timers,
)
from mayak.errors import EventRejected, InvalidRequest, NotFound
from mayak.eventlog import (
    RESOLVED_SOURCES,
    SEGMENT_TYPES,
    NewEvent,
    append,
    event_json,
    event_rows,
    last_seq,
)
from mayak.ingest.segment import depth_ok, nul_path, validate_consents, validate_preferences
from mayak.ingest.writer import IngestWriter
from mayak.pipeline.identity import normalise, normalise_kind, suppression_hash
from mayak.pipeline.processor import CONSUMER, Pipeline
from mayak.pipeline.profile import CONTEXT_STAMP
from mayak.timeutil import ms_to_rfc3339, now_ms, parse_rfc3339_ms
from mayak.workspaces.service import WorkspaceService

IDENTITY_CHANNELS = {"email": "email", "phone": "sms", "telegram": "telegram", "whatsapp": "whatsapp"}
MAX_LIMIT = 200
MAX_ADMIN_DEPTH = 32
MAX_ADMIN_BYTES = 32 * 1024


def _admin_check(check: Callable[[Any, str], None], value: Any, path: str) -> None:
    """Run an ingestion validator on an admin body, reporting its refusal as a request error."""
    try:
        check(value, path)
    except EventRejected as exc:
        raise InvalidRequest(exc.code, exc.message, exc.param) from exc


async def apply_admin_event(
    db: Database,
    writer: IngestWriter,
    pipeline: Pipeline,
    ws_id: str,
    customer_id: str,
    etype: str,
    payload: dict[str, Any],
    actor: str,
) -> None:
    """Append an admin action as an event on the customer and return once the pipeline applied it
    (so the caller reads its own write)."""
    now = now_ms()
    event = NewEvent(
        workspace_id=ws_id,
        type=etype,
        timestamp=now,
        received_at=now,
        payload=payload,
        source="admin",
        actor=actor,
        customer_id=customer_id,
    )
    await writer.submit([event])
    async with db.read() as conn:
        seq = await last_seq(conn, ws_id)
    await pipeline.wait_for(ws_id, seq)


def encode_cursor(value: str | int | list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def decode_cursor(cursor: str, kind: type) -> Any:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise InvalidRequest("invalid_cursor", "the cursor is not one this API returned", "$.cursor") from exc
    if not isinstance(value, kind):
        raise InvalidRequest("invalid_cursor", "the cursor is not one this API returned", "$.cursor")
    return value


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest("invalid_limit", f"limit must be between 1 and {MAX_LIMIT}", "$.limit")
    return limit


def _time_param(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_rfc3339_ms(value)
    except ValueError as exc:
        raise InvalidRequest(
            "invalid_timestamp", f"{name} must be an RFC 3339 timestamp", f"$.{name}"
        ) from exc


def event_view(row: Any) -> dict[str, Any]:
    return event_json(row, orjson.loads(row.payload))


class CustomerService:
    def __init__(self, db: Database, pipeline: Pipeline, writer: IngestWriter, workspaces: WorkspaceService):
        self.db = db
        self.pipeline = pipeline
        self.writer = writer
        self.workspaces = workspaces

    # -- reading -----------------------------------------------------------------------------

    async def resolve(self, ws_id: str, customer_id: str) -> str:
        """The surviving id for ``customer_id`` (itself unless it was merged away)."""
        survivor: str = await self.db.run_read(_resolve, ws_id, customer_id)
        return survivor

    async def get(self, ws_id: str, customer_id: str) -> dict[str, Any]:
        row, idents, merged = await self.db.run_read(_load_view, ws_id, customer_id)
        return self._view(row, idents, merged)

    def _view(self, row: Any, idents: Sequence[Any], merged_ids: list[str]) -> dict[str, Any]:
        idents = sorted(idents, key=lambda i: (i.kind, i.value))
        context = dict(row.context)
        hints = context.pop("channel_hints", [])
        context.pop(CONTEXT_STAMP, None)
        channels = sorted(
            {IDENTITY_CHANNELS[i.kind] for i in idents if i.kind in IDENTITY_CHANNELS} | set(hints)
        )
        context["channels"] = channels
        context.setdefault("groups", [])
        return {
            "id": row.id,
            "object": "customer",
            "identified": bool(row.identified),
            "identities": [
                {"kind": i.kind, "value": i.value, "created_at": ms_to_rfc3339(i.created_at)} for i in idents
            ],
            "traits": row.traits,
            "consents": row.consents,
            "preferences": row.preferences,
            "stage": row.stage,
            "stage_at": ms_to_rfc3339(row.stage_at),
            "context": context,
            "first_seen": ms_to_rfc3339(row.first_seen),
            "last_seen": ms_to_rfc3339(row.last_seen),
            "created_at": ms_to_rfc3339(row.created_at),
            "updated_at": ms_to_rfc3339(row.updated_at),
            "merged_ids": merged_ids,
        }

    async def find_by_identity(self, ws_id: str, identity: str) -> dict[str, Any]:
        kind_raw, sep, value_raw = identity.partition(":")
        kind = normalise_kind(kind_raw)
        if not sep or kind is None:
            raise InvalidRequest(
                "invalid_identity", "identity must be KIND:VALUE, e.g. email:ann@example.com", "$.identity"
            )
        value = normalise(kind, value_raw, await self.pipeline.region(ws_id))
        if value is None:
            raise InvalidRequest("invalid_identity", f"{value_raw!r} is not a valid {kind}", "$.identity")
        row, idents, merged = await self.db.run_read(_load_view_by_identity, ws_id, kind, value)
        return self._view(row, idents, merged)

    async def list(
        self,
        ws_id: str,
        *,
        trait: str | None = None,
        stage: str | None = None,
        seen_since: str | None = None,
        identity_kind: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        limit = check_limit(limit)
        query = sa.select(customers).where(
            customers.c.workspace_id == ws_id, customers.c.merged_into.is_(None)
        )
        if trait is not None:
            name, sep, value = trait.partition(":")
            if not sep or not name:
                raise InvalidRequest("invalid_filter", "trait filter must be NAME:VALUE", "$.trait")
            query = query.where(customers.c.traits[name].as_string() == value)
        if stage is not None:
            query = query.where(customers.c.stage == stage)
        since = _time_param(seen_since, "seen_since")
        if since is not None:
            query = query.where(customers.c.last_seen >= since)
        if identity_kind is not None:
            query = query.where(
                sa.exists().where(
                    identities.c.workspace_id == ws_id,
                    identities.c.customer_key == customers.c.key,
                    identities.c.kind == identity_kind,
                )
            )
        if cursor is not None:
            query = query.where(customers.c.id > decode_cursor(cursor, str))
        query = query.order_by(customers.c.id).limit(limit + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
            page = rows[:limit]
            numbers = [r.key for r in page]
            idents: dict[int, list[Any]] = {n: [] for n in numbers}
            if numbers:
                for ident in await conn.execute(
                    sa.select(
                        identities.c.customer_key,
                        identities.c.kind,
                        identities.c.value,
                        identities.c.created_at,
                    ).where(identities.c.workspace_id == ws_id, identities.c.customer_key.in_(numbers))
                ):
                    idents[ident.customer_key].append(ident)
        items = [self._view(r, idents[r.key], []) for r in page]
        for item in items:
            del item["merged_ids"]
        return {"items": items, "next_cursor": encode_cursor(page[-1].id) if len(rows) > limit else None}

    async def list_events(
        self,
        ws_id: str,
        customer_id: str,
        *,
        type: str | None = None,
        name: str | None = None,
        since: str | None = None,
        until: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        limit = check_limit(limit)
        survivor = await self.resolve(ws_id, customer_id)
        query = event_rows(events.c.workspace_id == ws_id, events.c.customer_key == key_of(ws_id, survivor))
        if type is not None:
            query = query.where(events.c.type == type)
        if name is not None:
            query = query.where(events.c.name == name)
        start, end = _time_param(since, "since"), _time_param(until, "until")
        if start is not None:
            query = query.where(events.c.timestamp >= start)
        if end is not None:
            query = query.where(events.c.timestamp < end)
        if cursor is not None:
            query = query.where(events.c.seq < decode_cursor(cursor, int))
        query = query.order_by(events.c.seq.desc()).limit(limit + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        page = rows[:limit]
        return {
            "items": [event_view(r) for r in page],
            "next_cursor": encode_cursor(page[-1].seq) if len(rows) > limit else None,
        }

    # -- changing (through the log) ----------------------------------------------------------

    async def _change(
        self, ws_id: str, customer_id: str, etype: str, field: str, value: Any, actor: str
    ) -> dict[str, Any]:
        """Append an admin change as an event and wait until the pipeline applied it."""
        body = {field: value}
        bad = nul_path(value, f"$.{field}")
        if bad is not None:
            raise InvalidRequest("invalid_character", "text must not contain U+0000", bad)
        if not depth_ok(body, MAX_ADMIN_DEPTH):
            raise InvalidRequest(
                "too_deep", f"the body nests deeper than {MAX_ADMIN_DEPTH} levels", f"$.{field}"
            )
        if len(orjson.dumps(body)) > MAX_ADMIN_BYTES:
            raise InvalidRequest("event_too_large", f"the change is larger than {MAX_ADMIN_BYTES} bytes", "$")
        survivor = await self.resolve(ws_id, customer_id)
        await apply_admin_event(self.db, self.writer, self.pipeline, ws_id, survivor, etype, body, actor)
        return await self.get(ws_id, survivor)

    async def set_traits(
        self, ws_id: str, customer_id: str, traits: dict[str, Any], actor: str
    ) -> dict[str, Any]:
        if not isinstance(traits, dict) or not traits:
            raise InvalidRequest("invalid_field_type", "traits must be a non-empty object", "$.traits")
        checks = [(validate_consents, "consents"), (validate_preferences, "preferences")]
        for check, key in checks:
            if key in traits:
                _admin_check(check, traits[key], f"$.traits.{key}")
        return await self._change(ws_id, customer_id, "customer.traits_set", "traits", traits, actor)

    async def set_consents(self, ws_id: str, customer_id: str, consents: Any, actor: str) -> dict[str, Any]:
        _admin_check(validate_consents, consents, "$.consents")
        return await self._change(ws_id, customer_id, "customer.consents_set", "consents", consents, actor)

    async def set_preferences(self, ws_id: str, customer_id: str, prefs: Any, actor: str) -> dict[str, Any]:
        _admin_check(validate_preferences, prefs, "$.preferences")
        return await self._change(ws_id, customer_id, "customer.preferences_set", "preferences", prefs, actor)

    async def set_stage(self, ws_id: str, customer_id: str, stage: str, actor: str) -> dict[str, Any]:
        ws = await self.workspaces.get_workspace(ws_id)
        stages = ws["settings"].get("journey_stages", [])
        if stage not in stages:
            raise InvalidRequest("unknown_stage", f"stage must be one of: {', '.join(stages)}", "$.stage")
        return await self._change(ws_id, customer_id, "customer.stage_set", "stage", stage, actor)

    # -- GDPR ----------------------------------------------------------------------------------

    async def _catch_up(self, ws_id: str) -> None:
        await self.writer.flush()
        async with self.db.read() as conn:
            seq = await last_seq(conn, ws_id)
        await self.pipeline.wait_for(ws_id, seq)

    async def export(self, ws_id: str, customer_id: str) -> dict[str, Any]:
        await self._catch_up(ws_id)
        profile = await self.get(ws_id, customer_id)
        ids = [profile["id"], *profile["merged_ids"]]
        async with self.db.read() as conn:
            evs = (
                await conn.execute(
                    event_rows(
                        events.c.workspace_id == ws_id, events.c.customer_key.in_(keys_of(ws_id, ids))
                    ).order_by(events.c.seq)
                )
            ).all()
            out = (
                await conn.execute(
                    sa.select(outbox)
                    .where(outbox.c.workspace_id == ws_id, outbox.c.customer_id.in_(ids))
                    .order_by(outbox.c.id)
                )
            ).all()
            tms = (
                await conn.execute(
                    sa.select(timers)
                    .where(timers.c.workspace_id == ws_id, timers.c.customer_id.in_(ids))
                    .order_by(timers.c.id)
                )
            ).all()
            convs = (
                await conn.execute(
                    sa.select(conversations)
                    .where(conversations.c.workspace_id == ws_id, conversations.c.customer_id.in_(ids))
                    .order_by(conversations.c.id)
                )
            ).all()
        return {
            "object": "customer_export",
            "exported_at": ms_to_rfc3339(now_ms()),
            "customer": profile,
            "events": [event_view(r) for r in evs],
            "messages": [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "target": r.target,
                    "status": r.status,
                    "attempts": r.attempts,
                    "payload": orjson.loads(r.payload),
                    "created_at": ms_to_rfc3339(r.created_at),
                }
                for r in out
            ],
            "timers": [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "status": r.status,
                    "fire_at": ms_to_rfc3339(r.fire_at),
                    "payload": orjson.loads(r.payload),
                }
                for r in tms
            ],
            "conversations": [
                {
                    "id": r.id,
                    "bot_id": r.bot_id,
                    "version": r.version,
                    "status": r.status,
                    "state": orjson.loads(r.state),
                    "channel_id": r.channel_id,
                    "address": r.address,
                    "queue": r.queue,
                    "reason": r.reason,
                    "created_at": ms_to_rfc3339(r.created_at),
                    "updated_at": ms_to_rfc3339(r.updated_at),
                }
                for r in convs
            ],
        }

    async def erase(self, ws_id: str, customer_id: str, actor: str) -> dict[str, Any]:
        """Erase a person: profile, identities, events, messages, timers; keep hashed identifiers only."""
        await self._catch_up(ws_id)
        survivor = await self.resolve(ws_id, customer_id)
        now = now_ms()
        async with self.db.write() as conn:
            await self.db.lock_workspace(conn, ws_id, CONSUMER)
            ids = [survivor] + [
                r[0]
                for r in await conn.execute(
                    sa.select(customers.c.id).where(
                        customers.c.workspace_id == ws_id, customers.c.merged_into == survivor
                    )
                )
            ]
            numbers = [r[0] for r in await conn.execute(keys_of(ws_id, ids))]
            keys = (
                await conn.execute(
                    sa.select(identities.c.kind, identities.c.value).where(
                        identities.c.workspace_id == ws_id, identities.c.customer_key.in_(numbers)
                    )
                )
            ).all()
            if keys:
                await conn.execute(
                    self.db.insert(suppressions).on_conflict_do_nothing(),
                    [
                        {"workspace_id": ws_id, "hash": suppression_hash(ws_id, (k, v)), "created_at": now}
                        for k, v in keys
                    ],
                )
            counts: dict[str, int] = {}
            for table in KEYED_TABLES:
                res = await conn.execute(
                    table.delete().where(table.c.workspace_id == ws_id, table.c.customer_key.in_(numbers))
                )
                counts[table.name] = int(res.rowcount or 0)
            for table in CUSTOMER_TABLES:
                res = await conn.execute(
                    table.delete().where(table.c.workspace_id == ws_id, table.c.customer_id.in_(ids))
                )
                counts[table.name] = int(res.rowcount or 0)
            await conn.execute(
                customers.delete().where(customers.c.workspace_id == ws_id, customers.c.id.in_(ids))
            )
            await append(
                self.db,
                conn,
                [
                    NewEvent(
                        workspace_id=ws_id,
                        type="customer.erased",
                        timestamp=now,
                        received_at=now,
                        source="admin",
                        actor=actor,
                        payload={
                            "erased_customer_ids": ids,
                            "identities": len(keys),
                            "events": counts["events"],
                        },
                    )
                ],
            )
        return {
            "object": "customer_erasure",
            "id": survivor,
            "erased_customer_ids": ids,
            "identities_suppressed": len(keys),
            "events_deleted": counts["events"],
        }

    async def replay(self, ws_id: str) -> int:
        """Rebuild every profile of a workspace from its log; returns the number of events replayed."""
        await self.workspaces.get_workspace(ws_id)
        async with self.db.write() as conn:
            await self.db.lock_workspace(conn, ws_id, CONSUMER)
            await conn.execute(
                events.delete().where(events.c.workspace_id == ws_id, events.c.source == "pipeline")
            )
            # Attributions go; the customer an event named stays (a profile is rebuilt under its
            # old public id, which derives from the event that created it).
            await conn.execute(
                events.update().where(events.c.workspace_id == ws_id).values(customer_key=None)
            )
            await conn.execute(  # an earlier version kept these too: resolved again, by identities
                events.update()
                .where(
                    events.c.workspace_id == ws_id,
                    events.c.type.in_(SEGMENT_TYPES),
                    events.c.source.in_(RESOLVED_SOURCES),
                )
                .values(customer_id=None)
            )
            await conn.execute(identities.delete().where(identities.c.workspace_id == ws_id))
            await conn.execute(customers.delete().where(customers.c.workspace_id == ws_id))
            await conn.execute(
                consumer_cursors.delete().where(
                    consumer_cursors.c.workspace_id == ws_id, consumer_cursors.c.consumer == CONSUMER
                )
            )
            total = (
                await conn.execute(sa.select(sa.func.count()).where(events.c.workspace_id == ws_id))
            ).scalar_one()
        self.pipeline.reset_position(ws_id)
        async with self.db.read() as conn:
            seq = await last_seq(conn, ws_id)
        await self.pipeline.wait_for(ws_id, seq, timeout=3600)
        return int(total)


# -- point reads: prebuilt statements, run by Database.run_read (inline on SQLite) ------------------

_WS: sa.BindParameter[str] = sa.bindparam("ws")
_ID: sa.BindParameter[str] = sa.bindparam("id")
_OWNER_OF = (
    sa.select(customers.c.id)
    .join(identities, identities.c.customer_key == customers.c.key)
    .where(
        identities.c.workspace_id == _WS,
        identities.c.kind == sa.bindparam("kind"),
        identities.c.value == sa.bindparam("value"),
    )
)
_MERGED_INTO = sa.select(customers.c.merged_into).where(
    customers.c.workspace_id == _WS, customers.c.id == _ID
)
_CUSTOMER = sa.select(customers).where(customers.c.workspace_id == _WS, customers.c.id == _ID)
# No ORDER BY: sorting in SQL makes SQLite walk the primary key (already in that order) across the
# whole workspace instead of using the by-customer index; _view sorts.
_IDENTITIES_OF = sa.select(identities.c.kind, identities.c.value, identities.c.created_at).where(
    identities.c.workspace_id == _WS, identities.c.customer_key == key_of(_WS, _ID)
)
_MERGED_FROM = sa.select(customers.c.id).where(
    customers.c.workspace_id == _WS, customers.c.merged_into == _ID
)


def _resolve(conn: Connection, ws_id: str, customer_id: str) -> str:
    for _ in range(64):  # merge chains are compressed on every merge; this is a safety bound
        merged_into = conn.execute(_MERGED_INTO, {"ws": ws_id, "id": customer_id}).first()
        if merged_into is None:
            break
        if merged_into[0] is None:
            return customer_id
        customer_id = merged_into[0]
    raise NotFound("customer", "$.id")


def _load_view(conn: Connection, ws_id: str, customer_id: str) -> tuple[Any, list[Any], list[str]]:
    survivor = _resolve(conn, ws_id, customer_id)
    params = {"ws": ws_id, "id": survivor}
    row = conn.execute(_CUSTOMER, params).one()
    idents = list(conn.execute(_IDENTITIES_OF, params).all())
    merged = [m[0] for m in conn.execute(_MERGED_FROM, params)]
    return row, idents, merged


def _load_view_by_identity(
    conn: Connection, ws_id: str, kind: str, value: str
) -> tuple[Any, list[Any], list[str]]:
    owner = conn.execute(_OWNER_OF, {"ws": ws_id, "kind": kind, "value": value}).first()
    if owner is None:
        raise NotFound("customer", "$.identity")
    return _load_view(conn, ws_id, owner[0])
