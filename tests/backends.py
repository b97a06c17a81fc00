"""A reusable ``backend_db`` fixture: a fresh, empty ``Database`` on SQLite and on PostgreSQL.

Import it into a test module (``from tests.backends import backend_db``) and every test that takes
``backend_db`` runs twice. PostgreSQL needs ``MAYAK_TEST_POSTGRES_URL`` (for example
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``); without it the PostgreSQL case is skipped,
or fails when ``MAYAK_REQUIRE_SERVICES=1`` (CI).

Each PostgreSQL test gets its own throw-away database (``CREATE DATABASE``, dropped afterwards), so
tests never see each other's rows, runs in parallel do not collide, and ``backend_db.url`` can be
opened again to simulate a restart.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from mayak.db.database import Database
from mayak.db.schema import workspaces

POSTGRES_URL_ENV = "MAYAK_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")
BARE_WORKSPACES = ("ws_1", "ws_2")


def postgres_url() -> str:
    """The configured server, or skip (fail under ``MAYAK_REQUIRE_SERVICES=1``) when there is none."""
    url = os.environ.get(POSTGRES_URL_ENV, "")
    if url:
        return url
    reason = (
        f"PostgreSQL tests need {POSTGRES_URL_ENV} (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test)"
    )
    if os.environ.get("MAYAK_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; MAYAK_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(reason)


def _plain_dsn(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def create_postgres_database() -> tuple[str, str]:
    """Create an empty database on the configured server; returns (async URL, database name)."""
    base = postgres_url()
    name = f"mayak_t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(_plain_dsn(base))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    async_url = make_url(base).set(drivername="postgresql+asyncpg", database=name)
    return async_url.render_as_string(hide_password=False), name


async def drop_postgres_database(name: str) -> None:
    conn = await asyncpg.connect(_plain_dsn(postgres_url()))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=BACKENDS)
async def backend_db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Database]:
    """A database with the schema created and two bare workspaces, ``ws_1`` and ``ws_2`` (rows
    only: no keys or settings, for tests that write rows of their own), disposed (and dropped, on
    PostgreSQL) afterwards."""
    pg_name: str | None = None
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    else:
        url, pg_name = await create_postgres_database()
        db = Database(url, pool_size=5)
    try:
        await db.create_all()
        async with db.write() as conn:
            await conn.execute(
                workspaces.insert(),
                [
                    {"id": ws_id, "name": ws_id, "settings": {}, "created_at": 0, "number": number}
                    for number, ws_id in enumerate(BARE_WORKSPACES, start=1)
                ],
            )
        yield db
    finally:
        await db.dispose()
        if pg_name is not None:
            await drop_postgres_database(pg_name)
