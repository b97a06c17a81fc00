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

A receiver may say when to come back (``DeliveryOutcome.retry_after_ms``: Telegram's
``retry_after``); the next attempt is then due no earlier than that, or after the backoff if that is
longer. A delivery made of several steps (a message sent as several parts) runs each step through
``step``: the row's ``progress`` column keeps how many steps are done, so a retry resumes at the
first step not done instead of repeating the earlier ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.config import Settings
from mayak.db.database import AFTER_COMMIT, Database
from mayak.db.fastsql import FastSql
from mayak.db.schema import UNDELIVERED_SQL, outbox
from mayak.ids import monotonic_ids, new_ids
from mayak.metrics import Metrics
from mayak.timeutil import now_ms

log = structlog.get_logger("mayak.outbox")

PENDING, IN_FLIGHT, SENT, FAILED, DEAD = "pending", "in_flight", "sent", "failed", "dead"
STATUSES = (PENDING, IN_FLIGHT, SENT, FAILED, DEAD)


def _any_due(dialect: str) -> sa.TextClause:
    """The poll that asks whether anything is due at all: one probe of ``ix_outbox_due`` per kind
    of due row. An OR of the two in one WHERE was planned as a scan of every message ever stored.
    The statuses are constants in the statement (see ``mayak.db.database.constant``: PostgreSQL's
    generic plan for status parameters was a scan too).

    On SQLite the index is named (``INDEXED BY``; SQLAlchemy's SQLite dialect does not render
    table hints): the statistics ``PRAGMA optimize`` gathers say ``status`` has a few values, not
    that nearly every row holds ``sent``, and with them SQLite scanned the table for the in-flight
    probe (4.6 ms a poll at 33,000 rows, against 5 µs through the index)."""
    hint = " INDEXED BY ix_outbox_due" if dialect == "sqlite" else ""
    return sa.text(
        f"SELECT id FROM (SELECT id FROM outbox{hint} WHERE status IN ('{PENDING}', '{FAILED}') "
        "AND next_attempt_at <= :now LIMIT 1) AS due UNION ALL "
        f"SELECT id FROM (SELECT id FROM outbox{hint} WHERE status = '{IN_FLIGHT}' "
        "AND lease_until <= :now LIMIT 1) AS leased"
    ).bindparams(sa.bindparam("now", type_=sa.BigInteger))


UNDELIVERED = (PENDING, IN_FLIGHT, FAILED)
MAX_BACKOFF_MS = 3_600_000
MAX_RETRY_AFTER_MS = 86_400_000  # a receiver's "come back in N s" is honoured up to a day
LEASE_MARGIN_MS = 30_000
IDLE_POLL_S = 0.2
CLAIM_INTERVAL_S = 0.02
ERROR_PAUSE_S = 1.0  # after a failed loop iteration (the database is down, say)
ERROR_CHARS = 2000
PUSH_FLUSH_S = 2.0  # on stop: how long committed instant pushes may take to go out


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


_COLUMNS = (
    "id, workspace_id, customer_id, kind, target, payload, idempotency_key, status, attempts, "
    "next_attempt_at, lease_until, last_error, created_at, updated_at"
)
_UPDATE_KEYS = ("b_status", "b_attempts", "b_next", "b_error", "b_progress", "b_now", "b_id", "b_lease")
_CHUNK_ROWS = 500  # rows per multi-row INSERT (14 parameters each: under every placeholder limit)
# Rivals of births: the dispatcher of this process for each database (set while it runs).
_ADOPTERS: weakref.WeakKeyDictionary[Database, OutboxDispatcher] = weakref.WeakKeyDictionary()


async def enqueue(db: Database, conn: AsyncConnection, items: Iterable[OutboxItem]) -> int:
    """Insert rows inside the caller's transaction; duplicates of (workspace, key) are ignored.

    Returns how many rows were new. Items keep their order (their ids increase in list order).

    Claimed at birth: while this process's dispatcher runs and handles the row's kind, a due row
    whose lane has nothing older undelivered is inserted already ``in_flight`` under a lease of
    that dispatcher and handed to it once the transaction commits (``Database.after_commit``), so
    it goes out at once, without a claim query or a claim transaction. A rollback drops the hand-
    over with the rows; a crash leaves them in flight until the lease expires, and they are then
    claimed again like any other row (at least once, same row id). Only a lane's head is ever in
    flight: the lane check runs in the caller's transaction, under the writer's lock (SQLite) or the
    workspace's pipeline lock (PostgreSQL), which every enqueuer holds.
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
    born, instant = await _births(db, conn, batch, now)
    # The dispatcher that adopts this process's births; its claim loop is woken only by
    # ``backlog`` (below) for rows that neither went out at birth nor were pushed.
    adopter = _ADOPTERS.get(db)
    lease = now + adopter.lease_ms if adopter is not None and born else 0
    rows = [
        (
            row_id,
            item.workspace_id,
            item.customer_id,
            item.kind,
            item.target,
            orjson.dumps(item.payload).decode(),
            item.idempotency_key,
            SENT if i in instant else IN_FLIGHT if i in born else PENDING,
            1 if i in instant else 0,
            now if item.not_before is None else item.not_before,
            lease if i in born else None,
            None,
            now,
            now,
        )
        for i, (row_id, item) in enumerate(zip(ids, batch, strict=True))
    ]
    sql = FastSql(db.dialect)
    inserted: set[str] = set()
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        width = len(chunk[0])
        placeholders = ", ".join(f"({sql.values(width, start=1 + j * width)})" for j in range(len(chunk)))
        # RETURNING counts the new rows on both dialects and tells which born rows really exist
        result = await sql.fetch(
            conn,
            f"INSERT INTO outbox ({_COLUMNS}) VALUES {placeholders} ON CONFLICT DO NOTHING RETURNING id",
            tuple(v for row in chunk for v in row),
        )
        inserted.update(r[0] for r in result)
    if adopter is not None:

        def written(row: Sequence[Any]) -> OutboxRow:
            """The row as just inserted, for the pushes and claims made after the commit."""
            return OutboxRow(
                id=row[0],
                workspace_id=row[1],
                customer_id=row[2],
                kind=row[3],
                target=row[4],
                payload=_payload(row[5]),
                idempotency_key=row[6],
                attempts=0,
                created_at=now,
            )

        pushed = [written(row) for i, row in enumerate(rows) if i in instant and row[0] in inserted]
        if pushed:
            # the attempt is recorded with the row: it is done once the transaction commits
            await sql.run_many(
                conn,
                "INSERT INTO outbox_attempts (id, outbox_id, workspace_id, attempt, at, status_code, error, "
                f"duration_ms) VALUES ({sql.values(8)})",
                [
                    (attempt_id, row.id, row.workspace_id, 1, now, None, None, 0)
                    for row, attempt_id in zip(pushed, new_ids("oba", len(pushed)), strict=True)
                ],
            )
            db.after_commit(conn, lambda: adopter.push(pushed))
        claimed = [
            _Claimed(written(row), lease) for i, row in enumerate(rows) if i in born and row[0] in inserted
        ]
        if claimed:
            db.after_commit(conn, lambda: adopter.adopt(claimed))
        if len(claimed) + len(pushed) < len(inserted):
            db.after_commit(conn, adopter.backlog)  # rows to claim the ordinary way
    return len(inserted)


async def _births(
    db: Database, conn: AsyncConnection, batch: list[OutboxItem], now: int
) -> tuple[set[int], set[int]]:
    """Indexes of the items to insert claimed, and of those to insert sent (a push this process
    makes right after the commit, see ``OutboxDispatcher.instant``); both empty when no dispatcher
    adopts (see ``enqueue``)."""
    adopter = _ADOPTERS.get(db)
    if adopter is None or not adopter.accepts_births() or conn.info.get(AFTER_COMMIT) is None:
        return set(), set()
    kinds = adopter.kinds
    candidates = [
        i
        for i, item in enumerate(batch)
        if item.kind in kinds and (item.not_before is None or item.not_before <= now)
    ]
    if not candidates:
        return set(), set()
    sql = FastSql(db.dialect)
    busy: set[tuple[str, str | None, str | None]] = set()
    by_ws: dict[str, set[str]] = {}
    for i in candidates:
        item = batch[i]
        if item.customer_id is not None:
            by_ws.setdefault(item.workspace_id, set()).add(item.customer_id)
    for ws_id, customer_ids in by_ws.items():
        rows: Any = await sql.fetch(
            conn,
            f"SELECT DISTINCT customer_id, target FROM outbox WHERE {UNDELIVERED_SQL} "
            f"AND workspace_id = {sql.p(1)} AND customer_id {sql.in_list(2)}",
            (ws_id, sql.list_param(sorted(customer_ids))),
        )
        busy.update((ws_id, customer_id, target) for customer_id, target in rows)
    born: set[int] = set()
    instant: set[int] = set()
    room = adopter.birth_room()
    eligible = set(candidates)
    for i, item in enumerate(batch):
        lane = (item.workspace_id, item.customer_id, item.target) if item.customer_id is not None else None
        if lane is not None and lane in busy:
            continue
        if i in eligible:
            check = adopter.instant_checks.get(item.kind)
            if check is not None and await check(item):
                instant.add(i)  # sent at commit: the lane's next row may go too
                continue
            if len(born) < room:
                born.add(i)
                if lane is not None:
                    busy.add(lane)  # the lane's later rows in this batch wait for this one
                continue
        if lane is not None:
            busy.add(lane)  # pending: the lane's later rows in this batch queue behind it
    return born, instant


# -- delivery ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class OutboxRow:
    """A claimed row as a handler sees it; ``attempts`` counts the attempts made before this one,
    ``progress`` the steps they completed (see ``step``)."""

    id: str
    workspace_id: str
    customer_id: str | None
    kind: str
    target: str | None
    payload: dict[str, Any]
    idempotency_key: str
    attempts: int
    created_at: int
    progress: int = 0


@dataclass(slots=True, frozen=True)
class DeliveryOutcome:
    """What a handler reports. ``retryable=False`` dead-letters the row at once.

    ``retry_after_ms``: for a retryable failure, the receiver's own word on when to come back
    (Telegram's ``retry_after``). The next attempt is due no earlier than that many milliseconds
    after this one (at most ``MAX_RETRY_AFTER_MS``), or after the backoff when that is longer. The
    attempt still counts towards ``outbox_max_attempts``.
    """

    ok: bool
    status_code: int | None = None
    error: str | None = None
    retryable: bool = True
    retry_after_ms: int | None = None


Handler = Callable[[OutboxRow], Awaitable[DeliveryOutcome]]
# Says whether an item can be delivered as an instant push (see ``OutboxDispatcher.instant``).
InstantCheck = Callable[[OutboxItem], Awaitable[bool]]


class Steps:
    """How far a delivery made of several steps got (the parts of a message cut in several).

    The row's ``progress`` column counts the steps that are done. A step that an earlier attempt
    completed is skipped, so a retry resumes at the first step not done. Steps are numbered in the
    order they run: a handler must run the same steps in the same order on every attempt of a row
    (a deterministic cut of the same payload), and stop at the first failed step.

    Before a step starts, the steps this attempt completed so far are written to the row, fenced by
    the lease, and committed. A step is therefore repeated only when the process died (or the write
    failed) between the receiver's answer and that write (for the last step: the recording of the
    result), or, as for any delivery, when a call timed out after the receiver had accepted it. A
    one-step delivery costs no extra write. If the write finds that the row was claimed again (the
    lease expired), the attempt stops without the step.
    """

    __slots__ = ("_active", "_next", "_save", "_saved", "done", "resume")

    def __init__(self, resume: int, save: Callable[[int], Awaitable[bool]] | None = None) -> None:
        self.resume = resume  # steps completed by earlier attempts
        self.done = resume  # ... and by this attempt so far
        self._next = 0  # the number of the next step
        self._saved = resume  # what the row says
        self._save = save
        self._active = False

    async def run(self, send: Callable[[], Awaitable[DeliveryOutcome]]) -> DeliveryOutcome:
        if self._active:
            return await send()  # a step inside a step is part of the outer one
        number = self._next
        self._next += 1
        if number < self.resume:
            return DeliveryOutcome(True)  # an earlier attempt did this one
        if self.done > self._saved and self._save is not None:
            if not await self._save(self.done):
                return DeliveryOutcome(False, None, "the row was claimed again (lease expired); stopped")
            self._saved = self.done
        self._active = True
        try:
            outcome = await send()
        finally:
            self._active = False
        if outcome.ok and number == self.done:
            self.done += 1
        return outcome


_STEPS: ContextVar[Steps | None] = ContextVar("mayak_outbox_steps", default=None)


async def step(send: Callable[[], Awaitable[DeliveryOutcome]]) -> DeliveryOutcome:
    """Run ``send`` as the next step of the delivery in progress, unless an earlier attempt of the
    same row did it (then answer success without calling it). Outside an outbox attempt it just
    calls ``send``. See ``Steps`` for the rules a handler must follow."""
    steps = _STEPS.get()
    return await (send() if steps is None else steps.run(send))


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
    progress: int


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
        self._any_due = _any_due(db.dialect)
        self._recorder = _Recorder(self._record)
        self._rng = random.Random()
        self._depth_refreshed = -1e9
        self._wake = asyncio.Event()
        self.sql = FastSql(db.dialect)
        self._born: set[asyncio.Task[None]] = set()  # deliveries of rows claimed at birth
        self.instant_checks: dict[str, InstantCheck] = {}
        self._pushes: collections.deque[OutboxRow] = collections.deque()  # sent at birth, to push
        self._pusher: asyncio.Task[None] | None = None
        self._adopting = False
        self._backlog = True  # claimable rows may exist (cleared by a claim that finds none)
        self.max_born = max(256, concurrency * 8)

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def accepts_births(self) -> bool:
        return self._adopting and bool(self._handlers)

    def birth_room(self) -> int:
        """How many more rows may be claimed at birth now (a bound on concurrent born deliveries)."""
        return max(0, self.max_born - len(self._born)) if self._adopting else 0

    def adopt(self, claimed: list[_Claimed]) -> None:
        """Rows claimed at birth by ``enqueue`` were committed: deliver them now."""
        if self._adopting:
            # Started on the next loop turn: whoever waited for the commit (an ingest request
            # awaiting its ack) is resumed first, so the ack goes out before the answer it caused.
            asyncio.get_running_loop().call_soon(self._start_born, claimed)

    def _start_born(self, claimed: list[_Claimed]) -> None:
        if not self._adopting:
            return  # stopping: they come back when their lease expires
        for item in claimed:
            task = asyncio.create_task(self._process(item, None), name="mayak-outbox-born")
            self._born.add(task)
            task.add_done_callback(self._born_done)

    def _born_done(self, task: asyncio.Task[None]) -> None:
        self._born.discard(task)
        if self._backlog:
            self._wake.set()  # the lane's next row may be claimable now
        if not task.cancelled() and task.exception() is not None:
            log.error("outbox_record_failed", exc_info=task.exception())

    def wake(self) -> None:
        """New rows were committed: claim now instead of at the next poll.

        While this dispatcher adopts births, every row enqueued in this process either went out at
        birth or called ``backlog``, so the wake is not needed (other processes' rows are polled)."""
        if not self._adopting:
            self._wake.set()

    def backlog(self) -> None:
        """Rows that must be claimed were committed (not born claimed, or behind a born row)."""
        self._backlog = True
        self._wake.set()

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler
        self._claim_query = None  # rebuilt with the new kind on the next claim

    def instant(self, kind: str, check: InstantCheck) -> None:
        """Rows of ``kind`` for which ``check`` says yes are *instant pushes*: inserted ``sent``,
        with their one attempt recorded, in the transaction that creates them, and handed to the
        kind's handler right after the commit, in commit order, never retried.

        Only for deliveries that cannot fail and whose loss in a crash loses nothing more than the
        crash itself does: the web chat's push to sockets that live in this process (a crash closes
        them; the message is in the log and the next connection's history). It saves the claim, the
        result's write and its transaction. Like a birth, it needs this dispatcher running and the
        lane free (nothing older undelivered); otherwise the row takes the ordinary way.
        """
        self.instant_checks[kind] = check

    def push(self, rows: list[OutboxRow]) -> None:
        """Instant pushes were committed (as sent): hand them to their handler now."""
        if self._adopting:
            # next loop turn, as births: the ack of the message that caused them goes out first
            asyncio.get_running_loop().call_soon(self._queue_pushes, rows)

    def _queue_pushes(self, rows: list[OutboxRow]) -> None:
        if not self._adopting:
            return  # stopping: the rows are in the log (what a crash here would leave too)
        self._pushes.extend(rows)
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.create_task(self._run_pushes(), name="mayak-outbox-push")

    async def _run_pushes(self) -> None:
        """One after another, so one lane's pushes keep their order across transactions."""
        while self._pushes:
            row = self._pushes.popleft()
            handler = self._handlers.get(row.kind)
            try:
                outcome = (
                    await handler(row)
                    if handler is not None
                    else DeliveryOutcome(False, error=f"no handler for {row.kind}")
                )
            except Exception as exc:
                outcome = DeliveryOutcome(False, None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
            if outcome.ok:
                self.metrics.outbox_delivered.labels(row.kind).inc()
            else:  # recorded as sent already: say so in the log, not in the row
                self.metrics.outbox_failed.labels(row.kind).inc()
                log.warning("outbox_push_failed", row_id=row.id, kind=row.kind, error=outcome.error)

    # -- entry points --------------------------------------------------------------------------

    async def run_once(self, now: int | None = None) -> int:
        """Claim one batch of due rows, deliver them concurrently, record every outcome.

        Returns how many delivery attempts were made. ``now`` pins the clock for due-ness, attempt
        times and backoff (tests); durations are measured for real.
        """
        if not self._handlers:
            return 0
        born = list(self._born)
        if self._pusher is not None and not self._pusher.done():
            born.append(self._pusher)
        if born:  # deliveries of rows claimed at birth count as this round's work
            await asyncio.gather(*born, return_exceptions=True)
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
        return len(claimed) + len(born)

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
        _ADOPTERS[self.db] = self
        self._adopting = True
        try:
            while not stop.is_set():
                wake.clear()
                free = self.concurrency - len(active)
                since = time.monotonic() - last_claim
                if free > 0 and (free >= min_batch or not active or since >= CLAIM_INTERVAL_S):
                    try:
                        self._backlog = False
                        claimed = await self._claim(now_ms(), min(free, self.batch_size))
                        if claimed:
                            self._backlog = True  # more may be due behind them
                        await self._refresh_depth(force=False)
                    except Exception:
                        self._backlog = True
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
            self._adopting = False
            if _ADOPTERS.get(self.db) is self:
                del _ADOPTERS[self.db]
            pending = list(active) + list(self._born)
            for task in pending:
                task.cancel()  # unrecorded rows come back when their lease expires
            await asyncio.gather(*pending, return_exceptions=True)
            pusher = self._pusher
            if pusher is not None and not pusher.done():  # committed pushes: let them out
                await asyncio.wait({pusher}, timeout=PUSH_FLUSH_S)
                pusher.cancel()

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
            if (await conn.execute(self._any_due, {"now": now})).first() is None:
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
        # Literal status list: the partial index ix_outbox_undelivered holds exactly these rows, and the
        # planner can use it only when the query's terms match its WHERE clause.
        heads = (
            sa.select(sa.func.min(p.c.id))
            .where(sa.text("p." + UNDELIVERED_SQL), p.c.customer_id.is_not(None))
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
        steps = Steps(item.row.progress, functools.partial(self._save_progress, item, now))
        token = _STEPS.set(steps)
        try:
            async with asyncio.timeout(self.attempt_timeout_s):
                outcome = await handler(item.row)
        except TimeoutError:
            outcome = DeliveryOutcome(False, None, f"timeout after {self.attempt_timeout_s:g} s")
        except Exception as exc:
            log.warning("outbox_handler_error", row_id=item.row.id, kind=item.row.kind, exc_info=True)
            outcome = DeliveryOutcome(False, None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
        finally:
            _STEPS.reset(token)
        return _Result(item, outcome, at, int((time.monotonic() - started) * 1000), steps.done)

    async def _save_progress(self, item: _Claimed, now: int | None, done: int) -> bool:
        """Commit ``progress = done`` while the row still carries our lease; False if it does not."""
        async with self.db.write() as conn:
            result = await conn.execute(
                outbox.update()
                .where(
                    outbox.c.id == item.row.id,
                    outbox.c.status == IN_FLIGHT,
                    outbox.c.lease_until == item.lease_until,
                )
                .values(progress=done, updated_at=_clock(now))
            )
        return bool(result.rowcount == 1)

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
                delay = backoff_ms(number, self.settings.outbox_base_delay_ms, self._rng)
                if out.retry_after_ms is not None and out.retry_after_ms > 0:
                    delay = max(delay, min(out.retry_after_ms, MAX_RETRY_AFTER_MS))  # the receiver's word
                next_at = res.at + delay
            updates.append(
                {
                    "b_id": row.id,
                    "b_lease": res.claimed.lease_until,
                    "b_status": status,
                    "b_attempts": number,
                    "b_next": next_at,
                    "b_error": error,
                    "b_progress": res.progress,
                    "b_now": res.at,
                }
            )
        sql = self.sql
        async with self.db.write() as conn:
            await sql.run_many(
                conn,
                "INSERT INTO outbox_attempts (id, outbox_id, workspace_id, attempt, at, status_code, error, "
                f"duration_ms) VALUES ({sql.values(8)})",
                [
                    (
                        a["id"],
                        a["outbox_id"],
                        a["workspace_id"],
                        a["attempt"],
                        a["at"],
                        a["status_code"],
                        a["error"],
                        a["duration_ms"],
                    )
                    for a in attempt_rows
                ],
            )
            # fenced: only the holder of the lease the row was claimed with may record its result
            await sql.run_many(
                conn,
                f"UPDATE outbox SET status = {sql.p(1)}, attempts = {sql.p(2)}, "
                f"next_attempt_at = {sql.p(3)}, last_error = {sql.p(4)}, progress = {sql.p(5)}, "
                f"lease_until = NULL, updated_at = {sql.p(6)} "
                f"WHERE id = {sql.p(7)} AND status = '{IN_FLIGHT}' AND lease_until = {sql.p(8)}",
                [tuple(u[k] for k in _UPDATE_KEYS) for u in updates],
            )
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


def _payload(text: str) -> dict[str, Any]:
    payload = orjson.loads(text)
    return payload if isinstance(payload, dict) else {"value": payload}


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
        progress=int(raw.get("progress") or 0),
    )


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when ``event`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
