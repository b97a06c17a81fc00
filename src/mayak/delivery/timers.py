"""Durable timers: "wake me at T" as a row, fired back into the event log as a ``timer`` event.

Why rows: waits, quiet-hour delays, reminders and retries must survive a restart, and a timer that
fires as an ordinary log event is processed by the same per-customer pipeline as everything else,
so journeys, flows and campaigns need no second scheduling mechanism.

Keys are idempotent per workspace and single-use: scheduling a key that is still pending moves it
(new ``fire_at`` / payload); scheduling a key that already fired or was cancelled changes nothing, so
replaying the event that scheduled it after a crash cannot fire it twice. Derive the key from the
cause (``f"{event_id}:reminder"``), not from the customer alone.

Exactly once into the log: a due timer is appended and marked fired in one transaction, and the
appended event carries the dedup key ``timer:{id}``, so even two workers racing on the same row
(a lost lock, a replayed batch) produce one event.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database, constant
from mayak.db.schema import timers
from mayak.eventlog import LogNotifier, NewEvent, append
from mayak.ids import new_id
from mayak.metrics import Metrics
from mayak.timeutil import ms_to_rfc3339, now_ms

log = structlog.get_logger("mayak.timers")

PENDING, FIRED, CANCELLED = "pending", "fired", "cancelled"
ERROR_PAUSE_S = 1.0  # after a failed loop iteration (the database is down, say)


async def schedule(
    db: Database,
    conn: AsyncConnection,
    *,
    workspace_id: str,
    key: str,
    kind: str,
    fire_at: int,
    payload: dict[str, Any],
    customer_id: str | None = None,
) -> str:
    """Create (or move, while still pending) the timer ``key``; returns its ``tmr_…`` id.

    Runs inside the caller's transaction, like the change that wants the timer.
    """
    if not key or len(key) > 200:
        raise ValueError("a timer key must be 1-200 characters")
    if not kind or len(kind) > 60:
        raise ValueError("a timer kind must be 1-60 characters")
    body = orjson.dumps(payload).decode()
    stmt = db.insert(timers).values(
        id=new_id("tmr"),
        workspace_id=workspace_id,
        customer_id=customer_id,
        kind=kind,
        key=key,
        fire_at=fire_at,
        payload=body,
        status=PENDING,
        created_at=now_ms(),
        fired_at=None,
    )
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=[timers.c.workspace_id, timers.c.key],
        set_={"fire_at": excluded.fire_at, "payload": excluded.payload},
        where=timers.c.status == PENDING,
    ).returning(timers.c.id)
    row = (await conn.execute(stmt)).first()
    if row is not None:
        return str(row[0])
    # The key exists and already fired or was cancelled: keep it as it is.
    existing = (
        await conn.execute(
            sa.select(timers.c.id).where(timers.c.workspace_id == workspace_id, timers.c.key == key)
        )
    ).first()
    if existing is None:  # pragma: no cover - the conflict above proves the row exists
        raise RuntimeError(f"timer {key!r} vanished during scheduling")
    return str(existing[0])


async def cancel(conn: AsyncConnection, workspace_id: str, key: str) -> bool:
    """Cancel a pending timer; False when there is none (unknown, already fired or cancelled)."""
    res = await conn.execute(
        timers.update()
        .where(timers.c.workspace_id == workspace_id, timers.c.key == key, timers.c.status == PENDING)
        .values(status=CANCELLED)
    )
    return bool(res.rowcount)


# Is any timer due? (index ix_timers_due; the status is a constant in the statement, see
# mayak.db.database.constant)
_ANY_DUE = (
    sa.select(timers.c.id)
    .where(timers.c.status == constant(PENDING), timers.c.fire_at <= sa.bindparam("now", type_=sa.BigInteger))
    .limit(1)
)


class TimerWorker:
    """Fires due timers into the log and wakes the log's consumers."""

    def __init__(self, db: Database, notifier: LogNotifier, metrics: Metrics, *, batch_size: int = 500):
        self.db = db
        self.notifier = notifier
        self.metrics = metrics
        self.batch_size = batch_size

    async def run_once(self, now: int | None = None) -> int:
        """Fire up to ``batch_size`` due timers in one transaction; return how many fired."""
        clock = now_ms() if now is None else now
        query = (
            sa.select(timers)
            .where(timers.c.status == PENDING, timers.c.fire_at <= clock)
            .order_by(timers.c.fire_at, timers.c.id)
            .limit(self.batch_size)
        )
        if self.db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        async with self.db.read() as conn:  # most polls find nothing: do not take the write lock
            if (await conn.execute(_ANY_DUE, {"now": clock})).first() is None:
                return 0
        async with self.db.write() as conn:
            due = list((await conn.execute(query)).mappings())
            if not due:
                return 0
            batch = [_timer_event(row, clock) for row in due]
            await append(self.db, conn, batch)
            await conn.execute(
                timers.update()
                .where(timers.c.id.in_([row["id"] for row in due]), timers.c.status == PENDING)
                .values(status=FIRED, fired_at=clock)
            )
        self.metrics.timers_fired.inc(len(due))
        self.notifier.notify()
        return len(due)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Fire timers until ``stop`` is set; idle polls every 0.2 s, busy loops without sleeping."""
        while not stop.is_set():
            try:
                fired = await self.run_once()
            except Exception:
                log.exception("timers_run_failed")
                fired = 0
                await _wait(stop, ERROR_PAUSE_S)
                continue
            if not fired:
                await _wait(stop, 0.2)


def _timer_event(row: Any, fired_at: int) -> NewEvent:
    try:
        payload = orjson.loads(row["payload"])
    except orjson.JSONDecodeError:
        payload = None
    return NewEvent(
        workspace_id=row["workspace_id"],
        type="timer",
        name=row["kind"],
        timestamp=row["fire_at"],
        received_at=fired_at,
        source="timer",
        customer_id=row["customer_id"],
        dedup_key=f"timer:{row['id']}",
        payload={
            "timer_id": row["id"],
            "key": row["key"],
            "kind": row["kind"],
            "payload": payload,
            "fire_at": ms_to_rfc3339(row["fire_at"]),
            "fired_at": ms_to_rfc3339(fired_at),
        },
    )


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
