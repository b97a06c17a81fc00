"""The quick-start demo end to end: Demo Motors in the web chat over a real socket, with the demo DMS.

Everything runs for real in one process: uvicorn serving the app (and the demo DMS), the worker
loops, the bot calling the DMS over HTTP through the outbox, and the DMS reporting finished work
back through a signed hook, after which the bot tells the customer their car is ready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from mayak import demo_dms
from mayak.api.app import create_app
from mayak.cli import ensure_demo, ensure_demo_bot
from mayak.config import Settings
from mayak.platform import Mayak


@dataclasses.dataclass
class Demo:
    mayak: Mayak
    base: str
    ws: dict[str, Any]
    demo: dict[str, Any]
    http: httpx.AsyncClient

    async def chat(self) -> ClientConnection:
        url = self.base.replace("http", "ws") + f"/v1/webchat/{self.demo['channel_id']}/ws"
        sock = await connect(url)
        hello = {"type": "hello", "visitor_id": str(uuid.uuid4()), "write_key": self.ws["write_key"]}
        await sock.send(orjson.dumps(hello).decode())
        welcome = await next_frame(sock, "welcome")
        assert welcome["visitor_id"] == hello["visitor_id"]
        return sock


async def next_frame(sock: ClientConnection, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            frame: dict[str, Any] = orjson.loads(await sock.recv())
            if frame["type"] == kind:
                return frame


async def say(sock: ClientConnection, text: str) -> dict[str, Any]:
    """Send a text and return the bot's next message."""
    await sock.send(orjson.dumps({"type": "message", "text": text, "client_id": uuid.uuid4().hex}).decode())
    return await next_frame(sock, "message")


async def press(sock: ClientConnection, button: dict[str, Any]) -> dict[str, Any]:
    frame = {
        "type": "button",
        "payload": button["payload"],
        "title": button["title"],
        "client_id": uuid.uuid4().hex,
    }
    await sock.send(orjson.dumps(frame).decode())
    return await next_frame(sock, "message")


@pytest.fixture
async def demo(settings: Settings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Demo]:
    monkeypatch.setenv("MAYAK_DATA_DIR", str(tmp_path / "data"))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    m = Mayak(dataclasses.replace(settings, public_url=base))
    await m.db.create_all()
    ws = await ensure_demo(m, 5)
    info = await ensure_demo_bot(m, ws)
    again = await ensure_demo_bot(m, ws)  # a second quick start reuses everything
    assert again["channel_id"] == info["channel_id"] and again["hook_id"] == info["hook_id"]
    app = create_app(m, manage=False)
    dms = demo_dms.Dms(info["token"], f"{base}/v1/hooks/{info['hook_id']}", info["hook_secret"])
    app.include_router(demo_dms.router(dms))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    await m.start(workers=True)
    http = httpx.AsyncClient(base_url=base, timeout=10)
    try:
        yield Demo(m, base, ws, info, http)
    finally:
        await http.aclose()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await m.close()
        listener.close()


async def test_book_a_visit_and_hear_the_car_is_ready(demo: Demo) -> None:
    sock = await demo.chat()
    reply = await say(sock, "Hello")
    assert "Demo Motors assistant" in reply["text"]
    reply = await press(sock, reply["buttons"][0])  # Book a service visit
    assert "Which car" in reply["text"]
    assert "Which day" in (await say(sock, "Octavia"))["text"]
    reply = await say(sock, "tomorrow")
    assert [b["title"] for b in reply["buttons"]] == ["09:00", "11:00", "14:00", "16:00"]
    reply = await press(sock, reply["buttons"][1])
    assert "phone" in reply["text"]
    reply = await say(sock, "+44 7700 900123")
    assert "Booking number B-1001" in reply["text"], reply  # the DMS answered over HTTP

    status = await say(sock, "is my car ready?")
    assert "Octavia (order WO-1001): booked" in status["text"]

    r = await demo.http.post("/demo/dms/orders/WO-1001/complete")
    assert r.status_code == 200
    ready = await next_frame(sock, "message")  # proactive: the DMS reported through the signed hook
    assert "your Octavia is ready" in ready["text"] and "12 500 RUB" in ready["text"]
    assert [b["title"] for b in ready["buttons"]] == ["Pay online", "Book a pickup time"]
    assert ready["buttons"][0]["url"] == "https://pay.demo-motors.example/WO-1001"
    reply = await press(sock, ready["buttons"][1])
    assert "collect" in reply["text"]
    await sock.close()


async def test_talk_to_a_person_and_back(demo: Demo) -> None:
    sock = await demo.chat()
    reply = await say(sock, "I want to talk to a person")
    assert "service advisor" in reply["text"]
    headers = {"Authorization": f"Bearer {demo.ws['secret_key']}"}
    r = await demo.http.get("/v1/conversations?status=waiting_human", headers=headers)
    [conv] = r.json()["items"]
    r = await demo.http.post(
        f"/v1/conversations/{conv['id']}/messages", json={"text": "Olga here!"}, headers=headers
    )
    assert r.status_code == 200
    assert (await next_frame(sock, "message"))["text"] == "Olga here!"
    r = await demo.http.post(
        f"/v1/conversations/{conv['id']}/handback", json={"flow": "menu"}, headers=headers
    )
    assert r.status_code == 200
    assert "what I can do" in (await next_frame(sock, "message"))["text"]
    await sock.close()


async def test_russian_speaking_customer(demo: Demo) -> None:
    sock = await demo.chat()
    reply = await say(sock, "здравствуйте")
    assert "помощник Demo Motors" in reply["text"], reply
    reply = await say(sock, "часы работы")
    assert "с понедельника по субботу" in reply["text"]
    await sock.close()
