"""Configured channels: CRUD, adapter lookup, and delivery of outbound messages from the outbox.

Secret parts of a channel's config (a Telegram bot token, the webhook secret) are stored encrypted
with the workspace's other secrets and decrypted only into ``ChannelRecord.secrets``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import orjson
import sqlalchemy as sa
import structlog

from mayak.channels.base import MESSAGE_KIND, ChannelAdapter, ChannelRecord, OutboundMessage, fit
from mayak.db.database import Database
from mayak.db.schema import bots, channels
from mayak.delivery.outbox import DeliveryOutcome, OutboxItem, OutboxRow
from mayak.errors import InvalidRequest, NotFound
from mayak.ids import new_id
from mayak.timeutil import ms_to_rfc3339, now_ms
from mayak.workspaces.service import WorkspaceService

log = structlog.get_logger("mayak.channels")

SECRET_PURPOSE = "channel"
MAX_CHANNELS = 50
CACHE_SECONDS = 5.0
CACHE_SIZE = 1024


class ChannelService:
    def __init__(self, db: Database, workspaces: WorkspaceService):
        self.db = db
        self.workspaces = workspaces
        self.adapters: dict[str, ChannelAdapter] = {}
        self._cache: OrderedDict[str, tuple[float, ChannelRecord]] = OrderedDict()

    def register(self, adapter: ChannelAdapter) -> None:
        self.adapters[adapter.type] = adapter

    async def close(self) -> None:
        """Release what adapters hold (HTTP clients, sockets)."""
        for adapter in self.adapters.values():
            close = getattr(adapter, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.warning("channel_adapter_close_failed", channel_type=adapter.type, exc_info=True)

    def adapter(self, channel_type: str) -> ChannelAdapter:
        try:
            return self.adapters[channel_type]
        except KeyError:
            raise InvalidRequest(
                "unknown_channel_type",
                f"channel type must be one of: {', '.join(sorted(self.adapters))}",
                "$.type",
            ) from None

    # -- administration ------------------------------------------------------------------------

    async def create(
        self, ws_id: str, *, type: str, name: str, config: dict[str, Any], bot_id: str | None = None
    ) -> dict[str, Any]:
        adapter = self.adapter(type)
        name = (name or "").strip()
        if not name or len(name) > 200:
            raise InvalidRequest("invalid_name", "name must be 1-200 characters", "$.name")
        if not isinstance(config, dict):
            raise InvalidRequest("invalid_config", "config must be an object", "$.config")
        public, secret = adapter.validate_config(config)
        channel_id = new_id("ch")
        now = now_ms()
        async with self.db.write() as conn:
            count = (
                await conn.execute(sa.select(sa.func.count()).where(channels.c.workspace_id == ws_id))
            ).scalar_one()
            if count >= MAX_CHANNELS:
                raise InvalidRequest("too_many_channels", f"a workspace can have at most {MAX_CHANNELS}")
            if bot_id is not None:
                await _check_bot(conn, ws_id, bot_id)
            secret_id = (
                await self.workspaces.store_secret(conn, ws_id, SECRET_PURPOSE, orjson.dumps(secret).decode())
                if secret
                else None
            )
            await conn.execute(
                channels.insert().values(
                    id=channel_id,
                    workspace_id=ws_id,
                    type=type,
                    name=name,
                    bot_id=bot_id,
                    config=public,
                    secret_id=secret_id,
                    status="active",
                    created_at=now,
                )
            )
        record = ChannelRecord(channel_id, ws_id, type, name, bot_id, public, secret)
        try:
            extra = await adapter.activate(record)
        except Exception:
            async with self.db.write() as conn:
                await conn.execute(channels.delete().where(channels.c.id == channel_id))
            raise
        if extra:
            record.config = public | extra
            async with self.db.write() as conn:
                await conn.execute(
                    channels.update().where(channels.c.id == channel_id).values(config=record.config)
                )
        return await self.get(ws_id, channel_id)

    async def update(self, ws_id: str, channel_id: str, *, bot_id: str | None, status: str | None) -> Any:
        values: dict[str, Any] = {}
        async with self.db.write() as conn:
            await self._row(conn, ws_id, channel_id)
            if bot_id is not None:
                await _check_bot(conn, ws_id, bot_id)
                values["bot_id"] = bot_id
            if status is not None:
                if status not in ("active", "disabled"):
                    raise InvalidRequest("invalid_status", "status is active or disabled", "$.status")
                values["status"] = status
            if values:
                await conn.execute(channels.update().where(channels.c.id == channel_id).values(**values))
        self._cache.pop(channel_id, None)
        return await self.get(ws_id, channel_id)

    async def list(self, ws_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(channels).where(channels.c.workspace_id == ws_id).order_by(channels.c.id)
            )
            return [_public(r) for r in rows]

    async def get(self, ws_id: str, channel_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            return _public(await self._row(conn, ws_id, channel_id))

    async def delete(self, ws_id: str, channel_id: str) -> dict[str, Any]:
        record = await self.record(ws_id, channel_id)
        try:
            await self.adapter(record.type).deactivate(record)
        except Exception:
            log.warning("channel_deactivate_failed", channel=channel_id, exc_info=True)
        async with self.db.write() as conn:
            await conn.execute(channels.delete().where(channels.c.id == channel_id))
        self._cache.pop(channel_id, None)
        return {"id": channel_id, "deleted": True}

    async def _row(self, conn: Any, ws_id: str, channel_id: str) -> Any:
        row = (
            await conn.execute(
                sa.select(channels).where(channels.c.workspace_id == ws_id, channels.c.id == channel_id)
            )
        ).first()
        if row is None:
            raise NotFound("channel", "$.channel_id")
        return row

    # -- runtime -------------------------------------------------------------------------------

    async def record(self, ws_id: str | None, channel_id: str) -> ChannelRecord:
        """The channel with its secrets, cached for a few seconds. ``ws_id=None`` trusts the id alone
        (inbound webhooks that carry the channel id in their URL and prove it with a secret)."""
        cached = self._cache.get(channel_id)
        if cached and cached[0] > time.monotonic() and (ws_id is None or cached[1].workspace_id == ws_id):
            return cached[1]
        async with self.db.read() as conn:
            query = sa.select(channels).where(channels.c.id == channel_id)
            if ws_id is not None:
                query = query.where(channels.c.workspace_id == ws_id)
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound("channel", "$.channel_id")
        secret = orjson.loads(await self.workspaces.read_secret(row.secret_id)) if row.secret_id else {}
        record = ChannelRecord(
            row.id, row.workspace_id, row.type, row.name, row.bot_id, dict(row.config), secret, row.status
        )
        self._cache[channel_id] = (time.monotonic() + CACHE_SECONDS, record)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return record

    async def first_of_type(self, ws_id: str, channel_type: str) -> ChannelRecord | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(channels.c.id)
                    .where(
                        channels.c.workspace_id == ws_id,
                        channels.c.type == channel_type,
                        channels.c.status == "active",
                    )
                    .order_by(channels.c.id)
                    .limit(1)
                )
            ).first()
        return None if row is None else await self.record(ws_id, row[0])

    async def instant(self, item: OutboxItem) -> bool:
        """Whether the outbox may treat a ``message`` item as an instant push (recorded sent when
        written, pushed after the commit: ``OutboxDispatcher.instant``): its channel is active and
        its adapter says its sends cannot fail and reach only what a crash of this process closes
        anyway (``instant_push``: the web chat on the in-process bus)."""
        channel_id = item.payload.get("channel_id")
        if not isinstance(channel_id, str):
            return False
        try:
            channel = await self.record(item.workspace_id, channel_id)
        except NotFound:
            return False
        adapter = self.adapters.get(channel.type)
        return channel.status == "active" and bool(getattr(adapter, "instant_push", False))

    async def deliver(self, row: OutboxRow) -> DeliveryOutcome:
        """Outbox handler for kind ``message``: payload ``{channel_id, address, message}``."""
        payload = row.payload
        try:
            channel = await self.record(row.workspace_id, str(payload["channel_id"]))
        except NotFound:
            return DeliveryOutcome(False, error="the channel no longer exists", retryable=False)
        if channel.status != "active":
            return DeliveryOutcome(False, error="the channel is disabled", retryable=False)
        adapter = self.adapters.get(channel.type)
        if adapter is None:
            return DeliveryOutcome(False, error=f"no adapter for {channel.type}", retryable=False)
        parts = fit(OutboundMessage.from_json(payload["message"]), adapter.capabilities)
        outcome = DeliveryOutcome(True)
        for index, part in enumerate(parts):
            outcome = await adapter.send(channel, str(payload["address"]), part, f"{row.id}.{index}")
            if not outcome.ok:
                return outcome
        return outcome


async def _check_bot(conn: Any, ws_id: str, bot_id: str) -> None:
    row = (
        await conn.execute(sa.select(bots.c.id).where(bots.c.workspace_id == ws_id, bots.c.id == bot_id))
    ).first()
    if row is None:
        raise NotFound("bot", "$.bot_id")


def _public(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "type": row.type,
        "name": row.name,
        "bot_id": row.bot_id,
        "config": dict(row.config),
        "status": row.status,
        "created_at": ms_to_rfc3339(row.created_at),
    }


__all__ = ["MESSAGE_KIND", "ChannelService"]
