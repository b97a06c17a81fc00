"""Signed inbound hooks end to end: create, sign, deliver, dedup, refusals; integration secrets API."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from mayak.db.schema import events, signing_secrets
from mayak.delivery import webhooks
from mayak.platform import Mayak
from tests.conftest import admin

pytestmark = pytest.mark.contract

CRM_MAPPING = {
    "event": "Service Completed",
    "identity": {"kind": "crm_id", "path": "$.customer.id"},
    "properties_path": "$.data",
    "timestamp_path": "$.occurred_at",
}


async def create_hook(
    client: httpx.AsyncClient, ws: dict[str, Any], mapping: dict[str, Any] | None = None
) -> dict[str, Any]:
    r = await client.post(
        "/v1/hooks", json={"name": "Service desk", "mapping": mapping or CRM_MAPPING}, headers=admin(ws)
    )
    assert r.status_code == 201, r.text
    hook: dict[str, Any] = r.json()
    return hook


async def deliver(
    client: httpx.AsyncClient,
    hook: dict[str, Any],
    body: Any,
    *,
    msg_id: str = "msg_1",
    ts: int | None = None,
    secret: str | None = None,
    raw: bytes | None = None,
) -> httpx.Response:
    content = raw if raw is not None else orjson.dumps(body)
    headers = webhooks.headers(secret or hook["signing_secret"], msg_id, content, now_s=ts)
    headers["content-type"] = "application/json"
    return await client.post(hook["path"], content=content, headers=headers)


async def test_hook_lifecycle_delivery_and_dedup(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    hook = await create_hook(client, ws)
    assert hook["id"].startswith("hook_") and hook["path"] == f"/v1/hooks/{hook['id']}"
    assert hook["signing_secret"].startswith("whsec_")
    assert hook["mapping"] == CRM_MAPPING
    public = {k: v for k, v in hook.items() if k != "signing_secret"}
    r = await client.get("/v1/hooks", headers=admin(ws))
    assert r.json() == {"items": [public], "next_cursor": None}
    r = await client.get(f"/v1/hooks/{hook['id']}", headers=admin(ws))
    assert r.json() == public

    body = {
        "customer": {"id": 42, "name": "Ann"},
        "data": {"car": "VW Golf", "mileage": 60000},
        "occurred_at": "2026-01-02T03:04:05Z",
    }
    first = await deliver(client, hook, body, msg_id="svc-1")
    assert first.status_code == 200, first.text
    assert first.json()["duplicate"] is False and first.json()["event_id"].startswith("evt_")
    again = await deliver(client, hook, body, msg_id="svc-1")  # the sender retried: new timestamp
    assert again.status_code == 200 and again.json() == {"success": True, "duplicate": True, "event_id": None}
    await mayak.drain()

    r = await client.get("/v1/customers", params={"identity": "crm_id:42"}, headers=admin(ws))
    assert r.status_code == 200, r.text
    customer = r.json()
    assert {"kind": "crm_id", "value": "42"} in [
        {"kind": i["kind"], "value": i["value"]} for i in customer["identities"]
    ]
    r = await client.get(f"/v1/customers/{customer['id']}/events", headers=admin(ws))
    [event] = r.json()["items"]
    assert event["id"] == first.json()["event_id"]
    assert (event["type"], event["name"], event["source"]) == ("track", "Service Completed", "hook")
    assert event["actor"] == hook["id"]
    assert event["timestamp"] == "2026-01-02T03:04:05.000Z"
    payload = event["payload"]
    assert payload["properties"] == {"car": "VW Golf", "mileage": 60000}
    assert payload["context"]["externalIds"] == [{"type": "crm_id", "id": "42"}]
    assert payload["context"]["hook"] == {"id": hook["id"], "name": "Service desk", "webhook_id": "svc-1"}
    assert payload["originalTimestamp"] == "2026-01-02T03:04:05Z"

    async with mayak.db.read() as conn:
        stored = (
            await conn.execute(sa.select(sa.func.count()).where(events.c.source == "hook"))
        ).scalar_one()
    assert stored == 1

    # a second delivery with another id is another event on the same customer
    r = await deliver(client, hook, body | {"customer": {"id": "42"}}, msg_id="svc-2")
    assert r.json()["duplicate"] is False
    await mayak.drain()
    r = await client.get(f"/v1/customers/{customer['id']}/events", headers=admin(ws))
    assert len(r.json()["items"]) == 2

    r = await client.delete(f"/v1/hooks/{hook['id']}", headers=admin(ws))
    assert r.json() == {"id": hook["id"], "deleted": True}
    r = await deliver(client, hook, body, msg_id="svc-3")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = await client.get(f"/v1/hooks/{hook['id']}", headers=admin(ws))
    assert r.status_code == 404
    async with mayak.db.read() as conn:
        purposes = [r[0] for r in await conn.execute(sa.select(signing_secrets.c.purpose))]
    assert "hook" not in purposes


async def test_event_path_user_id_email_and_time(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    by_user = await create_hook(
        client,
        ws,
        {"event_path": "$.type", "identity": {"kind": "user_id", "path": "$.user['id']"}},
    )
    r = await deliver(client, by_user, {"type": "order.shipped", "user": {"id": "u-7"}, "eta": 3})
    assert r.status_code == 200, r.text
    by_email = await create_hook(
        client,
        ws,
        {
            "event": "Ticket Closed",
            "identity": {"kind": "email", "path": "$.requester.emails[0]"},
            "timestamp_path": "$.at",
        },
    )
    future = int(time.time()) + 86_400
    r = await deliver(client, by_email, {"requester": {"emails": [" Ann@Example.COM "]}, "at": future})
    assert r.status_code == 200, r.text
    await mayak.drain()

    r = await client.get("/v1/customers", params={"identity": "user_id:u-7"}, headers=admin(ws))
    cus = r.json()
    r = await client.get(f"/v1/customers/{cus['id']}/events", headers=admin(ws))
    [event] = r.json()["items"]
    assert event["name"] == "order.shipped" and event["payload"]["userId"] == "u-7"
    assert event["payload"]["properties"] == {"type": "order.shipped", "user": {"id": "u-7"}, "eta": 3}

    r = await client.get("/v1/customers", params={"identity": "email:ann@example.com"}, headers=admin(ws))
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/customers/{r.json()['id']}/events", headers=admin(ws))
    [event] = r.json()["items"]
    assert event["timestamp"] == event["received_at"]  # a future time is clamped to the receipt


@pytest.mark.parametrize(
    ("mapping", "param"),
    [
        ({"event": "X"}, "$.mapping.identity"),
        ({"event": "X", "identity": {"kind": "crm_id", "path": "customer.id"}}, "$.mapping.identity.path"),
        ({"event": "X", "identity": {"kind": "crm_id", "path": "$.a[x]"}}, "$.mapping.identity.path"),
        ({"event": "X", "identity": {"kind": "CRM id", "path": "$.id"}}, "$.mapping.identity.kind"),
        ({"event": "X", "identity": {"kind": "crm_id", "path": "$.id", "x": 1}}, "$.mapping.identity.x"),
        ({"identity": {"kind": "crm_id", "path": "$.id"}}, "$.mapping.event"),
        (
            {"event": "X", "event_path": "$.t", "identity": {"kind": "crm_id", "path": "$.id"}},
            "$.mapping.event",
        ),
        ({"event": "", "identity": {"kind": "crm_id", "path": "$.id"}}, "$.mapping.event"),
        ({"event": "X", "identity": {"kind": "crm_id", "path": "$.id"}, "extra": 1}, "$.mapping.extra"),
        (
            {"event": "X", "identity": {"kind": "crm_id", "path": "$.id"}, "timestamp_path": "$."},
            "$.mapping.timestamp_path",
        ),
        (
            {"event": "X", "identity": {"kind": "crm_id", "path": "$.id"}, "properties_path": 3},
            "$.mapping.properties_path",
        ),
    ],
)
async def test_create_refuses_bad_mappings(
    client: httpx.AsyncClient, ws: dict[str, Any], mapping: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/hooks", json={"name": "x", "mapping": mapping}, headers=admin(ws))
    assert r.status_code == 400, r.text
    assert (r.json()["code"], r.json()["param"]) == ("invalid_mapping", param)


async def test_create_shape_errors_idempotency_and_auth(
    client: httpx.AsyncClient, ws: dict[str, Any]
) -> None:
    r = await client.post("/v1/hooks", json={"mapping": CRM_MAPPING}, headers=admin(ws))
    assert r.status_code == 400 and r.json()["param"] == "$.name"
    r = await client.post("/v1/hooks", json={"name": "x", "mapping": CRM_MAPPING})
    assert r.status_code == 401
    r = await client.post(
        "/v1/hooks",
        json={"name": "x", "mapping": CRM_MAPPING},
        headers={"Authorization": f"Bearer {ws['write_key']}"},
    )
    assert r.status_code == 403

    headers = admin(ws) | {"Idempotency-Key": "create-hook-1"}
    first = await client.post("/v1/hooks", json={"name": "x", "mapping": CRM_MAPPING}, headers=headers)
    second = await client.post("/v1/hooks", json={"name": "x", "mapping": CRM_MAPPING}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json() and second.headers["Idempotent-Replayed"] == "true"
    r = await client.get("/v1/hooks", headers=admin(ws))
    assert len(r.json()["items"]) == 1


async def test_signature_and_replay_window(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    hook = await create_hook(client, ws)
    other = await create_hook(client, ws)
    body = {"customer": {"id": 1}, "data": {}}
    now = int(time.time())

    r = await deliver(client, hook, body, secret=other["signing_secret"])
    assert (r.status_code, r.json()["code"]) == (401, "invalid_signature")
    content = orjson.dumps(body)
    headers = webhooks.headers(hook["signing_secret"], "m1", content)
    r = await client.post(hook["path"], content=content + b" ", headers=headers)  # body changed in transit
    assert (r.status_code, r.json()["code"]) == (401, "invalid_signature")
    r = await client.post(hook["path"], content=content)
    assert (r.status_code, r.json()["code"]) == (401, "missing_signature_headers")
    for ts in (now - 301, now + 301):
        r = await deliver(client, hook, body, ts=ts)
        assert (r.status_code, r.json()["code"]) == (401, "signature_timestamp_out_of_window")
    r = await deliver(client, hook, body, ts=now - 200)  # inside the window
    assert r.status_code == 200, r.text

    r = await deliver(client, hook | {"path": "/v1/hooks/hook_01NOPE"}, body)
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = await deliver(client, hook | {"path": "/v1/hooks/dst_01NOPE"}, body)
    assert r.status_code == 404
    await mayak.drain()
    async with mayak.db.read() as conn:
        stored = (
            await conn.execute(sa.select(sa.func.count()).where(events.c.source == "hook"))
        ).scalar_one()
    assert stored == 1


async def test_body_and_mapping_refusals(client: httpx.AsyncClient, ws: dict[str, Any]) -> None:
    hook = await create_hook(
        client,
        ws,
        {
            "event_path": "$.kind",
            "identity": {"kind": "crm_id", "path": "$.customer.id"},
            "properties_path": "$.data",
            "timestamp_path": "$.at",
        },
    )
    r = await deliver(client, hook, None, raw=b'{"customer": ')
    assert (r.status_code, r.json()["code"], r.json()["param"]) == (400, "invalid_json", "$")
    cases: list[tuple[Any, int, str, str]] = [
        ({"kind": "x", "customer": {}}, 400, "identity_missing", "$.customer.id"),
        ({"kind": "x"}, 400, "identity_missing", "$.customer.id"),
        ({"kind": "x", "customer": {"id": {"a": 1}}}, 400, "invalid_identity", "$.customer.id"),
        ({"customer": {"id": 1}}, 400, "event_name_missing", "$.kind"),
        ({"kind": 5, "customer": {"id": 1}}, 400, "invalid_event_name", "$.kind"),
        ({"kind": "x", "customer": {"id": 1}, "data": [1]}, 400, "invalid_properties", "$.data"),
        ({"kind": "x", "customer": {"id": 1}, "at": "yesterday"}, 400, "invalid_timestamp", "$.at"),
        ([1, 2], 400, "identity_missing", "$.customer.id"),
        ({"kind": "x", "customer": {"id": 1}, "data": {"b": "x" * 40_000}}, 413, "event_too_large", "$.data"),
    ]
    for i, (body, status, code, param) in enumerate(cases):
        r = await deliver(client, hook, body, msg_id=f"bad-{i}")
        assert (r.status_code, r.json()["code"], r.json()["param"]) == (status, code, param), (body, r.text)
    # a refused delivery did not use up its webhook-id: the fixed message goes through
    r = await deliver(client, hook, {"kind": "x", "customer": {"id": 1}}, msg_id="bad-0")
    assert r.status_code == 200 and r.json()["duplicate"] is False

    email_hook = await create_hook(client, ws, {"event": "E", "identity": {"kind": "email", "path": "$.e"}})
    r = await deliver(client, email_hook, {"e": "not an address"})
    assert (r.status_code, r.json()["code"], r.json()["param"]) == (400, "invalid_identity", "$.e")


async def test_other_workspace_cannot_see_or_delete(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    hook = await create_hook(client, ws)
    other = await mayak.workspaces.create_workspace("Other", {"default_region": "GB"})
    r = await client.get("/v1/hooks", headers=admin(other))
    assert r.json()["items"] == []
    r = await client.get(f"/v1/hooks/{hook['id']}", headers=admin(other))
    assert r.status_code == 404
    r = await client.delete(f"/v1/hooks/{hook['id']}", headers=admin(other))
    assert r.status_code == 404
    r = await deliver(client, hook, {"customer": {"id": 5}, "data": {}})
    assert r.status_code == 200  # still there
    await mayak.drain()
    r = await client.get("/v1/customers", params={"identity": "crm_id:5"}, headers=admin(other))
    assert r.status_code == 404
    r = await client.get("/v1/customers", params={"identity": "crm_id:5"}, headers=admin(ws))
    assert r.status_code == 200


async def test_integration_secrets_api(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    r = await client.put("/v1/secrets/dms_token", json={"value": "s3cr3t-1"}, headers=admin(ws))
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "dms_token" and r.json()["created_at"].endswith("Z")
    r = await client.put("/v1/secrets/dms_token", json={"value": "s3cr3t-2"}, headers=admin(ws))
    assert r.status_code == 200
    await client.put("/v1/secrets/crm.key", json={"value": "k"}, headers=admin(ws))
    r = await client.get("/v1/secrets", headers=admin(ws))
    assert [s["name"] for s in r.json()["items"]] == ["crm.key", "dms_token"]
    assert "s3cr3t" not in r.text and "value" not in r.json()["items"][0]
    async with mayak.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(signing_secrets.c.ciphertext).where(
                    signing_secrets.c.purpose == "integration:dms_token"
                )
            )
        ).all()
    assert len(rows) == 1 and "s3cr3t" not in rows[0][0]  # newest only, encrypted
    from mayak.integrations.calls import integrations

    assert await integrations(mayak).secrets.resolve(ws["id"], ["dms_token"]) == {"dms_token": "s3cr3t-2"}

    other = await mayak.workspaces.create_workspace("Other", {"default_region": "GB"})
    r = await client.get("/v1/secrets", headers=admin(other))
    assert r.json()["items"] == []
    r = await client.delete("/v1/secrets/dms_token", headers=admin(other))
    assert r.status_code == 404

    r = await client.delete("/v1/secrets/dms_token", headers=admin(ws))
    assert r.json() == {"name": "dms_token", "deleted": True}
    r = await client.delete("/v1/secrets/dms_token", headers=admin(ws))
    assert r.status_code == 404
    for bad in ("has space", "x" * 29, "-lead"):
        r = await client.put(f"/v1/secrets/{bad}", json={"value": "v"}, headers=admin(ws))
        assert (r.status_code, r.json()["code"]) == (400, "invalid_secret_name"), bad
    r = await client.put("/v1/secrets/ok", json={"value": ""}, headers=admin(ws))
    assert r.status_code == 400 and r.json()["param"] == "$.value"
    r = await client.put("/v1/secrets/ok", json={"value": "v"})
    assert r.status_code == 401
