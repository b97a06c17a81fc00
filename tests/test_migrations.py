"""Migrations build exactly the schema the code declares, on every backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from mayak.db.migrate import alembic_config, upgrade
from tests.conftest import POSTGRES_URL, need_service

pytestmark = pytest.mark.contract


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


def test_upgrade_matches_models_and_is_repeatable(backend: str, tmp_path: Any) -> None:
    url = _url(backend, tmp_path)
    upgrade(url)
    upgrade(url)  # a second run is a no-op
    command.check(alembic_config(url))  # raises if the models and the migrated schema differ
