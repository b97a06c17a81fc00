"""Idempotency-Key on POSTs that create something (POST /v1/destinations)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from mayak.db.schema import destinations, idempotency_keys
from mayak.platform import Mayak
from tests.conftest import admin

pytestmark = pytest.mark.contract
BODY = {"name": "CRM", "url": "https://crm.example.com/hooks", "event_types": ["track"]}


def with_key(ws: dict[str, Any], key: str) -> dict[str, str]:
    return admin(ws) | {"Idempotency-Key": key}


async def count(mayak: Mayak, table: sa.Table) -> int:
    async with mayak.db.read() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def test_retry_with_the_same_key_gets_the_first_answer(client, mayak: Mayak, ws) -> None:
    first = await client.post("/v1/destinations", json=BODY, headers=with_key(ws, "create-crm-1"))
    assert first.status_code == 201, first.text
    again = await client.post("/v1/destinations", json=BODY, headers=with_key(ws, "create-crm-1"))
    assert again.status_code == 201
    assert again.json() == first.json()  # the same destination, its signing secret included
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await count(mayak, destinations) == 1
    async with mayak.db.read() as conn:
        stored = (await conn.execute(sa.select(idempotency_keys.c.response))).scalar_one()
    assert first.json()["signing_secret"] not in stored  # kept encrypted


async def test_same_key_for_another_request_is_refused(client, mayak: Mayak, ws) -> None:
    await client.post("/v1/destinations", json=BODY, headers=with_key(ws, "k1"))
    r = await client.post("/v1/destinations", json=BODY | {"name": "Other"}, headers=with_key(ws, "k1"))
    assert r.status_code == 409
    assert (r.json()["code"], r.json()["param"]) == ("idempotency_key_reused", "$.headers.Idempotency-Key")
    assert await count(mayak, destinations) == 1


async def test_keys_are_per_workspace_and_optional(client, mayak: Mayak, ws) -> None:
    other = await mayak.workspaces.create_workspace("Other")
    assert (await client.post("/v1/destinations", json=BODY, headers=with_key(ws, "k"))).status_code == 201
    assert (await client.post("/v1/destinations", json=BODY, headers=with_key(other, "k"))).status_code == 201
    for _ in range(2):
        assert (await client.post("/v1/destinations", json=BODY, headers=admin(ws))).status_code == 201
    assert await count(mayak, destinations) == 4


async def test_a_refused_request_is_replayed_as_refused(client, mayak: Mayak, ws) -> None:
    bad = BODY | {"url": "ftp://nope"}
    first = await client.post("/v1/destinations", json=bad, headers=with_key(ws, "bad-1"))
    again = await client.post("/v1/destinations", json=bad, headers=with_key(ws, "bad-1"))
    assert first.status_code == again.status_code == 400
    assert again.json() == first.json() and first.json()["code"] == "invalid_url"


async def test_invalid_key_and_expiry(client, mayak: Mayak, ws) -> None:
    r = await client.post("/v1/destinations", json=BODY, headers=with_key(ws, "x" * 256))
    assert r.status_code == 400 and r.json()["code"] == "invalid_idempotency_key"
    await client.post("/v1/destinations", json=BODY, headers=with_key(ws, "old"))
    async with mayak.db.write() as conn:
        await conn.execute(idempotency_keys.update().values(created_at=0))
    assert await mayak.idempotency.prune() == 1
    r = await client.post("/v1/destinations", json=BODY, headers=with_key(ws, "old"))
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers
    assert await count(mayak, destinations) == 2


async def test_a_retry_while_the_first_still_runs_is_refused(client, mayak: Mayak, ws) -> None:
    from mayak.idempotency import fingerprint
    from mayak.timeutil import now_ms

    body = b'{"name":"CRM","url":"https://crm.example.com/hooks","event_types":["track"]}'
    async with mayak.db.write() as conn:  # as if the first request were still running
        await conn.execute(
            idempotency_keys.insert().values(
                workspace_id=ws["id"],
                key="busy",
                fingerprint=fingerprint("POST", "/v1/destinations", body),
                created_at=now_ms(),
            )
        )
    r = await client.post(
        "/v1/destinations", content=body, headers=with_key(ws, "busy") | {"Content-Type": "application/json"}
    )
    assert r.status_code == 409 and r.json()["code"] == "idempotency_key_in_use"
