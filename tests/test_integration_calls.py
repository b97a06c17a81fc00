"""``integration_call`` outbox rows against a real HTTP server on a local socket.

The server is a hand-written HTTP/1.1 responder on ``asyncio.start_server`` (one request per
connection), so the executor's own httpx client, timeouts and connection errors are exercised for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from mayak.db.schema import events, outbox
from mayak.delivery.outbox import OutboxItem, OutboxRow, enqueue
from mayak.eventlog import event_rows
from mayak.integrations.calls import MAX_BODY_BYTES, integrations
from mayak.platform import Mayak
from tests.conftest import admin, write_auth

pytestmark = pytest.mark.contract

TOKEN = "real-dms-token-7f3a9c"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    base: str
    seen: list[Seen] = field(default_factory=list)
    flaky_calls: int = 0


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}.get(status, "Status")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server(base="")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            state.seen.append(Seen(method, path, headers, body))
            route = path.split("?", 1)[0]
            if route == "/ok":
                answer = {"received": orjson.loads(body) if body else None, "authorized": True}
                writer.write(_response(200, orjson.dumps(answer)))
            elif route == "/flaky":
                state.flaky_calls += 1
                if state.flaky_calls == 1:
                    writer.write(_response(500, b'{"error": "try again"}'))
                else:
                    writer.write(_response(200, b'{"slot": "10:30"}'))
            elif route == "/down":
                writer.write(_response(500, b"down"))
            elif route == "/slow":
                with contextlib.suppress(TimeoutError):  # answer late, or not once the client gave up
                    await asyncio.wait_for(reader.read(), 3)
                writer.write(_response(200, b"{}"))
            elif route == "/echo":
                writer.write(
                    _response(200, f"you sent {headers.get('authorization')}".encode(), "text/plain")
                )
            elif route == "/big":
                writer.write(_response(200, orjson.dumps({"data": "x" * (MAX_BODY_BYTES + 100)})))
            else:
                writer.write(_response(404, b"no such thing", "text/plain"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    state.base = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        srv.close()


@pytest.fixture
async def customer_id(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> str:
    r = await client.post(
        "/v1/identify", json={"userId": "u1", "traits": {"name": "Ann"}}, auth=write_auth(ws)
    )
    assert r.status_code == 200, r.text
    await mayak.drain()
    r = await client.get("/v1/customers", params={"identity": "user_id:u1"}, headers=admin(ws))
    cid: str = r.json()["id"]
    return cid


@pytest.fixture(autouse=True)
async def fast_backoff(mayak: Mayak) -> AsyncIterator[None]:
    executor = integrations(mayak).calls
    executor.backoff_base_s = 0.01
    yield
    await executor.close()


async def run_call(
    mayak: Mayak, ws: dict[str, Any], customer_id: str | None, payload: dict[str, Any]
) -> None:
    async with mayak.db.write() as conn:
        await enqueue(
            mayak.db,
            conn,
            [
                OutboxItem(
                    workspace_id=ws["id"],
                    kind="integration_call",
                    payload=payload,
                    idempotency_key=f"test:{payload['call_id']}:{len(payload)}:{id(payload)}",
                    customer_id=customer_id,
                    target="integration",
                )
            ],
        )
    await mayak.drain()


async def results(mayak: Mayak, ws: dict[str, Any]) -> list[dict[str, Any]]:
    async with mayak.db.read() as conn:
        rows = await conn.execute(
            event_rows(events.c.workspace_id == ws["id"], events.c.type == "integration.result").order_by(
                events.c.seq
            )
        )
        out = []
        for r in rows:
            payload = r.payload if isinstance(r.payload, dict) else orjson.loads(r.payload)
            out.append(payload | {"_customer_id": r.customer_id, "_source": r.source})
        return out


async def test_call_with_secret_reaches_server_and_result_is_logged(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], server: Server, customer_id: str
) -> None:
    r = await client.put("/v1/secrets/dms_token", json={"value": TOKEN}, headers=admin(ws))
    assert r.status_code == 200
    await run_call(
        mayak,
        ws,
        customer_id,
        {
            "call_id": "call_1",
            "conversation_id": "conv_1",
            "name": "dms.book",
            "request": {
                "method": "post",
                "url": server.base + "/ok?key={{secret:dms_token}}",
                "headers": {
                    "Authorization": "Bearer {{secret:dms_token}}",
                    "X-Plain": "{{secret: nope}}",
                    "User-Agent": "dealer-bot/1",
                },
                "json": {"vin": "WVW123", "auth": {"token": "{{secret:dms_token}}"}},
            },
        },
    )
    [seen] = server.seen
    assert seen.method == "POST" and seen.path == f"/ok?key={TOKEN}"
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["x-plain"] == "{{secret: nope}}"  # not the placeholder form: left alone
    assert seen.headers["x-mayak-call-id"] == "call_1" and seen.headers["user-agent"] == "dealer-bot/1"
    assert orjson.loads(seen.body) == {"vin": "WVW123", "auth": {"token": TOKEN}}

    [result] = await results(mayak, ws)
    assert result["_customer_id"] == customer_id and result["_source"] == "integration"
    assert result["call_id"] == "call_1" and result["conversation_id"] == "conv_1"
    assert result["name"] == "dms.book"
    assert (result["ok"], result["status"], result["error"], result["attempts"]) == (True, 200, None, 1)
    assert result["body"] == {
        "received": {"vin": "WVW123", "auth": {"token": "[redacted]"}},
        "authorized": True,
    }
    assert result["truncated"] is False and isinstance(result["duration_ms"], int)

    async with mayak.db.read() as conn:
        stored_payloads = [r[0] for r in await conn.execute(sa.select(outbox.c.payload))]
        stored_events = [str(r[0]) for r in await conn.execute(sa.select(events.c.payload))]
        statuses = [r[0] for r in await conn.execute(sa.select(outbox.c.status))]
    assert stored_payloads and all(TOKEN not in p for p in stored_payloads)
    assert all(TOKEN not in p for p in stored_events)
    assert statuses == ["sent"]

    r = await client.get(
        f"/v1/customers/{customer_id}/events", params={"type": "integration.result"}, headers=admin(ws)
    )
    [event] = r.json()["items"]
    assert event["name"] == "dms.book" and event["payload"]["call_id"] == "call_1"


async def test_500_is_retried_then_succeeds(
    mayak: Mayak, ws: dict[str, Any], server: Server, customer_id: str
) -> None:
    await run_call(
        mayak,
        ws,
        customer_id,
        {"call_id": "c2", "name": "slots", "request": {"url": server.base + "/flaky", "retries": 2}},
    )
    [result] = await results(mayak, ws)
    assert (result["ok"], result["status"], result["attempts"]) == (True, 200, 2)
    assert result["body"] == {"slot": "10:30"}
    assert [s.method for s in server.seen] == ["GET", "GET"]


async def test_failures_are_results_not_outbox_retries(
    mayak: Mayak, ws: dict[str, Any], server: Server, customer_id: str
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    calls: list[dict[str, Any]] = [
        {"call_id": "down", "request": {"url": server.base + "/down", "retries": 1}},
        {"call_id": "404", "request": {"url": server.base + "/nothing", "retries": 3}},
        {"call_id": "slow", "request": {"url": server.base + "/slow", "timeout_s": 0.3, "retries": 1}},
        {"call_id": "refused", "request": {"url": f"http://127.0.0.1:{refused_port}/x", "retries": 0}},
        {"call_id": "nosecret", "request": {"url": server.base + "/ok?t={{secret:missing_one}}"}},
        {"call_id": "ftp", "request": {"url": "ftp://files.example.com/x"}},
        {"call_id": "file", "request": {"url": "file:///etc/passwd"}},
        {"call_id": "bad", "request": {"url": server.base + "/ok", "method": "TRACE"}},
        {"call_id": "none"},
        {"call_id": "crlf", "request": {"url": server.base + "/ok", "headers": {"X-A": "a\r\nX-B: b"}}},
    ]
    for payload in calls:
        await run_call(mayak, ws, customer_id, payload | {"name": "t"})
    got = {r["call_id"]: r for r in await results(mayak, ws)}
    summary = {k: (v["ok"], v["status"], v["error"], v["attempts"]) for k, v in got.items()}
    assert summary == {
        "down": (False, 500, "http_500", 2),
        "404": (False, 404, "http_404", 1),  # 4xx is final
        "slow": (False, None, "timeout", 2),
        "refused": (False, None, "connection_error", 1),
        "nosecret": (False, None, "missing_secret:missing_one", 0),
        "ftp": (False, None, "invalid_url", 0),
        "file": (False, None, "invalid_url", 0),
        "bad": (False, None, "invalid_call", 0),
        "none": (False, None, "invalid_call", 0),
        "crlf": (False, None, "invalid_call", 0),
    }
    assert got["404"]["body"] == "no such thing"
    assert got["slow"]["duration_ms"] < 2500
    assert not any(s.path.startswith("/ok") for s in server.seen)  # nothing sent without its secret
    async with mayak.db.read() as conn:
        statuses = {r[0] for r in await conn.execute(sa.select(outbox.c.status))}
    assert statuses == {"sent"}


async def test_big_answers_are_truncated_and_echoed_secrets_redacted(
    client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any], server: Server, customer_id: str
) -> None:
    await client.put("/v1/secrets/dms_token", json={"value": TOKEN}, headers=admin(ws))
    await run_call(mayak, ws, customer_id, {"call_id": "big", "request": {"url": server.base + "/big"}})
    await run_call(
        mayak,
        ws,
        customer_id,
        {
            "call_id": "echo",
            "request": {"url": server.base + "/echo", "headers": {"authorization": "{{secret:dms_token}}"}},
        },
    )
    got = {r["call_id"]: r for r in await results(mayak, ws)}
    assert got["big"]["ok"] is True and got["big"]["truncated"] is True
    assert isinstance(got["big"]["body"], str) and len(got["big"]["body"]) == MAX_BODY_BYTES
    assert got["echo"]["body"] == "you sent [redacted]"


async def test_same_call_id_is_recorded_once(
    mayak: Mayak, ws: dict[str, Any], server: Server, customer_id: str
) -> None:
    payload = {"call_id": "dup", "request": {"url": server.base + "/ok"}}
    await run_call(mayak, ws, customer_id, payload)
    await run_call(mayak, ws, customer_id, dict(payload))  # e.g. the row delivered again after a crash
    assert len(await results(mayak, ws)) == 1


async def test_failed_append_asks_the_outbox_to_retry(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = integrations(mayak).calls
    executor.client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: httpx.Response(204)))

    async def broken(_batch: Any) -> Any:
        raise RuntimeError("database is down")

    row = OutboxRow(
        id="obx_1",
        workspace_id=ws["id"],
        customer_id=None,
        kind="integration_call",
        target=None,
        payload={"call_id": "x", "request": {"url": "https://dms.example/api"}},
        idempotency_key="k",
        attempts=0,
        created_at=0,
    )
    outcome = await executor.handle(row)
    assert outcome.ok is True and outcome.status_code == 204
    monkeypatch.setattr(executor.writer, "submit", broken)
    outcome = await executor.handle(row)
    assert outcome.ok is False and outcome.retryable is True and "database is down" in (outcome.error or "")


async def test_call_without_customer(mayak: Mayak, ws: dict[str, Any], server: Server) -> None:
    await run_call(mayak, ws, None, {"call_id": "sys", "request": {"url": server.base + "/ok"}})
    [result] = await results(mayak, ws)
    assert result["ok"] is True and result["_customer_id"] is None
