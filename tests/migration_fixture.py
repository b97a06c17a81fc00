"""A database written by an earlier schema revision, and what the API answered from it.

``tests/data/migrations/<revision>.db`` is a SQLite file built by Mayak at that revision through
its public API (``build``): customers identified, anonymous and linked, merged, in conflict,
erased, with traits, consents, preferences and stages set by the admin API. Next to it,
``<revision>.json`` holds the workspace's keys and every answer of the reads in ``reads``. A later
revision must migrate the file and give the same answers (``tests/test_migrations.py``), which
keeps a schema change honest about existing data.

Build a fixture for the current head (commit both files), when a migration is about to change
tables that hold data:

    .venv/bin/python -m tests.migration_fixture
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import orjson

from mayak.api.app import create_app
from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.migrate import upgrade_async
from mayak.platform import Mayak

FIXTURES = Path(__file__).parent / "data" / "migrations"
SECRET_KEY = "migration-fixture-master-key"  # MAYAK_SECRET_KEY of the fixture's signing secrets

# (name, Segment batch) sent in order, each drained before the next, so merges happen as written.
BATCHES: list[tuple[str, list[dict[str, Any]]]] = [
    (
        "identified",
        [
            {
                "type": "identify",
                "userId": "u-ann",
                "messageId": "m-1",
                "traits": {"email": " Ann@Example.com ", "name": "Ann", "phone": "07700 900123"},
                "context": {"locale": "en-GB", "timezone": "Europe/London"},
                "timestamp": "2026-11-20T10:00:00Z",
            },
            {
                "type": "track",
                "userId": "u-ann",
                "event": "Service Booked",
                "properties": {"car": "Aurora"},
                "messageId": "m-2",
                "timestamp": "2026-11-20T10:05:00Z",
            },
        ],
    ),
    (
        "anonymous, then linked",
        [
            {"type": "page", "anonymousId": "a-bob", "name": "Home", "messageId": "m-3"},
            {"type": "track", "anonymousId": "a-bob", "event": "Viewed", "messageId": "m-4"},
            {
                "type": "identify",
                "userId": "u-bob",
                "anonymousId": "a-bob",
                "traits": {"email": "bob@example.com", "plan": "pro"},
                "messageId": "m-5",
            },
        ],
    ),
    (
        "two anonymous profiles merged into one",
        [
            {"type": "track", "anonymousId": "a-cid-1", "event": "Viewed", "messageId": "m-6"},
            {"type": "track", "anonymousId": "a-cid-2", "event": "Viewed", "messageId": "m-7"},
        ],
    ),
    (
        "one of them identified",
        [
            {
                "type": "identify",
                "userId": "u-cid",
                "anonymousId": "a-cid-2",
                "traits": {"name": "Cid"},
                "messageId": "m-8",
            }
        ],
    ),
    (
        "the other merged into it",
        [{"type": "alias", "userId": "u-cid", "previousId": "a-cid-1", "messageId": "m-9"}],
    ),
    (
        "conflict: Bob's e-mail claimed by another identified person",
        [{"type": "identify", "userId": "u-dan", "traits": {"email": "bob@example.com"}, "messageId": "m10"}],
    ),
    (
        "to be erased",
        [{"type": "identify", "userId": "u-eve", "traits": {"name": "Eve"}, "messageId": "m-11"}],
    ),
]
# Admin writes: (method, path with {user} for the customer whose user id it is, body)
ADMIN: list[tuple[str, str, dict[str, Any]]] = [
    ("PATCH", "/v1/customers/{u-ann}/traits", {"traits": {"vip": True}}),
    ("PATCH", "/v1/customers/{u-ann}/consents", {"consents": {"email": {"marketing": True}}}),
    ("PATCH", "/v1/customers/{u-bob}/preferences", {"preferences": {"language": "en"}}),
    ("PUT", "/v1/customers/{u-bob}/stage", {"stage": "buyer"}),
]
USERS = ("u-ann", "u-bob", "u-cid", "u-dan", "u-eve")
ERASED = "u-eve"


def reads(ids: dict[str, str], merged_away: list[str]) -> list[str]:
    """Every read whose answer the fixture records (paths, given the customers' ids)."""
    paths = ["/v1/customers?limit=50", "/v1/workspace"]
    for user in USERS:
        paths.append(f"/v1/customers?identity=user_id:{user}")
    for user, cid in ids.items():
        paths += [f"/v1/customers/{cid}", f"/v1/customers/{cid}/events?limit=50"]
        if user != ERASED:
            paths.append(f"/v1/customers/{cid}/export")
    paths += [f"/v1/customers/{cid}" for cid in merged_away]
    paths += ["/v1/customers?identity=email:bob@example.com", "/v1/customers?identity=phone:+447700900123"]
    return paths


async def start_client(url: str) -> tuple[Mayak, httpx.AsyncClient]:
    mayak = Mayak(Settings(database_url=url, secret_key=SECRET_KEY), db=Database(url))
    await mayak.start(workers=False)
    transport = httpx.ASGITransport(app=create_app(mayak, manage=False))
    return mayak, httpx.AsyncClient(transport=transport, base_url="http://mayak.test")


async def answers(client: httpx.AsyncClient, secret_key: str, paths: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in paths:
        r = await client.get(path, headers={"Authorization": f"Bearer {secret_key}"})
        found[path] = {"status": r.status_code, "body": r.json()}
    return found


async def build(directory: Path) -> tuple[Path, dict[str, Any]]:
    """Write ``<revision>.db`` and return its path and record (the current code's head revision)."""
    path = directory / "fixture.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_async(url)
    mayak, client = await start_client(url)
    try:
        ws = await mayak.workspaces.create_workspace("Migration fixture", {"default_region": "GB"})
        auth = (ws["write_key"], "")
        admin = {"Authorization": f"Bearer {ws['secret_key']}"}
        for _, batch in BATCHES:
            r = await client.post("/v1/batch", json={"batch": batch}, auth=auth)
            assert r.status_code == 200 and not r.json().get("errors"), r.text
            await mayak.drain()
        ids: dict[str, str] = {}
        for user in USERS:
            r = await client.get(f"/v1/customers?identity=user_id:{user}", headers=admin)
            assert r.status_code == 200, r.text
            ids[user] = r.json()["id"]
        for method, template, body in ADMIN:
            user = template.split("{")[1].split("}")[0]
            target = template.replace(f"{{{user}}}", ids[user])
            r = await client.request(method, target, json=body, headers=admin)
            assert r.status_code == 200, r.text
        await mayak.drain()
        r = await client.delete(f"/v1/customers/{ids[ERASED]}", headers=admin)
        assert r.status_code == 200, r.text
        await mayak.drain()
        with contextlib.closing(sqlite3.connect(path)) as plain:
            merged_away = [
                row[0] for row in plain.execute("SELECT id FROM customers WHERE merged_into IS NOT NULL")
            ]
            revision = str(plain.execute("SELECT version_num FROM alembic_version").fetchone()[0])
        paths = reads(ids, merged_away)
        record = {
            "revision": revision,
            "keys": {"write": ws["write_key"], "secret": ws["secret_key"]},
            "ids": ids,
            "merged_away": merged_away,
            "answers": await answers(client, ws["secret_key"], paths),
        }
    finally:
        await client.aclose()
        await mayak.close()
    assert merged_away, "the fixture must hold a merged-away customer"
    with contextlib.closing(sqlite3.connect(path)) as plain:
        plain.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        plain.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        plain.execute("VACUUM")
    return path, record


async def _main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path, record = await build(Path(tmp))
        name = record["revision"]
        shutil.copy(path, FIXTURES / f"{name}.db")
        (FIXTURES / f"{name}.json").write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
        print(f"wrote {FIXTURES / name}.db and .json ({len(record['answers'])} answers)", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(_main())
