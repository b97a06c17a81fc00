"""The web-chat channel over a real socket: uvicorn serving the app in the test's own event loop,
the ``websockets`` client library as the browser, ``mayak.drain()`` to run pipeline and outbox."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from mayak.api.app import create_app
from mayak.channels import user_tokens
from mayak.channels.webchat import CLOSE_GONE, TokenBucket, adapter_of, origin_allowed
from mayak.db.schema import events, outbox, outbox_attempts
from mayak.delivery.outbox import OutboxItem, enqueue
from mayak.eventlog import NewEvent, append, event_rows
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import admin


class Live:
    """A running server and the workspace and channel the tests talk to."""

    def __init__(self, mayak: Mayak, port: int, ws: dict[str, Any], channel: dict[str, Any]):
        self.mayak = mayak
        self.port = port
        self.ws = ws
        self.channel = channel
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def url(self, channel_id: str | None = None) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/webchat/{channel_id or self.channel['id']}/ws"

    async def open(
        self,
        visitor: str | None = None,
        *,
        key: str | None = None,
        token: str | None = None,
        origin: str | None = None,
        channel_id: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[ClientConnection, dict[str, Any]]:
        """Connect and say hello; returns the socket and the first frame the server sent."""
        sock = await connect(
            self.url(channel_id),
            origin=Origin(origin) if origin else None,
            user_agent_header="Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148",
        )
        hello: dict[str, Any] = {
            "type": "hello",
            "visitor_id": visitor or str(uuid.uuid4()),
            "write_key": self.ws["write_key"] if key is None else key,
        }
        if token is not None:
            hello["user_token"] = token
        if context is not None:
            hello["context"] = context
        await sock.send(orjson.dumps(hello).decode())
        return sock, await recv(sock)

    async def create_channel(
        self, config: dict[str, Any], ws: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        r = await self.http.post(
            "/v1/channels",
            json={"type": "webchat", "name": "Shop chat", "config": config},
            headers=admin(ws or self.ws),
        )
        assert r.status_code == 201, r.text
        return dict(r.json())


async def recv(sock: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(sock.recv(), timeout))
    return frame


async def closed_with(sock: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(sock.recv(), 5)
    assert info.value.rcvd is not None
    return info.value.rcvd.code


async def say(sock: ClientConnection, text: str, client_id: str | None = None) -> dict[str, Any]:
    cid = client_id or uuid.uuid4().hex
    await sock.send(orjson.dumps({"type": "message", "text": text, "client_id": cid}).decode())
    return await recv(sock)


@pytest.fixture
async def live(mayak: Mayak, ws: dict[str, Any]) -> AsyncIterator[Live]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(mayak, manage=False), log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    channel = await mayak.channels.create(
        ws["id"], type="webchat", name="Demo Motors", config={"title": "Ask us", "greeting": "Hi there!"}
    )
    lv = Live(mayak, port, ws, channel)
    try:
        yield lv
    finally:
        await lv.http.aclose()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def logged(mayak: Mayak, ws_id: str, **where: Any) -> list[Any]:
    async with mayak.db.read() as conn:
        query = event_rows(events.c.workspace_id == ws_id)
        for name, value in where.items():
            query = query.where(events.c[name] == value)
        return list((await conn.execute(query.order_by(events.c.seq))).all())


# -- the conversation ------------------------------------------------------------------------------


async def test_hello_welcome_message_ack_and_event(live: Live) -> None:
    visitor = str(uuid.uuid4())
    sock, welcome = await live.open(visitor, context={"locale": "en-GB", "timezone": "Europe/London"})
    assert welcome == {
        "type": "welcome",
        "visitor_id": visitor,
        "history": [],
        "config": {"title": "Ask us", "greeting": "Hi there!"},
    }
    ack = await say(sock, "Hello, is the Aurora in stock?", "c-1")
    assert ack["type"] == "ack" and ack["client_id"] == "c-1" and ack["duplicate"] is False
    assert ack["id"].startswith("evt_")
    # the ack means committed: the event is in the log now, attributed to the visitor's customer
    [row] = await logged(live.mayak, live.ws["id"], name="Message Received")
    assert row.id == ack["id"] and row.source == "webchat"
    body = orjson.loads(row.payload)
    assert body["anonymousId"] == visitor and "userId" not in body
    assert body["properties"] == {
        "channel": "webchat",
        "channel_id": live.channel["id"],
        "address": visitor,
        "text": "Hello, is the Aurora in stock?",
        "external_id": "c-1",
    }
    assert body["context"]["locale"] == "en-GB" and body["context"]["timezone"] == "Europe/London"
    assert "iPhone" in body["context"]["userAgent"]
    await live.mayak.drain()
    customer = await live.mayak.customers.find_by_identity(live.ws["id"], f"anonymous_id:{visitor}")
    [row] = await logged(live.mayak, live.ws["id"], name="Message Received")
    assert row.customer_id == customer["id"]
    assert customer["context"].get("timezone") == "Europe/London"
    await sock.close()


async def test_same_client_id_is_stored_once(live: Live) -> None:
    sock, _ = await live.open()
    first = await say(sock, "book a test drive", "same-id")
    again = await say(sock, "book a test drive", "same-id")
    assert first["duplicate"] is False and again == {"type": "ack", "client_id": "same-id", "duplicate": True}
    # a reconnect that resends an unacked message is deduplicated as well
    await sock.close()
    assert len(await logged(live.mayak, live.ws["id"], name="Message Received")) == 1


async def test_button_frame_is_a_button_clicked_event(live: Live) -> None:
    sock, _ = await live.open()
    await sock.send(
        orjson.dumps({"type": "button", "payload": "book", "title": "Book", "client_id": "b1"}).decode()
    )
    assert (await recv(sock))["type"] == "ack"
    [row] = await logged(live.mayak, live.ws["id"], name="Button Clicked")
    props = orjson.loads(row.payload)["properties"]
    assert props["payload"] == "book" and props["title"] == "Book" and "text" not in props
    await sock.close()


async def test_bad_frames_are_answered_without_closing(live: Live) -> None:
    sock, _ = await live.open()
    cases: list[tuple[str | bytes, str]] = [
        ("not json", "$"),
        ("[1, 2]", "$"),
        (b"\x00binary", "$"),
        ('{"type": "shout"}', "$.type"),
        ('{"type": "message", "text": "hi"}', "$.client_id"),
        ('{"type": "message", "text": "   ", "client_id": "e1"}', "$.text"),
        ('{"type": "message", "text": 5, "client_id": "e2"}', "$.text"),
        (orjson.dumps({"type": "message", "text": "x" * 10_001, "client_id": "e3"}).decode(), "$.text"),
        ('{"type": "button", "client_id": "e4"}', "$.payload"),
        ('{"type": "hello", "visitor_id": "x"}', "$.type"),
    ]
    for frame, param in cases:
        await sock.send(frame)
        answer = await recv(sock)
        assert answer["type"] == "error" and answer["code"] == "invalid_frame", (frame, answer)
        assert answer["param"] == param, (frame, answer)
    # the client id comes back once it is known, so the widget can mark that message failed
    await sock.send('{"type": "message", "text": "", "client_id": "e9"}')
    assert (await recv(sock))["client_id"] == "e9"
    await sock.send('{"type": "ping"}')
    assert await recv(sock) == {"type": "pong"}
    # a 10,000-character message is accepted whole
    ack = await say(sock, "y" * 10_000)
    assert ack["type"] == "ack"
    [row] = await logged(live.mayak, live.ws["id"], name="Message Received")
    assert len(orjson.loads(row.payload)["properties"]["text"]) == 10_000
    await sock.close()


async def test_rate_limit_answers_the_excess(live: Live) -> None:
    assert adapter_of(live.mayak).rate_capacity == 20  # the default burst…
    adapter_of(live.mayak).rate_per_s = 0.1  # …refilled slowly here, so a slow machine cannot refill it
    sock, _ = await live.open()
    answers = [await say(sock, f"message {i}", f"r{i}") for i in range(22)]
    assert [a["type"] for a in answers[:20]] == ["ack"] * 20
    for a, cid in zip(answers[20:], ("r20", "r21"), strict=True):
        assert a["type"] == "error" and a["code"] == "rate_limited" and a["client_id"] == cid
        assert 0 < a["retry_after_ms"] <= 10_000
    assert len(await logged(live.mayak, live.ws["id"], name="Message Received")) == 20
    await sock.close()


def test_token_bucket_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(2, 0.5, clock=lambda: now[0])
    assert bucket.take() == 0 and bucket.take() == 0
    assert bucket.take() == pytest.approx(2.0)
    now[0] = 1.0
    assert bucket.take() == pytest.approx(1.0)
    now[0] = 2.0
    assert bucket.take() == 0


# -- who may connect ------------------------------------------------------------------------------


async def test_keys_channels_and_first_frame_are_checked(live: Live, mayak: Mayak) -> None:
    other = await mayak.workspaces.create_workspace("Other")
    cases = [
        ({"key": ""}, 4401, "missing_key"),
        ({"key": "wk_unknown"}, 4401, "invalid_key"),
        ({"key": other["write_key"]}, 4403, "key_not_for_channel"),
        ({"key": live.ws["secret_key"]}, 4403, "secret_key_not_allowed"),
        ({"channel_id": "ch_nope"}, 4404, "channel_not_found"),
        ({"visitor": "short"}, 4400, "invalid_frame"),
    ]
    for kwargs, close_code, code in cases:
        sock, frame = await live.open(**kwargs)
        assert frame["type"] == "error" and frame["code"] == code, (kwargs, frame)
        assert await closed_with(sock) == close_code, kwargs
    sock = await connect(live.url())
    await sock.send('{"type": "message", "text": "hi", "client_id": "1"}')
    assert (await recv(sock))["code"] == "hello_required"
    assert await closed_with(sock) == 4400
    adapter_of(mayak).hello_timeout_s = 0.05
    sock = await connect(live.url())
    assert (await recv(sock))["code"] == "hello_timeout"
    assert await closed_with(sock) == 4408
    await mayak.channels.update(live.ws["id"], live.channel["id"], bot_id=None, status="disabled")
    sock, frame = await live.open()
    assert frame["code"] == "channel_disabled" and await closed_with(sock) == 4403


async def test_origins(live: Live, mayak: Mayak) -> None:
    shop = await live.create_channel({"allowed_origins": ["https://shop.example"]})
    sock, frame = await live.open(channel_id=shop["id"], origin="https://evil.example")
    assert frame["code"] == "origin_not_allowed" and await closed_with(sock) == 4403
    sock, frame = await live.open(channel_id=shop["id"], origin="https://shop.example")
    assert frame["type"] == "welcome"
    await sock.close()
    # the page Mayak serves itself (the demo page) is always allowed
    sock, frame = await live.open(channel_id=shop["id"], origin=f"http://127.0.0.1:{live.port}")
    assert frame["type"] == "welcome"
    await sock.close()
    # no allowed_origins on the channel: the workspace's setting applies
    await mayak.workspaces.update_settings(live.ws["id"], {"allowed_origins": ["https://www.example"]})
    sock, frame = await live.open(origin="https://shop.example")
    assert frame["code"] == "origin_not_allowed"
    sock, frame = await live.open(origin="https://www.example")
    assert frame["type"] == "welcome"
    await sock.close()
    assert origin_allowed("HTTPS://Shop.Example", ["https://shop.example"], None)
    assert not origin_allowed("https://shop.example.evil", ["https://shop.example"], "mayak.example")


async def test_channel_config_is_validated(live: Live) -> None:
    for config, param in [
        ({"colour": "red"}, "$.config.colour"),
        ({"title": ""}, "$.config.title"),
        ({"greeting": 5}, "$.config.greeting"),
        ({"allowed_origins": []}, "$.config.allowed_origins"),
        ({"allowed_origins": ["shop.example"]}, "$.config.allowed_origins[0]"),
        ({"allowed_origins": ["https://shop.example/path"]}, "$.config.allowed_origins[0]"),
    ]:
        r = await live.http.post(
            "/v1/channels", json={"type": "webchat", "name": "x", "config": config}, headers=admin(live.ws)
        )
        assert r.status_code == 400 and r.json()["param"] == param, (config, r.text)


async def test_deleting_the_channel_closes_its_sockets(live: Live) -> None:
    sock, _ = await live.open()
    r = await live.http.delete(f"/v1/channels/{live.channel['id']}", headers=admin(live.ws))
    assert r.status_code == 200
    assert (await recv(sock))["code"] == "channel_deleted"
    assert await closed_with(sock) == CLOSE_GONE


# -- user tokens ------------------------------------------------------------------------------------


async def test_forged_expired_and_foreign_tokens_are_refused(live: Live, mayak: Mayak) -> None:
    secret = await mayak.workspaces.signing_secret(live.ws["id"], "user_tokens")
    other = await mayak.workspaces.create_workspace("Other")
    other_secret = await mayak.workspaces.signing_secret(other["id"], "user_tokens")
    good = user_tokens.mint(secret, "user-1", 600)
    header, payload, signature = good.split(".")
    forged_payload = user_tokens._b64encode(orjson.dumps({"sub": "user-2", "exp": time.time() + 600}))
    none_header = user_tokens._b64encode(orjson.dumps({"alg": "none", "typ": "JWT"}))
    cases = [
        (user_tokens.mint("guessed-secret", "user-1", 600), "invalid_user_token"),
        (user_tokens.mint(other_secret, "user-1", 600), "invalid_user_token"),
        (f"{header}.{forged_payload}.{signature}", "invalid_user_token"),
        (f"{none_header}.{payload}.", "invalid_user_token"),
        ("not-a-token", "invalid_user_token"),
        (user_tokens.mint(secret, "user-1", 60, now=time.time() - 3600), "expired_user_token"),
    ]
    for token, code in cases:
        sock, frame = await live.open(token=token)
        assert frame["type"] == "error" and frame["code"] == code, (token, frame)
        assert frame["param"] == "$.user_token"
        assert await closed_with(sock) == 4401
    assert await logged(live.mayak, live.ws["id"], name="Message Received") == []


async def test_a_valid_token_identifies_the_visitor_and_merges_the_anonymous_profile(
    live: Live, mayak: Mayak
) -> None:
    visitor = str(uuid.uuid4())
    sock, _ = await live.open(visitor)
    assert (await say(sock, "just looking", "a1"))["type"] == "ack"
    await sock.close()
    await mayak.drain()
    anonymous = await mayak.customers.find_by_identity(live.ws["id"], f"anonymous_id:{visitor}")

    secret = await mayak.workspaces.signing_secret(live.ws["id"], "user_tokens")
    token = user_tokens.mint(secret, "user-42", 600, email="Ann@Example.com", name="Ann Smith")
    sock, welcome = await live.open(visitor, token=token)
    assert welcome["type"] == "welcome" and welcome["user_id"] == "user-42"
    assert [h["text"] for h in welcome["history"]] == ["just looking"]  # the same browser's conversation
    assert (await say(sock, "I'd like to book a service", "a2"))["type"] == "ack"
    await sock.close()
    await mayak.drain()

    rows = await logged(live.mayak, live.ws["id"], name="Message Received")
    body = orjson.loads(rows[1].payload)
    assert body["userId"] == "user-42" and body["anonymousId"] == visitor
    assert body["context"]["traits"] == {"email": "Ann@Example.com", "name": "Ann Smith"}
    user = await mayak.customers.find_by_identity(live.ws["id"], "user_id:user-42")
    assert {r.customer_id for r in await logged(live.mayak, live.ws["id"], name="Message Received")} == {
        user["id"]
    }
    assert anonymous["id"] == user["id"] or anonymous["id"] in user["merged_ids"]
    kinds = {(i["kind"], i["value"]) for i in user["identities"]}
    assert ("email", "ann@example.com") in kinds and ("anonymous_id", visitor) in kinds

    # Logged out on the same browser (no token): the identified customer's conversation stays hidden.
    sock, welcome = await live.open(visitor)
    assert welcome["history"] == [] and "customer_id" not in welcome
    await sock.close()
    # Another device of the same user, with a token: the conversation is there.
    sock, welcome = await live.open(str(uuid.uuid4()), token=token)
    assert [h["text"] for h in welcome["history"]] == ["just looking", "I'd like to book a service"]
    assert welcome["customer_id"] == user["id"]
    await sock.close()


async def test_user_token_admin_routes(live: Live) -> None:
    r = await live.http.post("/v1/webchat/user_tokens", json={"user_id": "u-7", "email": "u7@example.com"})
    assert r.status_code == 401
    r = await live.http.post(
        "/v1/webchat/user_tokens",
        json={"user_id": "u-7"},
        headers={"Authorization": f"Bearer {live.ws['write_key']}"},
    )
    assert r.status_code == 403 and r.json()["code"] == "secret_key_required"
    r = await live.http.post(
        "/v1/webchat/user_tokens",
        json={"user_id": "u-7", "ttl_s": 120, "email": "u7@example.com"},
        headers=admin(live.ws) | {"Idempotency-Key": "tok-1"},
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    again = await live.http.post(
        "/v1/webchat/user_tokens",
        json={"user_id": "u-7", "ttl_s": 120, "email": "u7@example.com"},
        headers=admin(live.ws) | {"Idempotency-Key": "tok-1"},
    )
    assert again.json()["token"] == token and again.headers["Idempotent-Replayed"] == "true"
    secret = (await live.http.get("/v1/webchat/user_token_secret", headers=admin(live.ws))).json()["secret"]
    claims = user_tokens.verify(secret, token, time.time())
    assert claims["sub"] == "u-7" and claims["email"] == "u7@example.com"
    assert claims["exp"] - claims["iat"] == 120
    sock, welcome = await live.open(token=token)
    assert welcome["type"] == "welcome"
    await sock.close()
    for bad in ({"user_id": ""}, {"user_id": "u", "ttl_s": 10}, {"user_id": " u"}, {"user_id": "u", "x": 1}):
        r = await live.http.post("/v1/webchat/user_tokens", json=bad, headers=admin(live.ws))
        assert r.status_code == 400, (bad, r.text)
    # rotation: tokens signed with the old secret are refused
    r = await live.http.post("/v1/webchat/user_token_secret/rotate", headers=admin(live.ws))
    assert r.status_code == 200 and r.json()["secret"] != secret
    sock, frame = await live.open(token=token)
    assert frame["code"] == "invalid_user_token"


# -- outbound ---------------------------------------------------------------------------------------


async def _customer_of(mayak: Mayak, ws_id: str, visitor: str) -> str:
    await mayak.drain()
    return str((await mayak.customers.find_by_identity(ws_id, f"anonymous_id:{visitor}"))["id"])


async def _enqueue_message(
    live: Live, customer_id: str, visitor: str, key: str, message: dict[str, Any]
) -> None:
    async with live.mayak.db.write() as conn:
        await enqueue(
            live.mayak.db,
            conn,
            [
                OutboxItem(
                    live.ws["id"],
                    kind="message",
                    target=live.channel["id"],
                    customer_id=customer_id,
                    idempotency_key=key,
                    payload={"channel_id": live.channel["id"], "address": visitor, "message": message},
                )
            ],
        )


async def test_outbox_message_is_pushed_to_every_socket_of_the_visitor(live: Live) -> None:
    visitor = str(uuid.uuid4())
    tab1, _ = await live.open(visitor)
    tab2, _ = await live.open(visitor)
    stranger, _ = await live.open()
    await say(tab1, "hello")
    customer = await _customer_of(live.mayak, live.ws["id"], visitor)
    message = {
        "text": "Hi",
        "buttons": [
            {"title": "Book", "payload": "book"},
            {"title": "Site", "url": "https://motors.example"},
            {"title": "Evil", "url": "javascript:alert(1)"},
        ],
    }
    await _enqueue_message(live, customer, visitor, "m-1", message)
    await live.mayak.drain()
    for tab in (tab1, tab2):
        frame = await recv(tab)
        assert frame["type"] == "message" and frame["text"] == "Hi" and frame["id"].startswith("obx_")
        assert frame["buttons"] == [
            {"title": "Book", "payload": "book"},
            {"title": "Site", "url": "https://motors.example"},
        ]
        assert frame["at"].endswith("Z")
    await stranger.send('{"type": "ping"}')
    assert await recv(stranger) == {"type": "pong"}  # nothing was pushed to another visitor
    # a long message is cut to 4,096-character parts, buttons under the last
    await _enqueue_message(
        live,
        customer,
        visitor,
        "m-2",
        {"text": "word " * 1000, "buttons": [{"title": "OK", "payload": "ok"}]},
    )
    await live.mayak.drain()
    first, second = await recv(tab1), await recv(tab1)
    assert len(first["text"]) <= 4096 and first["buttons"] == [] and second["buttons"][0]["title"] == "OK"
    for sock in (tab1, tab2, stranger):
        await sock.close()


async def test_a_visitor_who_is_not_connected_still_counts_as_delivered(live: Live) -> None:
    visitor = str(uuid.uuid4())
    sock, _ = await live.open(visitor)
    await say(sock, "hello")
    await sock.close()
    customer = await _customer_of(live.mayak, live.ws["id"], visitor)
    await _enqueue_message(live, customer, visitor, "m-offline", {"text": "Are you still there?"})
    await live.mayak.drain()
    async with live.mayak.db.read() as conn:
        status = (
            await conn.execute(sa.select(outbox.c.status).where(outbox.c.idempotency_key == "m-offline"))
        ).scalar_one()
    assert status == "sent"


async def test_with_the_dispatcher_running_a_push_is_recorded_sent_with_its_row(live: Live) -> None:
    """The in-process bus: the row is written sent (its one attempt too) and pushed after the
    commit, with no claim and no second write."""
    visitor = str(uuid.uuid4())
    sock, _ = await live.open(visitor)
    await say(sock, "hello")
    customer = await _customer_of(live.mayak, live.ws["id"], visitor)
    dispatcher = live.mayak.outbox
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run_forever(stop))
    try:
        while not dispatcher.accepts_births():
            await asyncio.sleep(0.01)
        await _enqueue_message(live, customer, visitor, "m-instant", {"text": "Right away"})
        async with live.mayak.db.read() as conn:
            row = (await conn.execute(sa.select(outbox).where(outbox.c.idempotency_key == "m-instant"))).one()
            attempts = (
                await conn.execute(sa.select(outbox_attempts).where(outbox_attempts.c.outbox_id == row.id))
            ).all()
        assert (row.status, row.attempts, row.lease_until) == ("sent", 1, None)
        assert [(a.attempt, a.error) for a in attempts] == [(1, None)]
        frame = await recv(sock)  # no drain: pushed right after the commit
        assert frame["type"] == "message" and frame["text"] == "Right away" and frame["id"] == f"{row.id}.0"
    finally:
        stop.set()
        dispatcher._wake.set()
        await asyncio.wait_for(task, 5)
    await sock.close()


async def test_history_on_reconnect(live: Live, mayak: Mayak) -> None:
    visitor = str(uuid.uuid4())
    sock, _ = await live.open(visitor)
    await say(sock, "Do you have the Comet?", "h1")
    await sock.send('{"type": "button", "payload": "yes", "title": "Yes please", "client_id": "h2"}')
    await recv(sock)
    await sock.close()
    customer = await _customer_of(mayak, live.ws["id"], visitor)
    now = now_ms()

    def outbound(channel_id: str, text: str, key: str) -> NewEvent:
        return NewEvent(
            workspace_id=live.ws["id"],
            type="message.outbound",
            timestamp=now,
            received_at=now,
            source="bot",
            customer_id=customer,
            dedup_key=key,
            payload={
                "channel_id": channel_id,
                "channel": "webchat",
                "address": visitor,
                "message": {"text": text, "buttons": [{"title": "Book", "payload": "book"}]},
                "conversation_id": "conv_1",
            },
        )

    async with mayak.db.write() as conn:
        await append(mayak.db, conn, [outbound(live.channel["id"], "We do! Book a test drive?", "o1")])
        await append(mayak.db, conn, [outbound("ch_other", "on another channel", "o2")])
    await mayak.drain()
    sock, welcome = await live.open(visitor)
    history = welcome["history"]
    assert welcome["customer_id"] == customer
    assert [(h["direction"], h["text"]) for h in history] == [
        ("in", "Do you have the Comet?"),
        ("in", "Yes please"),
        ("out", "We do! Book a test drive?"),
    ]
    assert history[0]["client_id"] == "h1" and history[1]["payload"] == "yes"
    assert history[2]["buttons"] == [{"title": "Book", "payload": "book"}]
    assert all(h["id"].startswith("evt_") and h["at"].endswith("Z") for h in history)
    await sock.close()


# -- static files -----------------------------------------------------------------------------------


async def test_widget_script_and_demo_page(live: Live) -> None:
    for path in ("/widget.js", "/v1/webchat/widget.js"):
        r = await live.http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
        assert "attachShadow" in r.text
        assert not any(sink in r.text for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "eval("))
    channel_id = live.channel["id"]
    r = await live.http.get(f"/v1/webchat/{channel_id}/demo", params={"key": live.ws["write_key"]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert f'data-channel="{channel_id}"' in r.text and f'data-key="{live.ws["write_key"]}"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    r = await live.http.get(f"/v1/webchat/{channel_id}/demo", params={"key": '"><script>alert(1)</script>'})
    assert r.status_code == 200 and "<script>alert" not in r.text and "?key=wk_" in r.text
    r = await live.http.get("/v1/webchat/ch_missing/demo", params={"key": live.ws["write_key"]})
    assert r.status_code == 404
