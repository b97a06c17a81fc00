"""Fixtures and helpers shared by the Telegram channel's end-to-end tests.

A test module uses a fixture by importing it (and naming it in ``__all__``): ``settings`` (a public
URL, so that Mayak can set webhooks), ``adapter`` (the Telegram adapter, closed afterwards) and
``telegram``: a workspace with a Telegram channel connected to a bot of the emulator, bundled in a
``Telegram`` with the helpers most tests need."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from mayak.channels.base import MESSAGE_KIND
from mayak.channels.telegram import TelegramAdapter
from mayak.config import Settings
from mayak.db.schema import events, outbox, outbox_attempts
from mayak.delivery.outbox import OutboxItem, enqueue
from mayak.eventlog import event_rows
from mayak.platform import Mayak
from tests.conftest import admin
from tests.telegram_emulator import Bot, TelegramEmulator, telegram_server, tg

__all__ = ["Telegram", "adapter", "settings", "telegram", "telegram_server", "tg"]  # fixtures

PUBLIC_URL = "https://mayak.example.com/"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, public_url=PUBLIC_URL)


def adapter_of(mayak: Mayak) -> TelegramAdapter:
    adapter = mayak.channels.adapters["telegram"]
    assert isinstance(adapter, TelegramAdapter)
    return adapter


@pytest.fixture
async def adapter(mayak: Mayak) -> AsyncIterator[TelegramAdapter]:
    adapter = adapter_of(mayak)
    yield adapter
    await adapter.close()


async def connect(
    client: httpx.AsyncClient, ws: dict[str, Any], tg: TelegramEmulator, bot: Bot | None = None
) -> tuple[dict[str, Any], Bot]:
    bot = bot or tg.add_bot()
    r = await client.post(
        "/v1/channels",
        json={
            "type": "telegram",
            "name": "Shop bot",
            "config": {"bot_token": bot.token, "api_base_url": tg.base_url},
        },
        headers=admin(ws),
    )
    assert r.status_code == 201, r.text
    return r.json(), bot


async def logged(mayak: Mayak, ws: dict[str, Any], name: str | None = None) -> list[dict[str, Any]]:
    """The workspace's events in log order (payload decoded)."""
    query = event_rows(events.c.workspace_id == ws["id"]).order_by(events.c.seq)
    if name is not None:
        query = query.where(events.c.name == name)
    async with mayak.db.read() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [dict(r) | {"payload": orjson.loads(r["payload"])} for r in rows]


async def customer_of(client: httpx.AsyncClient, ws: dict[str, Any], identity: str) -> dict[str, Any]:
    r = await client.get("/v1/customers", params={"identity": identity}, headers=admin(ws))
    assert r.status_code == 200, r.text
    customer: dict[str, Any] = r.json()
    return customer


async def outbox_rows(mayak: Mayak) -> list[dict[str, Any]]:
    async with mayak.db.read() as conn:
        return [dict(r) for r in (await conn.execute(sa.select(outbox).order_by(outbox.c.id))).mappings()]


async def attempts(mayak: Mayak, row_id: str) -> list[tuple[int, int | None, str | None]]:
    a = outbox_attempts.c
    async with mayak.db.read() as conn:
        rows = await conn.execute(
            sa.select(a.attempt, a.status_code, a.error).where(a.outbox_id == row_id).order_by(a.attempt)
        )
        return [(r.attempt, r.status_code, r.error) for r in rows]


async def say(
    mayak: Mayak, ws: dict[str, Any], channel: dict[str, Any], chat: int, message: dict[str, Any], key: str
) -> str:
    """Enqueue an outbound message as the bot router would; returns the outbox row id."""
    payload = {"channel_id": channel["id"], "address": str(chat), "message": message}
    item = OutboxItem(ws["id"], MESSAGE_KIND, payload, key, target=channel["id"])
    async with mayak.db.write() as conn:
        await enqueue(mayak.db, conn, [item])
    rows = [r for r in await outbox_rows(mayak) if r["idempotency_key"] == key]
    return str(rows[0]["id"])


@dataclasses.dataclass
class Telegram:
    """A workspace with a Telegram channel connected to ``bot`` of the emulator ``tg``."""

    client: httpx.AsyncClient
    mayak: Mayak
    ws: dict[str, Any]
    tg: TelegramEmulator
    adapter: TelegramAdapter
    channel: dict[str, Any]
    bot: Bot

    async def deliver(self, update: dict[str, Any] | bytes, *, secret: str | None = "") -> httpx.Response:
        """Telegram posts ``update`` to the bot's webhook."""
        return await self.tg.deliver(self.client, self.bot, update, secret=secret)

    async def message(self, chat: int, text: str | None = None, **fields: Any) -> httpx.Response:
        """The customer in ``chat`` writes to the bot."""
        return await self.deliver(self.tg.message_update(self.bot, chat, text, **fields))

    async def hi(self, chat: int) -> None:
        """The customer in ``chat`` says "hi" (so the bot may write there) and the pipeline is drained."""
        await self.message(chat, "hi")
        await self.mayak.drain()

    async def say(self, chat: int, message: dict[str, Any], key: str) -> str:
        """Enqueue ``message`` to ``chat`` as the bot router would; returns the outbox row id."""
        return await say(self.mayak, self.ws, self.channel, chat, message, key)

    async def logged(self, name: str | None = None) -> list[dict[str, Any]]:
        return await logged(self.mayak, self.ws, name)

    async def customer(self, identity: str) -> dict[str, Any]:
        return await customer_of(self.client, self.ws, identity)

    async def outbox_rows(self) -> list[dict[str, Any]]:
        return await outbox_rows(self.mayak)

    async def row(self, row_id: str) -> dict[str, Any]:
        return next(r for r in await outbox_rows(self.mayak) if r["id"] == row_id)

    async def attempts(self, row_id: str) -> list[tuple[int, int | None, str | None]]:
        return await attempts(self.mayak, row_id)

    def texts(self) -> list[str]:
        """What the bot has sent, in order."""
        return [m["text"] for m in self.bot.sent]


@pytest.fixture
async def telegram(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], tg: TelegramEmulator
) -> AsyncIterator[Telegram]:
    """A Telegram channel connected in ``ws``; its adapter (``telegram.adapter``) is closed afterwards."""
    adapter = adapter_of(mayak)
    try:
        channel, bot = await connect(client, ws, tg)
        yield Telegram(client, mayak, ws, tg, adapter, channel, bot)
    finally:
        await adapter.close()
