"""The official server SDKs (Segment's and RudderStack's Python libraries), unchanged, against a
real Mayak server on a real socket: uvicorn in a background thread, the app's lifespan running the
workers, results checked through the admin API."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from mayak.api.app import create_app
from mayak.config import Settings
from mayak.db.migrate import upgrade_async
from mayak.platform import Mayak

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, url: str, ws: dict[str, Any], other: dict[str, Any]):
        self.url = url
        self.ws = ws
        self.other = other
        self.http = httpx.Client(base_url=url, timeout=10)

    def admin(self, ws: dict[str, Any] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {(ws or self.ws)['secret_key']}"}

    def customer(self, user_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The profile for ``user_id`` once the server's workers have processed it."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.http.get(
                "/v1/customers", params={"identity": f"user_id:{user_id}"}, headers=self.admin()
            )
            if r.status_code == 200:
                return dict(r.json())
            assert r.status_code == 404, r.text
            if time.monotonic() > deadline:
                raise AssertionError(f"no profile for {user_id} after {timeout}s")
            time.sleep(0.05)

    def events(self, customer_id: str) -> list[dict[str, Any]]:
        """The customer's collected events (not the pipeline's own records, such as merges)."""
        r = self.http.get(f"/v1/customers/{customer_id}/events", params={"limit": 200}, headers=self.admin())
        assert r.status_code == 200, r.text
        return [e for e in r.json()["items"] if e["source"] == "api"]

    def wait_for_events(self, user_id: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            items = self.events(self.customer(user_id, timeout)["id"])
            if len(items) >= count or time.monotonic() > deadline:
                return items
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("e2e-sdks")
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp}/m.db", secret_key="e2e-master-key")

    async def setup() -> tuple[dict[str, Any], dict[str, Any]]:
        await upgrade_async(settings.database_url)
        m = Mayak(settings)
        try:
            return (
                await m.workspaces.create_workspace("E2E"),
                await m.workspaces.create_workspace("E2E other"),
            )
        finally:
            await m.close()

    ws, other = asyncio.run(setup())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(Mayak(settings)),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True, name="mayak-e2e")
    thread.start()
    deadline = time.monotonic() + 15
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    srv = Server(f"http://127.0.0.1:{port}", ws, other)
    try:
        yield srv
    finally:
        srv.http.close()
        uv.should_exit = True
        thread.join(10)
        sock.close()


def _sdk_calls(client: Any, user: str, anon: str) -> None:
    """The same calls through either SDK (their public APIs are the same)."""
    client.identify(user, {"email": f"{user}@example.com", "name": "Test Person", "plan": "gold"})
    client.track(user, "Order Completed", {"order_id": "o-1", "total": 4999, "currency": "EUR"})
    client.page(user, "Docs", "Getting Started", {"url": "https://shop.example/docs"})
    client.screen(user, "App", "Home")
    client.group(user, f"grp-{user}", {"name": "Acme"})
    client.track(anonymous_id=anon, event="Viewed Product", properties={"sku": "sku-9"})
    client.alias(anon, user)
    # a resend (same messageId) is stored once
    client.track(user, "Paid", {"amount": 10}, message_id=f"fixed-{user}")
    client.track(user, "Paid", {"amount": 10}, message_id=f"fixed-{user}")


def _check_profile(server: Server, user: str, anon: str) -> None:
    profile = server.customer(user)
    assert profile["traits"]["email"] == f"{user}@example.com"
    assert profile["traits"]["plan"] == "gold"
    items = server.wait_for_events(user, 8)
    kinds = sorted((e["type"], e["name"] or "") for e in items)
    assert kinds == sorted(
        [
            ("identify", ""),
            ("track", "Order Completed"),
            ("page", "Getting Started"),
            ("screen", "Home"),
            ("group", ""),
            ("track", "Viewed Product"),
            ("alias", ""),
            ("track", "Paid"),
        ]
    ), kinds
    order = next(e for e in items if e["name"] == "Order Completed")
    assert order["payload"]["properties"]["total"] == 4999
    assert order["payload"]["context"]["library"]["name"] == "analytics-python"
    uuid.UUID(order["payload"]["messageId"])  # the SDK's own messageId was kept
    ident = {(i["kind"], i["value"]) for i in profile["identities"]}
    assert ("user_id", user) in ident and ("email", f"{user}@example.com") in ident
    assert ("anonymous_id", anon) in ident, ident  # the alias joined the anonymous visitor


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("sdk", ["segment", "rudder"])
def test_official_sdk(server: Server, sdk: str, compress: bool) -> None:
    """segment-analytics-python and rudder-sdk-python, unchanged, pointed at Mayak."""
    if sdk == "segment":
        from segment.analytics import Client
    else:
        from rudderstack.analytics import Client  # type: ignore[no-redef]

    errors: list[Any] = []
    user, anon = f"{sdk}-{int(compress)}-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    client = Client(
        write_key=server.ws["write_key"],
        host=server.url,
        gzip=compress,
        max_retries=1,
        on_error=lambda e, batch: errors.append(e),
    )
    _sdk_calls(client, user, anon)
    client.flush()
    client.shutdown()
    assert errors == []
    _check_profile(server, user, anon)
    if sdk == "rudder":
        order = next(e for e in server.events(server.customer(user)["id"]) if e["name"] == "Order Completed")
        assert order["payload"]["channel"] == "server"


def test_segment_module_level_api(server: Server) -> None:
    """``import segment.analytics as analytics; analytics.write_key = …`` — the documented usage."""
    import segment.analytics as analytics

    errors: list[Any] = []
    analytics.write_key = server.ws["write_key"]
    analytics.host = server.url
    analytics.on_error = lambda e, batch: errors.append(e)
    analytics.sync_mode = True
    try:
        analytics.identify("seg-module", {"name": "Module"})
        analytics.track("seg-module", "Signed Up")
        analytics.flush()
    finally:
        analytics.default_client = None
        analytics.sync_mode = False
    assert errors == []
    assert server.customer("seg-module")["traits"]["name"] == "Module"


def test_sdk_errors_surface(server: Server) -> None:
    """A secret key in an SDK is refused with a code the SDK reports, and nothing is stored."""
    from segment.analytics import Client
    from segment.analytics.request import APIError

    errors: list[Any] = []
    client = Client(
        write_key=server.ws["secret_key"],
        host=server.url,
        max_retries=1,
        on_error=lambda e, b: errors.append(e),
    )
    client.track("seg-wrong-key", "Nope")
    client.flush()
    client.shutdown()
    assert len(errors) == 1 and isinstance(errors[0], APIError)
    assert (errors[0].status, errors[0].code) == (403, "secret_key_not_allowed")
    r = server.http.get("/v1/customers", params={"identity": "user_id:seg-wrong-key"}, headers=server.admin())
    assert r.status_code == 404


def test_gzip_bomb_over_a_socket(server: Server) -> None:
    raw = b'{"batch": [' + b" " * (60 * 1024 * 1024) + b"]}"
    bomb = gzip.compress(raw, compresslevel=9)
    del raw
    started = time.monotonic()
    r = server.http.post(
        "/v1/batch",
        content=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        auth=(server.ws["write_key"], ""),
    )
    assert time.monotonic() - started < 2.0
    assert r.status_code == 413 and r.json()["code"] == "request_too_large", r.text
    assert server.http.get("/healthz").status_code == 200
    r = server.http.post(
        "/v1/track", json={"userId": "after-bomb", "event": "E"}, auth=(server.ws["write_key"], "")
    )
    assert r.status_code == 200, r.text
    assert server.customer("after-bomb")


def test_oversize_plain_body_over_a_socket(server: Server) -> None:
    body = orjson.dumps({"batch": [{"type": "track", "userId": "x", "event": "E", "p": "y" * 1000}] * 2000})
    assert len(body) > 2 * 1024 * 1024
    r = server.http.post(
        "/v1/batch",
        content=body,
        headers={"Content-Type": "application/json"},
        auth=(server.ws["write_key"], ""),
    )
    assert r.status_code == 413 and r.json()["code"] == "request_too_large"
    assert server.http.get("/healthz").status_code == 200


def test_browser_form_and_cors_over_a_socket(server: Server) -> None:
    r = server.http.options(
        "/v1/t", headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://shop.example"
    body = {
        "writeKey": server.ws["write_key"],
        "anonymousId": "browser-anon",
        "userId": "browser-user",
        "event": "Clicked",
    }
    r = server.http.post(
        "/v1/t",
        content=orjson.dumps(body),
        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://shop.example"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    assert server.customer("browser-user")


def test_tenant_isolation_over_a_socket(server: Server) -> None:
    r = server.http.post(
        "/v1/identify", json={"userId": "iso-a", "traits": {"secret": "a"}}, auth=(server.ws["write_key"], "")
    )
    assert r.status_code == 200
    cid = server.customer("iso-a")["id"]
    r = server.http.get(f"/v1/customers/{cid}", headers=server.admin(server.other))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert "secret" not in r.text
