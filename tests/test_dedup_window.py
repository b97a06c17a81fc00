"""messageId deduplication holds within the window (default 7 days) and not beyond it."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from mayak.db.schema import dedup_keys, events
from mayak.eventlog import prune_dedup_keys
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import write_auth

pytestmark = pytest.mark.contract
DAY = 86_400_000


async def _send(client: Any, ws: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(
        "/v1/track", json={"userId": "u1", "event": "X", "messageId": "m-1"}, auth=write_auth(ws)
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def _age_keys(mayak: Mayak, days: int) -> None:
    async with mayak.db.write() as conn:
        await conn.execute(dedup_keys.update().values(seen_at=now_ms() - days * DAY))


async def test_resend_within_window_is_a_duplicate_and_after_it_is_new(client, mayak: Mayak, ws) -> None:
    assert (await _send(client, ws))["accepted"] == 1
    await _age_keys(mayak, 6)
    assert (await _send(client, ws))["duplicates"] == 1  # six days later: still within the window
    await _age_keys(mayak, 8)
    assert (await _send(client, ws))["accepted"] == 1  # eight days later: a new event
    assert (await _send(client, ws))["duplicates"] == 1  # and the window starts again from now
    async with mayak.db.read() as conn:
        stored = (await conn.execute(sa.select(sa.func.count()).select_from(events))).scalar_one()
    assert stored == 2


async def test_expired_keys_are_pruned(client, mayak: Mayak, ws) -> None:
    await _send(client, ws)
    assert await prune_dedup_keys(mayak.db) == 0
    await _age_keys(mayak, 8)
    assert await prune_dedup_keys(mayak.db) == 1
    async with mayak.db.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(dedup_keys))).scalar_one() == 0


async def test_one_batch_of_new_duplicate_expired_and_repeated_keys(client, mayak: Mayak, ws) -> None:
    """Every kind of key in one request, the duplicate's key stamped in the future (a clock that
    went back): each is judged on its own."""

    def track(mid: str) -> dict[str, Any]:
        return {"type": "track", "userId": "u1", "event": "X", "messageId": mid}

    r = await client.post("/v1/batch", json={"batch": [track("old"), track("dup")]}, auth=write_auth(ws))
    assert r.json()["accepted"] == 2
    async with mayak.db.write() as conn:
        await conn.execute(
            dedup_keys.update().where(dedup_keys.c.key == "mid:old").values(seen_at=now_ms() - 8 * DAY)
        )
        await conn.execute(
            dedup_keys.update().where(dedup_keys.c.key == "mid:dup").values(seen_at=now_ms() + 3_600_000)
        )
    batch = [track("new"), track("dup"), track("old"), track("new")]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert (r.json()["accepted"], r.json()["duplicates"]) == (2, 2), r.json()
    async with mayak.db.read() as conn:
        stored = (await conn.execute(sa.select(sa.func.count()).select_from(events))).scalar_one()
        seen = dict((await conn.execute(sa.select(dedup_keys.c.key, dedup_keys.c.seen_at))).all())
    assert stored == 4
    assert seen["mid:old"] > now_ms() - DAY  # refreshed: the window starts again
