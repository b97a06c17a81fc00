"""Migrations build exactly the schema the code declares, on every backend."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from alembic import command

from mayak.db.migrate import alembic_config, upgrade, upgrade_async
from tests.conftest import POSTGRES_URL, need_service
from tests.migration_fixture import FIXTURES, answers, start_client


def _url(backend: str, tmp_path: Any) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/migrated.db"
    need_service("PostgreSQL", bool(POSTGRES_URL), "MAYAK_TEST_POSTGRES_URL is not set")
    from mayak.db.database import Database

    async def reset() -> None:
        db = Database(POSTGRES_URL)
        async with db.engine.begin() as conn:
            await conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(sa.text("CREATE SCHEMA public"))
        await db.dispose()

    asyncio.run(reset())
    return POSTGRES_URL


@pytest.mark.contract
def test_upgrade_matches_models_and_is_repeatable(backend: str, tmp_path: Any) -> None:
    url = _url(backend, tmp_path)
    upgrade(url)
    upgrade(url)  # a second run is a no-op
    command.check(alembic_config(url))  # raises if the models and the migrated schema differ


VOLATILE = frozenset({"exported_at"})  # the time of the request, not data


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


@pytest.mark.parametrize("fixture", sorted(p.stem for p in FIXTURES.glob("*.db")))
async def test_a_database_from_an_earlier_revision_answers_the_same_after_upgrade(
    fixture: str, tmp_path: Any
) -> None:
    """A SQLite file written through the API by an earlier revision (tests/migration_fixture.py)
    is upgraded to head; every recorded read answers as it did, and the data goes on working:
    a known person's next event reaches their profile, an erased person's is dropped."""
    record = orjson.loads((FIXTURES / f"{fixture}.json").read_bytes())
    path = tmp_path / "old.db"
    shutil.copy(FIXTURES / f"{fixture}.db", path)
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_async(url)
    mayak, client = await start_client(url)
    try:
        found = await answers(client, record["keys"]["secret"], list(record["answers"]))
        for read, expected in record["answers"].items():
            assert _stable(found[read]) == _stable(expected), read
        admin = {"Authorization": f"Bearer {record['keys']['secret']}"}
        batch = [
            {"type": "track", "userId": "u-ann", "event": "After Upgrade", "messageId": "m-after-1"},
            {"type": "track", "userId": "u-eve", "event": "After Upgrade", "messageId": "m-after-2"},
            {"type": "track", "userId": "u-ann", "event": "After Upgrade", "messageId": "m-1"},  # seen
        ]
        r = await client.post("/v1/batch", json={"batch": batch}, auth=(record["keys"]["write"], ""))
        assert r.status_code == 200, r.text
        await mayak.drain()
        ann = record["ids"]["u-ann"]
        r = await client.get(f"/v1/customers/{ann}/events", params={"name": "After Upgrade"}, headers=admin)
        assert len(r.json()["items"]) == 1  # the resent messageId m-1 was a duplicate
        r = await client.get("/v1/customers", params={"identity": "user_id:u-eve"}, headers=admin)
        assert r.status_code == 404  # still erased: the suppression survived
    finally:
        await client.aclose()
        await mayak.close()
