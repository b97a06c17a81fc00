"""The append-only event log: dedup by source key, append with a monotonic ``seq``, wake consumers.

Everything is an event first. Ingestion, admin changes, timers and the pipeline's own records
(merges, conflicts) all append here; derived state is built by consumers reading in ``seq`` order.

Ordering guarantee consumers rely on: within one workspace, rows become visible in ``seq`` order.
SQLite has one writer; on PostgreSQL every append holds the workspace's advisory lock until commit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database
from mayak.db.fastsql import FastSql, dump_json
from mayak.db.schema import customers, dedup_keys, events
from mayak.ids import new_ids
from mayak.timeutil import ms_to_rfc3339, now_ms

APPEND_LOCK = "log"
DEDUP_WINDOW_MS = 7 * 86_400_000  # default; MAYAK_DEDUP_WINDOW_DAYS
SEGMENT_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
# Sources whose Segment-shaped events are attributed by the identities they carry (the others name
# their customer). Channel events may carry only a channel identity (``context.externalIds``).
RESOLVED_SOURCES = frozenset({"api", "telegram", "webchat", "hook"})


def resolved_by_identities(etype: str, source: str) -> bool:
    """Whether the pipeline finds this event's customer by its identities (else the event names it)."""
    return etype in SEGMENT_TYPES and source in RESOLVED_SOURCES


@dataclass(slots=True)
class NewEvent:
    workspace_id: str
    type: str
    timestamp: int
    payload: dict[str, Any]
    name: str | None = None
    received_at: int = 0
    source: str = "api"
    actor: str | None = None
    dedup_key: str | None = None
    customer_id: str | None = None
    id: str = ""
    customer_key: int | None = None  # the named customer's number, where the appender knows it


@dataclass(slots=True)
class AppendResult:
    accepted: int = 0
    duplicates: int = 0
    duplicate_flags: list[bool] = field(default_factory=list)


class LogNotifier:
    """Wakes in-process consumers after a commit; consumers also poll for other processes' writes."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()


async def append(
    db: Database, conn: AsyncConnection, batch: Sequence[NewEvent], *, window_ms: int | None = None
) -> AppendResult:
    """Append events inside the caller's write transaction, dropping duplicates by ``dedup_key``.

    Every stored event of ``batch`` gets an ``id`` and a ``seq``; duplicates (already seen within the
    window, or repeated inside the batch) are flagged and not stored.
    """
    result, kept = await deduplicate(db, conn, batch, window_ms=window_ms)
    if kept:
        await insert(db, conn, kept, await reserve_seqs(db, conn, len(kept)))
    return result


async def deduplicate(
    db: Database,
    conn: AsyncConnection,
    batch: Sequence[NewEvent],
    *,
    window_ms: int | None = None,
    locked: Callable[[], None] | None = None,
) -> tuple[AppendResult, list[NewEvent]]:
    """Step one of an append: flag duplicates, remember the new dedup keys, give the rest ids.

    On PostgreSQL this takes each workspace's append lock (held to commit), which is what keeps a
    workspace's events visible in ``seq`` order. ``locked`` is called once the first lock is held.
    """
    result = AppendResult(duplicate_flags=[False] * len(batch))
    if not batch:
        return result, []
    now = now_ms()
    cutoff = now - (DEDUP_WINDOW_MS if window_ms is None else window_ms)
    by_ws: dict[str, list[int]] = {}
    for i, ev in enumerate(batch):
        by_ws.setdefault(ev.workspace_id, []).append(i)
    keep: list[int] = []
    sql = FastSql(db.dialect)
    for ws_id, idxs in by_ws.items():
        await db.lock_workspace(conn, ws_id, APPEND_LOCK)
        if locked is not None:
            locked()
            locked = None
        keep.extend(await _deduplicate(db, sql, conn, batch, ws_id, idxs, now, cutoff, result))
    result.duplicates = len(batch) - len(keep)
    result.accepted = len(keep)
    kept = [batch[i] for i in sorted(keep)]
    for ev, evt_id in zip(kept, new_ids("evt", len(kept)), strict=True):
        ev.id = evt_id
        ev.payload["messageId"] = ev.payload.get("messageId") or evt_id
        ev.received_at = ev.received_at or now
    return result, kept


async def _deduplicate(
    db: Database,
    sql: FastSql,
    conn: AsyncConnection,
    batch: Sequence[NewEvent],
    ws_id: str,
    idxs: list[int],
    now: int,
    cutoff: int,
    result: AppendResult,
) -> list[int]:
    """Flag and remember one workspace's keys with ONE statement; returns the kept positions. A key
    is new when it is not stored or was last seen before the window starts; the upsert stores or
    refreshes exactly those and returns them (a key seen inside the window is left as it is and not
    returned: a duplicate). Repeats inside the batch are settled here first (an upsert may not touch
    a row twice). One search of the keys' index a key, where a lookup and then an insert took two."""
    first: dict[str, int] = {}
    for i in idxs:
        key = batch[i].dedup_key
        if key is not None:
            if key in first:
                result.duplicate_flags[i] = True
            else:
                first[key] = i
    fresh: set[str] = set()
    if first:
        number = await db.workspace_number(conn, ws_id)
        upsert = (
            "ON CONFLICT (workspace_number, key) DO UPDATE SET seen_at = excluded.seen_at "
            f"WHERE dedup_keys.seen_at < {sql.p(4)} RETURNING key"
        )
        params: tuple[Any, ...]
        if sql.pg:
            select = "SELECT $1, k, $3 FROM unnest($2::text[]) AS k"
            params = (number, list(first), now, cutoff)
        else:  # parameters in order of appearance; WHERE true: SQLite's parser needs it before ON CONFLICT
            select = "SELECT ?, value, ? FROM json_each(?) WHERE true"
            params = (number, now, dump_json(list(first)), cutoff)
        rows = await sql.fetch(
            conn, f"INSERT INTO dedup_keys (workspace_number, key, seen_at) {select} {upsert}", params
        )
        fresh = {r[0] for r in rows}
    kept: list[int] = []
    for i in idxs:
        key = batch[i].dedup_key
        if key is None or (first[key] == i and key in fresh):
            kept.append(i)
        else:
            result.duplicate_flags[i] = True
    return kept


async def reserve_seqs(db: Database, conn: AsyncConnection, count: int) -> list[int]:
    """The next ``count`` log sequence numbers, inside the caller's write transaction."""
    return await reserve_numbers(db, conn, "events", "seq", count)


async def reserve_numbers(
    db: Database, conn: AsyncConnection, table: str, column: str, count: int
) -> list[int]:
    """The next ``count`` numbers of an auto-numbered key (events' ``seq``, customers' ``key``),
    inside the caller's write transaction, so rows can point at each other before they are written.

    SQLite: the tables are AUTOINCREMENT, so a number is never reused even after deletions (an erased
    or suppressed last event must not hand its number to a newer one behind a consumer's cursor);
    the process's single writer makes max+1… safe, and another process racing us fails the commit on
    the primary key rather than reusing a number. PostgreSQL: the column's sequence.
    """
    if db.dialect == "postgresql":
        rows = await conn.exec_driver_sql(
            f"SELECT nextval(pg_get_serial_sequence('{table}', '{column}')) FROM generate_series(1, $1)",
            (count,),
        )
        return sorted(int(r[0]) for r in rows)
    found = await FastSql(db.dialect).fetch(
        conn,
        f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0),"
        f" coalesce((SELECT max({column}) FROM {table}), 0))",
    )
    start = int(found[0][0]) + 1 if found else 1
    return list(range(start, start + count))


async def insert(
    db: Database, conn: AsyncConnection, kept: Sequence[NewEvent | LoggedEvent], seqs: Sequence[int]
) -> None:
    """Step two of an append: store deduplicated events under the given sequence numbers.

    An event's ``customer_key`` is stored as its attribution (the pipeline sets it for events that
    come without); its ``customer_id`` only where the event names its customer (not for events
    resolved by their identities). While a consumer watches the transaction (``watch_appends``), it
    also gets every stored row, with the customer's public id as the event carries it.
    """
    sql = FastSql(db.dialect)
    rows = [
        (
            seq,
            ev.id,
            ev.workspace_id,
            ev.type,
            ev.name,
            None if resolved_by_identities(ev.type, ev.source) else ev.customer_id,
            ev.customer_key,
            ev.timestamp,
            ev.received_at,
            ev.source,
            ev.actor,
            dump_json(ev.payload),
        )
        for ev, seq in zip(kept, seqs, strict=True)
    ]
    if sql.pg:  # binary COPY: the cheapest way in for the server (no executor per row)
        await sql.copy(conn, "events", _EVENT_COLUMNS, rows)
    else:
        await sql.run_many(conn, f"{_INSERT_EVENTS} VALUES ({sql.values(12)})", rows)
    sink = conn.info.get(APPEND_SINK)
    if sink is not None:
        sink.extend((*row[:5], ev.customer_id, *row[6:]) for row, ev in zip(rows, kept, strict=True))


_EVENT_COLUMNS = (
    "seq", "id", "workspace_id", "type", "name", "customer_id", "customer_key", "timestamp", "received_at",
    "source", "actor", "payload",
)  # fmt: skip
_INSERT_EVENTS = f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)})"
APPEND_SINK = "mayak.appended"  # key in a connection's info: rows appended while a consumer watches


@contextlib.contextmanager
def watch_appends(conn: AsyncConnection) -> Iterator[list[tuple[Any, ...]]]:
    """Collect, as stored (``seq, id, …, payload`` text), every event this transaction appends
    inside the block (see ``insert``)."""
    sink: list[tuple[Any, ...]] = []
    previous = conn.info.get(APPEND_SINK)
    conn.info[APPEND_SINK] = sink
    try:
        yield sink
    finally:
        if previous is None:
            conn.info.pop(APPEND_SINK, None)
        else:  # an outer watcher sees what the inner one saw
            conn.info[APPEND_SINK] = previous
            previous.extend(sink)


async def prune_dedup_keys(db: Database, window_ms: int = DEDUP_WINDOW_MS) -> int:
    """Forget dedup keys older than the window (they no longer deduplicate anything)."""
    cutoff = now_ms() - window_ms
    async with db.write() as conn:
        res = await conn.execute(dedup_keys.delete().where(dedup_keys.c.seen_at < cutoff))
        return int(res.rowcount or 0)


async def last_seq(conn: AsyncConnection, ws_id: str) -> int:
    row = (
        await conn.execute(sa.select(sa.func.max(events.c.seq)).where(events.c.workspace_id == ws_id))
    ).first()
    return int(row[0] or 0) if row else 0


@dataclass(slots=True)
class LoggedEvent:
    """An event as read back from the log by a consumer."""

    seq: int
    id: str
    workspace_id: str
    type: str
    name: str | None
    customer_id: str | None
    timestamp: int
    received_at: int
    source: str
    actor: str | None
    payload: dict[str, Any]
    customer_key: int | None = None  # the attributed customer's number (not shown outside)


def event_rows(*where: Any) -> sa.Select[Any]:
    """Events as the API shows them: ``customer_id`` is the public id of the customer the event is
    attributed to (else the one it named). Add ORDER BY and LIMIT."""
    attributed = sa.select(customers.c.id).where(customers.c.key == events.c.customer_key).scalar_subquery()
    return sa.select(
        events.c.seq,
        events.c.id,
        events.c.type,
        events.c.name,
        sa.func.coalesce(attributed, events.c.customer_id).label("customer_id"),
        events.c.timestamp,
        events.c.received_at,
        events.c.source,
        events.c.actor,
        events.c.payload,
    ).where(*where)


def event_json(event: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The one wire shape of a logged event (admin API, exports, destination webhooks).

    ``event`` is a LoggedEvent or an ``events`` row; ``payload`` its decoded payload.
    """
    return {
        "id": event.id,
        "seq": event.seq,
        "type": event.type,
        "name": event.name,
        "customer_id": event.customer_id,
        "timestamp": ms_to_rfc3339(event.timestamp),
        "received_at": ms_to_rfc3339(event.received_at),
        "source": event.source,
        "actor": event.actor,
        "payload": payload,
    }
