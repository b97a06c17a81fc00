"""The admin API: changes through the log, lists, events, GDPR export and erase, replay."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from mayak.db.schema import customers, events, identities
from mayak.platform import Mayak
from tests.conftest import admin, write_auth
from tests.test_profiles import by_identity, send

pytestmark = [pytest.mark.contract, pytest.mark.both_modes]


def _nest(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"n": value}
    return value


async def test_admin_changes_are_events_with_actor(client, mayak: Mayak, ws) -> None:
    await send(client, ws, {"type": "identify", "userId": "u1", "traits": {"plan": "free"}})
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:u1"))["id"]
    r = await client.patch(f"/v1/customers/{cid}/traits", json={"traits": {"plan": "vip"}}, headers=admin(ws))
    assert r.status_code == 200, r.text
    assert r.json()["traits"]["plan"] == "vip"
    r = await client.put(f"/v1/customers/{cid}/stage", json={"stage": "buyer"}, headers=admin(ws))
    assert r.status_code == 200 and r.json()["stage"] == "buyer"
    r = await client.patch(
        f"/v1/customers/{cid}/consents", json={"consents": {"sms": {"marketing": False}}}, headers=admin(ws)
    )
    assert r.json()["consents"]["sms"]["marketing"]["granted"] is False
    assert r.json()["consents"]["sms"]["marketing"]["source"] == f"admin:{ws['secret_key_id']}"
    r = await client.patch(
        f"/v1/customers/{cid}/preferences",
        json={"preferences": {"preferred_channel": "sms"}},
        headers=admin(ws),
    )
    assert r.json()["preferences"] == {"preferred_channel": "sms"}
    r = await client.get(
        f"/v1/customers/{cid}/events", params={"type": "customer.stage_set"}, headers=admin(ws)
    )
    (stage_event,) = r.json()["items"]
    assert stage_event["actor"] == ws["secret_key_id"] and stage_event["source"] == "admin"


async def test_unknown_stage_is_rejected(client, mayak: Mayak, ws) -> None:
    await send(client, ws, {"type": "identify", "userId": "u1"})
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:u1"))["id"]
    r = await client.put(f"/v1/customers/{cid}/stage", json={"stage": "astronaut"}, headers=admin(ws))
    assert r.status_code == 400 and r.json()["code"] == "unknown_stage" and r.json()["param"] == "$.stage"


async def test_list_filters_and_cursor_pagination(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        *[
            {
                "type": "identify",
                "userId": f"u{i}",
                "traits": {
                    "plan": "pro" if i % 2 else "free",
                    **({"email": f"p{i}@example.com"} if i < 3 else {}),
                },
            }
            for i in range(7)
        ],
    )
    await mayak.drain()
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "trait": "plan:pro"}
        if cursor:
            params["cursor"] = cursor
        r = await client.get("/v1/customers", params=params, headers=admin(ws))
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [c["id"] for c in body["items"]]
        assert all(c["traits"]["plan"] == "pro" for c in body["items"])
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 3 and len(set(seen)) == 3
    r = await client.get("/v1/customers", params={"identity_kind": "email"}, headers=admin(ws))
    assert len(r.json()["items"]) == 3
    r = await client.get("/v1/customers", params={"seen_since": "2999-01-01T00:00:00Z"}, headers=admin(ws))
    assert r.json()["items"] == []
    r = await client.get("/v1/customers", params={"cursor": "garbage!"}, headers=admin(ws))
    assert r.status_code == 400 and r.json()["code"] == "invalid_cursor"


async def test_event_list_filters(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        *[
            {
                "type": "track",
                "userId": "u1",
                "event": "Car Purchased" if i == 3 else "Page Viewed",
                "timestamp": f"2026-01-0{i + 1}T00:00:00Z",
            }
            for i in range(5)
        ],
    )
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:u1"))["id"]
    r = await client.get(f"/v1/customers/{cid}/events", params={"name": "Car Purchased"}, headers=admin(ws))
    assert [e["name"] for e in r.json()["items"]] == ["Car Purchased"]
    r = await client.get(
        f"/v1/customers/{cid}/events",
        params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-04T00:00:00Z"},
        headers=admin(ws),
    )
    assert len(r.json()["items"]) == 2
    r1 = await client.get(f"/v1/customers/{cid}/events", params={"limit": 3}, headers=admin(ws))
    r2 = await client.get(
        f"/v1/customers/{cid}/events",
        params={"limit": 3, "cursor": r1.json()["next_cursor"]},
        headers=admin(ws),
    )
    ids = [e["id"] for e in r1.json()["items"] + r2.json()["items"]]
    assert len(ids) == 5 == len(set(ids)) and r2.json()["next_cursor"] is None


async def test_export_returns_everything_held(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        {"type": "page", "anonymousId": "a1"},
        {"type": "identify", "anonymousId": "a1", "userId": "u1", "traits": {"email": "x@example.com"}},
    )
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:u1"))["id"]
    r = await client.get(f"/v1/customers/{cid}/export", headers=admin(ws))
    assert r.status_code == 200
    body = r.json()
    assert body["customer"]["traits"]["email"] == "x@example.com"
    assert {e["type"] for e in body["events"]} == {"page", "identify"}


async def _numbers(mayak: Mayak) -> dict[str, int]:
    async with mayak.db.read() as conn:
        return {r.id: r.key for r in await conn.execute(sa.select(customers.c.id, customers.c.key))}


async def test_a_customer_number_is_never_given_twice(client, mayak: Mayak, ws) -> None:
    """Customers are numbered (customers.key, what events and identities point at); the number of
    an erased customer, even the highest, is not handed to the next new one."""
    await send(client, ws, {"type": "identify", "userId": "first"}, {"type": "identify", "userId": "last"})
    await mayak.drain()
    first = (await by_identity(client, ws, "user_id:first"))["id"]
    last = (await by_identity(client, ws, "user_id:last"))["id"]
    before = await _numbers(mayak)
    assert before[last] == max(before.values()) > before[first]
    assert (await client.delete(f"/v1/customers/{last}", headers=admin(ws))).status_code == 200
    await send(client, ws, {"type": "identify", "userId": "next", "traits": {"plan": "pro"}})
    await mayak.drain()
    after = await _numbers(mayak)
    following = await by_identity(client, ws, "user_id:next")
    assert following["traits"] == {"plan": "pro"}
    assert after[following["id"]] > before[last] and after[first] == before[first]
    assert last not in after


async def test_erase_removes_person_and_drops_their_later_events(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        {"type": "identify", "userId": "gone", "anonymousId": "ag", "traits": {"email": "gone@example.com"}},
        {"type": "identify", "userId": "stays", "traits": {"email": "stays@example.com"}},
    )
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:gone"))["id"]
    r = await client.delete(f"/v1/customers/{cid}", headers=admin(ws))
    assert r.status_code == 200, r.text
    assert r.json()["events_deleted"] >= 1
    assert (await client.get(f"/v1/customers/{cid}", headers=admin(ws))).status_code == 404
    r = await client.get("/v1/customers", params={"identity": "email:gone@example.com"}, headers=admin(ws))
    assert r.status_code == 404
    # Later events naming any of the person's identifiers are dropped, whatever id they use.
    await send(
        client,
        ws,
        {"type": "track", "anonymousId": "ag", "event": "Came Back"},
        {"type": "identify", "userId": "new-id", "traits": {"email": "gone@example.com"}},
        {"type": "track", "userId": "stays", "event": "Still Here"},
    )
    await mayak.drain()
    for identity in ("user_id:gone", "anonymous_id:ag", "email:gone@example.com", "user_id:new-id"):
        r = await client.get("/v1/customers", params={"identity": identity}, headers=admin(ws))
        assert r.status_code == 404, identity
    async with mayak.db.read() as conn:
        payloads = [r[0] for r in await conn.execute(sa.select(events.c.payload))]
    assert not any("gone@example.com" in p or '"ag"' in p for p in payloads)
    # A replay of the log never brings the person back, and keeps everyone else.
    await mayak.customers.replay(ws["id"])
    for identity in ("user_id:gone", "email:gone@example.com"):
        r = await client.get("/v1/customers", params={"identity": identity}, headers=admin(ws))
        assert r.status_code == 404
    assert (await by_identity(client, ws, "user_id:stays"))["traits"]["email"] == "stays@example.com"


async def test_replay_rebuilds_the_same_profiles(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        {"type": "page", "anonymousId": "a1"},
        {"type": "identify", "userId": "u1", "traits": {"email": "m@example.com", "plan": "pro"}},
        {"type": "identify", "anonymousId": "a1", "traits": {"email": "m@example.com"}},
        {"type": "identify", "userId": "u2", "traits": {"email": "m@example.com"}},
    )
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:u1"))["id"]
    await client.put(f"/v1/customers/{cid}/stage", json={"stage": "loyal"}, headers=admin(ws))
    before = await by_identity(client, ws, "user_id:u1")
    async with mayak.db.read() as conn:
        idents_before = sorted(
            tuple(r)
            for r in await conn.execute(
                sa.select(identities.c.kind, identities.c.value, customers.c.id).join(
                    customers, customers.c.key == identities.c.customer_key
                )
            )
        )
    await mayak.customers.replay(ws["id"])
    after = await by_identity(client, ws, "user_id:u1")
    async with mayak.db.read() as conn:
        idents_after = sorted(
            tuple(r)
            for r in await conn.execute(
                sa.select(identities.c.kind, identities.c.value, customers.c.id).join(
                    customers, customers.c.key == identities.c.customer_key
                )
            )
        )
    assert idents_after == idents_before
    for field in ("id", "traits", "stage", "merged_ids", "consents"):
        assert after[field] == before[field], field


async def test_other_workspace_cannot_read(client, mayak: Mayak, ws) -> None:
    other = await mayak.workspaces.create_workspace("Other")
    await send(client, ws, {"type": "identify", "userId": "u1"})
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:u1"))["id"]
    for path in (f"/v1/customers/{cid}", f"/v1/customers/{cid}/events", f"/v1/customers/{cid}/export"):
        r = await client.get(path, headers=admin(other))
        assert r.status_code == 404 and r.json()["code"] == "not_found", path
    r = await client.get("/v1/customers", params={"identity": "user_id:u1"}, headers=admin(other))
    assert r.status_code == 404
    r = await client.delete(f"/v1/customers/{cid}", headers=admin(other))
    assert r.status_code == 404
    assert (await by_identity(client, ws, "user_id:u1"))["id"] == cid


async def test_openapi_is_3_1_and_lists_the_api(client) -> None:
    r = await client.get("/openapi.json")
    spec = r.json()
    assert spec["openapi"].startswith("3.1")
    for path in (
        "/v1/batch",
        "/v1/identify",
        "/v1/customers",
        "/v1/customers/{customer_id}/export",
        "/healthz",
    ):
        assert path in spec["paths"], path


async def test_metrics_and_health(client, mayak: Mayak, ws, pipeline_mode) -> None:
    await send(
        client,
        ws,
        {"type": "track", "userId": "u1", "event": "X", "messageId": "m1"},
        {"type": "track", "userId": "u1", "event": "X", "messageId": "m1"},
    )
    text = (await client.get("/metrics")).text
    assert "mayak_events_accepted_total 1.0" in text
    assert "mayak_events_deduplicated_total 1.0" in text
    # the group's commit was timed (one group, or one per request without the writer task)
    commits = mayak.metrics.registry.get_sample_value("mayak_ingest_commit_seconds_count")
    assert commits is not None and commits >= 1
    assert "mayak_ingest_commit_seconds_bucket" in text
    # Inline, the profile is built in the appending transaction; otherwise the lane has it to do.
    lag = "0.0" if pipeline_mode == "inline" else "1.0"
    assert f"mayak_pipeline_lag_events {lag}" in text
    await mayak.drain()
    text = (await client.get("/metrics")).text
    assert "mayak_pipeline_lag_events 0.0" in text
    assert "mayak_events_processed_total 1.0" in text
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        ("traits", {"traits": {"note": "a\u0000b"}}, "invalid_character", "$.traits.note"),
        ("traits", {"traits": {"x": {"y": {"z": 1}}} | {"deep": _nest(40)}}, "too_deep", "$.traits"),
        ("traits", {"traits": {"blob": "x" * 40_000}}, "event_too_large", "$"),
        ("consents", {"consents": {"email": {"ads": True}}}, "invalid_consents", "$.consents.email.ads"),
        ("preferences", {"preferences": {"colour": "red"}}, "invalid_preferences", "$.preferences.colour"),
    ],
)
async def test_admin_changes_are_validated(client, mayak: Mayak, ws, path, body, code, param) -> None:
    await send(client, ws, {"type": "identify", "userId": "u1"})
    await mayak.drain()
    cid = (await by_identity(client, ws, "user_id:u1"))["id"]
    r = await client.patch(f"/v1/customers/{cid}/{path}", json=body, headers=admin(ws))
    assert r.status_code in (400, 413), r.text
    assert (r.json()["code"], r.json()["param"]) == (code, param)
    # Nothing was appended, and the pipeline is not stuck.
    await send(client, ws, {"type": "identify", "userId": "u1", "traits": {"after": True}})
    await mayak.drain()
    assert (await by_identity(client, ws, "user_id:u1"))["traits"] == {"after": True}


async def test_workspace_endpoint(client, ws) -> None:
    r = await client.get("/v1/workspace", headers=admin(ws))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == ws["id"]
    assert {k["kind"] for k in r.json()["keys"]} == {"write", "secret"}


async def test_request_ids(client) -> None:
    r = await client.get("/healthz")
    assert len(r.headers["x-request-id"]) == 32
    r = await client.get("/healthz", headers={"X-Request-Id": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"


async def test_a_refused_event_is_counted_once(client, ws) -> None:
    r = await client.post("/v1/track", json={"userId": "u1"}, auth=write_auth(ws))
    assert r.status_code == 400 and r.json()["code"] == "missing_field"
    text = (await client.get("/metrics")).text
    assert 'mayak_events_rejected_total{code="missing_field"} 1.0' in text
