"""Durable timers on SQLite and PostgreSQL: idempotent scheduling, firing into the log exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from mayak.db.database import Database
from mayak.db.schema import events, timers
from mayak.delivery import timers as timers_module
from mayak.delivery.timers import TimerWorker, cancel, schedule
from mayak.eventlog import LogNotifier
from mayak.metrics import Metrics
from mayak.timeutil import ms_to_rfc3339, now_ms
from tests.backends import backend_db

__all__ = ["backend_db"]  # the fixture, imported for pytest

T0 = 1_700_000_000_000


class CountingNotifier(LogNotifier):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def notify(self) -> None:
        self.calls += 1
        super().notify()


async def add(db: Database, key: str, fire_at: int, **kw: Any) -> str:
    async with db.write() as conn:
        return await schedule(
            db,
            conn,
            workspace_id=kw.pop("workspace_id", "ws_1"),
            key=key,
            kind=kw.pop("kind", "reminder"),
            fire_at=fire_at,
            payload=kw.pop("payload", {"key": key}),
            customer_id=kw.pop("customer_id", "cus_a"),
        )


async def timer_rows(db: Database) -> dict[str, dict[str, Any]]:
    async with db.read() as conn:
        return {r.key: dict(r._mapping) for r in await conn.execute(sa.select(timers))}


async def timer_events(db: Database) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = await conn.execute(sa.select(events).where(events.c.type == "timer").order_by(events.c.seq))
        return [dict(r._mapping) | {"payload": orjson.loads(r.payload)} for r in rows]


def worker(db: Database, batch_size: int = 500) -> TimerWorker:
    return TimerWorker(db, CountingNotifier(), Metrics(), batch_size=batch_size)


async def test_schedule_is_idempotent_and_moves_a_pending_timer(backend_db: Database) -> None:
    db = backend_db
    tid = await add(db, "k1", T0, payload={"v": 1})
    assert tid.startswith("tmr_")
    again = await add(db, "k1", T0 + 5000, payload={"v": 2})
    assert again == tid
    row = (await timer_rows(db))["k1"]
    assert (row["status"], row["fire_at"], orjson.loads(row["payload"])) == ("pending", T0 + 5000, {"v": 2})
    other_ws = await add(db, "k1", T0, workspace_id="ws_2")
    assert other_ws != tid  # keys are per workspace


async def test_fires_due_timers_into_the_log(backend_db: Database) -> None:
    db = backend_db
    tid = await add(db, "due", T0, kind="journey.wait", payload={"step": 3})
    await add(db, "later", T0 + 60_000)
    w = worker(db)
    assert await w.run_once(T0 - 1) == 0
    assert await w.run_once(T0 + 10) == 1
    [ev] = await timer_events(db)
    assert (ev["type"], ev["name"], ev["source"]) == ("timer", "journey.wait", "timer")
    assert (ev["workspace_id"], ev["customer_id"], ev["timestamp"], ev["received_at"]) == (
        "ws_1",
        "cus_a",
        T0,
        T0 + 10,
    )
    p = ev["payload"]
    assert p["timer_id"] == tid and p["key"] == "due" and p["kind"] == "journey.wait"
    assert p["payload"] == {"step": 3}
    assert p["fire_at"] == ms_to_rfc3339(T0) and p["fired_at"] == ms_to_rfc3339(T0 + 10)
    rows = await timer_rows(db)
    assert (rows["due"]["status"], rows["due"]["fired_at"]) == ("fired", T0 + 10)
    assert rows["later"]["status"] == "pending"
    assert isinstance(w.notifier, CountingNotifier) and w.notifier.calls == 1
    assert w.metrics.registry.get_sample_value("mayak_timers_fired_total") == 1


async def test_fires_exactly_once(backend_db: Database) -> None:
    db = backend_db
    for i in range(5):
        await add(db, f"k{i}", T0 + i)
    w1, w2 = worker(db), worker(db)
    fired = await asyncio.gather(w1.run_once(T0 + 100), w2.run_once(T0 + 100))
    assert sum(fired) == 5
    assert await w1.run_once(T0 + 100) == 0
    assert len(await timer_events(db)) == 5
    # A replay (say a transaction whose "fired" mark was lost) must not log the timer again.
    async with db.write() as conn:
        replay = timers.update().where(timers.c.key == "k0").values(status="pending", fired_at=None)
        await conn.execute(replay)
    assert await w1.run_once(T0 + 200) == 1
    assert len(await timer_events(db)) == 5
    assert (await timer_rows(db))["k0"]["status"] == "fired"


async def test_fired_and_cancelled_keys_are_single_use(backend_db: Database) -> None:
    db = backend_db
    tid = await add(db, "fired", T0)
    await add(db, "cancelled", T0)
    async with db.write() as conn:
        assert await cancel(conn, "ws_1", "cancelled") is True
        assert await cancel(conn, "ws_1", "cancelled") is False
        assert await cancel(conn, "ws_1", "unknown") is False
        assert await cancel(conn, "ws_2", "fired") is False  # another workspace's key space
    assert await worker(db).run_once(T0) == 1
    async with db.write() as conn:
        assert await cancel(conn, "ws_1", "fired") is False
    assert await add(db, "fired", T0 + 1000) == tid  # replaying the scheduling event changes nothing
    await add(db, "cancelled", T0 + 1000)
    rows = await timer_rows(db)
    assert (rows["fired"]["status"], rows["fired"]["fire_at"]) == ("fired", T0)
    assert (rows["cancelled"]["status"], rows["cancelled"]["fire_at"]) == ("cancelled", T0)
    assert await worker(db).run_once(T0 + 5000) == 0
    assert [e["payload"]["key"] for e in await timer_events(db)] == ["fired"]


async def test_batches(backend_db: Database) -> None:
    db = backend_db
    for i in range(7):
        await add(db, f"k{i}", T0 + i, customer_id=None)
    w = worker(db, batch_size=3)
    assert [await w.run_once(T0 + 10) for _ in range(4)] == [3, 3, 1, 0]
    evs = await timer_events(db)
    assert [e["payload"]["key"] for e in evs] == [f"k{i}" for i in range(7)]  # in fire_at order
    assert all(e["customer_id"] is None for e in evs)


async def test_timers_survive_a_restart(backend_db: Database) -> None:
    db = backend_db
    await add(db, "survivor", T0)
    await db.dispose()  # the process "stops": its connections are gone
    restarted = Database(db.url)
    try:
        assert await worker(restarted).run_once(T0 + 1) == 1
        assert [e["payload"]["key"] for e in await timer_events(restarted)] == ["survivor"]
    finally:
        await restarted.dispose()


async def test_run_forever_survives_errors(backend_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    db = backend_db
    await add(db, "soon", now_ms() + 100)
    w = worker(db)
    monkeypatch.setattr(timers_module, "ERROR_PAUSE_S", 0.01)
    real_run_once, failures = w.run_once, [RuntimeError("database unavailable")]

    async def flaky_run_once(now: int | None = None) -> int:
        if failures:
            raise failures.pop()
        return await real_run_once(now)

    monkeypatch.setattr(w, "run_once", flaky_run_once)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run_forever(stop))
    async with asyncio.timeout(10):
        while not await timer_events(db):
            await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert (await timer_rows(db))["soon"]["status"] == "fired"
    assert not failures
