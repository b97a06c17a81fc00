"""Bad input to the collection API: each refusal has a stable code and path, nothing is half-stored,
and the server keeps serving afterwards."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from mayak.db.schema import events
from mayak.platform import Mayak
from tests.conftest import admin, write_auth

pytestmark = pytest.mark.contract

JSON = {"Content-Type": "application/json"}


def gzip_bomb(inflated_mb: int = 50) -> bytes:
    """``inflated_mb`` MB of zeros, gzipped (about 1000:1), built without holding the inflated bytes."""
    co = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [co.compress(block) for _ in range(inflated_mb)]
    parts.append(co.flush())
    return b"".join(parts)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def big_event(size: int) -> dict[str, Any]:
    return {"userId": "big", "event": "Big", "properties": {"blob": "x" * size}}


async def api_events(mayak: Mayak, ws_id: str | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(events).where(events.c.source == "api")
    if ws_id is not None:
        query = query.where(events.c.workspace_id == ws_id)
    async with mayak.db.read() as conn:
        return int((await conn.execute(query)).scalar_one())


async def assert_healthy(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    """/healthz answers and a following valid request is accepted and stored."""
    before = await api_events(mayak, ws["id"])
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.post("/v1/track", json={"userId": "after", "event": "Still Works"}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    assert await api_events(mayak, ws["id"]) == before + 1


Build = Callable[[dict[str, Any]], dict[str, Any]]


def post_json(body: Any, path: str = "/v1/track") -> Build:
    return lambda ws: {"url": path, "content": orjson.dumps(body), "headers": JSON, "auth": write_auth(ws)}


def post_raw(content: bytes, headers: dict[str, str] | None = None, path: str = "/v1/track") -> Build:
    return lambda ws: {
        "url": path,
        "content": content,
        "headers": {**JSON, **(headers or {})},
        "auth": write_auth(ws),
    }


# (id, request, status, type, code, param)
CASES: list[tuple[str, Build, int, str, str, str | None]] = [
    # -- the body as a whole
    ("malformed_json", post_raw(b'{"userId": "u1", "event": '), 400, "invalid_request", "invalid_json", "$"),
    (
        "trailing_garbage",
        post_raw(b'{"userId": "u1", "event": "E"} x'),
        400,
        "invalid_request",
        "invalid_json",
        "$",
    ),
    ("empty_body", post_raw(b""), 400, "invalid_request", "invalid_json", "$"),
    (
        "body_not_object",
        post_json([{"userId": "u1", "event": "E"}]),
        400,
        "invalid_request",
        "invalid_body",
        "$",
    ),
    (
        "invalid_utf8",
        post_raw(b'{"userId": "\xff\xfeu1", "event": "E"}'),
        400,
        "invalid_request",
        "invalid_utf8",
        "$",
    ),
    (
        "invalid_utf8_gzipped",
        post_raw(gzip.compress(b'{"userId": "u1", "event": "\xc3\x28"}'), {"Content-Encoding": "gzip"}),
        400,
        "invalid_request",
        "invalid_utf8",
        "$",
    ),
    ("nested_10000_levels", post_raw(nested(10_000)), 400, "invalid_request", "too_deep", "$"),
    (
        "nested_10000_in_properties",
        post_raw(b'{"userId":"u1","event":"E","properties":{"p":' + nested(10_000) + b"}}"),
        400,
        "invalid_request",
        "too_deep",
        "$",
    ),
    (
        "nested_40_levels",
        post_raw(b'{"userId":"u1","event":"E","properties":{"p":' + nested(40) + b"}}"),
        400,
        "invalid_request",
        "too_deep",
        "$",
    ),
    # -- transport: content type, encoding, size
    (
        "form_content_type",
        lambda ws: {"url": "/v1/track", "data": {"userId": "u1", "event": "E"}, "auth": write_auth(ws)},
        415,
        "invalid_request",
        "unsupported_content_type",
        None,
    ),
    (
        "xml_content_type",
        post_raw(b"<track/>", {"Content-Type": "application/xml"}),
        415,
        "invalid_request",
        "unsupported_content_type",
        None,
    ),
    (
        "brotli_encoding",
        post_raw(b"\x1b\x00", {"Content-Encoding": "br"}),
        415,
        "invalid_request",
        "unsupported_content_encoding",
        None,
    ),
    (
        "not_gzip",
        post_raw(b'{"userId": "u1", "event": "E"}', {"Content-Encoding": "gzip"}),
        400,
        "invalid_request",
        "invalid_compression",
        None,
    ),
    (
        "truncated_gzip",
        post_raw(gzip.compress(b'{"userId": "u1", "event": "E"}')[:-12], {"Content-Encoding": "gzip"}),
        400,
        "invalid_request",
        "invalid_compression",
        None,
    ),
    ("oversize_event", post_json(big_event(33 * 1024)), 413, "invalid_request", "event_too_large", "$"),
    (
        "oversize_request",
        post_json({"batch": [{"type": "track", **big_event(20_000)}] * 30}, "/v1/batch"),
        413,
        "invalid_request",
        "request_too_large",
        None,
    ),
    (
        "gzip_bomb",
        post_raw(gzip_bomb(50), {"Content-Encoding": "gzip"}, "/v1/batch"),
        413,
        "invalid_request",
        "request_too_large",
        None,
    ),
    # -- one event
    ("no_identity", post_json({"event": "E"}), 400, "invalid_request", "missing_identity", "$.userId"),
    (
        "empty_identity",
        post_json({"userId": "", "anonymousId": None, "event": "E"}),
        400,
        "invalid_request",
        "missing_identity",
        "$.userId",
    ),
    (
        "user_id_object",
        post_json({"userId": {"id": 1}, "event": "E"}),
        400,
        "invalid_request",
        "invalid_field_type",
        "$.userId",
    ),
    (
        "user_id_too_long",
        post_json({"userId": "u" * 301, "event": "E"}),
        400,
        "invalid_request",
        "field_too_long",
        "$.userId",
    ),
    (
        "bad_timestamp",
        post_json({"userId": "u1", "event": "E", "timestamp": "last tuesday"}),
        400,
        "invalid_request",
        "invalid_timestamp",
        "$.timestamp",
    ),
    (
        "impossible_date",
        post_json({"userId": "u1", "event": "E", "timestamp": "2024-02-30T10:00:00Z"}),
        400,
        "invalid_request",
        "invalid_timestamp",
        "$.timestamp",
    ),
    (
        "numeric_timestamp",
        post_json({"userId": "u1", "event": "E", "timestamp": 1700000000}),
        400,
        "invalid_request",
        "invalid_timestamp",
        "$.timestamp",
    ),
    (
        "timestamp_year_0",
        post_json({"userId": "u1", "event": "E", "timestamp": "0001-01-01T00:00:00+14:00"}),
        400,
        "invalid_request",
        "invalid_timestamp",
        "$.timestamp",
    ),
    (
        "skew_of_millennia",
        post_json(
            {
                "userId": "u1",
                "event": "E",
                "timestamp": "1971-01-01T00:00:00Z",
                "sentAt": "9999-01-01T00:00:00Z",
            }
        ),
        400,
        "invalid_request",
        "invalid_timestamp",
        "$.timestamp",
    ),
    (
        "bad_sent_at",
        post_json({"userId": "u1", "event": "E", "sentAt": "2024-01-01T25:00:00Z"}),
        400,
        "invalid_request",
        "invalid_timestamp",
        "$.sentAt",
    ),
    (
        "unknown_type",
        post_json({"batch": [{"type": "purchase", "userId": "u1"}]}, "/v1/batch"),
        400,
        "invalid_request",
        "batch_rejected",
        "$.batch",
    ),
    (
        "type_is_a_list",
        post_json({"batch": [{"type": [], "userId": "u1"}, {"type": {"t": 1}, "userId": "u1"}]}, "/v1/batch"),
        400,
        "invalid_request",
        "batch_rejected",
        "$.batch",
    ),
    (
        "traits_not_object",
        post_json({"userId": "u1", "traits": ["vip"]}, "/v1/identify"),
        400,
        "invalid_request",
        "invalid_field_type",
        "$.traits",
    ),
    (
        "properties_not_object",
        post_json({"userId": "u1", "event": "E", "properties": "big"}),
        400,
        "invalid_request",
        "invalid_field_type",
        "$.properties",
    ),
    (
        "context_not_object",
        post_json({"userId": "u1", "event": "E", "context": 7}),
        400,
        "invalid_request",
        "invalid_field_type",
        "$.context",
    ),
    ("track_without_event", post_json({"userId": "u1"}), 400, "invalid_request", "missing_field", "$.event"),
    (
        "event_name_too_long",
        post_json({"userId": "u1", "event": "E" * 201}),
        400,
        "invalid_request",
        "field_too_long",
        "$.event",
    ),
    (
        "group_without_group_id",
        post_json({"userId": "u1"}, "/v1/group"),
        400,
        "invalid_request",
        "missing_field",
        "$.groupId",
    ),
    (
        "alias_without_previous_id",
        post_json({"userId": "u1"}, "/v1/alias"),
        400,
        "invalid_request",
        "missing_field",
        "$.previousId",
    ),
    (
        "message_id_not_string",
        post_json({"userId": "u1", "event": "E", "messageId": ["m"]}),
        400,
        "invalid_request",
        "invalid_field_type",
        "$.messageId",
    ),
    (
        "nul_in_event_name",
        post_json({"userId": "u1", "event": "Paid\u0000"}),
        400,
        "invalid_request",
        "invalid_character",
        "$.event",
    ),
    (
        "nul_in_trait",
        post_json({"userId": "u1", "traits": {"email": "a\u0000@example.com"}}, "/v1/identify"),
        400,
        "invalid_request",
        "invalid_character",
        "$.traits.email",
    ),
    (
        "bad_consents",
        post_json({"userId": "u1", "traits": {"consents": {"email": {"marketing": "yes"}}}}, "/v1/identify"),
        400,
        "invalid_request",
        "invalid_consents",
        "$.traits.consents.email.marketing",
    ),
    (
        "bad_preferences",
        post_json({"userId": "u1", "traits": {"preferences": {"timezone": "Mars/Olympus"}}}, "/v1/identify"),
        400,
        "invalid_request",
        "invalid_preferences",
        "$.traits.preferences.timezone",
    ),
    # -- the batch envelope
    (
        "batch_not_array",
        post_json({"batch": "x"}, "/v1/batch"),
        400,
        "invalid_request",
        "invalid_batch",
        "$.batch",
    ),
    ("batch_empty", post_json({"batch": []}, "/v1/batch"), 400, "invalid_request", "empty_batch", "$.batch"),
    # -- keys
    (
        "missing_key",
        lambda ws: {"url": "/v1/track", "json": {"userId": "u1", "event": "E"}},
        401,
        "authentication_error",
        "missing_key",
        None,
    ),
    (
        "unknown_key",
        lambda ws: {
            "url": "/v1/track",
            "json": {"userId": "u1", "event": "E"},
            "auth": ("wk_not-a-real-key", ""),
        },
        401,
        "authentication_error",
        "invalid_key",
        None,
    ),
    (
        "unknown_key_in_body",
        lambda ws: {"url": "/v1/track", "json": {"userId": "u1", "event": "E", "writeKey": "wk_nope"}},
        401,
        "authentication_error",
        "invalid_key",
        None,
    ),
    (
        "malformed_authorization",
        lambda ws: {
            "url": "/v1/track",
            "json": {"userId": "u1", "event": "E"},
            "headers": {"Authorization": "Digest abc"},
        },
        401,
        "authentication_error",
        "malformed_authorization",
        None,
    ),
    (
        "basic_not_base64",
        lambda ws: {
            "url": "/v1/track",
            "json": {"userId": "u1", "event": "E"},
            "headers": {"Authorization": "Basic %%%"},
        },
        401,
        "authentication_error",
        "malformed_authorization",
        None,
    ),
    (
        "secret_key_basic",
        lambda ws: {
            "url": "/v1/track",
            "json": {"userId": "u1", "event": "E"},
            "auth": (ws["secret_key"], ""),
        },
        403,
        "permission_error",
        "secret_key_not_allowed",
        None,
    ),
    (
        "secret_key_bearer",
        lambda ws: {
            "url": "/v1/batch",
            "json": {"batch": [{"type": "track", "userId": "u1", "event": "E"}]},
            "headers": {"Authorization": f"Bearer {ws['secret_key']}"},
        },
        403,
        "permission_error",
        "secret_key_not_allowed",
        None,
    ),
    (
        "secret_key_in_body",
        lambda ws: {
            "url": "/v1/t",
            "content": orjson.dumps({"userId": "u1", "event": "E", "writeKey": ws["secret_key"]}),
            "headers": {"Content-Type": "text/plain"},
        },
        403,
        "permission_error",
        "secret_key_not_allowed",
        None,
    ),
]


@pytest.mark.parametrize(
    ("build", "status", "etype", "code", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_refused(
    client: httpx.AsyncClient,
    mayak: Mayak,
    ws: dict[str, Any],
    build: Build,
    status: int,
    etype: str,
    code: str,
    param: str | None,
) -> None:
    kwargs = build(ws)
    r = await client.post(kwargs.pop("url"), **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert (body["type"], body["code"], body["param"]) == (etype, code, param), body
    assert isinstance(body["message"], str) and body["message"]
    assert await api_events(mayak) == 0, "a refused request stored something"
    await mayak.drain()
    await assert_healthy(client, mayak, ws)


async def test_unknown_type_reports_path(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    batch = [{"type": "track", "userId": "u", "event": "E"}] * 3 + [{"type": "purchase", "userId": "u"}]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert r.json()["errors"] == [
        {
            "index": 3,
            "code": "unknown_type",
            "message": r.json()["errors"][0]["message"],
            "param": "$.batch[3].type",
        }
    ]
    r = await client.post(
        "/v1/batch", json={"batch": [{"userId": "u", "event": "no type"}]}, auth=write_auth(ws)
    )
    assert r.status_code == 400
    assert [(e["code"], e["param"]) for e in r.json()["errors"]] == [("unknown_type", "$.batch[0].type")]
    assert await api_events(mayak, ws["id"]) == 3


async def test_deep_event_inside_batch(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    deep: Any = "leaf"
    for _ in range(100):
        deep = {"d": deep}
    batch = [
        {"type": "track", "userId": "u", "event": "E", "properties": deep},
        {"type": "track", "userId": "u", "event": "ok"},
    ]
    r = await client.post("/v1/batch", json={"batch": batch}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert [(e["index"], e["code"], e["param"]) for e in r.json()["errors"]] == [
        (0, "too_deep", "$.batch[0]")
    ]
    # 32 levels (the limit) is fine
    ok: Any = "leaf"
    for _ in range(31):
        ok = {"d": ok}
    r = await client.post("/v1/track", json=ok | {"userId": "u", "event": "E32"}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert await api_events(mayak, ws["id"]) == 2


async def test_gzip_bomb_is_refused_early_and_cheaply(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    bomb = gzip_bomb(50)
    assert len(bomb) < 100_000
    headers = {**JSON, "Content-Encoding": "gzip"}
    tracemalloc.start()
    try:
        started = time.perf_counter()
        r = await client.post("/v1/batch", content=bomb, headers=headers, auth=write_auth(ws))
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 413 and r.json()["code"] == "request_too_large", r.text
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert peak < 8 * 1024 * 1024, f"peak Python memory {peak / 1e6:.1f} MB while refusing a 50 MB bomb"
    assert await api_events(mayak) == 0
    await assert_healthy(client, mayak, ws)


async def test_revoked_key(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    body = {"userId": "u1", "event": "E"}
    assert (await client.post("/v1/track", json=body, auth=write_auth(ws))).status_code == 200
    await mayak.workspaces.revoke_key(ws["write_key_id"])
    for kwargs in (
        {"auth": write_auth(ws)},
        {"headers": {"Authorization": f"Bearer {ws['write_key']}"}},
        {"json": body | {"writeKey": ws["write_key"]}},
    ):
        r = await client.post("/v1/track", **({"json": body} | kwargs))
        assert r.status_code == 401, r.text
        assert (r.json()["type"], r.json()["code"]) == ("authentication_error", "revoked_key")
    assert await api_events(mayak, ws["id"]) == 1
    # a new write key works; the secret key still reads
    issued = await mayak.workspaces.create_key(ws["id"], "write")
    r = await client.post("/v1/track", json=body, auth=(issued.plaintext, ""))
    assert r.status_code == 200, r.text
    assert (await client.get("/healthz")).status_code == 200


async def test_revoked_secret_key(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    assert (await client.get("/v1/customers", headers=admin(ws))).status_code == 200
    await mayak.workspaces.revoke_key(ws["secret_key_id"])
    r = await client.get("/v1/customers", headers=admin(ws))
    assert r.status_code == 401 and r.json()["code"] == "revoked_key"


async def test_keys_of_the_wrong_kind_on_admin_routes(client: httpx.AsyncClient, ws: dict[str, Any]) -> None:
    r = await client.get("/v1/customers", headers={"Authorization": f"Bearer {ws['write_key']}"})
    assert r.status_code == 403, r.text
    assert (r.json()["type"], r.json()["code"]) == ("permission_error", "secret_key_required")
    r = await client.get("/v1/customers")
    assert r.status_code == 401 and r.json()["code"] == "missing_key"
    r = await client.get("/v1/customers", headers={"Authorization": "Bearer sk_unknown"})
    assert r.status_code == 401 and r.json()["code"] == "invalid_key"


async def test_another_workspaces_key_sees_nothing(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]
) -> None:
    other = await mayak.workspaces.create_workspace("Workspace B")
    r = await client.post(
        "/v1/identify",
        json={"userId": "alice", "traits": {"email": "alice@example.com"}},
        auth=write_auth(ws),
    )
    assert r.status_code == 200
    await mayak.drain()
    cus = (await client.get("/v1/customers", params={"identity": "user_id:alice"}, headers=admin(ws))).json()
    cid = cus["id"]
    for path in (f"/v1/customers/{cid}", f"/v1/customers/{cid}/events", f"/v1/customers/{cid}/export"):
        r = await client.get(path, headers=admin(other))
        assert r.status_code == 404, (path, r.text)
        assert r.json()["code"] == "not_found"
        assert "alice" not in r.text
    r = await client.get("/v1/customers", params={"identity": "user_id:alice"}, headers=admin(other))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = await client.get("/v1/customers", headers=admin(other))
    assert r.status_code == 200 and r.json()["items"] == []
    r = await client.patch(
        f"/v1/customers/{cid}/traits", json={"traits": {"vip": True}}, headers=admin(other)
    )
    assert r.status_code == 404
    r = await client.delete(f"/v1/customers/{cid}", headers=admin(other))
    assert r.status_code == 404
    await mayak.drain()
    mine = (await client.get(f"/v1/customers/{cid}", headers=admin(ws))).json()
    assert mine["traits"] == {"email": "alice@example.com"}
    # B's write key writes to B only
    r = await client.post("/v1/track", json={"userId": "alice", "event": "B"}, auth=write_auth(other))
    assert r.status_code == 200
    assert await api_events(mayak, ws["id"]) == 1
    assert await api_events(mayak, other["id"]) == 1


async def test_refusals_are_counted(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    await client.post("/v1/track", json={"event": "E"}, auth=write_auth(ws))
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert 'code="missing_identity"' in r.text


async def test_unparsable_admin_body_has_a_stable_code(client: httpx.AsyncClient, ws: dict[str, Any]) -> None:
    deep = b'{"allowed_origins": ' + nested(10_000) + b"}"
    r = await client.patch(
        "/v1/workspace/settings", content=deep, headers=admin(ws) | {"Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert (r.json()["code"], r.json()["param"]) == ("invalid_json", "$")
    assert (await client.get("/healthz")).status_code == 200
