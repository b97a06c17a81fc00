"""A message sent as several parts resumes at the first unsent part when it is retried.

End to end against the Telegram Bot API emulator on a real socket (parts cut by ``fit``, parts cut
again by the adapter for Telegram's UTF-16 limit), and on the outbox itself with a scripted handler
(the progress is committed before the next part goes out; a worker whose lease expired stops).
Time is pinned with ``run_once(now=…)``; nothing sleeps."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import sqlalchemy as sa

from mayak.channels.base import Capabilities, OutboundMessage, fit
from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import outbox
from mayak.delivery.outbox import DeliveryOutcome, OutboxDispatcher, OutboxItem, OutboxRow, enqueue, step
from mayak.metrics import Metrics
from mayak.timeutil import now_ms
from tests.backends import backend_db
from tests.telegram_fixtures import Telegram, settings, telegram, telegram_server, tg

__all__ = ["backend_db", "settings", "telegram", "telegram_server", "tg"]  # fixtures

HOUR = 3_600_000


def paragraphs(n: int) -> list[str]:
    """``n`` paragraphs of about 3,000 characters: ``fit`` cuts a 4,096-character part at each."""
    out = []
    for k in range(1, n + 1):
        words = " ".join(f"p{k}w{i}" for i in range(600))
        out.append(f"Part {k}. {words}"[:3000].rstrip())
    return out


async def test_a_retry_resumes_at_the_part_that_failed(telegram: Telegram) -> None:
    await telegram.hi(400)
    parts = paragraphs(3)
    message = {"text": "\n\n".join(parts), "buttons": [{"title": "OK", "payload": "ok"}]}
    assert [p.text for p in fit(OutboundMessage.from_json(message), Capabilities())] == parts

    telegram.tg.fail("sendMessage", 500, "Internal Server Error", skip=1)  # part 2 fails, once
    row_id = await telegram.say(400, message, "three-parts")
    t0 = now_ms()
    assert await telegram.mayak.outbox.run_once(now=t0) == 1
    row = await telegram.row(row_id)
    assert (row["status"], row["attempts"], row["progress"]) == ("failed", 1, 1)
    assert telegram.texts() == parts[:1]

    assert await telegram.mayak.outbox.run_once(now=t0 + HOUR) == 1
    row = await telegram.row(row_id)
    assert (row["status"], row["attempts"], row["progress"]) == ("sent", 2, 3)
    assert telegram.texts() == parts  # each part exactly once, in order
    calls = telegram.tg.calls_to("sendMessage", telegram.bot)
    assert [(c.params["text"][:7], c.status) for c in calls] == [
        ("Part 1.", 200),
        ("Part 2.", 500),
        ("Part 2.", 200),
        ("Part 3.", 200),
    ]
    assert [("reply_markup" in m) for m in telegram.bot.sent] == [False, False, True]  # the keyboard, once
    assert [a[:2] for a in await telegram.attempts(row_id)] == [(1, 500), (2, 200)]


async def test_a_flood_wait_on_a_later_part(telegram: Telegram) -> None:
    """Part 2 of 3 meets Telegram's flood control: the row comes back after ``retry_after`` and
    sends parts 2 and 3 only."""
    await telegram.hi(401)

    async def sleep(seconds: float) -> None:
        raise AssertionError("a 40 s wait is left to the outbox")

    telegram.adapter.sleep = sleep
    parts = paragraphs(3)
    telegram.tg.fail("sendMessage", 429, "Too Many Requests: retry after 40", retry_after=40, skip=1)
    row_id = await telegram.say(401, {"text": "\n\n".join(parts)}, "flooded")
    t0 = now_ms()
    assert await telegram.mayak.outbox.run_once(now=t0) == 1
    row = await telegram.row(row_id)
    assert (row["status"], row["progress"], row["next_attempt_at"]) == ("failed", 1, t0 + 40_000)
    assert await telegram.mayak.outbox.run_once(now=t0 + 39_999) == 0
    assert await telegram.mayak.outbox.run_once(now=t0 + 40_000) == 1
    assert (await telegram.row(row_id))["status"] == "sent"
    assert telegram.texts() == parts


async def test_parts_cut_for_utf16_resume_too(telegram: Telegram) -> None:
    """3,000 emoji are one part for ``fit`` (code points) but two for Telegram (6,000 UTF-16 units):
    each ``sendMessage`` is a step of its own."""
    await telegram.hi(402)
    telegram.tg.fail("sendMessage", 502, "Bad Gateway", skip=1)
    row_id = await telegram.say(402, {"text": "😀" * 3000}, "emoji")
    t0 = now_ms()
    assert await telegram.mayak.outbox.run_once(now=t0) == 1
    assert (await telegram.row(row_id))["progress"] == 1
    assert await telegram.mayak.outbox.run_once(now=t0 + HOUR) == 1
    assert (await telegram.row(row_id))["status"] == "sent"
    assert len(telegram.bot.sent) == 2 and "".join(telegram.texts()) == "😀" * 3000
    assert [c.status for c in telegram.tg.calls_to("sendMessage", telegram.bot)] == [200, 502, 200]


# -- the outbox's side, with a scripted handler -------------------------------------------------


class Parts:
    """A handler that sends ``n`` parts per row through ``step``; ``during`` runs inside a part's
    send, before it is answered."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent: list[int] = []
        self.fail_once: set[int] = set()
        self.during: dict[int, Any] = {}
        self.raise_after_all = False

    async def __call__(self, row: OutboxRow) -> DeliveryOutcome:
        outcome = DeliveryOutcome(True)
        for k in range(1, self.n + 1):
            outcome = await step(functools.partial(self.part, row, k))
            if not outcome.ok:
                return outcome
        if self.raise_after_all:
            self.raise_after_all = False
            raise RuntimeError("crashed after the last part")
        return outcome

    async def part(self, row: OutboxRow, k: int) -> DeliveryOutcome:
        if k in self.during:
            await self.during[k](row)
        if k in self.fail_once:
            self.fail_once.discard(k)
            return DeliveryOutcome(False, 500, f"part {k} failed")
        self.sent.append(k)
        return DeliveryOutcome(True, 200)


def dispatcher(db: Database, handler: Parts) -> OutboxDispatcher:
    d = OutboxDispatcher(db, Settings(outbox_base_delay_ms=1000, outbox_max_attempts=5), Metrics())
    d.register("test", handler)
    return d


async def put(db: Database, key: str = "m") -> None:
    async with db.write() as conn:
        await enqueue(db, conn, [OutboxItem("ws_1", "test", {}, key, customer_id="cus_1", target="t")])


async def the_row(db: Database) -> Any:
    async with db.read() as conn:
        return (await conn.execute(sa.select(outbox))).one()


@pytest.mark.contract
async def test_progress_is_committed_before_the_next_part_goes_out(backend_db: Database) -> None:
    db = backend_db
    handler = Parts(3)
    seen: list[int] = []

    async def look(row: OutboxRow) -> None:
        seen.append((await the_row(db)).progress)  # what a crash right now would leave behind

    handler.during = {1: look, 2: look, 3: look}
    handler.fail_once = {3}
    d = dispatcher(db, handler)
    await put(db)
    t0 = now_ms()
    assert await d.run_once(now=t0) == 1
    assert seen == [0, 1, 2] and handler.sent == [1, 2]
    assert ((await the_row(db)).status, (await the_row(db)).progress) == ("failed", 2)
    assert await d.run_once(now=t0 + HOUR) == 1
    assert seen == [0, 1, 2, 2] and handler.sent == [1, 2, 3]
    row = await the_row(db)
    assert (row.status, row.attempts, row.progress) == ("sent", 2, 3)


@pytest.mark.contract
async def test_everything_sent_before_a_failure_is_not_sent_again(backend_db: Database) -> None:
    """The handler failed after its last part went out (a timeout, say): the retry sends nothing
    and records the row as sent."""
    db = backend_db
    handler = Parts(2)
    handler.raise_after_all = True
    d = dispatcher(db, handler)
    await put(db)
    t0 = now_ms()
    assert await d.run_once(now=t0) == 1
    row = await the_row(db)
    assert (row.status, row.progress) == ("failed", 2)
    assert await d.run_once(now=t0 + HOUR) == 1
    row = await the_row(db)
    assert (row.status, row.attempts) == ("sent", 2) and handler.sent == [1, 2]


@pytest.mark.contract
async def test_a_worker_whose_lease_expired_stops_before_the_next_part(backend_db: Database) -> None:
    db = backend_db
    handler = Parts(3)

    async def reclaimed(row: OutboxRow) -> None:  # another worker claims the row meanwhile
        async with db.write() as conn:
            await conn.execute(outbox.update().values(lease_until=outbox.c.lease_until + 1))

    handler.during = {1: reclaimed}
    d = dispatcher(db, handler)
    await put(db)
    assert await d.run_once(now=now_ms()) == 1
    assert handler.sent == [1]  # part 2 is left to the new holder of the row
    row = await the_row(db)
    assert (row.status, row.progress, row.attempts) == ("in_flight", 0, 0)  # our result was fenced out


async def test_step_outside_an_attempt_just_sends() -> None:
    calls: list[int] = []

    async def send() -> DeliveryOutcome:
        calls.append(1)
        return DeliveryOutcome(True, 200)

    assert (await step(send)).ok and (await step(send)).ok and calls == [1, 1]
