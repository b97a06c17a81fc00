"""Segment-spec event collection: endpoints, authentication forms, gzip, the browser's form, CORS,
messageId dedup, batches with partial acceptance, limits and timestamp correction."""

from __future__ import annotations

import base64
import gzip
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from mayak.db.schema import events
from mayak.platform import Mayak
from tests.conftest import admin, write_auth

pytestmark = pytest.mark.contract


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def stored(mayak: Mayak, ws_id: str) -> list[dict[str, Any]]:
    """Every event the API appended to the workspace's log, oldest first."""
    async with mayak.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(events.c.type, events.c.name, events.c.timestamp, events.c.payload)
                .where(events.c.workspace_id == ws_id, events.c.source == "api")
                .order_by(events.c.seq)
            )
        ).all()
    return [
        {"type": r.type, "name": r.name, "timestamp": r.timestamp, **orjson.loads(r.payload)} for r in rows
    ]


async def customer(client: httpx.AsyncClient, ws: dict[str, Any], user_id: str) -> dict[str, Any]:
    r = await client.get("/v1/customers", params={"identity": f"user_id:{user_id}"}, headers=admin(ws))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def customer_events(
    client: httpx.AsyncClient, ws: dict[str, Any], user_id: str
) -> list[dict[str, Any]]:
    cus = await customer(client, ws, user_id)
    r = await client.get(f"/v1/customers/{cus['id']}/events", headers=admin(ws))
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


CALLS: dict[str, dict[str, Any]] = {
    "identify": {"userId": "u-identify", "traits": {"name": "Ann", "plan": "pro"}},
    "track": {"userId": "u-track", "event": "Order Completed", "properties": {"total": 1250}},
    "page": {"userId": "u-page", "name": "Pricing", "properties": {"url": "https://shop.example/pricing"}},
    "screen": {"userId": "u-screen", "name": "Home"},
    "group": {"userId": "u-group", "groupId": "acme", "traits": {"name": "Acme"}},
    "alias": {"userId": "u-alias", "previousId": "anon-before-login"},
}


@pytest.mark.parametrize("kind", sorted(CALLS))
async def test_every_call_type_is_collected(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], kind: str
) -> None:
    body = CALLS[kind]
    r = await client.post(f"/v1/{kind}", json=body, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "accepted": 1, "duplicates": 0, "errors": []}
    log = await stored(mayak, ws["id"])
    assert [e["type"] for e in log] == [kind]
    assert log[0]["userId"] == body["userId"]
    assert log[0]["messageId"]  # one is assigned when the client sent none
    await mayak.drain()
    items = await customer_events(client, ws, body["userId"])
    assert [e["type"] for e in items] == [kind]


async def test_batch_of_every_type(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    batch = [{"type": kind, **body} for kind, body in CALLS.items()]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == len(CALLS)
    assert sorted(e["type"] for e in await stored(mayak, ws["id"])) == sorted(CALLS)
    await mayak.drain()
    assert (await customer(client, ws, "u-identify"))["traits"]["plan"] == "pro"


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.mark.parametrize("form", ["basic", "basic_httpx", "bearer", "body_write_key"])
async def test_authentication_forms(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], form: str
) -> None:
    body: dict[str, Any] = {"userId": f"auth-{form}", "event": "Signed In"}
    kwargs: dict[str, Any] = {}
    if form == "basic":
        kwargs["headers"] = _basic(ws["write_key"])
    elif form == "basic_httpx":
        kwargs["auth"] = write_auth(ws)
    elif form == "bearer":
        kwargs["headers"] = {"Authorization": f"Bearer {ws['write_key']}"}
    else:
        body["writeKey"] = ws["write_key"]
    r = await client.post("/v1/track", json=body, **kwargs)
    assert r.status_code == 200, r.text
    log = await stored(mayak, ws["id"])
    assert [e["userId"] for e in log] == [f"auth-{form}"]
    assert "writeKey" not in log[0], "the key must never be stored in the log"
    assert log[0]["type"] == "track" and log[0]["event"] == "Signed In"


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "identity"])
async def test_compressed_bodies(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], encoding: str
) -> None:
    raw = orjson.dumps({"batch": [{"type": "track", "userId": "gz", "event": f"E{i}"} for i in range(20)]})
    if encoding in ("gzip", "x-gzip"):
        data = gzip.compress(raw)
    elif encoding == "deflate":
        import zlib

        data = zlib.compress(raw)
    else:
        data = raw
    r = await client.post(
        "/v1/batch",
        content=data,
        headers={"Content-Type": "application/json", "Content-Encoding": encoding, **_basic(ws["write_key"])},
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 20
    assert [e["event"] for e in await stored(mayak, ws["id"])] == [f"E{i}" for i in range(20)]


@pytest.mark.parametrize(
    ("short", "kind", "extra"),
    [
        ("t", "track", {"event": "Viewed"}),
        ("i", "identify", {"traits": {"email": "web@example.com"}}),
        ("p", "page", {"name": "Home"}),
        ("s", "screen", {"name": "Main"}),
        ("g", "group", {"groupId": "g1"}),
        ("a", "alias", {"previousId": "anon-1"}),
    ],
)
async def test_browser_short_paths_text_plain(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], short: str, kind: str, extra: dict[str, Any]
) -> None:
    """analytics.js posts text/plain (no CORS preflight) with the write key inside the body."""
    body = {"userId": "web-1", "anonymousId": "anon-web", "writeKey": ws["write_key"], **extra}
    r = await client.post(
        f"/v1/{short}",
        content=orjson.dumps(body),
        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://shop.example"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    log = await stored(mayak, ws["id"])
    assert [e["type"] for e in log] == [kind]


async def test_browser_batch_short_path(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    body = {"writeKey": ws["write_key"], "batch": [{"type": "t", "anonymousId": "a1", "event": "Clicked"}]}
    r = await client.post("/v1/b", content=orjson.dumps(body), headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    assert [(e["type"], e["name"]) for e in await stored(mayak, ws["id"])] == [("track", "Clicked")]


async def test_cors_preflight(client: httpx.AsyncClient) -> None:
    r = await client.options(
        "/v1/track",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "content-type" in allowed and "authorization" in allowed


async def test_allowed_origins_setting(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    r = await client.get("/v1/workspace", headers=admin(ws))
    assert r.json()["settings"]["allowed_origins"] == ["*"]
    # only a secret key may change it
    r = await client.patch(
        "/v1/workspace/settings",
        json={"allowed_origins": ["https://shop.example"]},
        headers={"Authorization": f"Bearer {ws['write_key']}"},
    )
    assert r.status_code == 403 and r.json()["code"] == "secret_key_required"
    r = await client.patch(
        "/v1/workspace/settings", json={"allowed_origins": ["https://shop.example"]}, headers=admin(ws)
    )
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["allowed_origins"] == ["https://shop.example"]

    def post(origin: str | None, user: str) -> Any:
        headers = {"Content-Type": "text/plain"} | ({"Origin": origin} if origin else {})
        body = {"writeKey": ws["write_key"], "userId": user, "event": "Viewed"}
        return client.post("/v1/t", content=orjson.dumps(body), headers=headers)

    r = await post("https://shop.example", "allowed")
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    r = await post("https://evil.example", "refused")
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "origin_not_allowed"
    assert r.json()["type"] == "permission_error"
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    r = await post(None, "server-side")  # servers send no Origin; the list does not apply
    assert r.status_code == 200, r.text
    assert [e["userId"] for e in await stored(mayak, ws["id"])] == ["allowed", "server-side"]


async def test_message_id_dedup(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    body = {"userId": "dedup", "event": "Paid", "messageId": "msg-123"}
    first = await client.post("/v1/track", json=body, auth=write_auth(ws))
    assert first.json() == {"success": True, "accepted": 1, "duplicates": 0, "errors": []}
    again = await client.post("/v1/track", json=body, auth=write_auth(ws))
    assert again.status_code == 200, again.text
    assert again.json() == {"success": True, "accepted": 0, "duplicates": 1, "errors": []}
    # a batch repeating it (and repeating a new one inside itself) stores only the fresh one, once
    batch = [
        {"type": "track", **body},
        {"type": "track", "userId": "dedup", "event": "Refunded", "messageId": "msg-456"},
        {"type": "track", "userId": "dedup", "event": "Refunded", "messageId": "msg-456"},
    ]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert r.json() == {"success": True, "accepted": 1, "duplicates": 2, "errors": []}
    log = await stored(mayak, ws["id"])
    assert sorted(e["messageId"] for e in log) == ["msg-123", "msg-456"]
    await mayak.drain()
    assert len(await customer_events(client, ws, "dedup")) == 2


async def test_dedup_is_per_workspace(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    other = await mayak.workspaces.create_workspace("Other")
    body = {"userId": "same", "event": "Paid", "messageId": "shared-id"}
    for w in (ws, other):
        r = await client.post("/v1/track", json=body, auth=write_auth(w))
        assert r.json()["accepted"] == 1, r.text
    assert len(await stored(mayak, ws["id"])) == 1
    assert len(await stored(mayak, other["id"])) == 1


async def test_long_message_id_dedups(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    """The longest accepted messageId (300 characters) must dedup too, on every backend."""
    body = {"userId": "long-mid", "event": "Paid", "messageId": "m" * 300}
    assert (await client.post("/v1/track", json=body, auth=write_auth(ws))).json()["accepted"] == 1
    assert (await client.post("/v1/track", json=body, auth=write_auth(ws))).json()["duplicates"] == 1
    log = await stored(mayak, ws["id"])
    assert [e["messageId"] for e in log] == ["m" * 300]
    body["messageId"] = "m" * 301
    r = await client.post("/v1/track", json=body, auth=write_auth(ws))
    assert r.status_code == 400 and r.json()["param"] == "$.messageId"


async def test_batch_partial_acceptance(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    batch = [
        {"type": "track", "userId": "p1", "event": "Ok 0"},
        {"type": "track", "event": "No identity"},
        {"type": "identify", "userId": "p1", "traits": "not an object"},
        {"type": "track", "userId": "p1", "event": "Bad time", "timestamp": "yesterday"},
        {"type": "purchase", "userId": "p1"},
        {"type": "track", "userId": "p1", "event": "Ok 5"},
        "not an event",
        {"type": "track", "userId": "p1"},
    ]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["accepted"] == 2 and body["duplicates"] == 0
    got = [(e["index"], e["code"], e["param"]) for e in body["errors"]]
    assert got == [
        (1, "missing_identity", "$.batch[1].userId"),
        (2, "invalid_field_type", "$.batch[2].traits"),
        (3, "invalid_timestamp", "$.batch[3].timestamp"),
        (4, "unknown_type", "$.batch[4].type"),
        (6, "invalid_event", "$.batch[6]"),
        (7, "missing_field", "$.batch[7].event"),
    ]
    assert all(isinstance(e["message"], str) and e["message"] for e in body["errors"])
    assert [e["event"] for e in await stored(mayak, ws["id"])] == ["Ok 0", "Ok 5"]


async def test_batch_with_nothing_acceptable_is_400(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    batch = [{"type": "track", "event": "No identity"}, {"type": "nope", "userId": "x"}]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert r.status_code == 400, r.text
    body = r.json()
    assert (
        body["type"] == "invalid_request" and body["code"] == "batch_rejected" and body["param"] == "$.batch"
    )
    assert [(e["index"], e["code"], e["param"]) for e in body["errors"]] == [
        (0, "missing_identity", "$.batch[0].userId"),
        (1, "unknown_type", "$.batch[1].type"),
    ]
    assert await stored(mayak, ws["id"]) == []


async def test_batch_level_errors(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    cases = [
        ({"batch": {"type": "track"}}, "invalid_batch", "$.batch"),
        ({"events": []}, "invalid_batch", "$.batch"),
        ({"batch": []}, "empty_batch", "$.batch"),
        (
            {"batch": [{"type": "track", "userId": "x", "event": "E"}], "sentAt": "soon"},
            "invalid_timestamp",
            "$.sentAt",
        ),
    ]
    for body, code, param in cases:
        r = await client.post("/v1/batch", json=body, auth=write_auth(ws))
        assert r.status_code == 400, (body, r.text)
        assert (r.json()["code"], r.json()["param"]) == (code, param), body
    assert await stored(mayak, ws["id"]) == []


# -- limits -----------------------------------------------------------------------------------------


def _event_of_size(size: int, user: str = "big") -> dict[str, Any]:
    event: dict[str, Any] = {"userId": user, "event": "Big", "properties": {"blob": ""}}
    pad = size - len(orjson.dumps(event))
    event["properties"]["blob"] = "x" * pad
    assert len(orjson.dumps(event)) == size
    return event


async def test_event_size_limit(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    limit = mayak.settings.max_event_bytes
    assert limit == 32 * 1024
    r = await client.post("/v1/track", json=_event_of_size(limit, "fits"), auth=write_auth(ws))
    assert r.status_code == 200, r.text
    r = await client.post("/v1/track", json=_event_of_size(limit + 1, "too-big"), auth=write_auth(ws))
    assert r.status_code == 413, r.text
    assert (r.json()["code"], r.json()["param"]) == ("event_too_large", "$")
    # inside a batch the oversize event is reported and the rest accepted
    batch = [
        {"type": "track", **_event_of_size(limit + 100, "b0")},
        {"type": "track", "userId": "b1", "event": "S"},
    ]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert [(e["index"], e["code"], e["param"]) for e in r.json()["errors"]] == [
        (0, "event_too_large", "$.batch[0]")
    ]
    assert [e["userId"] for e in await stored(mayak, ws["id"])] == ["fits", "b1"]


async def test_event_size_limit_counts_decompressed_bytes(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    data = gzip.compress(orjson.dumps(_event_of_size(40 * 1024)))
    assert len(data) < 2048
    r = await client.post(
        "/v1/track",
        content=data,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip", **_basic(ws["write_key"])},
    )
    assert r.status_code == 413 and r.json()["code"] == "event_too_large", r.text
    assert await stored(mayak, ws["id"]) == []


async def test_request_size_limit(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    limit = mayak.settings.max_request_bytes
    assert limit == 500 * 1024
    one = _event_of_size(20 * 1024)
    one["type"] = "track"
    # just under the limit: accepted in full
    n = limit // (len(orjson.dumps(one)) + 1) - 1
    ok = orjson.dumps({"batch": [one] * n})
    assert len(ok) <= limit
    r = await client.post(
        "/v1/batch", content=ok, headers={"Content-Type": "application/json", **_basic(ws["write_key"])}
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == n
    # over the limit, plain and gzipped (small on the wire, large once inflated)
    big = orjson.dumps({"batch": [one] * (n + 3)})
    assert len(big) > limit
    for data, enc in ((big, "identity"), (gzip.compress(big), "gzip")):
        r = await client.post(
            "/v1/batch",
            content=data,
            headers={"Content-Type": "application/json", "Content-Encoding": enc, **_basic(ws["write_key"])},
        )
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "request_too_large"
    assert len(await stored(mayak, ws["id"])) == n


# -- timestamps -------------------------------------------------------------------------------------


async def _stored_timestamp(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], user: str
) -> datetime:
    await mayak.drain()
    items = await customer_events(client, ws, user)
    assert len(items) == 1
    return parse(items[0]["timestamp"])


async def test_clock_skew_correction(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    """A client whose clock runs 3 hours fast: the event happened 5 s before it was sent."""
    skew = timedelta(hours=3)
    client_now = datetime.now(UTC) + skew
    body = {
        "userId": "skewed",
        "event": "Tapped",
        "timestamp": iso(client_now - timedelta(seconds=5)),
        "sentAt": iso(client_now),
    }
    before = datetime.now(UTC)
    r = await client.post("/v1/track", json=body, auth=write_auth(ws))
    after = datetime.now(UTC)
    assert r.status_code == 200, r.text
    ts = await _stored_timestamp(client, mayak, ws, "skewed")
    assert (
        before - timedelta(seconds=5, milliseconds=5)
        <= ts
        <= after - timedelta(seconds=5) + timedelta(milliseconds=5)
    )
    payload = (await stored(mayak, ws["id"]))[0]
    assert payload["originalTimestamp"] == body["timestamp"]
    assert (
        before - timedelta(milliseconds=5)
        <= parse(payload["receivedAt"])
        <= after + timedelta(milliseconds=5)
    )


async def test_batch_sent_at_applies_to_each_event(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    client_now = datetime.now(UTC) - timedelta(days=2)  # a slow clock, two days behind
    batch = [
        {
            "type": "track",
            "userId": "bs0",
            "event": "E",
            "timestamp": iso(client_now - timedelta(minutes=10)),
        },
        {"type": "track", "userId": "bs1", "event": "E", "timestamp": iso(client_now - timedelta(minutes=1))},
    ]
    before = datetime.now(UTC)
    r = await client.post("/v1/batch", json={"batch": batch, "sentAt": iso(client_now)}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    after = datetime.now(UTC)
    slack = timedelta(milliseconds=5)
    for user, ago in (("bs0", timedelta(minutes=10)), ("bs1", timedelta(minutes=1))):
        ts = await _stored_timestamp(client, mayak, ws, user)
        assert before - ago - slack <= ts <= after - ago + slack, (user, ts)


async def test_timestamp_without_sent_at_is_kept(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    when = datetime(2024, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)
    body = {"userId": "historic", "event": "Imported", "timestamp": "2024-03-01T15:30:15.250+03:00"}
    r = await client.post("/v1/track", json=body, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert await _stored_timestamp(client, mayak, ws, "historic") == when


async def test_future_timestamp_clamped_to_receive_time(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    body = {"userId": "future", "event": "Later", "timestamp": iso(datetime.now(UTC) + timedelta(days=30))}
    before = datetime.now(UTC)
    r = await client.post("/v1/track", json=body, auth=write_auth(ws))
    after = datetime.now(UTC)
    assert r.status_code == 200, r.text
    ts = await _stored_timestamp(client, mayak, ws, "future")
    assert before - timedelta(milliseconds=5) <= ts <= after + timedelta(milliseconds=5)
    payload = (await stored(mayak, ws["id"]))[0]
    assert payload["timestamp"] == payload["receivedAt"]


async def test_skew_correction_never_lands_in_the_future(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    """sentAt before the event's own timestamp is nonsense; the result is still clamped."""
    now = datetime.now(UTC)
    body = {"userId": "odd", "event": "E", "timestamp": iso(now), "sentAt": iso(now - timedelta(hours=1))}
    r = await client.post("/v1/track", json=body, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert await _stored_timestamp(client, mayak, ws, "odd") <= datetime.now(UTC)


async def test_missing_timestamp_is_receive_time(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    before = datetime.now(UTC)
    r = await client.post("/v1/identify", json={"userId": "nots", "traits": {"a": 1}}, auth=write_auth(ws))
    after = datetime.now(UTC)
    assert r.status_code == 200, r.text
    ts = await _stored_timestamp(client, mayak, ws, "nots")
    assert before - timedelta(milliseconds=5) <= ts <= after + timedelta(milliseconds=5)


async def test_unique_ids_per_event(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    """Events without a messageId are never deduplicated against each other."""
    body = {"userId": "same", "event": "Same"}
    for _ in range(3):
        assert (await client.post("/v1/track", json=body, auth=write_auth(ws))).json()["accepted"] == 1
    ids = [e["messageId"] for e in await stored(mayak, ws["id"])]
    assert len(set(ids)) == 3


async def test_anonymous_only_and_numeric_user_id(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    anon = str(uuid.uuid4())
    r = await client.post("/v1/page", json={"anonymousId": anon, "name": "Landing"}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    r = await client.post("/v1/identify", json={"userId": 12345, "traits": {"x": 1}}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    log = await stored(mayak, ws["id"])
    assert log[0]["anonymousId"] == anon and "userId" not in log[0]
    assert log[1]["userId"] == "12345"
    await mayak.drain()
    assert (await customer(client, ws, "12345"))["traits"] == {"x": 1}


async def test_postgres_checks_one_batch_at_a_time_in_slices(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    """PostgreSQL: two batches arriving together are checked one after the other, each yielding to
    the event loop every few events (so the ingest writer's next step never waits behind a whole
    batch, or behind several). Forced on here so both backends run it; SQLite has no gate."""
    import asyncio

    from mayak.api import ingest_routes

    assert (mayak.check_gate is not None) == (mayak.db.dialect == "postgresql")
    monkeypatch.setattr(mayak, "check_gate", asyncio.Lock())
    seen: list[str] = []
    real = ingest_routes.normalise_event

    def recording(item: Any, **kw: Any) -> Any:
        seen.append(str(item["userId"])[0])
        return real(item, **kw)

    monkeypatch.setattr(ingest_routes, "normalise_event", recording)
    ticking = True

    async def ticker() -> None:
        while ticking:
            seen.append("tick")
            await asyncio.sleep(0)

    def batch(prefix: str) -> dict[str, Any]:
        return {"batch": [{"type": "track", "event": "E", "userId": f"{prefix}{i}"} for i in range(50)]}

    tick_task = asyncio.create_task(ticker())
    try:
        answers = await asyncio.gather(
            *(client.post("/v1/batch", json=batch(p), auth=write_auth(ws)) for p in ("a", "b"))
        )
    finally:
        ticking = False
        await tick_task
    assert [r.json()["accepted"] for r in answers] == [50, 50]
    checked = [s for s in seen if s != "tick"]
    first = checked[0]
    assert checked == [first] * 50 + [("b" if first == "a" else "a")] * 50  # not interleaved
    # from the first batch's first check to its last: runs of checks with ticks between them
    begin = seen.index(first)
    end = len(seen) - seen[::-1].index(first)
    runs: list[int] = [0]
    for s in seen[begin:end]:
        if s == first:
            runs[-1] += 1
        elif s == "tick" and runs[-1]:
            runs.append(0)
    runs = [n for n in runs if n]
    assert sum(runs) == 50 and max(runs) <= ingest_routes.CHECK_SLICE < 50, runs
