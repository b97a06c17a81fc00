"""Durable waits and event history in flows, through the pipeline: a flow that waits for a payment
continues when the business reports it, or takes its timeout branch when the timer fires."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mayak.channels.base import ChannelRecord
from mayak.channels.events import inbound_event
from mayak.db.schema import timers
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import admin
from tests.test_bots_conversations import FakeChannel

BOT = """\
bot:
  name: payments
  fallback_after: 5

intents:
  pay:
    examples: [I want to pay, how do I pay, payment please, pay my bill, can I pay now]
  history:
    examples: [what did I buy, my orders, order history, have I ordered before, show my purchases]

flows:
  pay:
    trigger: {intents: [pay]}
    steps:
      - say: "Here is your payment link. I will wait for it."
      - wait: {event: Payment Completed, timeout: 2h, on_timeout: reminder}
      - say: "Thank you, {{ event.amount | money('RUB') }} received."
      - end: true
      - id: reminder
        say: "Your payment has not arrived yet. Shall I send the link again?"

  history:
    trigger: {intents: [history]}
    steps:
      - branch:
          - {if: 'count_events("Order Completed", days=30) >= 2', goto: regular}
          - {if: 'last_event("Order Completed") != null', goto: once}
      - say: "I do not see any orders yet."
      - end: true
      - id: regular
        say: >-
          You are a regular:
          {{ events | selectattr('name', 'equalto', 'Order Completed') | list | length }}
          orders this month.
      - end: true
      - id: once
        say: "You ordered once."
"""


@pytest.fixture
async def chat(
    mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any]
) -> tuple[FakeChannel, ChannelRecord]:
    fake = FakeChannel("webchat")
    mayak.channels.register(fake)  # type: ignore[arg-type]
    r = await client.post("/v1/bots", json={"files": {"bot.yaml": BOT}}, headers=admin(ws))
    assert r.status_code == 201, r.text
    created = await mayak.channels.create(
        ws["id"], type="webchat", name="c", config={}, bot_id=r.json()["id"]
    )
    return fake, await mayak.channels.record(ws["id"], created["id"])


async def say(mayak: Mayak, channel: ChannelRecord, text: str, key: str) -> None:
    now = now_ms()
    ev = inbound_event(
        channel,
        address="v1",
        timestamp=now,
        received_at=now,
        dedup_key=key,
        text=text,
        anonymous_id="v1",
        user_id="u1",
    )
    await mayak.writer.submit([ev])
    await mayak.drain()


async def track(
    client: httpx.AsyncClient, ws: dict[str, Any], name: str, props: dict[str, Any], mid: str
) -> None:
    body = {"userId": "u1", "event": name, "properties": props, "messageId": mid}
    r = await client.post("/v1/track", json=body, auth=(ws["write_key"], ""))
    assert r.status_code == 200


async def test_wait_ends_with_the_event(
    mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any], chat: tuple[FakeChannel, ChannelRecord]
) -> None:
    fake, channel = chat
    await say(mayak, channel, "I want to pay", "m1")
    assert "I will wait" in fake.texts()[-1]
    await track(client, ws, "Payment Completed", {"amount": 990000}, "p1")
    await mayak.drain()
    assert fake.texts()[-1] == "Thank you, 9 900 RUB received."
    async with mayak.db.read() as conn:
        status = (await conn.execute(sa.select(timers.c.status).where(timers.c.kind == "bot"))).scalar_one()
    assert status == "cancelled"


async def test_wait_times_out_durably(
    mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any], chat: tuple[FakeChannel, ChannelRecord]
) -> None:
    fake, channel = chat
    await say(mayak, channel, "how do I pay", "m1")
    async with mayak.db.read() as conn:
        fire_at = (await conn.execute(sa.select(timers.c.fire_at).where(timers.c.kind == "bot"))).scalar_one()
    assert fire_at >= now_ms() + 2 * 3_600_000 - 60_000
    await mayak.timers.run_once(now=fire_at + 1)
    await mayak.drain()
    assert "has not arrived yet" in fake.texts()[-1]
    # A late payment no longer resumes the finished wait.
    sent = len(fake.sent)
    await track(client, ws, "Payment Completed", {"amount": 1}, "p-late")
    await mayak.drain()
    assert len(fake.sent) == sent


async def test_branches_on_event_history(
    mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any], chat: tuple[FakeChannel, ChannelRecord]
) -> None:
    fake, channel = chat
    await say(mayak, channel, "what did I buy", "m1")
    assert fake.texts()[-1] == "I do not see any orders yet."
    await track(client, ws, "Order Completed", {"total": 100}, "o1")
    await say(mayak, channel, "my orders", "m2")
    assert fake.texts()[-1] == "You ordered once."
    await track(client, ws, "Order Completed", {"total": 200}, "o2")
    await say(mayak, channel, "order history", "m3")
    assert fake.texts()[-1] == "You are a regular: 2 orders this month."
