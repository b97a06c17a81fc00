"""Inline SQLite writes keep one connection checked out across transactions; a driver error other
than a broken constraint gives it up, and the next write opens a fresh one."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database
from mayak.errors import StorageError


def _raw(conn: AsyncConnection) -> Any:
    sync = conn.sync_connection
    assert sync is not None
    return sync.connection.driver_connection._conn


async def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    async with db.write() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    return db


async def test_write_transactions_take_turns_on_one_held_connection(tmp_path: Path) -> None:
    db = await _db(tmp_path)
    seen = set()
    for i in range(5):
        async with db.write() as conn:
            await conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", (f"v{i}",))
            seen.add(id(_raw(conn)))
            assert _raw(conn).in_transaction
    assert len(seen) == 1
    # committed, visible to another connection, and the held one is idle between transactions
    plain = sqlite3.connect(tmp_path / "w.db")
    assert plain.execute("SELECT count(*) FROM t").fetchone()[0] == 5
    plain.close()
    assert db._held is not None and not _raw(db._held).in_transaction
    await db.dispose()
    assert db._held is None


async def test_a_rolled_back_transaction_leaves_nothing_and_the_connection_in_use(tmp_path: Path) -> None:
    db = await _db(tmp_path)
    async with db.write() as conn:
        before = id(_raw(conn))
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('gone')")
            raise RuntimeError("the caller failed")
    with pytest.raises(StorageError):  # a broken constraint: the connection stays good
        async with db.write() as conn:
            await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('kept?')")
            await conn.exec_driver_sql("INSERT INTO t (id, v) VALUES (1, 'twice')")
    async with db.write() as conn:
        assert id(_raw(conn)) == before
        assert (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar() == 0  # neither kept
    await db.dispose()


async def test_a_driver_failure_gives_the_connection_up(tmp_path: Path) -> None:
    db = await _db(tmp_path)
    async with db.write() as conn:
        before = _raw(conn)
    with pytest.raises(StorageError):
        async with db.write() as conn:
            await conn.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")
    assert db._held is None
    with pytest.raises(sqlite3.ProgrammingError):
        before.execute("SELECT 1")  # closed
    async with db.write() as conn:  # a fresh connection, set up like the first
        assert _raw(conn) is not before
        assert (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar() == 0
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('after')")
    async with db.read() as conn:
        assert (await conn.execute(sa.text("SELECT v FROM t"))).scalars().all() == ["after"]
    await db.dispose()


async def test_a_large_commit_runs_off_the_event_loop_a_small_one_on_it(tmp_path: Path) -> None:
    """COMMIT writes the pages to the log with the GIL released: a transaction that changed many
    rows commits on the committer's thread, and the event loop is free meanwhile; one that changed a
    few commits at once on the loop (handing it over would cost more). Either way the writer sees
    the commit done before it goes on."""
    import asyncio
    import threading

    from mayak.db.database import OFFLOAD_COMMIT_CHANGES

    db = await _db(tmp_path)
    loop_thread = threading.get_ident()
    threads: dict[str, set[int]] = {}

    def trace(sql: str) -> None:
        threads.setdefault(sql.split()[0].upper(), set()).add(threading.get_ident())

    async with db.write() as conn:
        _raw(conn).set_trace_callback(trace)
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('a')")
    assert threads["COMMIT"] == {loop_thread}  # small: committed inline
    threads.clear()

    rows = [(f"r{i}",) for i in range(OFFLOAD_COMMIT_CHANGES)]
    async with db.write() as conn:
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", rows)
    assert threads["INSERT"] == {loop_thread}
    assert threads["COMMIT"] and loop_thread not in threads["COMMIT"]  # large: on the thread
    plain = sqlite3.connect(tmp_path / "w.db")  # committed when write() returned
    assert plain.execute("SELECT count(*) FROM t").fetchone()[0] == 1 + OFFLOAD_COMMIT_CHANGES
    plain.close()

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    async with db.write() as conn:
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", rows)
        inside = ticks
    task.cancel()
    assert inside == before  # statements run inline: nothing else ran inside the transaction
    assert ticks > inside  # while the commit was written, the loop ran the ticker

    threads.clear()  # a rollback's changes do not count towards the next commit
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            await conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", rows)
            raise RuntimeError("the caller failed")
    async with db.write() as conn:
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('b')")
    assert threads["COMMIT"] == {loop_thread}
    await db.dispose()


async def test_a_writer_under_load_can_send_a_small_commit_to_the_committer_thread(tmp_path: Path) -> None:
    """``offload_commit`` hands the open transaction's commit to the committer's thread however
    small it is, once: the next small transaction commits inline again, and a rollback drops the
    request with the transaction."""
    import threading

    db = await _db(tmp_path)
    loop_thread = threading.get_ident()
    commits: list[int] = []

    def trace(sql: str) -> None:
        if sql.split()[0].upper() == "COMMIT":
            commits.append(threading.get_ident())

    async with db.write() as conn:
        _raw(conn).set_trace_callback(trace)
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('a')")
        db.offload_commit(conn)
    assert len(commits) == 1 and commits[0] != loop_thread  # small, yet on the thread
    async with db.write() as conn:
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('b')")
    assert commits[1] == loop_thread  # the request was for one commit only
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            db.offload_commit(conn)
            raise RuntimeError("the caller failed")
    async with db.write() as conn:
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('c')")
    assert commits[2] == loop_thread  # dropped with the rolled-back transaction
    plain = sqlite3.connect(tmp_path / "w.db")
    assert [r[0] for r in plain.execute("SELECT v FROM t ORDER BY id")] == ["a", "b", "c"]
    plain.close()
    await db.dispose()
