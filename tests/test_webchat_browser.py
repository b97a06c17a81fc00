"""The widget in a real browser (Debian's Chromium through Playwright) against a real server: the
demo page, a typed message acked, a bot message with a button pushed through the outbox, the click
logged, and the conversation back after a reload."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from mayak.channels.webchat import adapter_of
from mayak.eventlog import NewEvent, append
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import need_service
from tests.test_webchat import Live, _enqueue_message, live, logged

__all__ = ["live"]  # the fixture, imported for pytest
pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
async def page(live: Live) -> AsyncIterator[Any]:
    need_service("Chromium", os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = await browser.new_context()
            pg = await context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            yield pg
            assert errors == [], errors
        finally:
            await browser.close()


async def test_chat_in_the_browser(live: Live, page: Any, mayak: Mayak) -> None:
    from playwright.async_api import expect

    ws_id, channel_id = live.ws["id"], live.channel["id"]
    url = f"http://127.0.0.1:{live.port}/v1/webchat/{channel_id}/demo?key={live.ws['write_key']}"
    await page.goto(url)
    panel = page.locator(".panel")
    await expect(panel).to_be_visible()  # data-open="true" on the demo page
    await expect(page.locator(".head span")).to_have_text("Ask us")
    await expect(page.locator(".msg.out").first).to_have_text("Hi there!")  # the greeting

    await page.locator("textarea").fill("Is the <b>Aurora</b> in stock?")
    await page.locator("textarea").press("Enter")
    mine = page.locator(".msg.in", has_text="Aurora")
    await expect(mine).to_have_class("msg in")  # acked: no longer pending
    await expect(mine).to_have_text("Is the <b>Aurora</b> in stock?")  # shown as text, not markup
    [row] = await logged(mayak, ws_id, name="Message Received")
    body = orjson.loads(row.payload)
    visitor = await page.evaluate("JSON.parse(localStorage.getItem('mayak.visitor_id'))")
    assert body["anonymousId"] == visitor and body["properties"]["text"] == "Is the <b>Aurora</b> in stock?"
    assert body["context"]["timezone"] and body["context"]["page"]["url"].startswith("http://127.0.0.1")

    await mayak.drain()
    customer = (await mayak.customers.find_by_identity(ws_id, f"anonymous_id:{visitor}"))["id"]
    text = "We have two. <img src=x onerror=alert(1)> Book a test drive?"
    await _enqueue_message(
        live,
        customer,
        visitor,
        f"bot-{uuid.uuid4()}",
        {"text": text, "buttons": [{"title": "Book", "payload": "book"}]},
    )
    await mayak.drain()
    bot = page.locator(".msg.out", has_text="We have two.")
    await expect(bot).to_contain_text(text)
    await expect(page.locator(".msg.out img")).to_have_count(0)
    await bot.get_by_role("button", name="Book").click()
    await expect(page.locator(".msg.in", has_text="Book")).to_have_class("msg in")
    [click] = await logged(mayak, ws_id, name="Button Clicked")
    props = orjson.loads(click.payload)["properties"]
    assert props["payload"] == "book" and props["title"] == "Book" and props["address"] == visitor

    # The connection drops (a server restart, say): what the visitor types meanwhile stays queued,
    # the widget reconnects and sends it.
    assert adapter_of(mayak).hub.close_all() == 1
    await page.locator("textarea").fill("still there?")
    await page.locator("textarea").press("Enter")
    await expect(page.locator(".msg.in", has_text="still there?")).to_have_class("msg in")
    assert len(await logged(mayak, ws_id, name="Message Received")) == 2

    # What the bot engine will log with each message it sends (message.outbound) comes back as
    # history after a reload, with its buttons, as do the visitor's own messages.
    now = now_ms()
    outbound = NewEvent(
        workspace_id=ws_id,
        type="message.outbound",
        timestamp=now,
        received_at=now,
        source="bot",
        customer_id=customer,
        payload={
            "channel_id": channel_id,
            "channel": "webchat",
            "address": visitor,
            "message": {"text": text, "buttons": [{"title": "Book", "payload": "book"}]},
            "conversation_id": "conv_test",
        },
    )
    async with mayak.db.write() as conn:
        await append(mayak.db, conn, [outbound])
    await mayak.drain()
    await page.reload()
    await expect(page.locator(".msg.in")).to_have_count(3)
    await expect(page.locator(".msg.in").first).to_have_text("Is the <b>Aurora</b> in stock?")
    await expect(page.locator(".msg.out", has_text="We have two.").get_by_role("button")).to_have_text("Book")
