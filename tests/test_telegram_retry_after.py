"""Telegram's ``retry_after`` reaches the outbox: a 429 with a long flood wait is a retryable failure
whose next attempt is due no earlier than the wait (or the backoff, if that is longer), still counted
against the attempt limit. Against the Bot API emulator on a real socket; time is pinned with
``run_once(now=…)``, nothing sleeps."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from mayak.channels.telegram import ApiResult, TelegramAdapter, outcome_of
from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import outbox
from mayak.delivery.outbox import (
    MAX_RETRY_AFTER_MS,
    DeliveryOutcome,
    OutboxDispatcher,
    OutboxItem,
    OutboxRow,
    enqueue,
)
from mayak.metrics import Metrics
from mayak.timeutil import now_ms
from tests.backends import backend_db
from tests.conftest import admin
from tests.telegram_fixtures import Telegram, settings, telegram, telegram_server, tg

__all__ = ["backend_db", "settings", "telegram", "telegram_server", "tg"]  # fixtures

WAIT_S = 40  # over the adapter's 5 s in-attempt limit


def no_sleep(adapter: TelegramAdapter) -> list[float]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    adapter.sleep = sleep
    return slept


def test_a_429_carries_retry_after_in_milliseconds() -> None:
    flood = outcome_of(ApiResult(False, 429, description="Too Many Requests: retry after 40", retry_after=40))
    assert (flood.ok, flood.retryable, flood.retry_after_ms) == (False, True, 40_000)
    assert flood.error == "Too Many Requests: retry after 40 (retry after 40 s)"
    assert outcome_of(ApiResult(False, 429, description="Too Many Requests")).retry_after_ms is None
    assert outcome_of(ApiResult(False, 500, description="Internal Server Error")).retry_after_ms is None


async def test_the_next_attempt_waits_for_retry_after(telegram: Telegram) -> None:
    await telegram.hi(300)
    slept = no_sleep(telegram.adapter)
    telegram.tg.fail("sendMessage", 429, f"Too Many Requests: retry after {WAIT_S}", retry_after=WAIT_S)
    row_id = await telegram.say(300, {"text": "after the wait"}, "flood")

    t0 = now_ms()
    assert await telegram.mayak.outbox.run_once(now=t0) == 1
    row = await telegram.row(row_id)
    # the backoff after a first failure is ~10 ms here (conftest): Telegram's 40 s wins
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("failed", 1, t0 + WAIT_S * 1000)
    assert row["last_error"] == f"Too Many Requests: retry after {WAIT_S} (retry after {WAIT_S} s)"

    assert (
        await telegram.mayak.outbox.run_once(now=t0 + WAIT_S * 1000 - 1) == 0
    )  # not due a millisecond early
    assert [c.status for c in telegram.tg.calls_to("sendMessage", telegram.bot)] == [429]

    assert await telegram.mayak.outbox.run_once(now=t0 + WAIT_S * 1000) == 1
    assert (await telegram.row(row_id))["status"] == "sent"
    assert [c.status for c in telegram.tg.calls_to("sendMessage", telegram.bot)] == [429, 200]
    assert [m["text"] for m in telegram.bot.sent] == ["after the wait"]  # delivered once
    assert slept == []  # nothing was sat out inside the attempt

    # both attempts are recorded and visible through the API
    assert [a[:2] for a in await telegram.attempts(row_id)] == [(1, 429), (2, 200)]
    r = await telegram.client.get(f"/v1/deliveries/{row_id}/attempts", headers=admin(telegram.ws))
    assert r.status_code == 200, r.text
    assert [(a["attempt"], a["status_code"]) for a in r.json()["items"]] == [(1, 429), (2, 200)]


async def test_retry_after_still_counts_attempts_and_dead_letters(telegram: Telegram) -> None:
    await telegram.hi(301)
    no_sleep(telegram.adapter)
    telegram.tg.fail("sendMessage", 429, "Too Many Requests", retry_after=WAIT_S, times=10)
    row_id = await telegram.say(301, {"text": "never"}, "flood-forever")

    at = now_ms()
    for number in (1, 2):
        assert await telegram.mayak.outbox.run_once(now=at) == 1
        row = await telegram.row(row_id)
        assert (row["status"], row["attempts"]) == ("failed", number)
        assert row["next_attempt_at"] == at + WAIT_S * 1000
        at += WAIT_S * 1000
    assert await telegram.mayak.outbox.run_once(now=at) == 1  # the third attempt is the last (conftest: 3)
    row = await telegram.row(row_id)
    assert (row["status"], row["attempts"]) == ("dead", 3)
    assert await telegram.mayak.outbox.run_once(now=at + 10 * 3_600_000) == 0
    assert [a[1] for a in await telegram.attempts(row_id)] == [429, 429, 429]
    assert telegram.bot.sent == []


# -- the outbox's side, with a scripted handler -------------------------------------------------


async def _first_delay(db: Database, outcome: DeliveryOutcome, base_delay_ms: int) -> int:
    """Enqueue one row, fail its first attempt with ``outcome``; the delay before the next one."""
    d = OutboxDispatcher(db, Settings(outbox_base_delay_ms=base_delay_ms, outbox_max_attempts=5), Metrics())

    async def handler(row: OutboxRow) -> DeliveryOutcome:
        return outcome

    d.register("test", handler)
    async with db.write() as conn:
        await enqueue(db, conn, [OutboxItem("ws_1", "test", {}, "k", customer_id="cus_1", target="t")])
    at = now_ms()
    assert await d.run_once(now=at) == 1
    async with db.read() as conn:
        row = (await conn.execute(sa.select(outbox.c.status, outbox.c.next_attempt_at))).one()
    assert row.status == "failed"
    return int(row.next_attempt_at) - at


@pytest.mark.parametrize(
    ("base_delay_ms", "retry_after_ms", "low", "high"),
    [
        (10, 40_000, 40_000, 40_000),  # the receiver's wait is longer than the backoff: it wins
        (60_000, 5_000, 48_000, 72_000),  # the backoff (60 s ± 20 %) is longer: it wins
        (10, 10 * 86_400_000, MAX_RETRY_AFTER_MS, MAX_RETRY_AFTER_MS),  # capped at a day
        (60_000, None, 48_000, 72_000),  # no word from the receiver: the backoff
    ],
)
@pytest.mark.contract
async def test_the_delay_is_the_longer_of_backoff_and_retry_after(
    backend_db: Database, base_delay_ms: int, retry_after_ms: int | None, low: int, high: int
) -> None:
    delay = await _first_delay(
        backend_db, DeliveryOutcome(False, 429, "slow down", retry_after_ms=retry_after_ms), base_delay_ms
    )
    assert low <= delay <= high
