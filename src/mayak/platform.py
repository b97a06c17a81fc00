"""The composition root: one object that owns the database, the services and the worker loops.

``mayak serve`` builds one and mounts it in the HTTP app; tests build one on a temporary database
and call ``drain()`` to wait, deterministically, until every accepted event has been processed and
every due timer and outbox row handled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from mayak.bots.conversations import ConversationService
from mayak.bots.router import CHANNEL_SOURCES, BotRouter
from mayak.bots.store import BotStore
from mayak.bus import build_bus
from mayak.channels import telegram, webchat
from mayak.channels.base import MESSAGE_KIND
from mayak.channels.service import ChannelService
from mayak.config import Settings
from mayak.db.database import Database
from mayak.delivery.destinations import DestinationService
from mayak.delivery.outbox import OutboxDispatcher
from mayak.delivery.timers import TimerWorker
from mayak.eventlog import LogNotifier, prune_dedup_keys
from mayak.idempotency import IdempotencyStore
from mayak.ingest.writer import IngestWriter
from mayak.integrations import calls
from mayak.metrics import Metrics
from mayak.pipeline.customers import CustomerService
from mayak.pipeline.processor import Pipeline
from mayak.workspaces.secrets_box import SecretBox, load_or_create_key_file
from mayak.workspaces.service import WorkspaceService

log = structlog.get_logger("mayak")
MAINTENANCE_INTERVAL_S = 600.0


def master_key(settings: Settings) -> str:
    if settings.secret_key:
        return settings.secret_key
    path = settings.sqlite_path()
    if path is None:
        if settings.database_url.startswith("sqlite"):
            return "mayak-ephemeral-memory-key"  # in-memory database: nothing outlives the process
        raise RuntimeError("MAYAK_SECRET_KEY must be set when the database is not a local SQLite file")
    return load_or_create_key_file(path.parent / "mayak-secret.key")


class Mayak:
    def __init__(self, settings: Settings, db: Database | None = None):
        self.settings = settings
        self.db = db or Database(
            settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            sqlite_cache_mb=settings.sqlite_cache_mb,
            sqlite_mmap_mb=settings.sqlite_mmap_mb,
        )
        self.box = SecretBox(master_key(settings))
        self.metrics = Metrics()
        self.notifier = LogNotifier()
        # Live frames for sockets other processes hold (web chat); see mayak/bus.py.
        self.bus = build_bus(settings.bus_url, self.db.url)
        self.metrics.watch_push_bus(self.bus)
        self.workspaces = WorkspaceService(self.db, self.box)
        self.idempotency = IdempotencyStore(self.db, self.box)
        self.writer = IngestWriter(
            self.db, self.notifier, self.metrics, dedup_window_ms=settings.dedup_window_days * 86_400_000
        )
        # PostgreSQL: one ingestion request checks its events at a time (see ingest_routes.ingest).
        self.check_gate = asyncio.Lock() if self.db.dialect == "postgresql" else None
        self.destinations = DestinationService(self.db, self.workspaces, settings)
        self.outbox = OutboxDispatcher(self.db, settings, self.metrics)
        self.outbox.register("webhook", self.destinations.deliver)
        self.timers = TimerWorker(self.db, self.notifier, self.metrics)
        self.channels = ChannelService(self.db, self.workspaces)
        self.outbox.register(MESSAGE_KIND, self.channels.deliver)
        self.bots = BotStore(self.db)
        self.bot_router = BotRouter(self.db, self.bots, self.channels)
        self.writer.enrichers.append((CHANNEL_SOURCES, self.bot_router.preunderstand))
        self.pipeline = Pipeline(
            self.db,
            self.notifier,
            settings,
            self.metrics,
            routers=[self.destinations.route, self.bot_router.route],
            workspaces=self.workspaces,
        )
        self.pipeline.wake_deliveries = self.outbox.wake
        if settings.inline_pipeline:
            self.writer.pipeline = self.pipeline
        self.customers = CustomerService(self.db, self.pipeline, self.writer, self.workspaces)
        self.conversations = ConversationService(self.db, self.writer, self.pipeline, self.bots)
        # Adapters and integrations register their outbox handlers here.
        telegram.install(self)
        webchat.install(self)
        self.integrations = calls.install(self)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()

    async def start(self, *, workers: bool = True) -> None:
        self.writer.start()
        await self.bus.start()  # connects in the background: a bus that is down never stops start-up
        if workers:
            self._stop.clear()
            self._spawn("pipeline", self.pipeline.run_forever)
            self._spawn("outbox", self.outbox.run_forever)
            self._spawn("timers", self.timers.run_forever)
            self._spawn("maintenance", self._maintenance)

    def _spawn(self, name: str, loop: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(loop(self._stop), name=f"mayak-{name}")
        self._tasks.append(task)

    async def _maintenance(self, stop: asyncio.Event) -> None:
        """Housekeeping every few minutes: forget dedup keys older than the window and expired
        idempotency keys."""
        window_ms = self.settings.dedup_window_days * 86_400_000
        while not stop.is_set():
            try:
                pruned = await prune_dedup_keys(self.db, window_ms)
                expired = await self.idempotency.prune()
                if pruned or expired:
                    log.info("maintenance", dedup_keys_pruned=pruned, idempotency_keys_expired=expired)
            except Exception:
                log.exception("maintenance_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MAINTENANCE_INTERVAL_S)

    async def stop(self) -> None:
        self._stop.set()
        self.notifier.notify()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.writer.stop()
        await self.pipeline.close()
        await self.bus.stop()
        await self.destinations.close()
        await self.channels.close()
        await self.integrations.calls.close()

    async def drain(self, *, timeout: float = 30.0, deliveries: bool = True) -> None:
        """Process everything that is due now: pipeline to the end of the log, timers, outbox."""
        async with asyncio.timeout(timeout):
            while True:
                await self.writer.flush()
                worked = await self.pipeline.run_until_idle()
                worked += await self.timers.run_once()
                if deliveries:
                    worked += await self.outbox.run_once()
                if not worked:
                    return

    async def close(self) -> None:
        await self.stop()
        await self.db.dispose()
