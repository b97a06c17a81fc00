"""Integration plugins: the registry (register, entry points) and calls through the outbox."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from mayak.db.schema import events
from mayak.delivery.outbox import OutboxItem, enqueue
from mayak.eventlog import NewEvent
from mayak.integrations.calls import integrations
from mayak.integrations.plugins import PluginContext, PluginError, PluginRegistry
from mayak.platform import Mayak
from mayak.timeutil import now_ms


class Dms:
    """A fake dealer-management-system plugin, also loaded through a fake entry point."""

    name = "dms"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], PluginContext]] = []
        self.flaky = 0

    async def call(self, action: str, args: dict[str, Any], context: PluginContext) -> dict[str, Any]:
        self.calls.append((action, args, context))
        if action == "book":
            token = await context.secret("dms_token")
            return {"booking": f"B-{args['vin']}", "customer": context.customer_id, "echo": token}
        if action == "refuse":
            raise PluginError("slot_taken", "that slot is gone")
        if action == "flaky":
            self.flaky += 1
            if self.flaky == 1:
                raise PluginError("busy", "try again", retryable=True)
            return {"ok": "second time"}
        if action == "hang":
            await asyncio.sleep(10)
        if action == "crash":
            raise ValueError("boom")
        if action == "not_a_dict":
            return "nope"  # type: ignore[return-value]
        if action == "needs_missing":
            await context.secret("absent")
        raise PluginError("unknown_action", action)


async def customer(mayak: Mayak, ws: dict[str, Any]) -> str:
    found: str = (await mayak.customers.find_by_identity(ws["id"], "user_id:plugin-user"))["id"]
    return found


async def run(mayak: Mayak, ws: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    async with mayak.db.write() as conn:
        await enqueue(
            mayak.db,
            conn,
            [
                OutboxItem(
                    workspace_id=ws["id"],
                    kind="integration_call",
                    payload=payload,
                    idempotency_key=f"p:{payload['call_id']}",
                    customer_id=await customer(mayak, ws),
                )
            ],
        )
    await mayak.drain()
    async with mayak.db.read() as conn:
        row = (
            await conn.execute(
                sa.select(events.c.payload)
                .where(events.c.type == "integration.result", events.c.workspace_id == ws["id"])
                .order_by(events.c.seq.desc())
                .limit(1)
            )
        ).one()
    payload = row.payload if isinstance(row.payload, dict) else orjson.loads(row.payload)
    assert isinstance(payload, dict)
    return payload


@pytest.mark.contract
async def test_registered_plugin_calls(mayak: Mayak, ws: dict[str, Any]) -> None:
    svc = integrations(mayak)
    plugin = Dms()
    svc.plugins.register(plugin)
    svc.calls.backoff_base_s = 0.01
    await identify(mayak, ws)
    async with mayak.db.write() as conn:
        await mayak.workspaces.store_secret(conn, ws["id"], "integration:dms_token", "tok-123456")

    ok = await run(
        mayak,
        ws,
        {
            "call_id": "p1",
            "conversation_id": "conv_9",
            "name": "book",
            "plugin": "dms",
            "action": "book",
            "args": {"vin": "V1"},
        },
    )
    assert (ok["ok"], ok["error"], ok["status"], ok["attempts"]) == (True, None, None, 1)
    cid = await customer(mayak, ws)
    assert ok["body"] == {"booking": "B-V1", "customer": cid, "echo": "[redacted]"}
    assert (ok["plugin"], ok["action"]) == ("dms", "book")
    _, _, context = plugin.calls[0]
    assert (context.workspace_id, context.customer_id, context.conversation_id, context.call_id) == (
        ws["id"],
        cid,
        "conv_9",
        "p1",
    )

    refused = await run(mayak, ws, {"call_id": "p2", "plugin": "dms", "action": "refuse", "retries": 3})
    assert (refused["ok"], refused["error"], refused["attempts"]) == (False, "plugin_error:slot_taken", 1)
    assert refused["message"] == "that slot is gone"

    flaky = await run(mayak, ws, {"call_id": "p3", "plugin": "dms", "action": "flaky", "retries": 1})
    assert (flaky["ok"], flaky["attempts"], flaky["body"]) == (True, 2, {"ok": "second time"})

    hung = await run(
        mayak, ws, {"call_id": "p4", "plugin": "dms", "action": "hang", "timeout_s": 0.2, "retries": 1}
    )
    assert (hung["ok"], hung["error"], hung["attempts"]) == (False, "timeout", 2)
    assert hung["duration_ms"] < 2000

    crash = await run(mayak, ws, {"call_id": "p5", "plugin": "dms", "action": "crash"})
    assert (crash["ok"], crash["error"]) == (False, "plugin_error:unexpected")
    assert "boom" in crash["message"]

    bad = await run(mayak, ws, {"call_id": "p6", "plugin": "dms", "action": "not_a_dict"})
    assert bad["error"] == "plugin_error:invalid_result"

    missing = await run(mayak, ws, {"call_id": "p7", "plugin": "dms", "action": "needs_missing"})
    assert missing["error"] == "missing_secret:absent"

    unknown = await run(mayak, ws, {"call_id": "p8", "plugin": "crm", "action": "x"})
    assert unknown["error"] == "plugin_error:unknown_plugin"

    invalid = await run(mayak, ws, {"call_id": "p9", "plugin": "dms", "action": 7})
    assert invalid["error"] == "invalid_call"


async def identify(mayak: Mayak, ws: dict[str, Any]) -> None:
    await mayak.writer.submit(
        [
            NewEvent(
                workspace_id=ws["id"],
                type="identify",
                timestamp=now_ms(),
                payload={"type": "identify", "userId": "plugin-user"},
            )
        ]
    )
    await mayak.drain()


class Broken:
    def __init__(self) -> None:
        raise RuntimeError("cannot start")


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *entries: tuple[str, str]) -> list[str]:
    asked: list[str] = []

    def entry_points(**kwargs: Any) -> list[importlib.metadata.EntryPoint]:
        asked.append(kwargs.get("group", ""))
        return [
            importlib.metadata.EntryPoint(name=name, value=value, group="mayak.integrations")
            for name, value in entries
        ]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return asked


async def test_entry_points_load_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_entry_points(
        monkeypatch,
        ("dms", "tests.test_plugins:Dms"),
        ("broken", "tests.test_plugins:Broken"),
        ("gone", "tests.no_such_module:Plugin"),
    )
    registry = PluginRegistry()
    assert asked == []  # nothing is looked up before the first call
    plugin = registry.get("dms")
    assert isinstance(plugin, Dms) and registry.get("dms") is plugin
    assert asked == ["mayak.integrations"]
    assert registry.names() == ["broken", "dms", "gone"]
    for name in ("broken", "gone"):
        with pytest.raises(PluginError) as err:
            registry.get(name)
        assert err.value.code == "load_failed"
    with pytest.raises(PluginError) as err:
        registry.get("nope")
    assert err.value.code == "unknown_plugin"
    bare = PluginContext(workspace_id="ws_1", customer_id=None)  # built without a secrets getter
    with pytest.raises(PluginError) as err:
        await plugin.call("book", {"vin": "V"}, bare)
    assert err.value.code == "no_secrets"


@pytest.mark.contract
async def test_entry_point_plugin_through_the_outbox(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_entry_points(monkeypatch, ("dms", "tests.test_plugins:Dms"))
    await identify(mayak, ws)
    result = await run(mayak, ws, {"call_id": "e1", "plugin": "dms", "action": "refuse"})
    assert result["error"] == "plugin_error:slot_taken"


def test_register_checks_the_shape() -> None:
    registry = PluginRegistry()
    assert isinstance(registry.register(Dms), Dms)  # a class is instantiated
    obj = Dms()
    assert registry.register(obj, name="dms2") is obj and registry.get("dms2") is obj

    class NoName:
        async def call(self, action: str, args: dict[str, Any], context: PluginContext) -> dict[str, Any]:
            return {}

    class SyncCall:
        name = "sync"

        def call(self, action: str, args: dict[str, Any], context: PluginContext) -> dict[str, Any]:
            return {}

    for bad in (NoName, SyncCall()):
        with pytest.raises(TypeError):
            registry.register(bad)
