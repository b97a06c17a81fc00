"""Signed generic inbound webhooks: a business system POSTs JSON, Mayak logs one ``track`` event.

Why Standard Webhooks: the sender signs ``{webhook-id}.{webhook-timestamp}.{body}`` with the hook's
``whsec_`` secret, which is what Svix and a growing list of platforms already send, so most business
systems can call a hook without custom code. The timestamp bounds replays to five minutes either
side; the ``webhook-id`` (the same on every retry of one message) is the event's dedup key, so a
resent delivery is stored once and answered 200 both times.

A hook answers only after the event is durably appended; everything else (identity resolution,
profile, triggers, bots) follows from the log like for any other event.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping as HeaderMap
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import hooks, signing_secrets
from mayak.delivery import webhooks
from mayak.errors import InvalidRequest, NotFound
from mayak.ids import new_id
from mayak.ingest.body import parse_json
from mayak.ingest.writer import IngestWriter
from mayak.integrations.mapping import HookInfo, Mapping, build_event, parse_mapping
from mayak.timeutil import ms_to_rfc3339, now_ms
from mayak.workspaces.service import WorkspaceService

SECRET_PURPOSE = "hook"
ID_PREFIX = "hook"
MAX_HOOKS = 100
CACHE_TTL_S = 5.0  # another process's delete stops a hook here within this
CACHE_SIZE = 4096
REPLAY_WINDOW_S = webhooks.DEFAULT_TOLERANCE_S

Records = list[dict[str, Any]]  # inside the class, ``list`` names the method


@dataclass(frozen=True, slots=True)
class _Hook:
    id: str
    workspace_id: str
    name: str
    mapping: Mapping
    secret: str


class HookService:
    def __init__(self, db: Database, workspaces: WorkspaceService, writer: IngestWriter, settings: Settings):
        self.db = db
        self.workspaces = workspaces
        self.writer = writer
        self.settings = settings
        self._cache: OrderedDict[str, tuple[float, _Hook]] = OrderedDict()

    # -- administration ------------------------------------------------------------------------

    async def create(self, ws_id: str, *, name: Any, mapping: Any) -> dict[str, Any]:
        """Create a hook; the answer carries ``signing_secret``, which is never shown again."""
        clean_name = _validate_name(name)
        parsed = parse_mapping(mapping)
        secret = webhooks.new_webhook_secret()
        values = {
            "id": new_id(ID_PREFIX),
            "workspace_id": ws_id,
            "name": clean_name,
            "mapping": parsed.to_json(),
            "enabled": True,
            "created_at": now_ms(),
        }
        async with self.db.write() as conn:
            count = (
                await conn.execute(sa.select(sa.func.count()).where(hooks.c.workspace_id == ws_id))
            ).scalar_one()
            if count >= MAX_HOOKS:
                raise InvalidRequest(
                    "too_many_hooks", f"a workspace can have at most {MAX_HOOKS} hooks; delete one first"
                )
            values["secret_id"] = await self.workspaces.store_secret(conn, ws_id, SECRET_PURPOSE, secret)
            await conn.execute(hooks.insert().values(**values))
        return _public(values) | {"signing_secret": secret}

    async def list(self, ws_id: str) -> Records:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(hooks).where(hooks.c.workspace_id == ws_id).order_by(hooks.c.id)
            )
            return [_public(r._mapping) for r in rows]

    async def get(self, ws_id: str, hook_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            return _public(await _owned(conn, ws_id, hook_id))

    async def delete(self, ws_id: str, hook_id: str) -> dict[str, Any]:
        """Delete a hook and its secret; later deliveries to it answer 404."""
        async with self.db.write() as conn:
            row = await _owned(conn, ws_id, hook_id)
            await conn.execute(hooks.delete().where(hooks.c.id == hook_id))
            await conn.execute(signing_secrets.delete().where(signing_secrets.c.id == row["secret_id"]))
        self._cache.pop(hook_id, None)
        return {"id": hook_id, "deleted": True}

    # -- receiving -----------------------------------------------------------------------------

    async def find(self, hook_id: str) -> _Hook:
        """The enabled hook with this id (cached briefly), or ``NotFound``."""
        cached = self._cache.get(hook_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        if not hook_id.startswith(ID_PREFIX + "_") or len(hook_id) > 40:
            raise NotFound("hook")
        async with self.db.read() as conn:
            row = (
                await conn.execute(sa.select(hooks).where(hooks.c.id == hook_id, hooks.c.enabled.is_(True)))
            ).first()
        if row is None:
            self._cache.pop(hook_id, None)
            raise NotFound("hook")
        hook = _Hook(
            id=row.id,
            workspace_id=row.workspace_id,
            name=row.name,
            mapping=parse_mapping(row.mapping),
            secret=await self.workspaces.read_secret(row.secret_id),
        )
        self._cache[hook_id] = (time.monotonic() + CACHE_TTL_S, hook)
        self._cache.move_to_end(hook_id)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return hook

    async def receive(
        self, hook: _Hook, headers: HeaderMap[str, str], body: bytes, *, now_s: int | None = None
    ) -> dict[str, Any]:
        """Verify, map and append one delivery; returns once the event is committed.

        Refusals: ``missing_signature_headers`` / ``signature_timestamp_out_of_window`` /
        ``invalid_signature`` (401), ``invalid_json`` (400), mapping failures (400, ``param`` = the
        path in the body), ``event_too_large`` (413).
        """
        webhooks.verify(hook.secret, headers, body, tolerance_s=REPLAY_WINDOW_S, now_s=now_s)
        document = parse_json(body)
        webhook_id = headers.get(webhooks.HEADER_ID) or ""
        region = str((await self.workspaces.settings(hook.workspace_id)).get("default_region") or "US")
        event = build_event(
            hook.mapping,
            document,
            HookInfo(hook.id, hook.name, hook.workspace_id, webhook_id),
            received_at=now_ms(),
            region=region,
            max_event_bytes=self.settings.max_event_bytes,
            max_depth=self.settings.max_json_depth,
        )
        result = await self.writer.submit([event])
        duplicate = result.duplicates > 0
        return {"success": True, "duplicate": duplicate, "event_id": None if duplicate else event.id}


# -- helpers -----------------------------------------------------------------------------------


async def _owned(conn: AsyncConnection, ws_id: str, hook_id: str) -> Any:
    row = (
        await conn.execute(sa.select(hooks).where(hooks.c.id == hook_id, hooks.c.workspace_id == ws_id))
    ).first()
    if row is None:
        raise NotFound("hook")
    return row._mapping


def _public(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "mapping": dict(row["mapping"]),
        "enabled": bool(row["enabled"]),
        "path": f"/v1/hooks/{row['id']}",
        "created_at": ms_to_rfc3339(row["created_at"]),
    }


def _validate_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 200:
        raise InvalidRequest("invalid_name", "name must be 1-200 characters", "$.name")
    return name.strip()
