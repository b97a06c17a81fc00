"""SQLite log checkpoints run in their own thread; the log still starts over, nothing is lost."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from mayak.db.checkpoint import NICE, SETTLE_WAIT_S, Checkpointer
from mayak.db.database import Database


async def _fill(db: Database, rounds: int) -> None:
    for i in range(rounds):
        async with db.write() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO t (v) SELECT ? || value FROM json_each(?)",
                (f"r{i}-" + "x" * 2000, "[" + ",".join(str(n) for n in range(20)) + "]"),
            )


async def test_commits_leave_checkpoints_to_the_thread_and_the_log_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = Database(f"sqlite:///{path}")
    assert db.checkpointer is not None
    db.checkpointer.restart_frames = 40  # small, so the test restarts the log many times
    db.checkpointer.interval_s = 0.0
    async with db.write() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        auto = (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar()
    assert auto == 0  # no checkpoint inside a commit
    await _fill(db, 200)  # ~200 x 20 rows of 2 KB: far more than 40 frames
    assert db.checkpointer.checkpoints > 0
    # The log was started over again and again. (How long it grows in between depends on how the
    # threads are scheduled: on a loaded machine the writer may commit hundreds of frames while one
    # checkpoint runs, so the test counts restarts rather than bounding the file's size.)
    assert db.checkpointer.restarts_seen >= 2
    wal = Path(f"{path}-wal")
    written = 200 * 20 * 2000
    assert wal.stat().st_size < written  # it never held everything written
    async with db.read() as conn:
        assert (await conn.exec_driver_sql("SELECT count(*) FROM t")).scalar() == 4000
    await db.dispose()
    assert db.checkpointer._thread is None  # stopped with the database

    # a fresh process sees every committed row
    plain = sqlite3.connect(path)
    assert plain.execute("SELECT count(*) FROM t").fetchone()[0] == 4000
    plain.close()


async def test_a_long_log_makes_the_next_transaction_settle_first(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = Database(f"sqlite:///{path}")
    checkpointer = db.checkpointer
    assert checkpointer is not None
    checkpointer.idle_s = 3600.0  # only settle() and pokes checkpoint
    checkpointer.interval_s = 3600.0
    async with db.write() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    order: list[str] = []
    settle = checkpointer.settle

    async def spy() -> None:
        order.append("settle")
        await settle()

    checkpointer.settle = spy  # type: ignore[method-assign]
    checkpointer.restart_due = True
    async with db.write() as conn:
        order.append("transaction")
        await conn.execute(sa.text("INSERT INTO t (v) VALUES ('a')"))
    assert order == ["settle", "transaction"]
    assert checkpointer.restart_due is False  # the settle copied the whole log
    async with db.write() as conn:
        order.append("transaction")
    assert order == ["settle", "transaction", "transaction"]  # nothing due: no settle
    await db.dispose()


def test_a_checkpoint_of_a_missing_file_is_logged_not_raised(tmp_path: Path) -> None:
    checkpointer = Checkpointer(str(tmp_path / "missing" / "x.db"))
    assert checkpointer.checkpoint() is False
    checkpointer.stop()
    assert not os.path.exists(tmp_path / "missing")


async def test_a_reader_that_needs_the_log_does_not_make_every_write_settle(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    db = Database(f"sqlite:///{path}")
    checkpointer = db.checkpointer
    assert checkpointer is not None
    checkpointer.idle_s = checkpointer.interval_s = 3600.0
    checkpointer.restart_frames = 1  # any log is long
    async with db.write() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()  # holds a snapshot in the log
    async with db.write() as conn:
        await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('after the reader began')")
    settles = 0
    settle = checkpointer.settle

    async def spy() -> None:
        nonlocal settles
        settles += 1
        await settle()

    checkpointer.settle = spy  # type: ignore[method-assign]
    checkpointer.restart_due = True
    for _ in range(3):
        async with db.write() as conn:
            await conn.exec_driver_sql("INSERT INTO t (v) VALUES ('x')")
    assert settles == 1  # the reader kept the log; writes went on without settling again
    checkpointer.checkpoint()
    assert checkpointer.restart_due is False  # held: no restart is due again at once
    reader.execute("COMMIT")
    reader.close()
    await db.dispose()


def _writer(path: Path) -> sqlite3.Connection:
    """A connection that stays open (closing the last one would checkpoint and remove the log)."""
    plain = sqlite3.connect(path, isolation_level=None)
    plain.execute("PRAGMA journal_mode=WAL")
    plain.execute("PRAGMA wal_autocheckpoint=0")
    plain.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
    return plain


def _writes(writer: sqlite3.Connection, rows: int) -> None:
    """One transaction of ``rows`` rows of a page each: about one frame a row."""
    writer.execute("BEGIN")
    for i in range(rows):
        writer.execute("INSERT INTO t (v) VALUES (?)", ("x" * 3000 + str(i),))
    writer.execute("COMMIT")


def test_a_long_log_waits_for_a_short_pass_before_a_restart_is_due(tmp_path: Path) -> None:
    """Once the log is long, passes run back to back; the restart is due only after one short
    enough that the settle (which the writer waits for) will be short too, or at twice the length."""
    path = tmp_path / "p.db"
    writer = _writer(path)
    checkpointer = Checkpointer(str(path), restart_frames=20, settle_pass_s=-1.0)  # no pass is short
    _writes(writer, 30)  # about 30 frames: long, but under twice the length
    assert checkpointer.checkpoint() is True
    assert checkpointer.restart_near and not checkpointer.restart_due
    assert checkpointer.pass_frames == checkpointer.log_frames > 20
    assert checkpointer.checkpoint() is True
    assert checkpointer.pass_frames == 0  # nothing new: the thread waits instead of spinning
    checkpointer.stop()
    writer.close()

    path = tmp_path / "h.db"
    writer = _writer(path)
    hard = Checkpointer(str(path), restart_frames=20, settle_pass_s=-1.0)
    _writes(writer, 50)  # past twice the length: due, however long the passes take
    hard.checkpoint()
    assert hard.log_frames >= 40 and hard.restart_due
    hard.stop()

    quick = Checkpointer(str(path), restart_frames=20, settle_pass_s=60.0)  # every pass is short
    quick.checkpoint()
    assert quick.restart_near and quick.restart_due
    quick.stop()
    writer.close()


def test_a_short_log_keeps_the_thread_on_its_interval(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    writer = _writer(path)
    checkpointer = Checkpointer(str(path), restart_frames=10_000)
    _writes(writer, 30)
    assert checkpointer.checkpoint() is True
    assert checkpointer.pass_frames > 0
    assert not checkpointer.restart_near and not checkpointer.restart_due
    checkpointer.stop()
    writer.close()


def test_with_a_restart_due_the_thread_leaves_the_log_to_the_settle(tmp_path: Path) -> None:
    """A pass the thread started after the restart fell due would hold the connection the settle
    needs: the writer then waited for that pass (20-30 ms under load) and then for its own."""
    path = tmp_path / "s.db"
    writer = _writer(path)
    checkpointer = Checkpointer(str(path), restart_frames=20, settle_pass_s=60.0, interval_s=0.0)
    _writes(writer, 30)
    checkpointer.checkpoint()
    assert checkpointer.restart_due
    passes = checkpointer.checkpoints
    checkpointer.start()
    for _ in range(5):
        checkpointer.poke()  # commits keep coming
        time.sleep(0.02)
    assert checkpointer.checkpoints == passes  # no pass while the settle is due
    checkpointer._due_since -= SETTLE_WAIT_S  # no write came to settle for that long: copy on
    checkpointer.poke()
    deadline = time.monotonic() + 5
    while checkpointer.checkpoints == passes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpointer.checkpoints > passes
    checkpointer.stop()
    writer.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are set on Linux only")
def test_the_thread_runs_below_the_event_loop(tmp_path: Path) -> None:
    """Its passes must not take a core from the event loop or the commits the writer waits for."""
    path = tmp_path / "nice.db"
    sqlite3.connect(path).close()
    checkpointer = Checkpointer(str(path), interval_s=0.01)
    checkpointer.start()
    try:
        thread = checkpointer._thread
        assert thread is not None and thread.native_id is not None
        deadline = time.monotonic() + 5
        while os.getpriority(os.PRIO_PROCESS, thread.native_id) != NICE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == NICE == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < NICE  # not the whole process
    finally:
        checkpointer.stop()
