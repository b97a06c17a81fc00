"""Event destinations without HTTP servers: routing into the outbox and signed delivery to a mock receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import outbox
from mayak.delivery import webhooks
from mayak.delivery.destinations import DestinationService
from mayak.delivery.outbox import OutboxDispatcher
from mayak.errors import InvalidRequest, NotFound
from mayak.eventlog import LoggedEvent
from mayak.metrics import Metrics
from mayak.timeutil import now_ms
from mayak.workspaces.secrets_box import SecretBox
from mayak.workspaces.service import WorkspaceService
from tests.backends import backend_db

__all__ = ["backend_db"]  # the fixture, imported for pytest

SETTINGS = Settings(outbox_base_delay_ms=10, outbox_max_attempts=3, webhook_timeout_s=2.0)


@dataclass
class Receiver:
    """The far side of the webhook: checks every signature, answers from a script."""

    secrets: dict[str, str] = field(default_factory=dict)  # host -> whsec secret
    requests: list[httpx.Request] = field(default_factory=list)
    script: list[int | Exception | tuple[int, dict[str, str]]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        webhooks.verify(self.secrets[request.url.host], request.headers, request.content)
        answer = self.script.pop(0) if self.script else 200
        if isinstance(answer, Exception):
            raise answer
        code, headers = answer if isinstance(answer, tuple) else (answer, {})
        return httpx.Response(code, text="nope" if code >= 300 else "ok", headers=headers)


@dataclass
class Env:
    db: Database
    service: DestinationService
    receiver: Receiver
    dispatcher: OutboxDispatcher
    ws: str
    other_ws: str

    async def create(self, host: str = "crm.example", **kw: Any) -> dict[str, Any]:
        dest = await self.service.create(
            self.ws,
            name=kw.pop("name", host),
            url=kw.pop("url", f"https://{host}/hooks"),
            event_types=kw.pop("event_types", []),
            event_names=kw.pop("event_names", []),
        )
        self.receiver.secrets[host] = dest["signing_secret"]
        return dest

    async def route(self, events: list[LoggedEvent], ws: str | None = None) -> int:
        async with self.db.write() as conn:
            return await self.service.route(conn, ws or self.ws, events)


@pytest.fixture
async def env(backend_db: Database) -> AsyncIterator[Env]:
    workspaces = WorkspaceService(backend_db, SecretBox("test-master-key"))
    ws = await workspaces.create_workspace("Shop")
    other = await workspaces.create_workspace("Other shop")
    receiver = Receiver()
    client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    service = DestinationService(backend_db, workspaces, SETTINGS, client=client)
    dispatcher = OutboxDispatcher(backend_db, SETTINGS, Metrics())
    dispatcher.register("webhook", service.deliver)
    try:
        yield Env(backend_db, service, receiver, dispatcher, ws["id"], other["id"])
    finally:
        await service.close()
        await client.aclose()


_seq = 0


def event(ws: str, type_: str = "track", name: str | None = "Order Completed", **kw: Any) -> LoggedEvent:
    global _seq
    _seq += 1
    return LoggedEvent(
        seq=_seq,
        id=f"evt_{_seq:06d}",
        workspace_id=ws,
        type=type_,
        name=name,
        customer_id=kw.get("customer_id", "cus_1"),
        timestamp=1_767_225_600_000,
        received_at=1_767_225_601_000,
        source="api",
        actor=None,
        payload=kw.get("payload", {"properties": {"total": 1999}}),
    )


async def deliveries(db: Database) -> list[dict[str, Any]]:
    async with db.read() as conn:
        return [dict(r._mapping) for r in await conn.execute(sa.select(outbox).order_by(outbox.c.id))]


def code_of(exc: pytest.ExceptionInfo[InvalidRequest]) -> tuple[str, str | None]:
    return exc.value.code, exc.value.param


@pytest.mark.parametrize(
    ("change", "code", "param"),
    [
        ({"url": "ftp://crm.example/x"}, "invalid_url", "$.url"),
        ({"url": "/relative/path"}, "invalid_url", "$.url"),
        ({"url": "https://"}, "invalid_url", "$.url"),
        ({"url": "https://x.example/" + "a" * 2000}, "invalid_url", "$.url"),
        ({"name": "   "}, "invalid_name", "$.name"),
        ({"event_types": "track"}, "invalid_event_types", "$.event_types"),
        ({"event_types": ["track", 3]}, "invalid_event_types", "$.event_types[1]"),
        ({"event_names": ["ok", ""]}, "invalid_event_names", "$.event_names[1]"),
    ],
)
async def test_create_validates(env: Env, change: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        await env.create(**change)
    assert code_of(exc) == (code, param)


async def test_crud_and_workspace_isolation(env: Env) -> None:
    made = await env.create(event_types=["track", "track", "timer"], event_names=["Order Completed"])
    assert made["id"].startswith("dst_") and made["signing_secret"].startswith("whsec_")
    assert made["event_types"] == ["track", "timer"]  # duplicates dropped, order kept
    assert made["created_at"].endswith("Z") and made["enabled"] is True
    fetched = await env.service.get(env.ws, made["id"])
    assert "signing_secret" not in fetched
    assert fetched == {k: v for k, v in made.items() if k != "signing_secret"}
    assert [d["id"] for d in await env.service.list(env.ws)] == [made["id"]]
    assert await env.service.list(env.other_ws) == []
    for call in (env.service.get, env.service.delete):
        with pytest.raises(NotFound):
            await call(env.other_ws, made["id"])
    with pytest.raises(NotFound):
        await env.service.list_deliveries(env.other_ws, made["id"])
    assert await env.service.delete(env.ws, made["id"]) == {"id": made["id"], "deleted": True}
    with pytest.raises(NotFound):
        await env.service.get(env.ws, made["id"])


async def test_route_filters_and_is_idempotent(env: Env) -> None:
    everything = await env.create("all.example")
    orders = await env.create("orders.example", event_types=["track"], event_names=["Order Completed"])
    batch = [
        event(env.ws, "identify", None),
        event(env.ws, "track", "Order Completed"),
        event(env.ws, "track", "Page Scrolled"),
        event(env.other_ws, "track", "Order Completed"),  # not this workspace's: never routed here
    ]
    assert await env.route(batch) == 4
    assert await env.route(batch) == 0  # a replayed batch adds nothing
    rows = await deliveries(env.db)
    by_target: dict[str, list[str]] = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append(orjson.loads(r["payload"])["event"]["id"])
    assert by_target == {
        everything["id"]: [batch[0].id, batch[1].id, batch[2].id],
        orders["id"]: [batch[1].id],
    }
    order_row = next(r for r in rows if r["target"] == orders["id"])
    assert order_row["idempotency_key"] == f"{batch[1].id}:{orders['id']}"
    assert (order_row["kind"], order_row["customer_id"], order_row["workspace_id"]) == (
        "webhook",
        "cus_1",
        env.ws,
    )
    assert orjson.loads(order_row["payload"]) == {
        "destination_id": orders["id"],
        "event": {
            "id": batch[1].id,
            "seq": batch[1].seq,
            "type": "track",
            "name": "Order Completed",
            "customer_id": "cus_1",
            "timestamp": "2026-01-01T00:00:00.000Z",
            "received_at": "2026-01-01T00:00:01.000Z",
            "source": batch[1].source,
            "actor": batch[1].actor,
            "payload": {"properties": {"total": 1999}},
        },
    }


async def test_route_cache_follows_create_and_delete(env: Env) -> None:
    assert await env.route([event(env.ws)]) == 0
    dest = await env.create()
    assert await env.route([event(env.ws)]) == 1
    await env.service.delete(env.ws, dest["id"])
    assert await env.route([event(env.ws)]) == 0


async def test_signed_delivery_with_retry_keeps_the_webhook_id(env: Env) -> None:
    dest = await env.create()
    env.receiver.script = [500, httpx.ConnectError("connection refused"), 200]
    ev = event(env.ws)
    await env.route([ev])
    [row] = await deliveries(env.db)
    now = now_ms() + 10
    for _ in range(3):
        assert await env.dispatcher.run_once(now) == 1
        now += 60_000
    [row] = await deliveries(env.db)
    assert (row["status"], row["attempts"]) == ("sent", 3)
    reqs = env.receiver.requests
    assert len(reqs) == 3  # every one passed webhooks.verify() in the receiver
    assert {r.headers["webhook-id"] for r in reqs} == {row["id"]}
    for r in reqs:
        assert r.method == "POST" and str(r.url) == dest["url"]
        assert r.headers["content-type"] == "application/json"
        assert abs(int(r.headers["webhook-timestamp"]) - now_ms() // 1000) < 60
    body = orjson.loads(reqs[-1].content)
    assert body["type"] == "event.track" and body["destination_id"] == dest["id"]
    assert body["timestamp"] == "2026-01-01T00:00:00.000Z"
    assert body["data"]["id"] == ev.id and body["data"]["payload"] == ev.payload
    page = await env.service.list_deliveries(env.ws, dest["id"])
    assert [d["status"] for d in page["items"]] == ["sent"] and page["next_cursor"] is None
    attempts = await env.service.list_attempts(env.ws, row["id"])
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, None), (3, 200)]
    assert attempts[0]["error"] == "HTTP 500: nope"
    assert "ConnectError: connection refused" in attempts[1]["error"]
    with pytest.raises(NotFound):
        await env.service.list_attempts(env.other_ws, row["id"])


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (410, "dead", "HTTP 410: nope"),
        (404, "failed", "HTTP 404: nope"),
        (302, "failed", "HTTP 302: nope (redirects are not followed)"),
        (httpx.ReadTimeout("slow"), "failed", "timeout after 2 s"),
    ],
)
async def test_outcomes(env: Env, answer: int | Exception, status: str, error: str) -> None:
    await env.create()
    env.receiver.script = [answer]
    await env.route([event(env.ws)])
    assert await env.dispatcher.run_once(now_ms() + 10) == 1
    [row] = await deliveries(env.db)
    assert (row["status"], row["last_error"]) == (status, error)


async def test_deleted_destination_dead_letters_its_backlog(env: Env) -> None:
    dest = await env.create()
    await env.route([event(env.ws), event(env.ws, customer_id="cus_2")])
    await env.service.delete(env.ws, dest["id"])
    assert await env.dispatcher.run_once(now_ms() + 10) == 2
    rows = await deliveries(env.db)
    assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [
        ("dead", 1, "destination_deleted")
    ] * 2
    assert env.receiver.requests == []


async def test_list_deliveries_pages_newest_first(env: Env) -> None:
    dest = await env.create()
    await env.route([event(env.ws) for _ in range(5)])
    rows = await deliveries(env.db)
    seen: list[str] = []
    cursor = None
    sizes = []
    while True:
        page = await env.service.list_deliveries(env.ws, dest["id"], cursor=cursor, limit=2)
        seen += [d["id"] for d in page["items"]]
        sizes.append(len(page["items"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sizes == [2, 2, 1]
    assert seen == [r["id"] for r in reversed(rows)]
    first = (await env.service.list_deliveries(env.ws, dest["id"], limit=1))["items"][0]
    assert first["status"] == "pending" and first["attempts"] == 0 and first["next_attempt_at"].endswith("Z")
    assert first["event"]["type"] == "track" and first["destination_id"] == dest["id"]
    assert (await env.service.list_deliveries(env.ws, dest["id"], status="sent"))["items"] == []
    for kwargs, code in (
        ({"limit": 0}, "invalid_limit"),
        ({"limit": 201}, "invalid_limit"),
        ({"status": "lost"}, "invalid_status"),
        ({"cursor": "evt_123"}, "invalid_cursor"),
    ):
        with pytest.raises(InvalidRequest) as exc:
            await env.service.list_deliveries(env.ws, dest["id"], **kwargs)
        assert exc.value.code == code


@pytest.mark.parametrize(
    ("answer", "wait_ms"),
    [
        ((429, {"Retry-After": "120"}), 120_000),
        ((503, {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}), 24 * 3_600_000),  # the outbox's cap
        ((503, {"Retry-After": "soon"}), None),  # unreadable: the backoff
        ((500, {"Retry-After": "120"}), None),  # only 429 and 503 carry it
    ],
)
async def test_a_receivers_retry_after_is_honoured(
    env: Env, answer: tuple[int, dict[str, str]], wait_ms: int | None
) -> None:
    await env.create()
    env.receiver.script = [answer]
    await env.route([event(env.ws)])
    now = now_ms() + 10
    assert await env.dispatcher.run_once(now) == 1
    [row] = await deliveries(env.db)
    assert row["status"] == "failed"
    if wait_ms is None:
        assert row["next_attempt_at"] < now + 60_000
    else:
        assert now + wait_ms <= row["next_attempt_at"] <= now + wait_ms + 1_000


def test_retry_after_values() -> None:
    from mayak.delivery.destinations import retry_after_ms

    assert retry_after_ms("0") == 0
    assert retry_after_ms(" 7 ") == 7000
    assert retry_after_ms("Thu, 01 Jan 1970 00:00:10 GMT", now=0) == 10_000
    assert retry_after_ms("Thu, 01 Jan 1970 00:00:10 GMT", now=20) == 0  # in the past: at once
    assert retry_after_ms("-5") is None
    assert retry_after_ms("") is None and retry_after_ms(None) is None
