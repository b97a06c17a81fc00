"""The Demo Motors bot in Telegram, through the real adapter and the Bot API emulator: updates in,
sendMessage with inline keyboards out, button presses, unknown callback data, and a deep link that
carries a web conversation over to Telegram."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx
import pytest

from mayak.channels.events import inbound_event
from mayak.config import Settings
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import admin
from tests.telegram_emulator import Bot, TelegramEmulator, telegram_server, tg

__all__ = ["telegram_server", "tg"]  # fixtures

DEMO = Path(__file__).parent.parent / "src" / "mayak" / "bots" / "examples" / "demo_motors"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, public_url="https://mayak.example.com")


@dataclasses.dataclass
class Setup:
    mayak: Mayak
    client: httpx.AsyncClient
    ws: dict[str, Any]
    tg: TelegramEmulator
    bot: Bot
    channel: dict[str, Any]
    bot_id: str

    async def send(self, update: dict[str, Any]) -> None:
        r = await self.tg.deliver(self.client, self.bot, update)
        assert r.status_code == 200, r.text
        await self.mayak.drain()

    def texts(self, chat_id: int) -> list[str]:
        return [m["text"] for m in self.bot.sent if m["chat"]["id"] == chat_id]


@pytest.fixture
async def setup(mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any], tg: TelegramEmulator) -> Any:
    files = {str(p.relative_to(DEMO)): p.read_text() for p in DEMO.rglob("*.yaml")}
    r = await client.post("/v1/bots", json={"files": files}, headers=admin(ws))
    assert r.status_code == 201, r.text
    bot_id = r.json()["id"]
    bot = tg.add_bot("demo_motors_bot")
    r = await client.post(
        "/v1/channels",
        json={
            "type": "telegram",
            "name": "Demo Motors",
            "bot_id": bot_id,
            "config": {"bot_token": bot.token, "api_base_url": tg.base_url},
        },
        headers=admin(ws),
    )
    assert r.status_code == 201, r.text
    s = Setup(mayak, client, ws, tg, bot, r.json(), bot_id)
    yield s
    await mayak.channels.adapters["telegram"].close()  # type: ignore[attr-defined]


async def test_start_and_buttons_in_telegram(setup: Setup) -> None:
    await setup.send(setup.tg.message_update(setup.bot, 1001, "/start"))
    [greeting] = [m for m in setup.bot.sent if m["chat"]["id"] == 1001]
    assert "Demo Motors assistant" in greeting["text"]
    titles = [b["text"] for row in greeting["reply_markup"]["inline_keyboard"] for b in row]
    assert titles == ["Book a service visit", "Is my car ready?", "Talk to a person"]
    await setup.send(setup.tg.press_button(setup.bot, 1001, "Book a service visit"))
    assert "Which car" in setup.texts(1001)[-1]
    await setup.send(setup.tg.message_update(setup.bot, 1001, "Octavia"))
    assert "Which day" in setup.texts(1001)[-1]


async def test_unknown_callback_data_is_answered_sensibly(setup: Setup) -> None:
    await setup.send(setup.tg.message_update(setup.bot, 1002, "hello"))
    await setup.send(setup.tg.callback_update(setup.bot, 1002, "no-such-payload"))
    assert "did not understand" in setup.texts(1002)[-1]


async def test_deep_link_continues_a_web_conversation_in_telegram(setup: Setup) -> None:
    m, ws = setup.mayak, setup.ws
    web = await m.channels.create(ws["id"], type="webchat", name="Site", config={}, bot_id=setup.bot_id)
    record = await m.channels.record(ws["id"], web["id"])
    now = now_ms()
    event = inbound_event(
        record,
        address="visitor-1",
        timestamp=now,
        received_at=now,
        dedup_key="web-1",
        text="I want to book a service",
        anonymous_id="visitor-1",
        user_id="crm-77",
    )
    await m.writer.submit([event])
    await m.drain()
    r = await setup.client.get("/v1/customers?identity=user_id:crm-77", headers=admin(ws))
    customer_id = r.json()["id"]
    r = await setup.client.post(f"/v1/customers/{customer_id}/link_tokens", json={}, headers=admin(ws))
    assert r.status_code == 201, r.text
    link = r.json()["links"]["telegram"]
    token = link.rsplit("start=", 1)[1]
    assert link.startswith("https://t.me/demo_motors_bot?start=")
    await setup.send(setup.tg.message_update(setup.bot, 2002, f"/start {token}"))
    r = await setup.client.get("/v1/customers?identity=telegram:2002", headers=admin(ws))
    assert r.json()["id"] == customer_id
    # The same conversation goes on: the bot was waiting for the car model.
    await setup.send(setup.tg.message_update(setup.bot, 2002, "Octavia"))
    assert "Which day" in setup.texts(2002)[-1]
