"""The push bus carries web-chat frames to the process that holds the visitor's socket.

Two ``Mayak`` platforms in one test stand for two processes (an API process holding the socket, a
worker delivering the outbox row): over PostgreSQL LISTEN/NOTIFY (one shared database) and over NATS
(``MAYAK_TEST_NATS_URL``). The last tests run real processes: ``mayak serve --no-workers`` holds
the socket, ``mayak worker`` runs the bot and delivers its reply (with each bus, and without one as
the control).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import sqlalchemy as sa
from prometheus_client import generate_latest

from mayak.bus import (
    PG_MAX_PAYLOAD,
    LocalBus,
    NatsBus,
    PostgresBus,
    PushBus,
    build_bus,
    pg_envelope,
    pg_payload,
)
from mayak.channels.base import Button, ChannelRecord, OutboundMessage
from mayak.channels.webchat import Connection, adapter_of
from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import outbox
from mayak.platform import Mayak
from tests.conftest import POSTGRES_URL, fresh_database, need_service

NATS_URL = os.environ.get("MAYAK_TEST_NATS_URL", "")

# Words to build long Russian messages from (realistic text: it compresses like real chat does).
WORDS = (  # noqa: SIM905
    "здравствуйте запись на сервис автомобиль завтра утром мастер проверит тормоза масло фильтр "
    "стоимость работ составит рублей спасибо что выбрали наш салон ждём вас по адресу улица Ленина"
).split()


class FakeSocket:
    """What ``Connection`` needs of a Starlette WebSocket: the frames it sends land in a queue."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send_text(self, text: str) -> None:
        self.frames.put_nowait(orjson.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.get(), timeout)


def attach(mayak: Mayak, channel_id: str, visitor: str) -> FakeSocket:
    """A socket of ``visitor`` open in ``mayak``'s process (registered in its hub)."""
    sock = FakeSocket()
    conn = Connection(sock, channel_id)  # type: ignore[arg-type]
    conn.visitor_id = visitor
    conn.start()
    adapter_of(mayak).hub.add(conn)
    return sock


def russian(chars: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def started_pair(a: Mayak, b: Mayak, bus: type[PushBus]) -> AsyncIterator[tuple[Mayak, Mayak]]:
    """``a`` and ``b`` started (their ``bus`` connected) for the block; both closed afterwards."""
    try:
        assert isinstance(a.bus, bus) and isinstance(b.bus, bus)
        for m in (a, b):
            await m.start(workers=False)
        for m in (a, b):
            assert await m.bus.wait_connected(10), f"the {m.bus.name} bus did not connect"
        yield a, b
    finally:
        await a.close()
        await b.close()


async def exchange(a: Mayak, b: Mayak) -> tuple[ChannelRecord, ChannelRecord]:
    """B delivers to a visitor whose socket A holds; A's own delivery reaches it once. Returns the
    channel as each side sees it."""
    ws = await a.workspaces.create_workspace("Bus", {})
    channel = await a.channels.create(ws["id"], type="webchat", name="Chat", config={})
    on_a = await a.channels.record(ws["id"], channel["id"])
    on_b = await b.channels.record(ws["id"], channel["id"])
    visitor = str(uuid.uuid4())
    sock = attach(a, channel["id"], visitor)
    elsewhere = attach(a, channel["id"], str(uuid.uuid4()))  # another visitor's socket

    outcome = await adapter_of(b).send(on_b, visitor, OutboundMessage("Привет из другого процесса"), "obx_1")
    assert outcome.ok
    frame = await sock.next()
    assert frame["type"] == "message" and frame["id"] == "obx_1"
    assert frame["text"] == "Привет из другого процесса" and frame["at"].endswith("Z")
    assert a.bus.received >= 1  # (other test runs on this database or NATS server may add theirs)
    await eventually(lambda: b.bus.published == 1)  # counted once pg_notify returned: maybe after

    # A's own delivery: pushed here directly, and its publication coming back is ignored
    own_before = a.bus.own
    assert (await adapter_of(a).send(on_a, visitor, OutboundMessage("from A"), "obx_2")).ok
    assert (await sock.next())["text"] == "from A"
    await eventually(lambda: a.bus.own > own_before)  # the echo arrived…
    await eventually(lambda: b.bus.received >= 1)  # …and B got it too (no socket there: no push)
    await asyncio.sleep(0.1)
    assert sock.frames.empty(), "A's own publication was pushed twice"

    # a Cyrillic message of the web chat's longest part (4,096 characters, typeset with no-break
    # spaces: 8 KB of UTF-8), with buttons: over PostgreSQL's limit for a notification's payload
    text = russian(4096).replace(" ", "\u00a0")
    buttons = (Button("Записаться на сервис", payload="book"), Button("Сайт", url="https://motors.example"))
    assert (await adapter_of(b).send(on_b, visitor, OutboundMessage(text, buttons), "obx_3")).ok
    big = await sock.next()
    assert big["text"] == text and len(orjson.dumps(big)) > PG_MAX_PAYLOAD
    assert big["buttons"] == [b.to_json() for b in buttons]
    assert elsewhere.frames.empty()
    return on_a, on_b


# -- PostgreSQL LISTEN/NOTIFY ------------------------------------------------------------------------


def pg_settings() -> Settings:
    return Settings(database_url=POSTGRES_URL, secret_key="test-master-key")


@pytest.fixture
async def pg_pair(tmp_path: Path) -> AsyncIterator[tuple[Mayak, Mayak]]:
    db_a = await fresh_database("postgres", tmp_path)  # skips (or fails in CI) without PostgreSQL
    a = Mayak(pg_settings(), db=db_a)
    b = Mayak(pg_settings(), db=Database(POSTGRES_URL, pool_size=2))
    async with started_pair(a, b, PostgresBus) as pair:
        yield pair


async def test_postgres_carries_frames_between_processes(pg_pair: tuple[Mayak, Mayak]) -> None:
    a, b = pg_pair
    await exchange(a, b)


async def test_postgres_skips_a_frame_too_large_for_a_notification(pg_pair: tuple[Mayak, Mayak]) -> None:
    a, b = pg_pair
    on_a, on_b = await exchange(a, b)
    visitor = str(uuid.uuid4())
    sock = attach(a, on_a.id, visitor)
    mine = attach(b, on_b.id, visitor)  # the sender's own socket still gets it
    rng = random.Random(1)
    noise = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(4000))  # incompressible
    assert pg_payload(orjson.dumps({"f": noise})) is None
    assert (await adapter_of(b).send(on_b, visitor, OutboundMessage(noise), "obx_big")).ok
    assert (await mine.next())["text"] == noise
    assert (await adapter_of(b).send(on_b, visitor, OutboundMessage("after"), "obx_after")).ok
    assert (await sock.next())["text"] == "after"  # the big one was skipped, the bus goes on
    assert b.bus.skipped == 1  # type: ignore[attr-defined]


async def test_postgres_listener_reconnects(pg_pair: tuple[Mayak, Mayak]) -> None:
    a, b = pg_pair
    ws = await a.workspaces.create_workspace("Bus", {})
    channel = await a.channels.create(ws["id"], type="webchat", name="Chat", config={})
    on_b = await b.channels.record(ws["id"], channel["id"])
    visitor = str(uuid.uuid4())
    sock = attach(a, channel["id"], visitor)
    assert isinstance(a.bus, PostgresBus)
    pid = a.bus._conn.get_server_pid()
    killer = await asyncpg.connect(POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await killer.close()
    await eventually(lambda: not a.bus.connected)
    assert await a.bus.wait_connected(10)
    assert a.bus._conn.get_server_pid() != pid
    assert (await adapter_of(b).send(on_b, visitor, OutboundMessage("back"), "obx_back")).ok
    assert (await sock.next())["text"] == "back"


def test_notification_payloads() -> None:
    small = orjson.dumps({"o": "x", "f": {"text": "привет"}})
    assert pg_payload(small) == small.decode()
    big = orjson.dumps({"o": "x", "f": {"text": russian(4096).replace(" ", "\u00a0")}})
    packed = pg_payload(big)
    assert packed is not None and packed.startswith("z:") and len(packed) <= PG_MAX_PAYLOAD
    assert pg_envelope(packed) == orjson.loads(big)


# -- NATS ------------------------------------------------------------------------------------------


@pytest.fixture
async def nats_pair(tmp_path: Path) -> AsyncIterator[tuple[Mayak, Mayak]]:
    need_service("NATS", bool(NATS_URL), "MAYAK_TEST_NATS_URL is not set (e.g. nats://127.0.0.1:4222)")
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/shared.db",
        secret_key="test-master-key",
        bus_url=NATS_URL,
    )
    db = Database(settings.database_url)
    await db.create_all()
    a = Mayak(settings, db=db)
    b = Mayak(settings)  # its own engine on the same SQLite file
    async with started_pair(a, b, NatsBus) as pair:
        yield pair


async def test_nats_carries_frames_between_processes(nats_pair: tuple[Mayak, Mayak]) -> None:
    a, b = nats_pair
    await exchange(a, b)


# -- no bus, a bus that is down ----------------------------------------------------------------------


def test_the_bus_is_chosen_from_the_settings() -> None:
    assert isinstance(build_bus("", "sqlite+aiosqlite:///x.db"), LocalBus)
    assert isinstance(build_bus("", "postgresql+asyncpg://u:p%40ss@db:5432/mayak"), PostgresBus)
    pg = build_bus("", "postgresql+asyncpg://u:p%40ss@db:5432/mayak")
    assert isinstance(pg, PostgresBus) and pg.dsn == "postgresql://u:p%40ss@db:5432/mayak"
    assert isinstance(build_bus("local", "postgresql+asyncpg://db/mayak"), LocalBus)
    nats = build_bus("nats://a:4222,nats://b:4222", "postgresql+asyncpg://db/mayak")
    assert isinstance(nats, NatsBus) and nats.servers == ["nats://a:4222", "nats://b:4222"]
    with pytest.raises(ValueError, match="MAYAK_BUS_URL"):
        build_bus("redis://x", "sqlite+aiosqlite:///x.db")


async def test_a_bus_that_is_down_never_fails_a_delivery(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/m.db",
        secret_key="test-master-key",
        bus_url="nats://127.0.0.1:1",  # nothing listens there
    )
    db = Database(settings.database_url)
    await db.create_all()
    m = Mayak(settings, db=db)
    await m.start(workers=False)  # starts although the bus cannot connect
    try:
        assert not await m.bus.wait_connected(0.2)
        ws = await m.workspaces.create_workspace("Bus", {})
        channel = await m.channels.create(ws["id"], type="webchat", name="Chat", config={})
        record = await m.channels.record(ws["id"], channel["id"])
        sock = attach(m, channel["id"], "visitor-1")
        assert (await adapter_of(m).send(record, "visitor-1", OutboundMessage("hi"), "obx_1")).ok
        assert (await sock.next())["text"] == "hi"  # this process's sockets still get it
        assert m.bus.dropped == 1
        exposition = generate_latest(m.metrics.registry).decode()
        assert 'mayak_push_frames_total{bus="nats",outcome="dropped"} 1.0' in exposition
        assert 'mayak_push_frames_total{bus="nats",outcome="published"} 0.0' in exposition
    finally:
        await m.close()


async def test_the_default_bus_stays_in_the_process(tmp_path: Path, settings: Settings) -> None:
    m = Mayak(dataclasses.replace(settings, bus_url=""))
    assert isinstance(m.bus, LocalBus)
    m.bus.publish("webchat", "ch_1", "v", {"type": "message"})  # nothing to do, nothing raised
    await m.db.dispose()


# -- real processes ------------------------------------------------------------------------------

BOT = """
bot:
  name: relay
  languages: [ru]
flows:
  hello:
    trigger: {commands: [/start]}
    steps:
      - say: "Здравствуйте! Ответ пришёл из процесса воркера."
"""


async def _outbox_sent(db_url: str) -> bool:
    db = Database(db_url)
    try:
        async with db.read() as conn:
            status = (await conn.execute(sa.select(outbox.c.status).where(outbox.c.kind == "message"))).all()
        return bool(status) and all(row.status == "sent" for row in status)
    finally:
        await db.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("bus", ["postgres", "nats", "local"])
async def test_a_reply_delivered_by_a_worker_reaches_the_api_process_socket(tmp_path: Path, bus: str) -> None:
    """``mayak serve --no-workers`` holds the socket; ``mayak worker`` runs the bot and delivers its
    reply. With a bus the reply is pushed live; with ``MAYAK_BUS_URL=local`` (the control) it is not,
    and the next connection's history shows it."""
    from websockets.asyncio.client import connect

    from tests.test_e2e_durability import Proc, free_port, mayak_command

    need_service("PostgreSQL", bool(POSTGRES_URL), "MAYAK_TEST_POSTGRES_URL is not set")
    if bus == "nats":
        need_service("NATS", bool(NATS_URL), "MAYAK_TEST_NATS_URL is not set (e.g. nats://127.0.0.1:4222)")
    db = Database(POSTGRES_URL)
    async with db.engine.begin() as conn:
        await conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
        await conn.execute(sa.text("CREATE SCHEMA public"))
    await db.dispose()
    port = free_port()
    env = {
        **os.environ,
        "MAYAK_DATABASE_URL": POSTGRES_URL,
        "MAYAK_SECRET_KEY": "bus-e2e",
        "MAYAK_PORT": str(port),
        "MAYAK_INLINE_PIPELINE": "0",  # the API process builds nothing: the worker runs the bot
        "MAYAK_LOG_LEVEL": "info",
        "MAYAK_BUS_URL": {"postgres": "", "nats": NATS_URL, "local": "local"}[bus],
    }
    created = subprocess.run(
        [*mayak_command(), "workspace", "create", "Bus", "--json"], env=env, capture_output=True, check=True
    )
    ws = json.loads(created.stdout)
    admin = {"Authorization": f"Bearer {ws['secret_key']}"}
    url = f"http://127.0.0.1:{port}"
    socket_url = ""
    api = Proc(env, tmp_path / "api.log", ("serve", "--no-workers"))
    worker = Proc(env, tmp_path / "worker.log", ("worker",))
    visitor = str(uuid.uuid4())
    hello = orjson.dumps({"type": "hello", "visitor_id": visitor, "write_key": ws["write_key"]}).decode()
    said = "Здравствуйте! Ответ пришёл из процесса воркера."
    try:
        await asyncio.to_thread(api.wait_ready, url)
        async with httpx.AsyncClient(base_url=url, headers=admin, timeout=10) as http:
            r = await http.post("/v1/channels", json={"type": "webchat", "name": "Chat", "config": {}})
            assert r.status_code == 201, r.text
            socket_url = f"ws://127.0.0.1:{port}/v1/webchat/{r.json()['id']}/ws"
            channel_id = r.json()["id"]
            r = await http.post("/v1/bots", json={"files": {"bot.yaml": BOT}})
            assert r.status_code in (200, 201), r.text
            r = await http.patch(f"/v1/channels/{channel_id}", json={"bot_id": r.json()["id"]})
            assert r.status_code == 200, r.text
        async with connect(socket_url) as sock:
            await sock.send(hello)
            assert orjson.loads(await asyncio.wait_for(sock.recv(), 10))["type"] == "welcome"
            await sock.send(orjson.dumps({"type": "message", "text": "/start", "client_id": "c1"}).decode())
            ack = orjson.loads(await asyncio.wait_for(sock.recv(), 10))
            assert ack["type"] == "ack" and ack["client_id"] == "c1", ack
            if bus != "local":
                # the worker runs the bot and delivers the reply; the API process pushes it
                reply = orjson.loads(await asyncio.wait_for(sock.recv(), 30))
                assert reply["type"] == "message" and reply["text"] == said, reply
            else:
                deadline = time.monotonic() + 30
                while not await _outbox_sent(POSTGRES_URL):
                    assert time.monotonic() < deadline, "the worker did not deliver the reply"
                    await asyncio.sleep(0.1)
                with pytest.raises(TimeoutError):  # delivered in the worker, not pushed here
                    await asyncio.wait_for(sock.recv(), 1.0)
        if bus == "local":  # the safety net: the next connection's history has it
            async with connect(socket_url) as sock:
                await sock.send(hello)
                welcome = orjson.loads(await asyncio.wait_for(sock.recv(), 10))
            assert [h["text"] for h in welcome["history"] if h["direction"] == "out"] == [said]
        assert worker.p.poll() is None, worker.output()
    except BaseException:
        print("--- api ---\n", api.output(), "\n--- worker ---\n", worker.output())
        raise
    finally:
        worker.stop()
        api.stop()


# -- a deleted channel closes its sockets in every process ----------------------------------------


async def close_across(a: Mayak, b: Mayak) -> None:
    """B deletes a channel whose visitor's socket A holds: A's socket is told and closed."""
    ws = await a.workspaces.create_workspace("Bus", {})
    channel = await a.channels.create(ws["id"], type="webchat", name="Chat", config={})
    on_b = await b.channels.record(ws["id"], channel["id"])
    sock = attach(a, channel["id"], str(uuid.uuid4()))
    await adapter_of(b).deactivate(on_b)
    frame = await sock.next()  # told, then closed (close_channel does both)
    assert (frame["type"], frame["code"]) == ("error", "channel_deleted")


async def test_a_channel_deleted_elsewhere_closes_its_sockets_over_postgres(
    pg_pair: tuple[Mayak, Mayak],
) -> None:
    await close_across(*pg_pair)


async def test_a_channel_deleted_elsewhere_closes_its_sockets_over_nats(
    nats_pair: tuple[Mayak, Mayak],
) -> None:
    await close_across(*nats_pair)
