"""The pipeline loop: read each workspace's log past its cursor, resolve, write back, advance.

One lane per workspace: a batch is read, resolved and written in one transaction that also moves
the cursor, so a crash re-reads the batch and, because every write is derived from the log
deterministically and outbox keys derive from event ids, reprocessing duplicates nothing. On
PostgreSQL the lane is an advisory lock, so several worker processes share workspaces safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak import eventlog
from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.fastsql import FastSql
from mayak.db.schema import consumer_cursors, events, workspaces
from mayak.eventlog import LoggedEvent, LogNotifier, NewEvent, append
from mayak.metrics import Metrics
from mayak.pipeline.batch import EVENT_COLUMNS, HELD_PROFILES, ProfileBatch, logged_from_tuple
from mayak.timeutil import now_ms
from mayak.workspaces.service import WorkspaceService

log = structlog.get_logger("mayak.pipeline")

CONSUMER = "profiles"
FOLLOW_ROUNDS = 4
ANALYSIS_LIMIT = 1000  # SQLite: rows sampled per index by the statistics refresh
# What a bot router derives about a customer it loaded: no profile rule reads these.
PROFILE_FREE = frozenset(
    {
        "message.outbound",
        "conversation.turn",
        "conversation.handoff",
        "message.suppressed",
        "message.deferred",
    }
)
Router = Callable[[AsyncConnection, str, list[LoggedEvent]], Awaitable[int]]


class Pipeline:
    def __init__(
        self,
        db: Database,
        notifier: LogNotifier,
        settings: Settings,
        metrics: Metrics,
        routers: list[Router] | None = None,
        workspaces: WorkspaceService | None = None,
    ):
        self.db = db
        self.notifier = notifier
        self.settings = settings
        self.metrics = metrics
        self.routers = list(routers or [])
        self.workspaces = workspaces
        self.batch_size = settings.pipeline_batch_size
        self.sql = FastSql(db.dialect)
        self.linger_s = 0.05
        self._lock = asyncio.Lock()
        self._progress = asyncio.Condition()
        self._positions: dict[str, int] = {}
        self._running = False
        self._processed = 0
        self._next_analyze = 10_000
        self._analyzing: asyncio.Task[None] | None = None
        self._deliveries_pending = False
        # Set when inline processing left events of its own transaction for the lane.
        self.lane_behind = False
        # Called after a commit that routed something into the outbox (set by the platform).
        self.wake_deliveries: Callable[[], None] | None = None

    # -- loops -------------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        self._running = True
        try:
            while not stop.is_set():
                try:
                    worked = await self.run_until_idle()
                except Exception:
                    log.exception("pipeline_round_failed")
                    worked = 0
                    await asyncio.sleep(1.0)
                if not worked:
                    await self.notifier.wait(0.5)
                elif worked < self.batch_size:
                    # Under a steady trickle, linger a moment so the next batch is larger: fewer,
                    # bigger transactions give far more events per second for a few ms of latency.
                    await asyncio.sleep(self.linger_s)
        finally:
            self._running = False

    async def run_until_idle(self) -> int:
        """Process every workspace to the end of its log; returns how many events it processed."""
        total = 0
        while done := await self.run_until_idle_once():
            total += done
        return total

    async def run_until_idle_once(self) -> int:
        """One batch per workspace that has unprocessed events; returns how many events it processed."""
        total = 0
        async with self._lock:
            async with self.db.read() as conn:
                ws_ids = [
                    r[0] for r in await conn.execute(sa.select(workspaces.c.id).order_by(workspaces.c.id))
                ]
            for ws_id in ws_ids:
                total += await self._process_batch(ws_id)
        return total

    async def wait_for(self, workspace_id: str, seq: int, timeout: float = 10.0) -> None:
        """Return once the workspace's cursor has passed ``seq`` (processing inline if no loop runs)."""
        if not self._running:
            await self.run_until_idle()
            return
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: self._positions.get(workspace_id, 0) >= seq)

    # -- one batch ---------------------------------------------------------------------------

    async def _has_work(self, ws_id: str) -> bool:
        """Cheap read-only check, so an idle workspace costs no write transaction.

        It asks for the workspace's last ``seq`` (one step down the ``(workspace_id, seq)`` index
        from its end), not for "any row past the cursor, LIMIT 1": PostgreSQL plans that generic
        prepared statement as a sequential scan that stops at the first match, which reads the whole
        table when nothing matches, i.e. every time the lane is caught up (at 1,000,000 events,
        130 ms of PostgreSQL's CPU per poll)."""
        known = self._positions.get(ws_id)
        if known is None:
            return True
        sql = self.sql
        async with self.db.read() as conn:
            last = (
                await conn.exec_driver_sql(
                    f"SELECT max(seq) FROM events WHERE workspace_id = {sql.p(1)}", (ws_id,)
                )
            ).scalar()
        return last is not None and int(last) > known

    async def _process_batch(self, ws_id: str) -> int:
        if not await self._has_work(ws_id):
            return 0
        started = time.perf_counter()
        async with self.db.write() as conn:
            await self.db.lock_workspace(conn, ws_id, CONSUMER)
            position = await self._cursor(conn, ws_id)
            rows = await self._read_after(conn, ws_id, position)
            if not rows:
                self._positions[ws_id] = position
                return 0
            new_position, derived = await self._process_stored(conn, ws_id, rows)
            new_position, more = await self._follow(conn, ws_id, new_position)
        if derived or more:
            self.notifier.notify()
        log.debug(
            "pipeline_batch",
            workspace=ws_id,
            events=len(rows),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        await self.advanced(ws_id, new_position)
        return len(rows)

    async def _read_after(self, conn: AsyncConnection, ws_id: str, position: int) -> list[Any]:
        sql = self.sql
        return await sql.fetch(
            conn,
            f"SELECT {EVENT_COLUMNS} FROM events AS e "
            f"WHERE e.workspace_id = {sql.p(1)} AND e.seq > {sql.p(2)} ORDER BY e.seq LIMIT {sql.p(3)}",
            (ws_id, position, self.batch_size),
        )

    async def _process_stored(
        self, conn: AsyncConnection, ws_id: str, rows: list[Any], *, save_cursor: bool = True
    ) -> tuple[int, int]:
        """Process events already in the log; returns (new position, events derived)."""
        logged = [logged_from_tuple(r) for r in rows]
        batch, items = await self._resolve(conn, ws_id, logged)
        await batch.number_new()
        routed, updates, dropped = batch.attribute(items)
        await batch.write_state()
        await batch.store_attribution(updates, dropped)
        new_position = int(rows[-1][0])
        derived = await self._finish(
            conn, ws_id, batch, len(items), routed, new_position, save_cursor=save_cursor
        )
        return new_position, derived

    async def _follow(self, conn: AsyncConnection, ws_id: str, position: int) -> tuple[int, int]:
        """Process, in the same transaction, what this transaction appended after ``position``: the
        pipeline's own records and what its consumers derived (a bot's messages, turns and profile
        changes). The lane then stays caught up, so the next events are processed inline too, and a
        bot's changes reach the profile before its next turn. Bounded, so a flow that triggers itself
        cannot spin here (the lane goes on with the rest later)."""
        followed = 0
        for _ in range(FOLLOW_ROUNDS):
            rows = await self._read_after(conn, ws_id, position)
            if not rows:
                break
            position, _ = await self._process_stored(conn, ws_id, rows)
            followed += len(rows)
        return position, followed

    async def process_new(
        self, conn: AsyncConnection, ws_id: str, kept: list[NewEvent], seqs: list[int]
    ) -> int | None:
        """Process events *while they are being appended*, in the appending transaction.

        Only when the workspace's lane is caught up (nothing older waits), so log order is kept.
        Saves reading the events back, attributing them with a second write and a second commit.
        Stores the events itself and returns the new cursor position; returns None (and stores
        nothing) when the events must wait for the lane, and the caller stores them plainly.
        """
        if not await self._caught_up(conn, ws_id):
            return None
        logged = [
            LoggedEvent(
                seq,
                ev.id,
                ws_id,
                ev.type,
                ev.name,
                ev.customer_id,
                ev.timestamp,
                ev.received_at,
                ev.source,
                ev.actor,
                ev.payload,
                ev.customer_key,
            )
            for ev, seq in zip(kept, seqs, strict=True)
        ]
        batch, items = await self._resolve(conn, ws_id, logged)
        await batch.number_new()
        routed, _, _ = batch.attribute(items)  # suppressed events are simply not stored
        if routed:
            await eventlog.insert(self.db, conn, routed, [ev.seq for ev in routed])
        await batch.write_state()
        with eventlog.watch_appends(conn) as appended:
            await self._finish(conn, ws_id, batch, len(items), routed, seqs[-1], save_cursor=False)
            position = await self._follow_appended(conn, ws_id, seqs[-1], appended)
        await self._save_cursor(conn, ws_id, position, batch.now)
        return position

    async def _follow_appended(
        self, conn: AsyncConnection, ws_id: str, position: int, appended: list[tuple[Any, ...]]
    ) -> int:
        """``_follow`` without reading back: the lane was caught up when this transaction began and
        the workspace's appends are serialised (the single writer; on PostgreSQL the append lock this
        transaction holds), so the log past ``position`` is exactly what this transaction appended
        since, and ``appended`` (from ``eventlog.watch_appends``) holds it as stored, in order.
        Rounds and their sizes are those of ``_follow``."""
        pending: list[tuple[Any, ...]] = []
        for _ in range(FOLLOW_ROUNDS):
            pending.extend(row for row in appended if row[2] == ws_id and row[0] > position)
            appended.clear()
            if not pending:
                break
            rows, pending = pending[: self.batch_size], pending[self.batch_size :]
            logged = [logged_from_tuple(r) for r in rows]
            if all(_profile_free(ev) for ev in logged):
                # What a bot said or did to a customer it has just loaded here: it changes no
                # profile and is attributed already, so only the routers need to see it.
                position = logged[-1].seq
                await self._finish(conn, ws_id, None, len(logged), logged, position, save_cursor=False)
            else:
                position, _ = await self._process_stored(conn, ws_id, rows, save_cursor=False)
        else:
            pending.extend(row for row in appended if row[2] == ws_id and row[0] > position)
            if pending:
                self.lane_behind = True  # the rest is the lane's (it is woken after the commit)
        return position

    async def _caught_up(self, conn: AsyncConnection, ws_id: str) -> bool:
        if self.db.dialect == "postgresql" and not await self.db.try_lock_workspace(conn, ws_id, CONSUMER):
            return False  # a lane is processing this workspace right now
        sql = self.sql
        found = await sql.fetch(
            conn,
            f"SELECT (SELECT max(seq) FROM events WHERE workspace_id = {sql.p(1)}), "
            f"(SELECT position FROM consumer_cursors WHERE consumer = {sql.p(2)} "
            f"AND workspace_id = {sql.p(3)})",
            (ws_id, CONSUMER, ws_id),
        )
        last, position = (int(found[0][0] or 0), int(found[0][1] or 0)) if found else (0, 0)
        return position >= last

    async def _resolve(
        self, conn: AsyncConnection, ws_id: str, logged: list[LoggedEvent]
    ) -> tuple[ProfileBatch, list[Any]]:
        batch = ProfileBatch(self.db, conn, ws_id, await self.region(ws_id), now_ms())
        sql = self.sql
        has_suppressions = bool(
            await sql.fetch(
                conn, f"SELECT 1 FROM suppressions WHERE workspace_id = {sql.p(1)} LIMIT 1", (ws_id,)
            )
        )
        items = await batch.load(logged, has_suppressions)
        batch.process(items)
        return batch, items

    async def _finish(
        self,
        conn: AsyncConnection,
        ws_id: str,
        batch: ProfileBatch | None,
        handled: int,
        routed: list[LoggedEvent],
        position: int,
        *,
        save_cursor: bool = True,
    ) -> int:
        """Append what the batch derived, route its events, move the cursor (unless the caller
        saves it later in the same transaction); returns how many events it derived."""
        if batch is not None and batch.derived:
            await append(self.db, conn, batch.derived)
        held = HELD_PROFILES.set(batch.profiles if batch is not None else None)
        try:
            for router in self.routers:
                if await router(conn, ws_id, routed):
                    self._deliveries_pending = True
        finally:
            HELD_PROFILES.reset(held)
        if save_cursor:
            await self._save_cursor(conn, ws_id, position, batch.now if batch is not None else now_ms())
        self.metrics.events_processed.inc(len(routed))
        self._processed += handled
        if handled > len(routed):
            self.metrics.events_suppressed.inc(handled - len(routed))
        if batch is None:
            return 0
        if batch.merges:
            self.metrics.merges.inc(len(batch.merges))
        if batch.conflicts:
            self.metrics.conflicts.inc(batch.conflicts)
        return len(batch.derived)

    async def advanced(self, ws_id: str, position: int) -> None:
        """A batch up to ``position`` is committed: wake whoever waits for it (and the outbox, when
        routers wrote rows into it)."""
        if self._deliveries_pending:
            self._deliveries_pending = False
            if self.wake_deliveries is not None:
                self.wake_deliveries()
        # The position first: until it is known here the lane's idle check sees the new events as
        # work, and a lane that takes the workspace's lock then keeps the next groups from being
        # processed inline.
        async with self._progress:
            if position > self._positions.get(ws_id, 0):
                self._positions[ws_id] = position
            self._progress.notify_all()
        if self._processed >= self._next_analyze:
            self._next_analyze = self._processed * 2
            # In the background: the writer calls this after every commit, and an ANALYZE of large
            # tables takes a second or two on PostgreSQL (about 5 s of a 1,000,000-event run when
            # the writer waited for them). One at a time; ``close`` waits for the one running.
            if self._analyzing is None or self._analyzing.done():
                self._analyzing = asyncio.create_task(self._refresh_statistics(), name="mayak-analyze")

    async def close(self) -> None:
        """Let a statistics refresh that is running finish (it is short next to a shutdown)."""
        task, self._analyzing = self._analyzing, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    @property
    def lane_running(self) -> bool:
        """This process runs the lane loop (``run_forever``)."""
        return self._running

    async def _refresh_statistics(self) -> None:
        """PostgreSQL plans the hot lookups from table statistics; while tables grow from empty far
        faster than autovacuum samples them, a plan made for a tiny table (an index range filtered
        row by row) is kept for a huge one. Analyse at 10k, 20k, 40k… processed events."""
        if self.db.dialect == "postgresql":
            statements = ["ANALYZE identities, customers, events, dedup_keys"]
        else:
            # SQLite analyses only the tables whose queries would gain, each index from a sample
            # of about ANALYSIS_LIMIT rows: a full ANALYZE reads every index, on the writer's lock
            # (10-20 ms at 80,000 events in a web-chat run, and growing with the log).
            statements = [f"PRAGMA analysis_limit={ANALYSIS_LIMIT}", "PRAGMA optimize"]
        try:
            async with self.db.write() as conn:
                for statement in statements:
                    await conn.exec_driver_sql(statement)
        except Exception:
            log.warning("analyze_failed", exc_info=True)

    async def _cursor(self, conn: AsyncConnection, ws_id: str) -> int:
        sql = self.sql
        found = await sql.fetch(
            conn,
            f"SELECT position FROM consumer_cursors WHERE consumer = {sql.p(1)} "
            f"AND workspace_id = {sql.p(2)}",
            (CONSUMER, ws_id),
        )
        return int(found[0][0]) if found else 0

    async def _save_cursor(self, conn: AsyncConnection, ws_id: str, position: int, now: int) -> None:
        sql = self.sql
        await sql.run(
            conn,
            "INSERT INTO consumer_cursors (consumer, workspace_id, position, updated_at) "
            f"VALUES ({sql.values(4)}) "
            "ON CONFLICT (consumer, workspace_id) DO UPDATE SET position = excluded.position, "
            "updated_at = excluded.updated_at",
            (CONSUMER, ws_id, position, now),
        )

    async def region(self, ws_id: str) -> str:
        """The workspace's default phone region."""
        if self.workspaces is None:
            return "US"
        return await self.workspaces.default_region(ws_id)

    def reset_position(self, ws_id: str) -> None:
        self._positions[ws_id] = 0

    async def lag(self) -> int:
        """Events in the log that the pipeline has not processed yet (all workspaces)."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(workspaces.c.id, sa.func.coalesce(consumer_cursors.c.position, 0)).select_from(
                    workspaces.outerjoin(
                        consumer_cursors,
                        sa.and_(
                            consumer_cursors.c.workspace_id == workspaces.c.id,
                            consumer_cursors.c.consumer == CONSUMER,
                        ),
                    )
                )
            )
            total = 0
            for ws_id, position in rows.all():
                total += (
                    await conn.execute(
                        sa.select(sa.func.count()).where(
                            events.c.workspace_id == ws_id, events.c.seq > position
                        )
                    )
                ).scalar_one()
        self.metrics.pipeline_lag.set(total)
        return int(total)


def _profile_free(ev: LoggedEvent) -> bool:
    return ev.type in PROFILE_FREE and ev.customer_key is not None
