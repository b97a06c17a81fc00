"""Migrations build exactly the schema the code declares, on every backend."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from pathlib import Path
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


FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.db"))


@pytest.mark.contract
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
async def test_a_database_from_an_earlier_revision_answers_the_same_after_upgrade(
    backend: str, fixture: str, tmp_path: Any
) -> None:
    """Data written through the API by an earlier revision (tests/migration_fixture.py; on
    PostgreSQL its rows copied into a schema at that revision) is upgraded to head; every recorded
    read answers as it did, and the data goes on working: a known person's next event reaches
    their profile, an erased person's is dropped."""
    url = await _copy_at_head(backend, fixture, tmp_path)
    await _answers_as_recorded(fixture, url)


@pytest.mark.contract
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
async def test_a_downgrade_to_the_fixtures_revision_and_back_keeps_the_data(
    backend: str, fixture: str, tmp_path: Any
) -> None:
    """Upgrade, downgrade to the revision that wrote the fixture, upgrade again: every recorded read
    still answers as it did (nothing the downgrades rebuild is lost on the way)."""
    url = await _copy_at_head(backend, fixture, tmp_path)
    await asyncio.to_thread(command.downgrade, alembic_config(url), fixture)
    await upgrade_async(url)
    await _answers_as_recorded(fixture, url)


async def _copy_at_head(backend: str, fixture: str, tmp_path: Any) -> str:
    """The fixture's data on ``backend`` (sqlite or postgres), upgraded to head; returns its URL."""
    if backend == "sqlite":
        return await _upgraded_copy(fixture, tmp_path)
    return await _pg_upgraded_copy(fixture, tmp_path)


async def _upgraded_copy(fixture: str, tmp_path: Any) -> str:
    """A copy of the SQLite fixture, upgraded to head; returns its URL."""
    path = tmp_path / "old.db"
    shutil.copy(FIXTURES / f"{fixture}.db", path)
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_async(url)
    return url


async def _pg_upgraded_copy(fixture: str, tmp_path: Any) -> str:
    """A fresh PostgreSQL schema at the fixture's revision, filled with its rows, upgraded to head;
    returns its URL."""
    url = await asyncio.to_thread(_url, "postgresql", tmp_path)
    await upgrade_async(url, fixture)
    await _copy_rows(FIXTURES / f"{fixture}.db", url)
    await upgrade_async(url)
    return url


async def _copy_rows(source: Path, url: str) -> None:
    """Every row of a SQLite fixture into the same tables on PostgreSQL (same revision), with the
    sequences moved past the copied numbers."""
    from mayak.db.database import Database

    with contextlib.closing(sqlite3.connect(source)) as lite:
        names = [
            r[0]
            for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith("sqlite_") and r[0] != "alembic_version"
        ]
        rows = {name: lite.execute(f"SELECT * FROM {name}") for name in names}
        data = {name: ([d[0] for d in cur.description], cur.fetchall()) for name, cur in rows.items()}
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            tables = await conn.run_sync(lambda sync: _reflect(sync, names))
            for name, (columns, values) in data.items():
                table = tables[name]
                if not values:
                    continue
                await conn.execute(
                    table.insert(), [_pg_row(table, dict(zip(columns, row, strict=True))) for row in values]
                )
            for table, column in (("events", "seq"),):
                await conn.execute(
                    sa.text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                        f"(SELECT max({column}) FROM {table}))"
                    )
                )
    finally:
        await db.dispose()


def _reflect(conn: Any, names: list[str]) -> dict[str, sa.Table]:
    meta = sa.MetaData()
    meta.reflect(conn, only=names)
    return dict(meta.tables)


def _pg_row(table: sa.Table, row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in row.items():
        kind = table.c[name].type
        if value is not None and isinstance(kind, sa.JSON):  # JSONB reflects as a JSON subtype
            value = orjson.loads(value)
        elif value is not None and isinstance(kind, sa.Boolean):
            value = bool(value)
        out[name] = value
    return out


async def _answers_as_recorded(fixture: str, url: str) -> None:
    record = orjson.loads((FIXTURES / f"{fixture}.json").read_bytes())
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
