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
serving requests, which copies the frames written since the last one. The transaction then starts
the log afresh; ``journal_size_limit`` trims the file.

The writer waits for that settle, and for the pass already running when it asks, so both must be
short. A pass costs a sync of the database file plus what it copies, and under steady writes it
copies what was appended during the pass before. So once the log is long the thread runs passes
back to back, each copying what the last one left, and only a pass of at most ``settle_pass_s``
(or a log of ``HARD_RESTART_FACTOR`` times the length, should no pass be that short) makes the
restart due. In practice that is a pass that found the writer between transactions and had
little or nothing to copy: with something to copy, the sync alone takes longer. Once the restart
is due the thread starts no pass of its own (for ``SETTLE_WAIT_S`` at most, should no write come):
under web-chat load the writer otherwise waited 20-30 ms for a pass that copied next to nothing,
then for the settle's own.

Measured on 1,000,000 events of SQLite ingestion (``bench/ingest_http.py``): with a restart every
32,000 frames, settled after the first pass over the length, the writer stalled 60-200 ms about
once a second, 11 % of the run; each pass here costs at least one sync of the database file, 30-40
ms on this machine's disk. With restarts every 96,000 frames, settled after a short pass, the
stalls took 2 % of the run (1.6 s in 74 s) and the run was 12 % faster. The log then reaches about
400 MiB under sustained writes; under lighter load SQLite starts it over at the first write after
a checkpoint that copied everything, long before that.

Durability does not change: a commit is durable in the log exactly as before, and SQLite recovers
from a crash at any moment of a checkpoint as ever. A passive checkpoint never waits for readers or
writers; frames a reader still needs are copied by a later one. When a settle cannot copy the
whole log for that reason, writes go on and no restart is tried for ``hold_s`` (a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import threading
import time

import structlog

log = structlog.get_logger("mayak.db")

LOG_LIMIT_BYTES = 400 * 1024 * 1024  # journal_size_limit: the log file is cut back to this on reset
RESTART_FRAMES = 96_000  # about 380 MiB of 4 KiB pages (reached only under sustained writes)
SETTLE_PASS_S = 0.01  # a pass this short: the settle's wait (for it and one more) is short too
HARD_RESTART_FACTOR = 2  # a log this many times restart_frames settles whatever a pass takes
SETTLE_WAIT_S = 1.0  # with a restart due, the thread leaves the log to the settle this long at most
# The thread's nice value (Linux, the lowest): it yields to the event loop and the commits, which the
# writer waits for; it gets the cores when they are idle, and they are most of the time.
# 1,000,000 events over HTTP on 2 cores: commits 10.4-10.9 against 11.3-11.5 ms a group, the
# event loop's CPU an event 47.9-49.9 against 51.0-51.1 µs (the passes took the loop's core too);
# three interleaved pairs: 19,421 / 18,602 / 18,979 against 19,228 / 17,756 / 18,448 events/s.
# A settle, which the writer does wait for, runs in a worker thread at the process's priority.
NICE = 19


class Checkpointer:
    """Passive ``wal_checkpoint`` runs on one SQLite file, from a daemon thread."""

    def __init__(
        self,
        path: str,
        *,
        interval_s: float = 0.2,
        idle_s: float = 1.0,
        restart_frames: int = RESTART_FRAMES,
        settle_pass_s: float = SETTLE_PASS_S,
    ):
        self.path = path
        self.interval_s = interval_s
        self.idle_s = idle_s
        self.restart_frames = restart_frames
        self.settle_pass_s = settle_pass_s
        self.restart_near = False  # the log is long: passes run back to back until one is short
        self.restart_due = False  # ... and one was: the next write transaction settles first
        self.hold_s = 1.0  # after a settle a reader kept from finishing: no restart before this long
        self._hold_until = 0.0
        self._due_since = 0.0  # when restart_due last became true
        self.checkpoints = 0  # checkpoints run (tests, diagnostics)
        self.log_frames = 0  # frames in the log at the last checkpoint
        self.copied_frames = 0  # of those, copied into the database
        self.pass_frames = 0  # frames the last checkpoint copied
        self.restarts_seen = 0  # times a checkpoint found the log shorter than the one before
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
        if sys.platform.startswith("linux"):  # elsewhere the call would renice the whole process
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while not self._stop.is_set():
            self._wake.wait(self.idle_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            if self.restart_due and time.monotonic() < self._due_since + SETTLE_WAIT_S:
                # The next write transaction settles: a pass started now would hold the connection
                # the settle needs, and the writer would wait for both.
                continue
            self.checkpoint()
            if self.restart_near and self.pass_frames:
                self._wake.set()  # near a restart: copy on at once, until a pass is short
            else:  # let a few commits gather in the log (or a reader finish with it)
                self._stop.wait(self.interval_s)

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
                started = time.monotonic()
                _busy, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                took = time.monotonic() - started
            except sqlite3.Error as exc:  # the file went away (tests) or a fault: the next one tries again
                log.warning("sqlite_checkpoint_failed", error=str(exc))
                return False
            self.checkpoints += 1
            # fewer copied than last time: the log started over since, and everything copied is new
            if frames < self.log_frames or copied < self.copied_frames:
                self.restarts_seen += 1
            self.pass_frames = copied - self.copied_frames if copied >= self.copied_frames else copied
            self.log_frames, self.copied_frames = frames, copied
            self.restart_near = frames >= self.restart_frames and time.monotonic() >= self._hold_until
            due = self.restart_near and (
                took <= self.settle_pass_s or frames >= self.restart_frames * HARD_RESTART_FACTOR
            )
            if due and not self.restart_due:
                self._due_since = time.monotonic()
            self.restart_due = due
            return bool(frames == copied)
