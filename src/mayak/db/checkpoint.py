"""SQLite write-ahead-log checkpoints in a thread of their own, off the writer's commit path.

With SQLite's automatic checkpoints, the commit that pushes the log past its threshold copies the
log back into the database file and syncs both while the single writer (and, for inline writes,
the event loop) waits. Here every connection of the process has automatic checkpoints off, and one
thread with its own connection runs passive checkpoints instead: woken after write commits, at most
every ``interval_s`` (and every ``idle_s`` regardless), it copies what the log holds while the writer
goes on appending. ``sqlite3`` releases the GIL while SQLite works, so the copy and its syncs overlap
the Python work of the next transaction, on the second core where there is one.

The log starts again from its beginning only when a write transaction begins with every frame
already copied. Under steady writes that moment never comes by itself (the writer has always
appended more by the time a checkpoint finishes), and a log that only grows costs more per frame
(the file system allocates as it goes). So once the log holds ``restart_frames`` frames the
checkpointer says ``restart_due``, and the next write transaction of this process first awaits
``settle()``: one more passive checkpoint, run in a worker thread while the event loop goes on
serving requests, which copies the few frames written since the last one. The transaction then
starts the log afresh; ``journal_size_limit`` trims the file.

Durability does not change: a commit is durable in the log exactly as before, and SQLite recovers
from a crash at any moment of a checkpoint as ever. A passive checkpoint never waits for readers or
writers; frames a reader still needs are copied by a later one. When a settle cannot copy the
whole log for that reason, writes go on and no restart is tried for ``hold_s`` (a second).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import structlog

log = structlog.get_logger("mayak.db")

LOG_LIMIT_BYTES = 160 * 1024 * 1024  # journal_size_limit: the log file is cut back to this on reset
RESTART_FRAMES = 32_000  # about 128 MiB of 4 KiB pages


class Checkpointer:
    """Passive ``wal_checkpoint`` runs on one SQLite file, from a daemon thread."""

    def __init__(
        self,
        path: str,
        *,
        interval_s: float = 0.2,
        idle_s: float = 1.0,
        restart_frames: int = RESTART_FRAMES,
    ):
        self.path = path
        self.interval_s = interval_s
        self.idle_s = idle_s
        self.restart_frames = restart_frames
        self.restart_due = False  # the log is long: the next write transaction settles first
        self.hold_s = 1.0  # after a settle a reader kept from finishing: no restart before this long
        self._hold_until = 0.0
        self.checkpoints = 0  # checkpoints run (tests, diagnostics)
        self.log_frames = 0  # frames in the log at the last checkpoint
        self._conn: sqlite3.Connection | None = None
        self._conn_lock = threading.Lock()  # the thread and settle() share one connection
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mayak-sqlite-checkpoint", daemon=True)
            self._thread.start()

    def poke(self) -> None:
        """A write transaction committed: there is something to copy."""
        self._wake.set()

    async def settle(self) -> None:
        """Checkpoint now, in a worker thread; the caller holds this process's write lock, so the
        checkpoint can copy the whole log unless a reader still needs part of it."""
        if not await asyncio.to_thread(self.checkpoint):
            # a reader still needs part of the log: write on, and try again a little later
            self._hold_until = time.monotonic() + self.hold_s
        self.restart_due = False  # done, or held: the transaction about to begin goes ahead

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.idle_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.checkpoint()
            if not self.restart_due:  # a restart is near: keep copying, so the settle has little left
                self._stop.wait(self.interval_s)  # let a few commits gather in the log

    def checkpoint(self) -> bool:
        """One passive checkpoint; True when it copied the whole log."""
        with self._conn_lock:
            try:
                if self._conn is None:
                    self._conn = sqlite3.connect(
                        self.path, check_same_thread=False, timeout=30, isolation_level=None
                    )
                    self._conn.execute("PRAGMA busy_timeout=30000")
                    self._conn.execute(f"PRAGMA journal_size_limit={LOG_LIMIT_BYTES}")
                _busy, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:  # the file went away (tests) or a fault: the next one tries again
                log.warning("sqlite_checkpoint_failed", error=str(exc))
                return False
            self.checkpoints += 1
            self.log_frames = frames
            self.restart_due = frames >= self.restart_frames and time.monotonic() >= self._hold_until
            return bool(frames == copied)
