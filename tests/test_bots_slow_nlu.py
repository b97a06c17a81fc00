"""A bot whose NLU engine calls an LLM asks it before the customer's message is appended, in a
thread, so the call never holds the pipeline's transaction or the event loop; the turn reads the
recorded answer from the event instead of calling again."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mayak.channels.base import ChannelRecord
from mayak.channels.events import inbound_event
from mayak.db.schema import events
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import admin
from tests.test_bots_conversations import FakeChannel


class Llm:
    """A chat-completions endpoint on a real socket: "book" → book, anything else → no intent.
    While ``hold`` is clear, answers wait for it (up to a few seconds)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.held_too_long = False
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                llm.calls.append(text)
                if not llm.hold.wait(5):
                    llm.held_too_long = True
                intent = "book" if "book" in text.lower() else None
                content = json.dumps({"intent": intent, "confidence": 0.91 if intent else 0.2, "slots": {}})
                answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                data = answer.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def llm() -> Iterator[Llm]:
    server = Llm()
    yield server
    server.hold.set()
    server.server.shutdown()


def bot_yaml(url: str) -> str:
    return f"""\
bot:
  name: llm_booking
  nlu:
    engine: {{engine: llm, base_url: "{url}", model: m, timeout: 8, fallback: null}}
intents:
  book:
    examples: [I want to book a visit, book a service, can I book, booking please, book my car in]
flows:
  book:
    trigger: {{intents: [book]}}
    steps:
      - say: "Let us book your visit."
"""


@pytest.fixture
async def chat(
    mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any], llm: Llm
) -> tuple[FakeChannel, ChannelRecord]:
    fake = FakeChannel("webchat")
    mayak.channels.register(fake)  # type: ignore[arg-type]
    r = await client.post("/v1/bots", json={"files": {"bot.yaml": bot_yaml(llm.url)}}, headers=admin(ws))
    assert r.status_code == 201, r.text
    created = await mayak.channels.create(
        ws["id"], type="webchat", name="c", config={}, bot_id=r.json()["id"]
    )
    return fake, await mayak.channels.record(ws["id"], created["id"])


async def say(mayak: Mayak, channel: ChannelRecord, text: str) -> None:
    await mayak.writer.submit([message(channel, text, "m1")])
    await mayak.drain()


def message(channel: ChannelRecord, text: str, key: str) -> Any:
    now = now_ms()
    return inbound_event(
        channel, address="v1", timestamp=now, received_at=now, dedup_key=key, text=text, anonymous_id="v1"
    )


async def test_the_llm_is_asked_once_before_the_append_and_the_turn_uses_its_answer(
    mayak: Mayak, chat: tuple[FakeChannel, ChannelRecord], llm: Llm
) -> None:
    fake, channel = chat
    await say(mayak, channel, "I would like to book my car in")
    assert fake.texts() == ["Let us book your visit."]
    assert len(llm.calls) == 1  # not asked again inside the turn
    async with mayak.db.read() as conn:
        payload = (
            await conn.execute(sa.select(events.c.payload).where(events.c.name == "Message Received"))
        ).scalar_one()
    nlu = json.loads(payload)["properties"]["nlu"]
    assert nlu["intent"] == {"name": "book", "confidence": 0.91} and nlu["version"] == 1


async def test_a_slow_llm_holds_neither_the_event_loop_nor_the_writer(
    mayak: Mayak,
    client: httpx.AsyncClient,
    ws: dict[str, Any],
    chat: tuple[FakeChannel, ChannelRecord],
    llm: Llm,
) -> None:
    fake, channel = chat
    llm.hold.clear()
    pending = asyncio.create_task(mayak.writer.submit([message(channel, "book a service", "m1")]))
    for _ in range(200):  # until the model has the question
        if llm.calls:
            break
        await asyncio.sleep(0.01)
    assert llm.calls
    # While the model thinks, other events are accepted and processed.
    r = await client.post(
        "/v1/track", json={"userId": "u1", "event": "Page Viewed"}, auth=(ws["write_key"], "")
    )
    assert r.status_code == 200
    await mayak.drain()
    assert not pending.done()
    llm.hold.set()
    await pending
    await mayak.drain()
    assert not llm.held_too_long
    assert fake.texts() == ["Let us book your visit."]


async def test_no_intent_from_the_llm_is_an_answer_too(
    mayak: Mayak, chat: tuple[FakeChannel, ChannelRecord], llm: Llm
) -> None:
    fake, channel = chat
    await say(mayak, channel, "what a lovely day")
    assert len(llm.calls) == 1
    assert fake.texts() and "did not understand" in fake.texts()[-1]


async def test_a_customer_cannot_send_a_made_up_answer(
    mayak: Mayak, chat: tuple[FakeChannel, ChannelRecord], llm: Llm
) -> None:
    fake, channel = chat
    ev = message(channel, "what a lovely day", "m1")
    ev.payload["properties"]["nlu"] = {
        "bot_id": "x",
        "version": 1,
        "intent": {"name": "book", "confidence": 1},
    }
    await mayak.writer.submit([ev])
    await mayak.drain()
    assert "did not understand" in fake.texts()[-1]


async def test_the_engine_reads_phone_numbers_with_the_workspace_region(
    mayak: Mayak, chat: tuple[FakeChannel, ChannelRecord]
) -> None:
    _, channel = chat
    assert channel.bot_id is not None
    bot = mayak.bots.cache.get(channel.bot_id, 1)
    assert bot is not None and bot.slow_nlu
    assert bot.nlu.region == "GB"  # the test workspace's default region
    mayak.bots.cache = type(mayak.bots.cache)()  # compiled again from the stored version
    async with mayak.db.read() as conn:
        again, _ = await mayak.bots.compiled(conn, channel.bot_id, 1)
    assert again.nlu.region == "GB"


def test_slowness_is_read_from_the_spec_as_the_built_engine_says() -> None:
    from mayak.nlu import build_engine, is_slow_spec

    llm_spec = {"engine": "llm", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    cases: list[Any] = [
        None,
        "linear",
        {"engine": "linear", "c": 2.0},
        llm_spec,
        {"engine": "ensemble", "engines": ["linear", {"engine": "linear"}]},
        {"engine": "ensemble", "engines": ["linear", llm_spec]},
        ["linear", llm_spec],
    ]
    for spec in cases:
        assert is_slow_spec(spec) is bool(getattr(build_engine(spec), "slow", False)), spec
    assert is_slow_spec("embeddings") and is_slow_spec({"engine": "embeddings", "model_path": "/m"})


def test_a_definition_says_what_its_compiled_bot_will(llm: Llm) -> None:
    from mayak.bots.compiled import compile_bot, has_slow_nlu
    from mayak.bots.loader import load_texts

    slow = load_texts({"bot.yaml": bot_yaml(llm.url)}).definition
    no_intents = {**slow, "intents": {}}
    fast = {**slow, "bot": {**slow["bot"], "nlu": {"engine": "linear"}}}
    for definition, expected in ((slow, True), (no_intents, False), (fast, False)):
        assert has_slow_nlu(definition) is expected
        assert compile_bot("b", 1, definition).slow_nlu is expected


async def test_a_process_that_only_appends_compiles_no_fast_bot(
    mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any], llm: Llm
) -> None:
    """``serve --no-workers`` runs preunderstand for every channel message: for a bot with a fast
    engine it must not train one (that is the worker's job); for a slow one it must."""
    routed = []
    for name, engine in (("fast", "linear"), ("slow", None)):
        files = {"bot.yaml": bot_yaml(llm.url).replace("llm_booking", name)}
        if engine is not None:
            files["bot.yaml"] = files["bot.yaml"].replace(
                files["bot.yaml"].split("\n")[3], f"    engine: {engine}"
            )
        r = await client.post("/v1/bots", json={"files": files}, headers=admin(ws))
        assert r.status_code == 201, r.text
        bot = r.json()
        created = await mayak.channels.create(
            ws["id"], type="webchat", name=name, config={}, bot_id=bot["id"]
        )
        routed.append((bot, await mayak.channels.record(ws["id"], created["id"])))
    router = mayak.bot_router
    store = router.store
    store.cache = type(store.cache)()  # a process that has compiled nothing yet
    (fast, fast_channel), (slow, slow_channel) = routed
    fast_event = message(fast_channel, "book my car in", "f1")
    slow_event = message(slow_channel, "book my car in", "s1")
    await router.preunderstand([fast_event, slow_event])
    assert store.cache.get(fast["id"], fast["current_version"]) is None  # not compiled, not trained
    assert "nlu" not in fast_event.payload["properties"]
    assert store.cache.get(slow["id"], slow["current_version"]) is not None
    assert slow_event.payload["properties"]["nlu"]["intent"]["name"] == "book"
    assert llm.calls == ["book my car in"]
