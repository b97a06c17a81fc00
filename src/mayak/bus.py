"""The push bus: live frames for sockets held by other processes.

A web-chat socket lives in one API process, but the outbox row that carries the bot's reply may be
delivered by any process (a ``mayak worker``, another API process). The sender pushes to the sockets
it holds itself and *publishes* the frame on this bus; every other process hands it to its own hub.

Three implementations of one small port (``PushBus``):

- ``LocalBus`` (the default on SQLite): nothing leaves the process; ``publish`` does nothing.
- ``NatsBus`` (``MAYAK_BUS_URL=nats://host:port``): NATS core publish/subscribe on one subject per
  kind (``mayak.push.webchat``).
- ``PostgresBus`` (on PostgreSQL when ``MAYAK_BUS_URL`` is not set): ``pg_notify`` on the channel
  ``mayak_push``, received on a dedicated asyncpg connection that ``LISTEN``s. A notification's
  payload must be under 8,000 bytes: a larger envelope is zlib-compressed (and base64-encoded), and
  one still too large is logged and skipped.

Delivery is **at most once** and best effort, by design: ``publish`` never blocks and never raises,
frames published while the bus is disconnected are dropped, frames that waited longer than
``MAX_AGE_S`` for a connection are dropped, and a lost connection is re-opened with exponential
backoff. The message itself is never lost: it is in the event log (``message.outbound``) and the
visitor's next connection shows it in its history. Every envelope carries the publishing process's
``origin`` id, and a process ignores its own publications (it pushed to its own sockets already).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import random
import secrets
import time
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import structlog

log = structlog.get_logger("mayak.bus")

Handler = Callable[[str, str, dict[str, Any]], object]
"""``handler(channel_id, address, frame)``: push ``frame`` to this process's sockets of ``address``."""

NATS_SUBJECT_PREFIX = "mayak.push"
PG_CHANNEL = "mayak_push"
PG_MAX_PAYLOAD = 7999  # PostgreSQL: "the payload must be shorter than 8000 bytes"
QUEUE_LIMIT = 10_000  # frames waiting for the sender; beyond that, new frames are dropped
MAX_AGE_S = 5.0  # a frame that waited longer for a connection is stale: the history shows it
BATCH = 200  # notifications per pg_notify statement
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTH_CHECK_S = 15.0  # an idle PostgreSQL listener is checked this often


class PushBus:
    """The port, and the in-process implementation's behaviour: local handlers only.

    ``subscribe(kind, handler)`` registers this process's receiver for a kind of frame;
    ``publish(kind, channel_id, address, frame)`` offers a frame to the *other* processes (never
    blocks, never raises); ``start``/``stop`` open and close the connection (in the background:
    a bus that cannot connect never stops the platform from starting).
    """

    name = "local"

    def __init__(self) -> None:
        self.origin = secrets.token_hex(8)
        self.handlers: dict[str, Handler] = {}
        self.published = 0  # frames handed to the connection
        self.received = 0  # frames from other processes, handed to a handler
        self.own = 0  # our own publications seen coming back (ignored)
        self.dropped = 0  # frames not published: disconnected, queue full, stale or too large

    def subscribe(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    def publish(self, kind: str, channel_id: str, address: str, frame: dict[str, Any]) -> None:
        """Nothing to do: there are no other processes to tell."""

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def wait_connected(self, timeout: float = 10.0) -> bool:
        return True

    def _dispatch(self, envelope: Any) -> None:
        """Hand a received envelope to the handler of its kind, unless it is our own."""
        if not isinstance(envelope, dict):
            return
        if envelope.get("o") == self.origin:
            self.own += 1
            return
        handler = self.handlers.get(envelope.get("k", ""))
        channel_id, address, frame = envelope.get("c"), envelope.get("a"), envelope.get("f")
        if handler is None or not isinstance(channel_id, str) or not isinstance(address, str):
            return
        if not isinstance(frame, dict):
            return
        self.received += 1
        try:
            handler(channel_id, address, frame)
        except Exception:
            log.exception("bus_handler_failed", kind=envelope.get("k"))


class LocalBus(PushBus):
    """Nothing leaves the process (one process, or SQLite without ``MAYAK_BUS_URL``)."""


class _RemoteBus(PushBus):
    """What the NATS and PostgreSQL buses share: a bounded queue drained by a sender that owns the
    connection, and a supervisor that (re)connects with exponential backoff."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: asyncio.Queue[tuple[float, str, bytes]] = asyncio.Queue(QUEUE_LIMIT)
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._warned_at = 0.0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, kind: str, channel_id: str, address: str, frame: dict[str, Any]) -> None:
        if not self._connected.is_set():
            self.dropped += 1
            return
        try:
            # ``n`` makes every envelope unique: PostgreSQL folds identical payloads of one transaction.
            data = orjson.dumps(
                {"o": self.origin, "n": next(self._seq), "k": kind, "c": channel_id, "a": address, "f": frame}
            )
            self._queue.put_nowait((time.monotonic(), kind, data))
        except asyncio.QueueFull:
            self.dropped += 1
            self._warn("bus_queue_full", limit=QUEUE_LIMIT)
        except Exception:  # a frame that cannot be serialised must not fail the delivery
            self.dropped += 1
            log.exception("bus_publish_failed")

    def _warn(self, event: str, **fields: Any) -> None:
        """At most one warning every 10 s (a flood of drops must not become a flood of logs)."""
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            log.warning(event, bus=self.name, dropped=self.dropped, **fields)

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._supervise(), name=f"mayak-bus-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._connected.clear()

    async def wait_connected(self, timeout: float = 10.0) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _supervise(self) -> None:
        delay = BACKOFF_MIN_S
        while True:
            try:
                await self._open()
                self._connected.set()
                log.info("bus_connected", bus=self.name, origin=self.origin)
                delay = BACKOFF_MIN_S
                await self._pump()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bus_connection_lost", bus=self.name, error=repr(exc), retry_in_s=delay)
            finally:
                was = self._connected.is_set()
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._close())
                if was:
                    log.info("bus_disconnected", bus=self.name)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _batch(self, timeout: float, lost: asyncio.Event) -> list[tuple[str, bytes]] | None:
        """The next frames to send (oldest first, stale ones dropped); None after ``timeout`` idle.
        Raises ``ConnectionError`` as soon as ``lost`` is set."""
        if self._queue.empty():
            getter = asyncio.ensure_future(self._queue.get())
            waiter = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({getter, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                if not getter.done():
                    getter.cancel()
            if lost.is_set() and getter.done() and not getter.cancelled():
                self.dropped += 1
            if lost.is_set():
                raise ConnectionError(f"the {self.name} connection was lost")
            if not getter.done() or getter.cancelled():
                return None
            first = getter.result()
        else:
            first = self._queue.get_nowait()
        items = [first]
        while len(items) < BATCH and not self._queue.empty():
            items.append(self._queue.get_nowait())
        cutoff = time.monotonic() - MAX_AGE_S
        fresh = [(kind, data) for at, kind, data in items if at >= cutoff]
        if len(fresh) < len(items):
            self.dropped += len(items) - len(fresh)
            self._warn("bus_frames_stale", max_age_s=MAX_AGE_S)
        return fresh

    async def _open(self) -> None:
        raise NotImplementedError

    async def _pump(self) -> None:
        """Send queued frames until the connection fails (raise) or the task is cancelled."""
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


# -- NATS ------------------------------------------------------------------------------------------


class NatsBus(_RemoteBus):
    """NATS core publish/subscribe: one subject per kind, every process subscribed to all of them.

    nats-py reconnects by itself once connected (``max_reconnect_attempts=-1``); the supervisor
    covers the first connection and a client that gave up. Frames published while nats-py is
    reconnecting are dropped here rather than buffered (they would arrive late, after the history).
    """

    name = "nats"

    def __init__(self, servers: list[str]):
        super().__init__()
        self.servers = servers
        self._nc: Any = None
        self._lost: asyncio.Event = asyncio.Event()

    async def _open(self) -> None:
        import nats

        self._lost = asyncio.Event()
        lost = self._lost

        async def on_disconnected() -> None:
            self._connected.clear()

        async def on_reconnected() -> None:
            self._connected.set()
            log.info("bus_reconnected", bus=self.name)

        async def on_closed() -> None:
            lost.set()

        async def on_error(exc: Exception) -> None:
            log.warning("bus_error", bus=self.name, error=repr(exc))

        self._nc = await nats.connect(
            self.servers,
            name=f"mayak-{self.origin}",
            connect_timeout=5,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            closed_cb=on_closed,
            error_cb=on_error,
        )
        await self._nc.subscribe(f"{NATS_SUBJECT_PREFIX}.*", cb=self._on_message)
        await self._nc.flush(timeout=5)  # the server has the subscription before we count as connected

    async def _on_message(self, msg: Any) -> None:
        try:
            envelope = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        self._dispatch(envelope)

    async def _pump(self) -> None:
        nc = self._nc
        while True:
            batch = await self._batch(60.0, self._lost)
            if not batch:
                continue
            if not nc.is_connected:
                self.dropped += len(batch)
                continue
            for kind, data in batch:
                await nc.publish(f"{NATS_SUBJECT_PREFIX}.{kind}", data)
                self.published += 1

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await asyncio.wait_for(nc.close(), 5)


# -- PostgreSQL LISTEN/NOTIFY ------------------------------------------------------------------


def pg_payload(data: bytes) -> str | None:
    """The NOTIFY payload for an envelope: the JSON itself when it fits, else ``z:`` + base64 of
    its zlib compression, else None (too large even compressed)."""
    if len(data) <= PG_MAX_PAYLOAD:
        return data.decode()
    packed = "z:" + base64.b64encode(zlib.compress(data, 6)).decode("ascii")
    return packed if len(packed) <= PG_MAX_PAYLOAD else None


def pg_envelope(payload: str) -> Any:
    if payload.startswith("z:"):
        return orjson.loads(zlib.decompress(base64.b64decode(payload[2:])))
    return orjson.loads(payload)


class PostgresBus(_RemoteBus):
    """``LISTEN mayak_push`` on a dedicated asyncpg connection, which also sends (``pg_notify``,
    up to ``BATCH`` per statement). An idle connection is checked every ``HEALTH_CHECK_S``."""

    name = "postgres"

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn
        self.skipped = 0  # frames too large for a notification even compressed
        self._conn: Any = None
        self._lost: asyncio.Event = asyncio.Event()

    async def _open(self) -> None:
        import asyncpg

        self._lost = asyncio.Event()
        lost = self._lost
        self._conn = await asyncpg.connect(self.dsn, timeout=10)
        self._conn.add_termination_listener(lambda _conn: lost.set())
        await self._conn.add_listener(PG_CHANNEL, self._on_notify)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            envelope = pg_envelope(payload)
        except Exception:
            log.warning("bus_bad_notification", bus=self.name, size=len(payload))
            return
        self._dispatch(envelope)

    async def _pump(self) -> None:
        conn = self._conn
        while True:
            batch = await self._batch(HEALTH_CHECK_S, self._lost)
            if batch is None:
                await conn.fetchval("SELECT 1", timeout=10)
                continue
            payloads = []
            for _kind, data in batch:
                payload = pg_payload(data)
                if payload is None:
                    self.dropped += 1
                    self.skipped += 1
                    log.warning(
                        "bus_frame_too_large",
                        bus=self.name,
                        bytes=len(data),
                        note="not pushed to other processes; the next connection's history shows it",
                    )
                    continue
                payloads.append(payload)
            if payloads:
                await conn.execute(
                    "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", PG_CHANNEL, payloads, timeout=10
                )
                self.published += len(payloads)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()


# -- construction ----------------------------------------------------------------------------------


def parse_bus_url(url: str) -> str:
    """The kind a ``MAYAK_BUS_URL`` names: ``""`` (automatic), ``local`` or ``nats``."""
    url = url.strip()
    if url in ("", "auto"):
        return ""
    if url in ("local", "none"):
        return "local"
    servers = [s.strip() for s in url.split(",") if s.strip()]
    if servers and all(s.startswith(("nats://", "tls://")) for s in servers):
        return "nats"
    raise ValueError(
        f"MAYAK_BUS_URL must be nats://host:port (comma-separated for a cluster) or 'local', not {url!r}"
    )


def build_bus(bus_url: str, database_url: str) -> PushBus:
    """The bus for these settings: NATS when ``bus_url`` names it, else PostgreSQL LISTEN/NOTIFY when
    the database is PostgreSQL, else in-process. ``database_url`` is SQLAlchemy's (any driver)."""
    kind = parse_bus_url(bus_url)
    if kind == "nats":
        return NatsBus([s.strip() for s in bus_url.split(",") if s.strip()])
    if kind == "" and database_url.startswith(("postgresql", "postgres:")):
        import sqlalchemy as sa

        url = sa.make_url(database_url).set(drivername="postgresql")
        return PostgresBus(url.render_as_string(hide_password=False))
    return LocalBus()
