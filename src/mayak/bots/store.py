"""Published bots: immutable versions, the current version, retiring, and the compiled cache.

Publishing validates the files (the same checks as ``mayak bot validate``) and trains the bot's NLU
once before anything is stored, so an invalid bot, or one whose NLU cannot train, is refused and the
current version stays as it was. Publishing identical content again answers the existing version.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak import runtime
from mayak.bots.compiled import BotCache, CompiledBot, compile_bot, definition_digest, has_slow_nlu
from mayak.bots.loader import LoadedBot, load_texts
from mayak.db.database import Database
from mayak.db.schema import bot_versions, bots, workspaces
from mayak.errors import Conflict, InvalidRequest, NotFound
from mayak.ids import new_id
from mayak.timeutil import ms_to_rfc3339, now_ms

ACTIVE, RETIRED = "active", "retired"
INDEX_SECONDS = 2.0
SLOW_MEMO_SIZE = 10_000  # versions whose NLU slowness is remembered (see BotStore.slow_nlu)
BotIndex = list[tuple[str, int]]  # module level: inside the class, ``list`` names the method


class BotInvalid(InvalidRequest):
    """A bot that does not validate; ``issues`` lists every problem with file and line."""

    def __init__(self, loaded: LoadedBot):
        first = loaded.issues[0]
        super().__init__("invalid_bot", f"{len(loaded.issues)} problem(s); first: {first}", first.path)
        self.issues = loaded.issues

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"issues": [i.to_json() for i in self.issues]}


class BotStore:
    def __init__(self, db: Database):
        self.db = db
        self.cache = BotCache()
        # workspace -> (expires, [(bot id, current version)]): which bots a workspace runs.
        self._index: dict[str, tuple[float, BotIndex]] = {}
        # (bot id, version) -> whether its NLU engine is slow, read from the definition (versions
        # are immutable); lets a process that only appends (serve --no-workers) skip compiling.
        self._slow: dict[tuple[str, int], bool] = {}

    # -- publishing ------------------------------------------------------------------------------

    async def publish_files(self, ws_id: str, files: dict[str, str]) -> dict[str, Any]:
        loaded = load_texts(files)
        if not loaded.ok:
            raise BotInvalid(loaded)
        return await self.publish(ws_id, loaded.definition)

    async def publish(self, ws_id: str, definition: dict[str, Any]) -> dict[str, Any]:
        digest = definition_digest(definition)
        name = definition["bot"]["name"]
        # Train once before storing: a bot whose NLU cannot train is refused like an invalid one.
        async with self.db.read() as conn:
            settings = (
                await conn.execute(sa.select(workspaces.c.settings).where(workspaces.c.id == ws_id))
            ).scalar()
        region = _region(settings)
        try:
            compiled = await asyncio.to_thread(
                functools.partial(compile_bot, "check", 0, definition, region=region)
            )
        except ValueError as exc:
            raise InvalidRequest("invalid_bot", f"the bot cannot be compiled: {exc}", "$.intents") from None
        now = now_ms()
        async with self.db.write() as conn:
            row = (
                await conn.execute(sa.select(bots).where(bots.c.workspace_id == ws_id, bots.c.name == name))
            ).first()
            if row is None:
                bot_id = new_id("bot")
                await conn.execute(
                    bots.insert().values(
                        id=bot_id, workspace_id=ws_id, name=name, current_version=None, created_at=now
                    )
                )
                latest = 0
            else:
                bot_id = row.id
                last = (
                    await conn.execute(
                        sa.select(bot_versions.c.version, bot_versions.c.digest)
                        .where(bot_versions.c.bot_id == bot_id)
                        .order_by(bot_versions.c.version.desc())
                        .limit(1)
                    )
                ).first()
                latest = int(last.version) if last else 0
                if last is not None and last.digest == digest and row.current_version == latest:
                    return await self._describe(conn, ws_id, bot_id) | {"unchanged": True}
            version = latest + 1
            await conn.execute(
                bot_versions.insert().values(
                    bot_id=bot_id,
                    version=version,
                    workspace_id=ws_id,
                    definition=orjson.dumps(definition).decode(),
                    digest=digest,
                    status=ACTIVE,
                    created_at=now,
                )
            )
            await conn.execute(bots.update().where(bots.c.id == bot_id).values(current_version=version))
            described = await self._describe(conn, ws_id, bot_id)
        compiled.bot_id, compiled.version = bot_id, version
        self.cache.put(compiled)
        runtime.settle_long_lived()
        self._index.pop(ws_id, None)
        return described | {"unchanged": False}

    async def retire(self, ws_id: str, bot_id: str, version: int) -> dict[str, Any]:
        async with self.db.write() as conn:
            row = await self._bot_row(conn, ws_id, bot_id)
            if row.current_version == version:
                raise Conflict(
                    "version_in_use", "the current version cannot be retired; publish a newer one first"
                )
            res = await conn.execute(
                bot_versions.update()
                .where(bot_versions.c.bot_id == bot_id, bot_versions.c.version == version)
                .values(status=RETIRED, retired_at=now_ms())
            )
            if not res.rowcount:
                raise NotFound("bot version", "$.version")
            return await self._describe(conn, ws_id, bot_id)

    # -- reading ---------------------------------------------------------------------------------

    async def list(self, ws_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            ids = [r[0] for r in await conn.execute(sa.select(bots.c.id).where(bots.c.workspace_id == ws_id))]
            return [await self._describe(conn, ws_id, bot_id) for bot_id in sorted(ids)]

    async def get(self, ws_id: str, bot_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            return await self._describe(conn, ws_id, bot_id)

    async def find(self, ws_id: str, id_or_name: str) -> str:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(bots.c.id).where(
                        bots.c.workspace_id == ws_id,
                        sa.or_(bots.c.id == id_or_name, bots.c.name == id_or_name),
                    )
                )
            ).first()
        if row is None:
            raise NotFound("bot", "$.bot")
        return str(row[0])

    async def _bot_row(self, conn: AsyncConnection, ws_id: str, bot_id: str) -> Any:
        row = (
            await conn.execute(sa.select(bots).where(bots.c.workspace_id == ws_id, bots.c.id == bot_id))
        ).first()
        if row is None:
            raise NotFound("bot", "$.bot_id")
        return row

    async def _describe(self, conn: AsyncConnection, ws_id: str, bot_id: str) -> dict[str, Any]:
        row = await self._bot_row(conn, ws_id, bot_id)
        versions = (
            await conn.execute(
                sa.select(
                    bot_versions.c.version,
                    bot_versions.c.status,
                    bot_versions.c.created_at,
                    bot_versions.c.digest,
                )
                .where(bot_versions.c.bot_id == bot_id)
                .order_by(bot_versions.c.version)
            )
        ).all()
        return {
            "id": row.id,
            "name": row.name,
            "current_version": row.current_version,
            "created_at": ms_to_rfc3339(row.created_at),
            "versions": [
                {
                    "version": v.version,
                    "status": v.status,
                    "created_at": ms_to_rfc3339(v.created_at),
                    "digest": v.digest,
                }
                for v in versions
            ],
        }

    # -- runtime (called by the bot router inside the pipeline's transaction) ---------------------

    def cached_bots(self, ws_id: str) -> BotIndex | None:
        """``workspace_bots`` when it is in the cache (no query), else None."""
        cached = self._index.get(ws_id)
        return cached[1] if cached and cached[0] > time.monotonic() else None

    async def workspace_bots(self, conn: AsyncConnection, ws_id: str) -> BotIndex:
        """(bot id, current version) of every published bot of the workspace, cached briefly."""
        cached = self.cached_bots(ws_id)
        if cached is not None:
            return cached
        rows = await conn.execute(
            sa.select(bots.c.id, bots.c.current_version)
            .where(bots.c.workspace_id == ws_id, bots.c.current_version.is_not(None))
            .order_by(bots.c.id)
        )
        found = [(r[0], int(r[1])) for r in rows]
        self._index[ws_id] = (time.monotonic() + INDEX_SECONDS, found)
        return found

    def known_slow_nlu(self, bot_id: str, version: int) -> bool | None:
        """Whether the version's NLU engine is slow, when this process knows it already (None: not yet)."""
        bot = self.cache.get(bot_id, version)
        return bot.slow_nlu if bot is not None else self._slow.get((bot_id, version))

    async def slow_nlu(self, conn: AsyncConnection, bot_id: str, version: int) -> bool:
        """Whether the version's NLU engine is slow, from its stored definition: nothing is compiled."""
        known = self.known_slow_nlu(bot_id, version)
        if known is not None:
            return known
        text = (
            await conn.execute(
                sa.select(bot_versions.c.definition).where(
                    bot_versions.c.bot_id == bot_id, bot_versions.c.version == version
                )
            )
        ).scalar()
        slow = text is not None and has_slow_nlu(orjson.loads(text))
        if len(self._slow) >= SLOW_MEMO_SIZE:
            self._slow.clear()
        self._slow[(bot_id, version)] = slow
        return slow

    async def compiled(self, conn: AsyncConnection, bot_id: str, version: int) -> tuple[CompiledBot, str]:
        """The compiled version and its status (active | retired)."""
        status = (
            await conn.execute(
                sa.select(bot_versions.c.status).where(
                    bot_versions.c.bot_id == bot_id, bot_versions.c.version == version
                )
            )
        ).scalar()
        if status is None:
            raise NotFound("bot version")
        bot = self.cache.get(bot_id, version)
        if bot is None:
            text, settings = (
                await conn.execute(
                    sa.select(bot_versions.c.definition, workspaces.c.settings)
                    .join(workspaces, workspaces.c.id == bot_versions.c.workspace_id)
                    .where(bot_versions.c.bot_id == bot_id, bot_versions.c.version == version)
                )
            ).one()
            bot = await asyncio.to_thread(
                functools.partial(compile_bot, bot_id, version, orjson.loads(text), region=_region(settings))
            )
            self.cache.put(bot)
            runtime.settle_long_lived()
        return bot, str(status)


def _region(settings: Any) -> str | None:
    """The workspace's default phone region (the NLU engine's default for phone entities)."""
    region = settings.get("default_region") if isinstance(settings, dict) else None
    return str(region) if region else None
