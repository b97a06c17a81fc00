"""The durable outbox: every side effect Mayak has on the world goes through here.

Why: a message or webhook is written as a row in the *same* transaction as the state change that
caused it, so a crash can lose neither; a dispatcher then delivers rows with retries, backoff and a
dead-letter state, so nothing is ever silently dropped.

Row life cycle::

    pending ──claim──► in_flight ──ok──► sent
       ▲                  │
       │                  ├─retryable failure──► failed ──(next_attempt_at due)──► claimed again
       │                  └─last attempt / non-retryable──► dead
       └── a lease that expires (the worker died) makes an in_flight row claimable again

Order: rows of one customer and one target (a "lane") are delivered in id order, one at a time:
a row is claimed only when no older row of its lane is still undelivered (pending, in flight, or
failed and waiting to retry). Ids are minted monotonically in this process, so rows enqueued in one
transaction, or one after another, keep their order. Rows without a customer have no order.

Claims take a lease (the attempt timeout plus a margin). A worker that dies leaves its rows in
flight; when the lease expires they are claimed again. Every result is written only if the row
still carries the lease it was claimed with (a fencing token), so a late worker cannot overwrite a
newer claim.

Delivery is at least once: a crash after the receiver answered but before the result is recorded
redelivers the row, with the same row id (receivers deduplicate on it). Results go through a
group-committing recorder the moment each delivery finishes, to keep that window one commit wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import outbox, outbox_attempts
from mayak.ids import monotonic_ids, new_ids
from mayak.metrics import Metrics
from mayak.timeutil import now_ms

log = structlog.get_logger("mayak.outbox")

PENDING, IN_FLIGHT, SENT, FAILED, DEAD = "pending", "in_flight", "sent", "failed", "dead"
STATUSES = (PENDING, IN_FLIGHT, SENT, FAILED, DEAD)
_NOW = sa.bindparam("now", type_=sa.BigInteger)
# Is anything due at all? (index ix_outbox_due; cheap, on a read connection)
_ANY_DUE = (
    sa.select(outbox.c.id)
    .where(
        sa.or_(
            sa.and_(outbox.c.status.in_((PENDING, FAILED)), outbox.c.next_attempt_at <= _NOW),
            sa.and_(outbox.c.status == IN_FLIGHT, outbox.c.lease_until <= _NOW),
        )
    )
    .limit(1)
)
UNDELIVERED = (PENDING, IN_FLIGHT, FAILED)
MAX_BACKOFF_MS = 3_600_000
LEASE_MARGIN_MS = 30_000
IDLE_POLL_S = 0.2
CLAIM_INTERVAL_S = 0.02
ERROR_PAUSE_S = 1.0  # after a failed loop iteration (the database is down, say)
ERROR_CHARS = 2000


# -- enqueue -----------------------------------------------------------------------------------


@dataclass(slots=True)
class OutboxItem:
    """Something to send. ``idempotency_key`` must derive from the cause (event id + action)."""

    workspace_id: str
    kind: str
    payload: dict[str, Any]
    idempotency_key: str
    customer_id: str | None = None
    target: str | None = None
    not_before: int | None = None


async def enqueue(db: Database, conn: AsyncConnection, items: Iterable[OutboxItem]) -> int:
    """Insert rows inside the caller's transaction; duplicates of (workspace, key) are ignored.

    Returns how many rows were new. Items keep their order (their ids increase in list order).
    """
    batch: list[OutboxItem] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        key = (item.workspace_id, item.idempotency_key)
        if key not in seen:
            seen.add(key)
            batch.append(item)
    if not batch:
        return 0
    now = now_ms()
    ids = monotonic_ids("obx", len(batch), now)
    rows = [
        {
            "id": row_id,
            "workspace_id": item.workspace_id,
            "customer_id": item.customer_id,
            "kind": item.kind,
            "target": item.target,
            "payload": orjson.dumps(item.payload).decode(),
            "idempotency_key": item.idempotency_key,
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": now if item.not_before is None else item.not_before,
            "lease_until": None,
            "last_error": None,
            "created_at": now,
            "updated_at": now,
        }
        for row_id, item in zip(ids, batch, strict=True)
    ]
    # executemany + RETURNING: SQLAlchemy batches it into multi-row INSERTs compiled once, and the
    # returned ids count the new rows on both dialects (asyncpg reports no executemany rowcount).
    stmt = db.insert(outbox).on_conflict_do_nothing().returning(outbox.c.id)
    result = await conn.execute(stmt, rows)
    return len(result.all())


# -- delivery ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class OutboxRow:
    """A claimed row as a handler sees it; ``attempts`` counts the attempts made before this one."""

    id: str
    workspace_id: str
    customer_id: str | None
    kind: str
    target: str | None
    payload: dict[str, Any]
    idempotency_key: str
    attempts: int
    created_at: int


@dataclass(slots=True, frozen=True)
class DeliveryOutcome:
    """What a handler reports. ``retryable=False`` dead-letters the row at once."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    retryable: bool = True


Handler = Callable[[OutboxRow], Awaitable[DeliveryOutcome]]


def backoff_ms(attempts: int, base_ms: int, rng: random.Random | None = None) -> int:
    """Delay before the next try after ``attempts`` failed ones: base * 2**(attempts-1), jittered.

    The nominal delay is multiplied by a random factor in [0.8, 1.2) so that rows that failed
    together (a receiver outage) do not all come back in the same instant; the result is capped at 1 h.
    """
    exponent = min(max(attempts - 1, 0), 40)
    nominal = min(base_ms * (2**exponent), MAX_BACKOFF_MS)
    factor = (rng or random).uniform(0.8, 1.2)
    return max(1, min(int(nominal * factor), MAX_BACKOFF_MS))


@dataclass(slots=True, frozen=True)
class _Claimed:
    row: OutboxRow
    lease_until: int  # also the fencing token: only the holder of this lease may record the result


@dataclass(slots=True, frozen=True)
class _Result:
    claimed: _Claimed
    outcome: DeliveryOutcome
    at: int
    duration_ms: int


class _Recorder:
    """Group commit for results: whatever finished while one write ran goes into the next one.

    Each delivery waits until its result is committed, so a lane's next row becomes claimable only
    once its predecessor is recorded, and the duplicate window after a crash stays one commit wide.
    """

    def __init__(self, write: Callable[[list[_Result]], Awaitable[None]]):
        self._write = write
        self._queue: list[tuple[_Result, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, result: _Result) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((result, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="mayak-outbox-recorder")
        await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._write([res for res, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)


class OutboxDispatcher:
    """Claims due rows, hands each to the handler registered for its ``kind``, records the outcome.

    Rows whose kind has no handler here are left alone (another process may own that kind).
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        metrics: Metrics,
        *,
        batch_size: int = 256,
        concurrency: int = 32,
        attempt_timeout_s: float | None = None,
    ):
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.batch_size = batch_size
        self.concurrency = concurrency
        # A handler that hangs must not hold its lane (or outlive its lease).
        self.attempt_timeout_s = attempt_timeout_s or max(30.0, settings.webhook_timeout_s * 2)
        self.lease_ms = int(self.attempt_timeout_s * 1000) + LEASE_MARGIN_MS
        self._handlers: dict[str, Handler] = {}
        self._claim_query: sa.Select[Any] | None = None
        self._recorder = _Recorder(self._record)
        self._rng = random.Random()
        self._depth_refreshed = -1e9
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New rows were committed: claim now instead of at the next poll."""
        self._wake.set()

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler
        self._claim_query = None  # rebuilt with the new kind on the next claim

    # -- entry points --------------------------------------------------------------------------

    async def run_once(self, now: int | None = None) -> int:
        """Claim one batch of due rows, deliver them concurrently, record every outcome.

        Returns how many delivery attempts were made. ``now`` pins the clock for due-ness, attempt
        times and backoff (tests); durations are measured for real.
        """
        if not self._handlers:
            return 0
        claimed = await self._claim(_clock(now), self.batch_size)
        if claimed:
            sem = asyncio.Semaphore(self.concurrency)

            async def one(item: _Claimed) -> None:
                async with sem:
                    await self._process(item, now)

            results = await asyncio.gather(*(one(item) for item in claimed), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        await self._refresh_depth(force=not claimed)  # exact once idle, rate-limited while busy
        return len(claimed)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Keep up to ``concurrency`` deliveries in flight until ``stop`` is set.

        Unlike repeated ``run_once`` calls, a slow receiver holds only its own slot: whenever a
        delivery is recorded the loop claims again, so the next row of that lane goes out at once.
        """
        active: set[asyncio.Task[None]] = set()
        wake = self._wake

        def finished(task: asyncio.Task[None]) -> None:
            active.discard(task)
            wake.set()
            if not task.cancelled() and task.exception() is not None:
                log.error("outbox_record_failed", exc_info=task.exception())

        # Claim as soon as a quarter of the slots is free, or 20 ms after the last claim: one claim
        # per finished delivery would make the claim query the bottleneck.
        min_batch = max(1, self.concurrency // 4)
        last_claim = -1.0
        try:
            while not stop.is_set():
                wake.clear()
                free = self.concurrency - len(active)
                since = time.monotonic() - last_claim
                if free > 0 and (free >= min_batch or not active or since >= CLAIM_INTERVAL_S):
                    try:
                        claimed = await self._claim(now_ms(), min(free, self.batch_size))
                        await self._refresh_depth(force=False)
                    except Exception:
                        log.exception("outbox_claim_failed")
                        await _wait(stop, ERROR_PAUSE_S)
                        continue
                    last_claim = time.monotonic()
                    for item in claimed:
                        task = asyncio.create_task(self._process(item, None))
                        active.add(task)
                        task.add_done_callback(finished)
                    if claimed and len(active) < self.concurrency:
                        continue  # there may be more due right now
                    timeout = IDLE_POLL_S  # a finished delivery wakes the loop earlier
                elif free > 0:
                    timeout = CLAIM_INTERVAL_S - since  # a few slots are free: gather more first
                else:
                    timeout = IDLE_POLL_S
                await _wait(wake, timeout)
        finally:
            for task in list(active):
                task.cancel()  # unrecorded rows come back when their lease expires
            await asyncio.gather(*active, return_exceptions=True)

    async def depth(self) -> int:
        """Rows not yet delivered nor dead (pending, in flight, or failed and waiting to retry)."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(sa.select(sa.func.count()).where(outbox.c.status.in_(UNDELIVERED)))
            ).first()
        return int(row[0]) if row else 0

    async def _refresh_depth(self, *, force: bool) -> None:
        if force or time.monotonic() - self._depth_refreshed >= 1.0:
            self._depth_refreshed = time.monotonic()
            self.metrics.outbox_depth.set(await self.depth())

    # -- claiming ------------------------------------------------------------------------------

    async def _claim(self, now: int, limit: int) -> list[_Claimed]:
        if not self._handlers:
            return []
        return await self._claim_heads(now, limit)

    async def _claim_heads(self, now: int, limit: int) -> list[_Claimed]:
        """Mark up to ``limit`` due lane heads in_flight under a fresh lease and return them.

        A lane's head is its oldest undelivered (pending, in flight or failed) row; only a head can
        be claimed, and only when it is due. Dead rows do not block: dead-lettering one message must
        not stall the customer's later ones. The heads are found with one GROUP BY over the
        undelivered rows (index ``ix_outbox_due``), so the cost follows the backlog, not the history.
        """
        if self._claim_query is None:
            self._claim_query = self._build_claim_query()
        async with self.db.read() as conn:  # most polls find nothing: do not take the write lock
            if (await conn.execute(_ANY_DUE, {"now": now})).first() is None:
                return []
        query = self._claim_query
        lease = now + self.lease_ms
        async with self.db.write() as conn:
            rows = [dict(r) for r in (await conn.execute(query, {"now": now, "limit": limit})).mappings()]
            if not rows:
                return []
            await conn.execute(
                outbox.update()
                .where(outbox.c.id.in_([r["id"] for r in rows]))
                .values(status=IN_FLIGHT, lease_until=lease, updated_at=now)
            )
        return [_Claimed(_to_row(r), lease) for r in rows]

    def _build_claim_query(self) -> sa.Select[Any]:
        """Built once per dispatcher (its handlers are fixed by then); ``now`` and ``limit`` are bound."""
        o = outbox.alias("o")
        p = outbox.alias("p")
        now = sa.bindparam("now", type_=sa.BigInteger)
        due = sa.or_(
            sa.and_(o.c.status.in_((PENDING, FAILED)), o.c.next_attempt_at <= now),
            sa.and_(o.c.status == IN_FLIGHT, o.c.lease_until <= now),
        )
        heads = (
            sa.select(sa.func.min(p.c.id))
            .where(p.c.status.in_(UNDELIVERED), p.c.customer_id.is_not(None))
            .group_by(p.c.workspace_id, p.c.customer_id, p.c.target)
        )
        query = (
            sa.select(o)
            .where(due, o.c.kind.in_(list(self._handlers)))
            .where(sa.or_(o.c.customer_id.is_(None), o.c.id.in_(heads)))
            .order_by(o.c.next_attempt_at, o.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )
        if self.db.dialect == "postgresql":
            # A head another dispatcher is claiming is skipped, and its lane-mates are not heads.
            query = query.with_for_update(of=o, skip_locked=True)
        return query

    # -- delivering ----------------------------------------------------------------------------

    async def _process(self, item: _Claimed, now: int | None) -> None:
        await self._recorder.submit(await self._attempt(item, now))

    async def _attempt(self, item: _Claimed, now: int | None) -> _Result:
        handler = self._handlers[item.row.kind]
        at = _clock(now)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.attempt_timeout_s):
                outcome = await handler(item.row)
        except TimeoutError:
            outcome = DeliveryOutcome(False, None, f"timeout after {self.attempt_timeout_s:g} s")
        except Exception as exc:
            log.warning("outbox_handler_error", row_id=item.row.id, kind=item.row.kind, exc_info=True)
            outcome = DeliveryOutcome(False, None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
        return _Result(item, outcome, at, int((time.monotonic() - started) * 1000))

    async def _record(self, results: list[_Result]) -> None:
        """One transaction: the attempts, then each row's new status, fenced by our lease."""
        attempt_rows: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for res, attempt_id in zip(results, new_ids("oba", len(results)), strict=True):
            row, out = res.claimed.row, res.outcome
            number = row.attempts + 1
            error = None if out.ok else (out.error or "delivery failed")[:ERROR_CHARS]
            attempt_rows.append(
                {
                    "id": attempt_id,
                    "outbox_id": row.id,
                    "workspace_id": row.workspace_id,
                    "attempt": number,
                    "at": res.at,
                    "status_code": out.status_code,
                    "error": error,
                    "duration_ms": res.duration_ms,
                }
            )
            if out.ok:
                status, next_at = SENT, res.at
            elif not out.retryable or number >= self.settings.outbox_max_attempts:
                status, next_at = DEAD, res.at
            else:
                status = FAILED
                next_at = res.at + backoff_ms(number, self.settings.outbox_base_delay_ms, self._rng)
            updates.append(
                {
                    "b_id": row.id,
                    "b_lease": res.claimed.lease_until,
                    "b_status": status,
                    "b_attempts": number,
                    "b_next": next_at,
                    "b_error": error,
                    "b_now": res.at,
                }
            )
        c = outbox.c
        fenced = sa.and_(
            c.id == sa.bindparam("b_id"), c.status == IN_FLIGHT, c.lease_until == sa.bindparam("b_lease")
        )
        stmt = (
            outbox.update()
            .where(fenced)
            .values(
                status=sa.bindparam("b_status"),
                attempts=sa.bindparam("b_attempts"),
                next_attempt_at=sa.bindparam("b_next"),
                last_error=sa.bindparam("b_error"),
                lease_until=None,
                updated_at=sa.bindparam("b_now"),
            )
        )
        async with self.db.write() as conn:
            await conn.execute(outbox_attempts.insert(), attempt_rows)
            await conn.execute(stmt, updates)
        for res, upd in zip(results, updates, strict=True):
            kind = res.claimed.row.kind
            if upd["b_status"] == SENT:
                self.metrics.outbox_delivered.labels(kind).inc()
                continue
            self.metrics.outbox_failed.labels(kind).inc()
            if upd["b_status"] == DEAD:
                self.metrics.outbox_dead.labels(kind).inc()
                log.warning(
                    "outbox_dead_lettered", row_id=res.claimed.row.id, kind=kind, error=upd["b_error"]
                )


def _clock(now: int | None) -> int:
    return now_ms() if now is None else now


def _to_row(raw: dict[str, Any]) -> OutboxRow:
    payload = orjson.loads(raw["payload"])
    return OutboxRow(
        id=raw["id"],
        workspace_id=raw["workspace_id"],
        customer_id=raw["customer_id"],
        kind=raw["kind"],
        target=raw["target"],
        payload=payload if isinstance(payload, dict) else {"value": payload},
        idempotency_key=raw["idempotency_key"],
        attempts=int(raw["attempts"]),
        created_at=int(raw["created_at"]),
    )


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when ``event`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
