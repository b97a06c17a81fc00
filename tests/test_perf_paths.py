"""Mechanisms of the fast bot-turn path: after-commit hooks, outbox rows claimed at birth, the
in-memory follow of a transaction's own appends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.fastsql import FastSql, _raw
from mayak.db.schema import outbox, outbox_attempts
from mayak.delivery import outbox as outbox_module
from mayak.delivery.outbox import (
    IN_FLIGHT,
    PENDING,
    DeliveryOutcome,
    OutboxDispatcher,
    OutboxItem,
    OutboxRow,
    enqueue,
)
from mayak.errors import StorageError
from mayak.eventlog import NewEvent, append, watch_appends
from mayak.metrics import Metrics
from tests.backends import backend_db

__all__ = ["backend_db"]  # the fixture, imported for pytest

SETTINGS = Settings(outbox_base_delay_ms=1, outbox_max_attempts=5)


def item(key: str, customer: str | None = "cus_a", target: str | None = "ch_1", **kw: Any) -> OutboxItem:
    return OutboxItem(
        workspace_id="ws_1",
        kind=kw.pop("kind", "test"),
        payload={"key": key},
        idempotency_key=key,
        customer_id=customer,
        target=target,
        **kw,
    )


class Receiver:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (idempotency key, row id)
        self.gate: asyncio.Event | None = None
        self.fail: set[str] = set()

    async def __call__(self, row: OutboxRow) -> DeliveryOutcome:
        self.seen.append((row.idempotency_key, row.id))
        if self.gate is not None:
            await self.gate.wait()
        if row.idempotency_key in self.fail:
            self.fail.discard(row.idempotency_key)
            return DeliveryOutcome(False, 500, "try again")
        return DeliveryOutcome(True, 200)


async def rows(db: Database) -> dict[str, dict[str, Any]]:
    async with db.read() as conn:
        result = await conn.execute(sa.select(outbox).order_by(outbox.c.id))
        return {r.idempotency_key: dict(r._mapping) for r in result}


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


class Running:
    """A dispatcher whose ``run_forever`` runs (so it adopts births); counts its ordinary claims."""

    def __init__(self, db: Database, receiver: Receiver):
        self.d = OutboxDispatcher(db, SETTINGS, Metrics())
        self.d.register("test", receiver)
        self.claims = 0
        self.polls = 0  # claim attempts, found something or not
        real = self.d._claim_heads

        async def counted(now: int, limit: int) -> Any:
            found = await real(now, limit)
            self.polls += 1
            self.claims += len(found)
            return found

        self.d._claim_heads = counted  # type: ignore[method-assign]
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OutboxDispatcher:
        self.task = asyncio.create_task(self.d.run_forever(self.stop))
        await until(self._adopting)
        return self.d

    async def _adopting(self) -> bool:
        return self.d.accepts_births()

    async def __aexit__(self, *exc: Any) -> None:
        self.stop.set()
        self.d._wake.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


# -- after-commit hooks --------------------------------------------------------------------------


async def test_after_commit_runs_after_commit_and_never_after_rollback(backend_db: Database) -> None:
    db = backend_db
    calls: list[str] = []
    async with db.write() as conn:
        assert db.after_commit(conn, lambda: calls.append("committed"))
        assert calls == []  # not before the commit
    assert calls == ["committed"]

    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            db.after_commit(conn, lambda: calls.append("rolled back"))
            raise RuntimeError("boom")
    assert calls == ["committed"]

    async with db.write() as conn:  # a later transaction on the same pooled connection: no leftovers
        pass
    assert calls == ["committed"]

    async with db.read() as conn:  # not a write(): nothing is registered
        assert not db.after_commit(conn, lambda: calls.append("read"))
    assert calls == ["committed"]


async def test_a_failing_callback_does_not_break_the_others(backend_db: Database) -> None:
    db = backend_db
    calls: list[int] = []

    def bad() -> None:
        raise ValueError("callback bug")

    async with db.write() as conn:
        db.after_commit(conn, bad)
        db.after_commit(conn, lambda: calls.append(1))
    assert calls == [1]


# -- claimed at birth ------------------------------------------------------------------------------


async def test_a_row_of_an_idle_lane_is_born_claimed_and_delivered_without_a_claim(
    backend_db: Database,
) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.gate = asyncio.Event()
    running = Running(db, receiver)
    async with running:
        async with db.write() as conn:
            assert await enqueue(db, conn, [item("a")]) == 1
        row = (await rows(db))["a"]
        assert row["status"] == IN_FLIGHT and row["lease_until"] > row["created_at"]
        await until(lambda: _true(len(receiver.seen) == 1))
        receiver.gate.set()
        await until(lambda: _status(db, "a", "sent"))
    assert running.claims == 0  # no claim query found it: it was handed over at birth
    assert receiver.seen == [("a", row["id"])]
    assert (await rows(db))["a"]["attempts"] == 1


async def test_only_the_head_of_a_lane_is_born_and_order_holds(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.gate = asyncio.Event()
    running = Running(db, receiver)
    async with running:
        async with db.write() as conn:
            await enqueue(db, conn, [item("a1"), item("a2"), item("b1", customer="cus_b")])
        first = await rows(db)
        assert first["a1"]["status"] == IN_FLIGHT
        assert first["a2"]["status"] == PENDING  # behind its lane's head
        assert first["b1"]["status"] == IN_FLIGHT  # another lane
        async with db.write() as conn:  # a later transaction: a1 is still undelivered
            await enqueue(db, conn, [item("a3")])
        assert (await rows(db))["a3"]["status"] == PENDING
        await asyncio.sleep(0.05)
        assert sorted(k for k, _ in receiver.seen) == ["a1", "b1"]  # a2 waits for a1
        receiver.gate.set()
        await until(lambda: _all_sent(db))
    keys = [k for k, _ in receiver.seen if k.startswith("a")]
    assert keys == ["a1", "a2", "a3"]


async def test_a_failed_head_blocks_births_in_its_lane_until_it_is_delivered(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.fail.add("a1")
    running = Running(db, receiver)
    async with running:
        async with db.write() as conn:
            await enqueue(db, conn, [item("a1")])
        await until(lambda: _status(db, "a1", "failed", "sent"))
        async with db.write() as conn:
            await enqueue(db, conn, [item("a2")])
        state = await rows(db)
        if state["a1"]["status"] == "failed":
            assert state["a2"]["status"] == PENDING
        await until(lambda: _all_sent(db))
    assert [k for k, _ in receiver.seen] == ["a1", "a1", "a2"]


async def test_a_rolled_back_birth_delivers_nothing(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    async with Running(db, receiver):
        with pytest.raises(RuntimeError):
            async with db.write() as conn:
                await enqueue(db, conn, [item("a")])
                raise RuntimeError("the pipeline's transaction fails")
        await asyncio.sleep(0.1)
    assert receiver.seen == []
    assert await rows(db) == {}


async def test_a_duplicate_is_not_born_twice(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    async with Running(db, receiver):
        async with db.write() as conn:
            assert await enqueue(db, conn, [item("a")]) == 1
        await until(lambda: _all_sent(db))
        async with db.write() as conn:  # the same cause processed again (a replay)
            assert await enqueue(db, conn, [item("a")]) == 0
        await asyncio.sleep(0.1)
    assert [k for k, _ in receiver.seen] == ["a"]


async def test_without_a_running_dispatcher_rows_are_pending(backend_db: Database) -> None:
    db = backend_db
    async with db.write() as conn:
        await enqueue(db, conn, [item("a")])
    assert (await rows(db))["a"]["status"] == PENDING


async def test_a_crash_after_birth_redelivers_the_same_row_when_the_lease_expires(
    backend_db: Database,
) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.gate = asyncio.Event()  # the delivery hangs: the process dies before recording it
    running = Running(db, receiver)
    async with running:
        async with db.write() as conn:
            await enqueue(db, conn, [item("a"), item("a2")])
        await until(lambda: _true(len(receiver.seen) == 1))
    # run_forever stopped (the crash): the born row is still in flight under its lease
    row = (await rows(db))["a"]
    assert row["status"] == IN_FLIGHT and row["attempts"] == 0
    later = OutboxDispatcher(db, SETTINGS, Metrics())
    after = Receiver()
    later.register("test", after)
    assert await later.run_once(now=row["lease_until"] - 1) == 0  # the lease still holds
    assert await later.run_once(now=row["lease_until"] + 1) == 1
    assert after.seen == [("a", row["id"])]  # at least once, same row id
    assert await later.run_once(now=row["lease_until"] + 2) == 1
    assert [k for k, _ in after.seen] == ["a", "a2"]


async def test_births_are_bounded(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.gate = asyncio.Event()
    running = Running(db, receiver)
    running.d.max_born = 2
    async with running:
        async with db.write() as conn:
            await enqueue(db, conn, [item(f"k{i}", customer=f"cus_{i}") for i in range(5)])
        state = await rows(db)
        # two born in flight; the claim loop, woken by the commit, may have claimed the others already
        assert [r["status"] for r in state.values()].count(IN_FLIGHT) >= 2
        receiver.gate.set()
        await until(lambda: _all_sent(db))
    assert running.claims == 3  # the three not born went the ordinary way


# -- instant pushes ----------------------------------------------------------------------------------


def instant_when(running: Running, keys: set[str] | None = None) -> None:
    """Make rows of kind ``test`` instant pushes (all, or those whose key is in ``keys``)."""

    async def check(it: OutboxItem) -> bool:
        return keys is None or it.idempotency_key in keys

    running.d.instant("test", check)


async def attempts_of(db: Database) -> list[tuple[str, int, str | None]]:
    async with db.read() as conn:
        result = await conn.execute(
            sa.select(outbox.c.idempotency_key, outbox_attempts.c.attempt, outbox_attempts.c.error)
            .join(outbox, outbox.c.id == outbox_attempts.c.outbox_id)
            .order_by(outbox_attempts.c.id)
        )
        return [tuple(r) for r in result]  # type: ignore[misc]


async def test_an_instant_push_is_recorded_sent_with_its_row_and_pushed_after_the_commit(
    backend_db: Database,
) -> None:
    db = backend_db
    receiver = Receiver()
    running = Running(db, receiver)
    instant_when(running)
    async with running:
        async with db.write() as conn:
            assert await enqueue(db, conn, [item("a"), item("a2"), item("b", customer="cus_b")]) == 3
            await asyncio.sleep(0.05)
            assert receiver.seen == []  # not before the commit
        state = await rows(db)
        assert {k: (r["status"], r["attempts"], r["lease_until"]) for k, r in state.items()} == {
            "a": ("sent", 1, None),
            "a2": ("sent", 1, None),  # a sent row does not hold its lane
            "b": ("sent", 1, None),
        }
        assert sorted(await attempts_of(db)) == [("a", 1, None), ("a2", 1, None), ("b", 1, None)]
        await until(lambda: _true(len(receiver.seen) == 3))
    assert [k for k, _ in receiver.seen] == ["a", "a2", "b"]
    assert receiver.seen[0] == ("a", state["a"]["id"])
    assert running.claims == 0
    assert len(await attempts_of(db)) == 3  # no second record of the same attempt


async def test_instant_pushes_do_not_wake_the_claim_loop(
    backend_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows pushed at birth leave nothing to claim: their commit must not send the claim loop
    polling (a web-chat reply per turn woke it for a poll that found nothing, every group)."""
    monkeypatch.setattr(outbox_module, "IDLE_POLL_S", 30.0)  # only wakes make it poll
    db = backend_db
    receiver = Receiver()
    running = Running(db, receiver)
    instant_when(running, {f"k{i}" for i in range(10)})
    async with running:
        await asyncio.sleep(0.05)  # the loop's first poll, at start
        polls = running.polls
        for i in range(10):
            async with db.write() as conn:
                await enqueue(db, conn, [item(f"k{i}", customer=f"cus_{i}")])
        await until(lambda: _true(len(receiver.seen) == 10))
        await asyncio.sleep(0.05)
        assert running.polls == polls
        running.d.max_born = 0  # no room for births: the next row must be claimed the ordinary way
        async with db.write() as conn:  # ... and its commit still wakes the loop at once
            await enqueue(db, conn, [item("plain", customer="cus_p")])
        await until(lambda: _true(len(receiver.seen) == 11))
        assert running.polls > polls and running.claims == 1


async def test_a_rolled_back_instant_push_pushes_nothing(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    running = Running(db, receiver)
    instant_when(running)
    async with running:
        with pytest.raises(RuntimeError):
            async with db.write() as conn:
                await enqueue(db, conn, [item("a")])
                raise RuntimeError("the pipeline's transaction fails")
        await asyncio.sleep(0.1)
    assert receiver.seen == []
    assert await rows(db) == {} and await attempts_of(db) == []


async def test_instant_pushes_keep_their_lane_order_across_transactions(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    running = Running(db, receiver)
    instant_when(running)
    async with running:
        for i in range(20):
            async with db.write() as conn:
                await enqueue(db, conn, [item(f"k{i:02}"), item(f"j{i:02}")])
        await until(lambda: _true(len(receiver.seen) == 40))
    assert [k for k, _ in receiver.seen] == [f"{p}{i:02}" for i in range(20) for p in "kj"]


async def test_an_instant_row_waits_behind_an_undelivered_row_of_its_lane(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.gate = asyncio.Event()
    running = Running(db, receiver)
    instant_when(running, {"a2", "a3", "b2"})
    running.d.max_born = 1
    async with running:
        async with db.write() as conn:
            # a1: born (in flight); b1: no room left, pending; each holds its lane in this batch
            await enqueue(db, conn, [item("a1"), item("b1", customer="cus_b"), item("b2", customer="cus_b")])
        async with db.write() as conn:  # a later transaction: a1 is still in flight
            await enqueue(db, conn, [item("a2")])
        state = await rows(db)
        assert state["a1"]["status"] == IN_FLIGHT
        assert state["b1"]["status"] in (PENDING, IN_FLIGHT)  # claimed the ordinary way meanwhile
        assert state["b2"]["status"] == PENDING
        assert state["a2"]["status"] == PENDING and state["a2"]["attempts"] == 0
        receiver.gate.set()
        await until(lambda: _all_sent(db))
        async with db.write() as conn:  # the lane is free again
            await enqueue(db, conn, [item("a3")])
        assert (await rows(db))["a3"]["status"] == "sent"
        await until(lambda: _true(len(receiver.seen) == 5))
    assert [k for k, _ in receiver.seen if k.startswith("a")] == ["a1", "a2", "a3"]
    assert [k for k, _ in receiver.seen if k.startswith("b")] == ["b1", "b2"]


async def test_a_failed_instant_push_is_logged_not_retried(backend_db: Database) -> None:
    db = backend_db
    receiver = Receiver()
    receiver.fail.add("a")
    running = Running(db, receiver)
    instant_when(running)
    async with running:
        async with db.write() as conn:
            await enqueue(db, conn, [item("a")])
        await until(lambda: _true(len(receiver.seen) == 1))
        await asyncio.sleep(0.05)
    assert [k for k, _ in receiver.seen] == ["a"]
    assert (await rows(db))["a"]["status"] == "sent"
    assert running.d.metrics.outbox_failed.labels("test")._value.get() == 1


# -- watching a transaction's appends ---------------------------------------------------------------


async def test_watch_appends_sees_what_the_transaction_stored_in_order(backend_db: Database) -> None:
    db = backend_db

    def ev(key: str) -> NewEvent:
        return NewEvent("ws_1", "track", 1, {"event": key}, name=key, source="bot", dedup_key=key)

    async with db.write() as conn:
        await append(db, conn, [ev("before")])
        with watch_appends(conn) as outer:
            await append(db, conn, [ev("a"), ev("b")])
            with watch_appends(conn) as inner:
                await append(db, conn, [ev("c"), ev("a")])  # "a" is a duplicate: not stored
            await append(db, conn, [ev("d")])
    assert [r[4] for r in inner] == ["c"]
    assert [r[4] for r in outer] == ["a", "b", "c", "d"]  # the inner watcher's rows reach the outer
    seqs = [r[0] for r in sorted(outer)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4


async def _true(value: bool) -> bool:
    return value


async def _status(db: Database, key: str, *statuses: str) -> bool:
    row = (await rows(db)).get(key)
    return row is not None and row["status"] in statuses


async def _all_sent(db: Database) -> bool:
    state = await rows(db)
    return bool(state) and all(r["status"] == "sent" for r in state.values())


# -- inline SQLite writes and driver-level statements ------------------------------------------------


async def test_driver_level_statements_share_the_write_transaction(backend_db: Database) -> None:
    db = backend_db
    sql = FastSql(db.dialect)
    insert = (
        f"INSERT INTO dedup_keys (workspace_number, key, seen_at) VALUES ({sql.p(1)}, {sql.p(2)}, {sql.p(3)})"
    )
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            await sql.run(conn, insert, (1, "a", 1))
            await sql.run_many(conn, insert, [(1, "b", 1), (1, "c", 1)])
            assert len(await sql.fetch(conn, "SELECT key FROM dedup_keys")) == 3  # seen inside
            raise RuntimeError("roll back")
    async with db.write() as conn:
        assert await sql.fetch(conn, "SELECT key FROM dedup_keys") == []  # rolled back
        await sql.run(conn, insert, (1, "a", 1))
    with pytest.raises(StorageError):
        async with db.write() as conn:
            with pytest.raises(sa.exc.IntegrityError):  # the same exception as through SQLAlchemy
                await sql.run(conn, insert, (1, "a", 2))
            await sql.run(conn, insert, (1, "a", 3))  # and write() maps it as it always did
    async with db.read() as conn:
        rows = await sql.fetch(conn, "SELECT key, seen_at FROM dedup_keys")
    assert [tuple(r) for r in rows] == [("a", 1)]


async def test_sqlite_writes_run_inline_and_reads_do_not(tmp_path: Any) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/inline.db")
    try:
        await db.create_all()
        async with db.write() as conn:
            assert _raw(conn) is not None
            await conn.execute(sa.text("SELECT 1"))  # Core statements work on it too
        async with db.read() as conn:
            assert _raw(conn) is None
        plain = Database(f"sqlite+aiosqlite:///{tmp_path}/plain.db", inline_writes=False)
        try:
            await plain.create_all()
            async with plain.write() as conn:
                assert _raw(conn) is None
        finally:
            await plain.dispose()
    finally:
        await db.dispose()


async def test_a_locked_database_is_a_storage_error_on_inline_writes(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "locked.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.create_all()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("PRAGMA busy_timeout=0")
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            async with db.write_engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA busy_timeout=50")
            with pytest.raises(StorageError):
                async with db.write():
                    pass
        finally:
            other.execute("ROLLBACK")
            other.close()
        async with db.write() as conn:  # and the connection is usable again
            await conn.exec_driver_sql("SELECT 1")
    finally:
        await db.dispose()
