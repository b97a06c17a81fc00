"""The append-only event log: dedup by source key, append with a monotonic ``seq``, wake consumers.

Everything is an event first. Ingestion, admin changes, timers and the pipeline's own records
(merges, conflicts) all append here; derived state is built by consumers reading in ``seq`` order.

Ordering guarantee consumers rely on: within one workspace, rows become visible in ``seq`` order.
SQLite has one writer; on PostgreSQL every append holds the workspace's advisory lock until commit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database
from mayak.db.fastsql import FastSql, dump_json
from mayak.db.schema import dedup_keys, events
from mayak.ids import new_ids
from mayak.timeutil import now_ms

APPEND_LOCK = "log"


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


async def append(db: Database, conn: AsyncConnection, batch: Sequence[NewEvent]) -> AppendResult:
    """Append events inside the caller's write transaction, dropping duplicates by ``dedup_key``.

    Every event of ``batch`` gets an ``id``; duplicates (already seen within the window, or repeated
    inside the batch) are flagged and not stored.
    """
    result = AppendResult(duplicate_flags=[False] * len(batch))
    if not batch:
        return result
    now = now_ms()
    by_ws: dict[str, list[int]] = {}
    for i, ev in enumerate(batch):
        by_ws.setdefault(ev.workspace_id, []).append(i)
    keep: list[int] = []
    sql = FastSql(db.dialect)
    for ws_id, idxs in by_ws.items():
        await db.lock_workspace(conn, ws_id, APPEND_LOCK)
        keys = list({k for i in idxs if (k := batch[i].dedup_key) is not None})
        seen: set[str] = set()
        if keys:
            found = await conn.exec_driver_sql(
                f"SELECT key FROM dedup_keys WHERE workspace_id = {sql.p(1)} AND key {sql.in_list(2)}",
                (ws_id, sql.list_param(keys)),
            )
            seen.update(r[0] for r in found)
        fresh_keys: list[tuple[str, str, int]] = []
        for i in idxs:
            key = batch[i].dedup_key
            if key is not None:
                if key in seen:
                    result.duplicate_flags[i] = True
                    continue
                seen.add(key)
                fresh_keys.append((ws_id, key, now))
            keep.append(i)
        if fresh_keys:
            await conn.exec_driver_sql(
                f"INSERT INTO dedup_keys (workspace_id, key, seen_at) VALUES ({sql.values(3)}) "
                "ON CONFLICT DO NOTHING",
                fresh_keys,
            )
    result.duplicates = len(batch) - len(keep)
    if keep:
        ids = new_ids("evt", len(keep))
        rows: list[tuple[Any, ...]] = []
        for i, evt_id in zip(keep, ids, strict=True):
            ev = batch[i]
            ev.id = evt_id
            ev.payload["messageId"] = ev.payload.get("messageId") or evt_id
            rows.append(
                (
                    evt_id,
                    ev.workspace_id,
                    ev.type,
                    ev.name,
                    ev.customer_id,
                    ev.timestamp,
                    ev.received_at or now,
                    ev.source,
                    ev.actor,
                    dump_json(ev.payload),
                )
            )
        await conn.exec_driver_sql(
            "INSERT INTO events (id, workspace_id, type, name, customer_id, timestamp, received_at, source, "
            f"actor, payload) VALUES ({sql.values(10)})",
            rows,
        )
    result.accepted = len(keep)
    return result


async def prune_dedup_keys(db: Database, window_days: int) -> int:
    cutoff = now_ms() - window_days * 86_400_000
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
