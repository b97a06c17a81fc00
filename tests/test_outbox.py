"""The durable outbox on SQLite and PostgreSQL: idempotent enqueue, retries, dead letters, order, leases."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import outbox, outbox_attempts
from mayak.delivery import outbox as outbox_module
from mayak.delivery.outbox import (
    DeliveryOutcome,
    OutboxDispatcher,
    OutboxItem,
    OutboxRow,
    backoff_ms,
    enqueue,
)
from mayak.ids import monotonic_ids
from mayak.metrics import Metrics
from mayak.timeutil import now_ms
from tests.backends import backend_db

__all__ = ["backend_db"]  # the fixture, imported for pytest

BASE_MS = 1000
SETTINGS = Settings(outbox_base_delay_ms=BASE_MS, outbox_max_attempts=3)


def item(key: str, customer: str | None = "cus_a", target: str | None = "dst_1", **kw: Any) -> OutboxItem:
    return OutboxItem(
        workspace_id=kw.pop("workspace_id", "ws_1"),
        kind=kw.pop("kind", "test"),
        payload=kw.pop("payload", {"key": key}),
        idempotency_key=key,
        customer_id=customer,
        target=target,
        **kw,
    )


async def put(db: Database, *items: OutboxItem) -> int:
    async with db.write() as conn:
        return await enqueue(db, conn, list(items))


async def rows_by_key(db: Database) -> dict[str, dict[str, Any]]:
    async with db.read() as conn:
        result = await conn.execute(sa.select(outbox).order_by(outbox.c.id))
        return {r.idempotency_key: dict(r._mapping) for r in result}


async def attempts_of(db: Database, outbox_id: str) -> list[dict[str, Any]]:
    async with db.read() as conn:
        result = await conn.execute(
            sa.select(outbox_attempts)
            .where(outbox_attempts.c.outbox_id == outbox_id)
            .order_by(outbox_attempts.c.attempt)
        )
        return [dict(r._mapping) for r in result]


class Receiver:
    """A scripted handler: answers from ``script`` per idempotency key (default: success)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.script: dict[str, list[DeliveryOutcome | Exception]] = {}

    async def __call__(self, row: OutboxRow) -> DeliveryOutcome:
        self.seen.append(row.idempotency_key)
        queue = self.script.get(row.idempotency_key)
        if queue:
            answer = queue.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return DeliveryOutcome(True, 200)


def dispatcher(db: Database, receiver: Receiver, settings: Settings = SETTINGS) -> OutboxDispatcher:
    d = OutboxDispatcher(db, settings, Metrics())
    d.register("test", receiver)
    return d


def counter(d: OutboxDispatcher, name: str, kind: str = "test") -> float:
    value = d.metrics.registry.get_sample_value(f"mayak_{name}_total", {"kind": kind})
    return value or 0.0


async def test_enqueue_is_idempotent_and_stores_json(backend_db: Database) -> None:
    db = backend_db
    before = now_ms()
    assert await put(db, item("a"), item("b", payload={"n": [1, "ü"]}), item("a")) == 2
    assert await put(db, item("a"), item("b")) == 0  # a crash-and-replay duplicates nothing
    assert await put(db, item("a", workspace_id="ws_2")) == 1  # keys are per workspace
    assert await put(db, item("c", not_before=before + 60_000)) == 1
    rows = await rows_by_key(db)
    assert set(rows) == {"a", "b", "c"}  # ws_2's "a" collapses in this dict; count below
    async with db.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(outbox))).scalar_one() == 4
    b = rows["b"]
    assert orjson.loads(b["payload"]) == {"n": [1, "ü"]}
    assert (b["status"], b["attempts"], b["lease_until"]) == ("pending", 0, None)
    assert before <= b["next_attempt_at"] <= now_ms()
    assert rows["c"]["next_attempt_at"] == before + 60_000


async def test_enqueue_rolls_back_with_the_callers_transaction(backend_db: Database) -> None:
    db = backend_db
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            await enqueue(db, conn, [item("x")])
            raise RuntimeError("the state change failed")
    assert await rows_by_key(db) == {}


def test_monotonic_ids_sort_in_creation_order() -> None:
    ids = monotonic_ids("obx", 500, now=1_700_000_000_000) + monotonic_ids("obx", 500, now=1_700_000_000_000)
    assert ids == sorted(ids) and len(set(ids)) == 1000
    earlier_clock = monotonic_ids("obx", 3, now=1_600_000_000_000)  # the clock stepped back
    assert earlier_clock[0] > ids[-1]


async def test_delivers_and_records_the_attempt(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    d = dispatcher(db, receiver)
    await put(db, item("a", payload={"hello": "world"}), item("z", customer=None, target=None))
    now = now_ms() + 10
    assert await d.run_once(now) == 2
    assert sorted(receiver.seen) == ["a", "z"]
    rows = await rows_by_key(db)
    assert rows["a"]["status"] == "sent" and rows["a"]["attempts"] == 1 and rows["a"]["lease_until"] is None
    [att] = await attempts_of(db, rows["a"]["id"])
    assert (att["attempt"], att["at"], att["status_code"], att["error"]) == (1, now, 200, None)
    assert att["duration_ms"] >= 0 and att["workspace_id"] == "ws_1"
    assert counter(d, "outbox_delivered") == 2
    assert await d.run_once(now) == 0
    assert await d.depth() == 0
    assert d.metrics.registry.get_sample_value("mayak_outbox_depth") == 0


async def test_not_before_and_unknown_kinds_wait(backend_db: Database) -> None:
    db = backend_db
    d = dispatcher(db, Receiver())
    now = now_ms()
    await put(db, item("later", not_before=now + 5000), item("other", kind="sms", customer=None))
    assert await d.run_once(now + 10) == 0
    assert await d.run_once(now + 5000) == 1
    rows = await rows_by_key(db)
    assert rows["later"]["status"] == "sent"
    assert rows["other"]["status"] == "pending"  # no handler for "sms" in this process
    assert await d.depth() == 1


def test_backoff_formula() -> None:
    rng = random.Random(7)
    for attempts in range(1, 30):
        nominal = min(1000 * 2 ** (attempts - 1), 3_600_000)
        for _ in range(20):
            delay = backoff_ms(attempts, 1000, rng)
            assert 0.8 * nominal <= delay <= min(1.2 * nominal, 3_600_000)
    assert backoff_ms(100, 1000) <= 3_600_000


async def test_retries_with_backoff_then_success(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.script["a"] = [DeliveryOutcome(False, 503, "HTTP 503"), RuntimeError("boom")]
    d = dispatcher(db, receiver)
    await put(db, item("a"))
    t0 = now_ms() + 10
    assert await d.run_once(t0) == 1
    row = (await rows_by_key(db))["a"]
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 1, "HTTP 503")
    first_delay = row["next_attempt_at"] - t0
    assert 0.8 * BASE_MS <= first_delay <= 1.2 * BASE_MS
    assert await d.run_once(t0 + first_delay - 1) == 0  # not due yet
    t1 = t0 + first_delay
    assert await d.run_once(t1) == 1  # the handler raises: a failed attempt, not a crash
    row = (await rows_by_key(db))["a"]
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert "RuntimeError: boom" in row["last_error"]
    assert 1.6 * BASE_MS <= row["next_attempt_at"] - t1 <= 2.4 * BASE_MS
    assert await d.run_once(row["next_attempt_at"]) == 1
    row = (await rows_by_key(db))["a"]
    assert (row["status"], row["attempts"], row["last_error"]) == ("sent", 3, None)
    atts = await attempts_of(db, row["id"])
    assert [(a["attempt"], a["status_code"]) for a in atts] == [(1, 503), (2, None), (3, 200)]
    assert counter(d, "outbox_attempts_failed") == 2 and counter(d, "outbox_delivered") == 1


async def test_dead_letter_after_max_attempts(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.script["a"] = [DeliveryOutcome(False, 500, "HTTP 500")] * 10
    d = dispatcher(db, receiver)
    await put(db, item("a"))
    now = now_ms() + 10
    for _ in range(SETTINGS.outbox_max_attempts):
        assert await d.run_once(now) == 1
        now += 3_600_000  # far beyond any backoff
    row = (await rows_by_key(db))["a"]
    assert (row["status"], row["attempts"]) == ("dead", 3)
    assert await d.run_once(now + 10 * 3_600_000) == 0  # dead rows are never tried again
    assert len(await attempts_of(db, row["id"])) == 3
    assert counter(d, "outbox_dead") == 1 and counter(d, "outbox_attempts_failed") == 3
    assert await d.depth() == 0


async def test_non_retryable_outcome_is_dead_at_once(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.script["gone"] = [DeliveryOutcome(False, 410, "HTTP 410", retryable=False)]
    d = dispatcher(db, receiver)
    await put(db, item("gone"), item("next"))
    now = now_ms() + 10
    assert await d.run_once(now) == 1
    assert (await rows_by_key(db))["gone"]["status"] == "dead"
    assert await d.run_once(now) == 1  # a dead row does not block its lane
    assert receiver.seen == ["gone", "next"]


async def test_per_customer_and_target_order(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.script["a1"] = [DeliveryOutcome(False, 500, "HTTP 500")]
    d = dispatcher(db, receiver)
    await put(db, item("a1"), item("a2"), item("a3"))
    await put(db, item("b1", customer="cus_b"), item("a-other", target="dst_2"))
    now = now_ms() + 10
    assert await d.run_once(now) == 3  # the heads of three lanes
    assert sorted(receiver.seen) == ["a-other", "a1", "b1"]
    receiver.seen.clear()
    # a1 failed and waits for its retry: a2 and a3 are due but must not overtake it.
    assert await d.run_once(now + 1) == 0
    rows = await rows_by_key(db)
    assert rows["a2"]["status"] == rows["a3"]["status"] == "pending"
    retry_at = rows["a1"]["next_attempt_at"]
    for _ in range(3):
        await d.run_once(retry_at)
    assert receiver.seen == ["a1", "a2", "a3"]


async def test_a_long_lane_keeps_enqueue_order(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    d = dispatcher(db, receiver)
    keys = [f"k{i:03d}" for i in range(40)]
    await put(db, *(item(k) for k in keys[:25]))  # one transaction, one millisecond
    await put(db, *(item(k) for k in keys[25:]))
    now = now_ms() + 10
    while await d.run_once(now):
        pass
    assert receiver.seen == keys


async def test_expired_lease_is_reclaimed_and_the_late_worker_is_fenced(backend_db: Database) -> None:
    db = backend_db
    entered, release = asyncio.Event(), asyncio.Event()

    async def stuck(row: OutboxRow) -> DeliveryOutcome:
        entered.set()
        await release.wait()
        return DeliveryOutcome(False, 500, "late failure")

    crashed = OutboxDispatcher(db, SETTINGS, Metrics())
    crashed.register("test", stuck)
    receiver = Receiver()
    healthy = dispatcher(db, receiver)
    await put(db, item("a"))
    t0 = now_ms() + 10
    first = asyncio.create_task(crashed.run_once(t0))
    await entered.wait()
    row = (await rows_by_key(db))["a"]
    assert row["status"] == "in_flight" and row["lease_until"] == t0 + crashed.lease_ms
    assert await healthy.run_once(t0 + crashed.lease_ms - 1) == 0  # the lease still holds
    assert await healthy.run_once(t0 + crashed.lease_ms) == 1  # expired: claimed again
    assert receiver.seen == ["a"]
    release.set()
    assert await first == 1  # the stuck worker finishes late; its result must not win
    row = (await rows_by_key(db))["a"]
    assert (row["status"], row["attempts"], row["last_error"]) == ("sent", 1, None)
    assert len(await attempts_of(db, row["id"])) == 2  # both attempts really happened


async def test_a_worker_that_died_mid_delivery(backend_db: Database) -> None:
    db = backend_db
    entered = asyncio.Event()

    async def hang(row: OutboxRow) -> DeliveryOutcome:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    dying = OutboxDispatcher(db, SETTINGS, Metrics())
    dying.register("test", hang)
    await put(db, item("a"))
    t0 = now_ms() + 10
    task = asyncio.create_task(dying.run_once(t0))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    receiver = Receiver()
    d = dispatcher(db, receiver)
    assert await d.run_once(t0 + 1000) == 0
    assert await d.run_once(t0 + dying.lease_ms) == 1
    row = (await rows_by_key(db))["a"]
    assert (row["status"], row["attempts"]) == ("sent", 1)


async def test_handler_timeout_is_a_failed_attempt(backend_db: Database) -> None:
    db = backend_db

    async def slow(row: OutboxRow) -> DeliveryOutcome:
        await asyncio.sleep(5)
        return DeliveryOutcome(True, 200)

    d = OutboxDispatcher(db, SETTINGS, Metrics(), attempt_timeout_s=0.05)
    d.register("test", slow)
    await put(db, item("a"))
    assert await d.run_once(now_ms() + 10) == 1
    row = (await rows_by_key(db))["a"]
    assert row["status"] == "failed" and row["last_error"].startswith("timeout")


async def test_concurrent_dispatchers_deliver_each_row_once(backend_db: Database) -> None:
    db = backend_db
    seen: list[str] = []
    in_flight = 0
    peak = 0

    async def handler(row: OutboxRow) -> DeliveryOutcome:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        seen.append(row.idempotency_key)
        in_flight -= 1
        return DeliveryOutcome(True, 200)

    workers = []
    for _ in range(3):
        w = OutboxDispatcher(db, SETTINGS, Metrics(), batch_size=20, concurrency=8)
        w.register("test", handler)
        workers.append(w)
    keys = [f"n{i}" for i in range(60)] + [f"c{i}" for i in range(10)]
    await put(db, *(item(k, customer=None) for k in keys[:60]), *(item(k) for k in keys[60:]))
    now = now_ms() + 10
    while sum(await asyncio.gather(*(w.run_once(now) for w in workers))):
        pass
    assert sorted(seen) == sorted(keys)
    assert [k for k in seen if k.startswith("c")] == keys[60:]
    assert peak > 1
    assert all(r["status"] == "sent" for r in (await rows_by_key(db)).values())


async def test_run_forever_delivers_and_survives_errors(
    backend_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.script["a"] = [ValueError("first try explodes")]
    d = dispatcher(db, receiver, Settings(outbox_base_delay_ms=1, outbox_max_attempts=5))
    monkeypatch.setattr(outbox_module, "ERROR_PAUSE_S", 0.01)
    real_claim, failures = d._claim, [RuntimeError("database unavailable")]

    async def flaky_claim(now: int, limit: int) -> Any:
        if failures:
            raise failures.pop()
        return await real_claim(now, limit)

    monkeypatch.setattr(d, "_claim", flaky_claim)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run_forever(stop))
    await put(db, item("a"), item("b"), item("c", customer="cus_b"))
    async with asyncio.timeout(10):
        while True:
            rows = await rows_by_key(db)
            if all(r["status"] == "sent" for r in rows.values()):
                break
            await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert rows["a"]["attempts"] == 2
    last_a = len(receiver.seen) - 1 - receiver.seen[::-1].index("a")
    assert receiver.seen.count("a") == 2 and receiver.seen.index("b") > last_a  # b waited for a's retry
    assert not failures  # the failed claim was survived
