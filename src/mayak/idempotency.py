"""``Idempotency-Key`` for POSTs that create something (DESIGN.md: every such POST accepts one).

The first request with a key runs and its answer is kept for 24 hours (encrypted: it may hold a
secret shown once, such as a destination's signing secret). A retry with the same key and the same
request gets that answer again, marked ``Idempotent-Replayed: true``; the same key with a different
request is refused (``idempotency_key_reused``), and so is a retry while the first is still running
(``idempotency_key_in_use``). Server errors (5xx) are not kept: the request may be retried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa

from mayak.db.database import Database
from mayak.db.schema import idempotency_keys
from mayak.errors import Conflict, InvalidRequest, MayakError
from mayak.timeutil import now_ms
from mayak.workspaces.secrets_box import SecretBox

TTL_MS = 24 * 3_600_000
HEADER_PARAM = "$.headers.Idempotency-Key"


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    replayed: bool = False


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


class IdempotencyStore:
    def __init__(self, db: Database, box: SecretBox):
        self.db = db
        self.box = box

    async def run(
        self,
        ws_id: str,
        key: str | None,
        request_fingerprint: str,
        create: Callable[[], Awaitable[Answer]],
    ) -> Answer:
        """Run ``create`` once per (workspace, key); replay its answer for retries."""
        if key is None:
            return await create()
        if not 1 <= len(key) <= 255 or not key.isprintable():
            raise InvalidRequest(
                "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable characters", HEADER_PARAM
            )
        existing = await self._claim(ws_id, key, request_fingerprint)
        if existing is not None:
            return existing
        try:
            answer = await create()
        except MayakError as exc:
            if exc.status >= 500:
                await self._forget(ws_id, key)
            else:
                await self._keep(ws_id, key, Answer(exc.status, exc.to_dict()))
            raise
        except BaseException:
            await self._forget(ws_id, key)
            raise
        await self._keep(ws_id, key, answer)
        return answer

    async def _claim(self, ws_id: str, key: str, request_fingerprint: str) -> Answer | None:
        """Insert the key as running, or return the kept answer of an earlier request."""
        now = now_ms()
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    sa.select(idempotency_keys).where(
                        idempotency_keys.c.workspace_id == ws_id, idempotency_keys.c.key == key
                    )
                )
            ).first()
            if row is not None and row.created_at < now - TTL_MS:
                await conn.execute(
                    idempotency_keys.delete().where(
                        idempotency_keys.c.workspace_id == ws_id, idempotency_keys.c.key == key
                    )
                )
                row = None
            if row is None:
                await conn.execute(
                    idempotency_keys.insert().values(
                        workspace_id=ws_id, key=key, fingerprint=request_fingerprint, created_at=now
                    )
                )
                return None
        if row.fingerprint != request_fingerprint:
            raise Conflict(
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request",
                HEADER_PARAM,
            )
        if row.status is None:
            raise Conflict(
                "idempotency_key_in_use", "a request with this Idempotency-Key is still running", HEADER_PARAM
            )
        return Answer(row.status, orjson.loads(self.box.decrypt(row.response)), replayed=True)

    async def _keep(self, ws_id: str, key: str, answer: Answer) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                idempotency_keys.update()
                .where(idempotency_keys.c.workspace_id == ws_id, idempotency_keys.c.key == key)
                .values(status=answer.status, response=self.box.encrypt(orjson.dumps(answer.body).decode()))
            )

    async def _forget(self, ws_id: str, key: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                idempotency_keys.delete().where(
                    idempotency_keys.c.workspace_id == ws_id, idempotency_keys.c.key == key
                )
            )

    async def prune(self) -> int:
        async with self.db.write() as conn:
            result = await conn.execute(
                idempotency_keys.delete().where(idempotency_keys.c.created_at < now_ms() - TTL_MS)
            )
            return int(result.rowcount or 0)
