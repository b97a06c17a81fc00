"""Group commit: many concurrent requests share one write transaction.

A request hands its validated events to ``submit`` and waits; a single writer task takes everything
queued, appends it in one transaction, commits, and answers every waiter. A 2xx therefore always
means the events are committed (durable against a crash of the process), while SQLite pays one
commit per group instead of one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database
from mayak.eventlog import AppendResult, LogNotifier, NewEvent, deduplicate, insert, reserve_seqs
from mayak.metrics import Metrics

if TYPE_CHECKING:
    from mayak.pipeline.processor import Pipeline

log = structlog.get_logger("mayak.ingest")

MAX_GROUP_EVENTS = 20_000
GROUP_LINGER_S = 0.01
# SQLite: a shorter wait, for web-chat turns. Measured at 2,000 msgs/s (bench/webchat.py, five
# interleaved pairs): p99 18.7-24.2 ms against 20.8-40.4 without; at 1,000 msgs/s p50 5.0 -> 4.3 ms;
# SQLite ingestion unchanged (13,314 / 13,203 against 13,109 / 13,467 events/s).
SQLITE_GROUP_LINGER_S = 0.002
# Under load, a group's commit goes to the committer's thread however small (``Database.offload_commit``):
# when the writer's recent duty cycle (the share of time spent building groups, not counting commits
# or the time between groups) is at least this. The event loop is then busy, and the ~0.2 ms it
# would spend writing a small commit to the log is worth more to the waiting requests than the
# ~0.5 ms the hand-over adds to this group. Web chat at 2,000 msgs/s: 24 µs less main-thread time a
# turn; a lightly loaded chat keeps its commits inline (lower latency).
OFFLOAD_DUTY = 0.5
DUTY_SMOOTHING = 0.2  # weight of the newest group in the duty cycle's moving average
# After a group stored events for the lane (it was behind), the next group waits this long at most
# for the lane to catch up, so that it is processed inline again (see IngestWriter._let_lane_catch_up).
LANE_CATCH_UP_S = 1.0
# Something that adds to events before they are appended, outside any transaction (e.g. asking a
# remote NLU engine about a customer's message): it may take its time without holding the writer.
Enricher = Callable[[Sequence[NewEvent]], Awaitable[None]]


class IngestWriter:
    def __init__(
        self, db: Database, notifier: LogNotifier, metrics: Metrics, *, dedup_window_ms: int | None = None
    ):
        self.dedup_window_ms = dedup_window_ms
        self.db = db
        self.notifier = notifier
        self.metrics = metrics
        self._queue: list[tuple[Sequence[NewEvent], asyncio.Future[AppendResult]]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        # Set by the platform when profiles are processed inline (see Pipeline.process_new).
        self.pipeline: Pipeline | None = None
        self._stored_for_lane = False  # the last group stored events for a lane to process
        self._lane_owed: dict[str, int] = {}  # workspace -> last seq stored for its lane to process
        # Asked about events from these sources only (ingestion pays one pass over a request's sources).
        self.enrichers: list[tuple[frozenset[str], Enricher]] = []
        # Under load, how long a group may wait to fill up (see _fill).
        self.linger_s = GROUP_LINGER_S if db.dialect == "postgresql" else SQLITE_GROUP_LINGER_S
        self._last_group = 0  # events in the last group
        self._duty = 0.0  # moving average of the writer's duty cycle (see OFFLOAD_DUTY)
        self._group_end = 0.0  # loop time when the last group's work was done
        # PostgreSQL: a committed group's answers, held until the next group holds its append lock
        # (see _commit); empty otherwise.
        self.hold_answers = db.dialect == "postgresql"
        self._held: list[tuple[asyncio.Future[AppendResult], AppendResult]] = []

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="mayak-ingest-writer")

    async def stop(self) -> None:
        if self._task is not None:
            await self.flush()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, batch: Sequence[NewEvent]) -> AppendResult:
        """Append ``batch`` durably; returns once it is committed."""
        if not batch:
            return AppendResult()
        for sources, enrich in self.enrichers:
            if any(ev.source in sources for ev in batch):
                await enrich(batch)
        if self._task is None:
            async with self._write() as conn:
                result, advanced = await self._append(conn, batch)
            self._count(result)
            await self._committed(advanced)
            return result
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append((batch, fut))
        self._idle.clear()
        self._wake.set()
        return await fut

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """``Database.write`` with its commit timed (``mayak_ingest_commit_seconds``: from the end of
        the block until the commit returned). A commit that takes long holds up the next group, as
        the SQLite writer cannot begin another transaction meanwhile; on SQLite it is usually a
        checkpoint syncing the files at the same moment (docs/operations.md)."""
        loop = asyncio.get_running_loop()
        async with self.db.write() as conn:
            yield conn
            built = loop.time()
        self.metrics.commit_seconds.observe(loop.time() - built)

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed."""
        if self._task is not None:
            await self._idle.wait()

    async def _append(
        self, conn: AsyncConnection, batch: Sequence[NewEvent]
    ) -> tuple[AppendResult, dict[str, int]]:
        """Deduplicate and store ``batch``; where a workspace's pipeline lane is caught up, process
        its events in this same transaction. Returns the result and the lanes' new positions."""
        result, kept = await deduplicate(
            self.db, conn, batch, window_ms=self.dedup_window_ms, locked=self._answer_held
        )
        by_ws: dict[str, list[NewEvent]] = {}
        for ev in kept:
            by_ws.setdefault(ev.workspace_id, []).append(ev)
        advanced: dict[str, int] = {}
        for ws_id, events in by_ws.items():
            seqs = await reserve_seqs(self.db, conn, len(events))  # per workspace: derived events follow
            position = None
            if self.pipeline is not None:
                position = await self.pipeline.process_new(conn, ws_id, events, seqs)
            if position is None:
                await insert(self.db, conn, events, seqs)
                self._stored_for_lane = True
                self._lane_owed[ws_id] = seqs[-1]
            else:
                advanced[ws_id] = position
        return result, advanced

    async def _committed(self, advanced: dict[str, int]) -> None:
        pipeline = self.pipeline
        # Events processed inline leave the lanes nothing to do: waking them would cost a read
        # per workspace for nothing (other consumers poll anyway).
        if pipeline is None or self._stored_for_lane or pipeline.lane_behind:
            self._stored_for_lane = False  # sticky until notified: a missed wake costs a poll
            self.notifier.notify()
            if pipeline is not None:
                pipeline.lane_behind = False
        if self.pipeline is not None:
            for ws_id, position in advanced.items():
                await self.pipeline.advanced(ws_id, position)

    def _count(self, result: AppendResult) -> None:
        self.metrics.events_accepted.inc(result.accepted)
        if result.duplicates:
            self.metrics.events_deduplicated.inc(result.duplicates)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                if self._lane_owed:
                    self._answer_held()
                    await self._let_lane_catch_up()
                if self.linger_s:
                    await self._fill()
                taken = size = 0
                for batch, _ in self._queue:
                    if size >= MAX_GROUP_EVENTS:
                        break
                    taken += 1
                    size += len(batch)
                group = self._queue[:taken]
                del self._queue[:taken]  # one slice, not a pop(0) per request: the queue can be long
                self._last_group = size
                await self._commit(group)
            self._answer_held()
            self._idle.set()

    def _busy(self, started: float, done: float) -> bool:
        """Fold this group (built from ``started`` to ``done``) into the writer's duty cycle; True
        when the cycle says the event loop is busy (see ``OFFLOAD_DUTY``)."""
        gap = max(0.0, started - self._group_end) if self._group_end else 1.0
        work = done - started
        share = work / (work + gap) if work + gap > 0 else 0.0
        self._duty += DUTY_SMOOTHING * (share - self._duty)
        self._group_end = done
        return self._duty >= OFFLOAD_DUTY

    async def _let_lane_catch_up(self) -> None:
        """Wait (at most ``LANE_CATCH_UP_S``) for this process's lane to process what earlier groups
        stored for it, before the next group.

        A group is processed inline only when its workspace's lane is caught up; otherwise its
        events are stored for the lane, which reads them back and attributes each one with a second
        write. Under steady load a lane that fell behind once (it held the workspace's lock for a
        moment) would stay behind, every group adding to its backlog, at a higher cost per event
        than inline. Waiting lets it catch up, and the groups after are processed inline again. A
        lane in another process (``mayak worker``) is not waited for."""
        owed, self._lane_owed = self._lane_owed, {}
        pipeline = self.pipeline
        if pipeline is None or not pipeline.lane_running:
            return
        deadline = asyncio.get_running_loop().time() + LANE_CATCH_UP_S
        for ws_id, seq in owed.items():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await pipeline.wait_for(ws_id, seq, timeout=left)

    async def _fill(self) -> None:
        """Wait a moment (at most ``linger_s``) while the queue holds less than half the last group.

        Under load on PostgreSQL the groups otherwise alternate between one request (the one that
        arrived while the previous group committed) and all the others (they arrive a moment
        later, when their answers have gone out), and a one-request group costs nearly as much as
        a full one. On SQLite, under a web-chat load, a group that commits a few turns pays the
        transaction's fixed costs (the commit's hand-over to the committer thread alone is ~0.8 ms)
        for little; a group twice as large pays them once. When the last group was that small
        anyway (light load) nothing waits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger_s
        while sum(len(batch) for batch, _ in self._queue) * 2 < self._last_group and loop.time() < deadline:
            await asyncio.sleep(0.001)

    async def _commit(self, group: list[tuple[Sequence[NewEvent], asyncio.Future[AppendResult]]]) -> None:
        flat = [ev for batch, _ in group for ev in batch]
        loop = asyncio.get_running_loop()
        try:
            async with self._write() as conn:
                started = loop.time()
                result, advanced = await self._append(conn, flat)
                if self._busy(started, loop.time()):
                    self.db.offload_commit(conn)
        except Exception as exc:  # nothing of this group was committed
            self._answer_held()
            if len(group) > 1:
                # one request's events must not fail its neighbours: commit each request on its own
                log.warning("ingest_group_commit_failed", error=str(exc), requests=len(group))
                for item in group:
                    await self._commit([item])
                return
            log.error("ingest_commit_failed", error=str(exc), events=len(flat))
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._answer_held()  # the group before: committed, and its answers waited long enough
        await self._committed(advanced)
        offset = 0
        answers: list[tuple[asyncio.Future[AppendResult], AppendResult]] = []
        for batch, fut in group:
            flags = result.duplicate_flags[offset : offset + len(batch)]
            offset += len(batch)
            dup = sum(flags)
            part = AppendResult(accepted=len(batch) - dup, duplicates=dup, duplicate_flags=flags)
            self._count(part)
            answers.append((fut, part))
        self._held = answers
        # Held only when the next group starts at once: not when it will wait (to fill up, or for
        # a lane this group stored events for).
        queued = sum(len(batch) for batch, _ in self._queue)
        if not (self.hold_answers and queued * 2 >= self._last_group > 0 and not self._lane_owed):
            self._answer_held()

    def _answer_held(self) -> None:
        """Answer the requests of the last committed group that are still waiting.

        On PostgreSQL, when the next group is ready to start, a committed group's answers are held
        until the next group holds its append lock. Answering wakes every request of a group: each
        sends its response, reads the client's next request and checks its events, a few
        milliseconds of the event loop apiece. Woken at once, they would delay the next group's
        first round trips (``BEGIN``, the lock: ~8 ms at the median under load, against ~0.4 ms
        for the same kind of statement later in the transaction) while PostgreSQL sits idle; woken
        once the lock is held, they run while PostgreSQL executes the group's dedup upsert. The
        answers are a round trip or two later; the events were committed before either way."""
        held, self._held = self._held, []
        for fut, part in held:
            if not fut.done():
                fut.set_result(part)
