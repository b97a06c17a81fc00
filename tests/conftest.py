"""Shared fixtures: a Mayak on a fresh database per test, an in-process HTTP client, a workspace.

Backends: every test using ``mayak`` runs on SQLite; tests marked ``contract`` also run on PostgreSQL
when ``MAYAK_TEST_POSTGRES_URL`` is set. In CI ``MAYAK_REQUIRE_SERVICES=1`` turns a missing
service into a failure instead of a skip.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mayak.api.app import create_app
from mayak.config import Settings
from mayak.db.database import Database
from mayak.platform import Mayak

POSTGRES_URL = os.environ.get("MAYAK_TEST_POSTGRES_URL", "")
REQUIRE_SERVICES = os.environ.get("MAYAK_REQUIRE_SERVICES") == "1"


def need_service(name: str, available: bool, reason: str) -> None:
    if available:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is required here (MAYAK_REQUIRE_SERVICES=1) but {reason}")
    pytest.skip(f"{name} not available: {reason}")


async def fresh_database(backend: str, tmp_path: Any) -> Database:
    if backend == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path}/mayak.db")
    else:
        need_service("PostgreSQL", bool(POSTGRES_URL), "MAYAK_TEST_POSTGRES_URL is not set")
        db = Database(POSTGRES_URL, pool_size=5)
        async with db.engine.begin() as conn:
            await conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(sa.text("CREATE SCHEMA public"))
    await db.create_all()
    return db


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        backends = (
            ["sqlite", "postgres"] if metafunc.definition.get_closest_marker("contract") else ["sqlite"]
        )
        metafunc.parametrize("backend", backends, indirect=False)
    if "pipeline_mode" in metafunc.fixturenames:
        # Profiles are built inline (in the appending transaction) when the lane is caught up, and by
        # the background lane otherwise: tests of profile rules run both ways.
        modes = ["inline", "lane"] if metafunc.definition.get_closest_marker("both_modes") else ["inline"]
        metafunc.parametrize("pipeline_mode", modes)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "contract: run against every storage backend")
    config.addinivalue_line("markers", "both_modes: run with inline processing and with the background lane")


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/mayak.db",
        secret_key="test-master-key",
        outbox_base_delay_ms=10,
        outbox_max_attempts=3,
    )


@pytest.fixture
async def mayak(backend: str, pipeline_mode: str, settings: Settings, tmp_path: Any) -> AsyncIterator[Mayak]:
    db = await fresh_database(backend, tmp_path)
    m = Mayak(dataclasses.replace(settings, inline_pipeline=pipeline_mode == "inline"), db=db)
    await m.start(workers=False)
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture
async def client(mayak: Mayak) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(mayak, manage=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mayak.test") as c:
        yield c


@pytest.fixture
async def ws(mayak: Mayak) -> dict[str, Any]:
    return await mayak.workspaces.create_workspace("Test Workspace", {"default_region": "GB"})


def write_auth(ws: dict[str, Any]) -> tuple[str, str]:
    return (ws["write_key"], "")


def admin(ws: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {ws['secret_key']}"}
