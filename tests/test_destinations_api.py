"""The destinations admin API end to end: create, ingest an event, deliver it signed, inspect the log."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from mayak.delivery import webhooks
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import admin, write_auth

pytestmark = pytest.mark.contract


async def test_destination_lifecycle_and_delivery(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    received: list[httpx.Request] = []
    secret = ""

    def receiver(request: httpx.Request) -> httpx.Response:
        webhooks.verify(secret, request.headers, request.content)
        received.append(request)
        return httpx.Response(503 if len(received) == 1 else 204)

    mock = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    mayak.destinations.client = mock
    try:
        r = await client.post(
            "/v1/destinations",
            json={"name": "CRM", "url": "https://crm.example/hook", "event_types": ["track"]},
            headers=admin(ws),
        )
        assert r.status_code == 201, r.text
        dest = r.json()
        secret = dest["signing_secret"]
        assert dest["event_types"] == ["track"] and dest["event_names"] == []

        r = await client.get("/v1/destinations", headers=admin(ws))
        assert r.json() == {
            "items": [{k: v for k, v in dest.items() if k != "signing_secret"}],
            "next_cursor": None,
        }
        r = await client.get(f"/v1/destinations/{dest['id']}", headers=admin(ws))
        assert r.status_code == 200 and "signing_secret" not in r.json()

        r = await client.post(
            "/v1/track",
            json={"userId": "u1", "event": "Order Completed", "properties": {"total": 10}},
            auth=write_auth(ws),
        )
        assert r.status_code == 200, r.text
        await client.post("/v1/identify", json={"userId": "u1", "traits": {"a": 1}}, auth=write_auth(ws))
        await mayak.drain()  # the first attempt answers 503; its retry may or may not be due yet
        while await mayak.outbox.run_once(now=now_ms() + 3_600_000):
            pass
        r = await client.get(f"/v1/destinations/{dest['id']}/deliveries", headers=admin(ws))
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == 1  # the identify was filtered out
        r = await client.get(
            f"/v1/destinations/{dest['id']}/deliveries", params={"status": "sent"}, headers=admin(ws)
        )
        [delivery] = r.json()["items"]
        assert delivery["event"]["name"] == "Order Completed" and delivery["event"]["customer_id"].startswith(
            "cus_"
        )
        assert [q.headers["webhook-id"] for q in received] == [delivery["id"]] * 2
        assert orjson.loads(received[-1].content)["data"]["payload"]["properties"] == {"total": 10}

        r = await client.get(f"/v1/deliveries/{delivery['id']}/attempts", headers=admin(ws))
        assert [(a["attempt"], a["status_code"]) for a in r.json()["items"]] == [(1, 503), (2, 204)]
        assert r.json()["next_cursor"] is None

        r = await client.delete(f"/v1/destinations/{dest['id']}", headers=admin(ws))
        assert r.json() == {"id": dest["id"], "deleted": True}
        r = await client.get(f"/v1/destinations/{dest['id']}", headers=admin(ws))
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    finally:
        await mock.aclose()


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"name": "x", "url": "ftp://x.example"}, "invalid_url", "$.url"),
        (
            {"name": "x", "url": "https://x.example", "event_names": ["a", ""]},
            "invalid_event_names",
            "$.event_names[1]",
        ),
        ({"name": "x", "url": "https://x.example", "colour": "red"}, "invalid_parameter", "$.colour"),
        ({"url": "https://x.example"}, "invalid_parameter", "$.name"),
    ],
)
async def test_create_errors_are_flat(
    client: httpx.AsyncClient, ws: dict[str, Any], body: dict[str, Any], code: str, param: str
) -> None:
    r = await client.post("/v1/destinations", json=body, headers=admin(ws))
    assert r.status_code == 400
    assert r.json() == r.json() | {"type": "invalid_request", "code": code, "param": param}


async def test_needs_a_secret_key(client: httpx.AsyncClient, ws: dict[str, Any]) -> None:
    r = await client.get("/v1/destinations", auth=write_auth(ws))
    assert r.status_code == 403 and r.json()["code"] == "secret_key_required"
    r = await client.get("/v1/deliveries/obx_unknown/attempts", headers=admin(ws))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = await client.get("/v1/destinations/dst_unknown/deliveries", params={"limit": 0}, headers=admin(ws))
    assert r.status_code == 400 and r.json()["code"] == "invalid_limit"


async def test_openapi_documents_the_routes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "DestinationCreate" in spec["components"]["schemas"]
    for path in (
        "/v1/destinations",
        "/v1/destinations/{destination_id}/deliveries",
        "/v1/deliveries/{delivery_id}/attempts",
    ):
        assert path in spec["paths"], path
