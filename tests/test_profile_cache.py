"""The pipeline's cache of identity and profile rows (SQLite): used, and never stale."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mayak.db.database import Database
from mayak.pipeline.cache import ProfileCache
from mayak.platform import Mayak
from tests.conftest import admin, write_auth
from tests.test_bots_conversations import recorded_sql


async def send(client: httpx.AsyncClient, ws: dict[str, Any], *events: dict[str, Any]) -> None:
    r = await client.post("/v1/batch", json={"batch": list(events)}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == len(events), r.json()


async def profile(client: httpx.AsyncClient, ws: dict[str, Any], identity: str) -> dict[str, Any]:
    r = await client.get("/v1/customers", params={"identity": identity}, headers=admin(ws))
    assert r.status_code == 200, r.text
    return dict(r.json())


def cache_of(mayak: Mayak) -> ProfileCache:
    assert mayak.db.profile_cache is not None
    return mayak.db.profile_cache


async def test_a_batch_reads_no_row_the_last_one_committed(
    client, mayak: Mayak, ws, monkeypatch: pytest.MonkeyPatch
) -> None:
    await send(client, ws, {"type": "identify", "userId": "u1", "traits": {"email": "ann@example.com"}})
    cache = cache_of(mayak)
    person = await profile(client, ws, "user_id:u1")
    assert cache.identities[(ws["id"], "user_id", "u1")] == person["id"]
    assert cache.identities[(ws["id"], "email", "ann@example.com")] == person["id"]
    assert (ws["id"], person["id"]) in cache.profiles
    reads = recorded_sql(monkeypatch, "fetch")
    await send(client, ws, {"type": "track", "userId": "u1", "event": "Viewed"})
    assert not [q for q in reads if "FROM identities" in q or "FROM customers" in q], reads
    assert (await profile(client, ws, "user_id:u1"))["last_seen"] is not None


async def test_a_rolled_back_batch_leaves_nothing_in_the_cache(
    mayak: Mayak, client, ws, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mayak.pipeline.processor import Pipeline

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(Pipeline, "_save_cursor", broken)
    with pytest.raises(RuntimeError, match="disk is full"):
        await client.post(
            "/v1/batch",
            json={"batch": [{"type": "identify", "userId": "u2", "traits": {"plan": "pro"}}]},
            auth=write_auth(ws),
        )
    assert cache_of(mayak).identities == {} and cache_of(mayak).profiles == {}
    monkeypatch.undo()
    await send(client, ws, {"type": "identify", "userId": "u2", "traits": {"plan": "basic"}})
    assert (await profile(client, ws, "user_id:u2"))["traits"] == {"plan": "basic"}


async def test_another_connections_commit_empties_the_cache(client, mayak: Mayak, ws) -> None:
    """Another process changed the row: the next batch must build on that row, not on the cached
    one (writing the cached traits back would undo the other writer's change)."""
    await send(client, ws, {"type": "identify", "userId": "u3", "traits": {"plan": "free"}})
    person = await profile(client, ws, "user_id:u3")
    other = Database(mayak.db.url)
    try:
        async with other.engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE customers SET traits = :t WHERE id = :id"),
                {"t": '{"plan": "gold"}', "id": person["id"]},
            )
    finally:
        await other.engine.dispose()
    await send(client, ws, {"type": "track", "userId": "u3", "event": "Viewed"})
    assert (await profile(client, ws, "user_id:u3"))["traits"] == {"plan": "gold"}


async def test_erasure_and_replay_empty_the_cache(client, mayak: Mayak, ws) -> None:
    await send(client, ws, {"type": "identify", "userId": "u4", "traits": {"plan": "free"}})
    person = await profile(client, ws, "user_id:u4")
    cache = cache_of(mayak)
    key = (ws["id"], person["id"])
    before = cache.profiles[key]
    await mayak.customers.replay(ws["id"])  # empties the cache, then rebuilds the profile from the log
    await mayak.drain()
    assert cache.profiles.get(key) is not before
    await send(client, ws, {"type": "track", "userId": "u4", "event": "Viewed"})
    assert cache.profiles[key][0] == person["id"]
    r = await client.delete(f"/v1/customers/{person['id']}", headers=admin(ws))
    assert r.status_code == 200, r.text
    assert not cache.profiles and not cache.identities


def test_the_cache_is_bounded_and_a_rewritten_profile_becomes_the_newest() -> None:
    cache = ProfileCache(max_profiles=2, max_identities=3)
    cache.store("ws", [(("email", f"{i}@x"), f"c{i}") for i in range(5)], [(f"c{i}",) for i in range(2)])
    assert list(cache.identities) == [("ws", "email", "2@x"), ("ws", "email", "3@x"), ("ws", "email", "4@x")]
    cache.forget_profiles("ws", ["c0"])  # rewritten in an open transaction
    assert list(cache.profiles) == [("ws", "c1")]
    cache.store("ws", [], [("c0",), ("c2",)])
    assert list(cache.profiles) == [("ws", "c0"), ("ws", "c2")]
    cache.check("connection", 7)
    assert not cache.profiles and not cache.identities
    cache.store("ws", [], [("c0",)])
    cache.check("connection", 7)  # nobody else committed
    assert cache.profiles
    cache.check("another connection", 7)  # a new write connection: versions are not comparable
    assert not cache.profiles
    assert not ProfileCache(max_profiles=0).enabled
