"""Bots end to end through the log: inbound events → pipeline → bot router → outbox → channel.

Channels are stand-in adapters that record what they are asked to send (the real web-chat and
Telegram adapters have their own tests); integration calls are answered by a stand-in business system
registered as the ``integration_call`` handler, so these tests pin the engine and the router.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import sqlalchemy as sa

from mayak.bots.loader import load_folder
from mayak.channels.base import Capabilities, ChannelRecord, OutboundMessage
from mayak.channels.events import identity_linked, inbound_event
from mayak.db.schema import conversations, events, timers
from mayak.delivery.outbox import DeliveryOutcome, OutboxRow
from mayak.eventlog import NewEvent
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import admin

DEMO = Path(__file__).parent.parent / "src" / "mayak" / "bots" / "examples" / "demo_motors"


class FakeChannel:
    capabilities = Capabilities()

    def __init__(self, channel_type: str):
        self.type = channel_type  # type: ignore[misc]
        self.sent: list[tuple[str, OutboundMessage]] = []

    type: ClassVar[str]

    def validate_config(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return dict(config), {}

    async def activate(self, channel: ChannelRecord) -> dict[str, Any]:
        return {}

    async def deactivate(self, channel: ChannelRecord) -> None:
        return None

    async def send(
        self, channel: ChannelRecord, address: str, message: OutboundMessage, message_id: str
    ) -> DeliveryOutcome:
        self.sent.append((address, message))
        return DeliveryOutcome(True)

    def texts(self) -> list[str]:
        return [m.text for _, m in self.sent]


class FakeDms:
    """Answers integration calls like the business system would, through an integration.result event."""

    def __init__(self, mayak: Mayak):
        self.mayak = mayak
        self.calls: list[dict[str, Any]] = []
        self.fail = False

    async def handle(self, row: OutboxRow) -> DeliveryOutcome:
        self.calls.append(row.payload)
        request = row.payload.get("request", {})
        if self.fail:
            ok, status, body = False, None, None
        elif request.get("method") == "POST":
            ok, status, body = True, 201, {"id": f"B-{len(self.calls)}"}
        else:
            ok, status, body = True, 200, {"id": "WO-1", "status": "ready", "car_model": "Octavia"}
        now = now_ms()
        await self.mayak.writer.submit(
            [
                NewEvent(
                    workspace_id=row.workspace_id,
                    type="integration.result",
                    timestamp=now,
                    received_at=now,
                    source="integration",
                    customer_id=row.customer_id,
                    dedup_key=f"call:{row.payload['call_id']}",
                    payload={
                        "call_id": row.payload["call_id"],
                        "conversation_id": row.payload["conversation_id"],
                        "ok": ok,
                        "status": status,
                        "body": body,
                        "error": None if ok else "timeout",
                    },
                )
            ]
        )
        return DeliveryOutcome(True)


@dataclasses.dataclass
class Setup:
    mayak: Mayak
    client: httpx.AsyncClient
    ws: dict[str, Any]
    chat: FakeChannel
    tg: FakeChannel
    chat_channel: ChannelRecord
    tg_channel: ChannelRecord
    dms: FakeDms
    seq: int = 0

    async def say(
        self,
        text: str | None = None,
        *,
        visitor: str = "v1",
        payload: str | None = None,
        title: str | None = None,
        user_id: str | None = None,
        channel: str = "chat",
    ) -> None:
        self.seq += 1
        record = self.chat_channel if channel == "chat" else self.tg_channel
        now = now_ms()
        ev = inbound_event(
            record,
            address=visitor,
            timestamp=now,
            received_at=now,
            dedup_key=f"test:{visitor}:{self.seq}",
            text=text,
            payload=payload,
            title=title,
            anonymous_id=visitor if channel == "chat" else None,
            identity_kind="telegram" if channel == "tg" else None,
            user_id=user_id,
        )
        await self.mayak.writer.submit([ev])
        await self.mayak.drain()

    async def conversation(self) -> dict[str, Any]:
        r = await self.client.get("/v1/conversations", headers=admin(self.ws))
        items = r.json()["items"]
        assert len(items) == 1, items
        return dict(items[0])


@pytest.fixture
async def bot(mayak: Mayak, client: httpx.AsyncClient, ws: dict[str, Any]) -> Setup:
    chat, tg = FakeChannel("webchat"), FakeChannel("telegram")
    mayak.channels.register(chat)  # type: ignore[arg-type]
    mayak.channels.register(tg)  # type: ignore[arg-type]
    dms = FakeDms(mayak)
    mayak.outbox.register("integration_call", dms.handle)
    files = {str(p.relative_to(DEMO)): p.read_text() for p in DEMO.rglob("*.yaml")}
    r = await client.post("/v1/bots", json={"files": files}, headers=admin(ws))
    assert r.status_code == 201, r.text
    bot_id = r.json()["id"]
    chans = []
    for kind in ("webchat", "telegram"):
        r = await client.post(
            "/v1/channels",
            json={"type": kind, "name": kind, "config": {}, "bot_id": bot_id},
            headers=admin(ws),
        )
        assert r.status_code == 201, r.text
        chans.append(await mayak.channels.record(ws["id"], r.json()["id"]))
    return Setup(mayak, client, ws, chat, tg, chans[0], chans[1], dms)


async def test_start_greets_with_buttons(bot: Setup) -> None:
    await bot.say("/start")
    assert len(bot.chat.sent) == 1
    address, message = bot.chat.sent[0]
    assert address == "v1"
    assert "Demo Motors assistant" in message.text
    assert [b.payload for b in message.buttons] == ["book_service", "car_status", "operator"]


async def book_with_phone(bot: Setup, phone: str) -> None:
    """The booking flow of the Demo Motors bot, answered up to the phone number."""
    await bot.say(payload="book_service", title="Book a service visit")
    await bot.say("Octavia")
    await bot.say("tomorrow")
    await bot.say(payload="11:00", title="11:00")
    await bot.say(phone)


async def test_booking_calls_the_dms_and_records_everything(bot: Setup) -> None:
    await book_with_phone(bot, "+7 916 123 45 67")
    assert bot.dms.calls and bot.dms.calls[0]["request"]["method"] == "POST"
    body = bot.dms.calls[0]["request"]["json"]
    assert body["car"] == "Octavia" and body["time"] == "11:00" and body["phone"] == "+79161234567"
    assert bot.dms.calls[0]["request"]["url"] == "{{secret:dms_base_url}}/bookings"
    assert "Booking number B-1" in bot.chat.texts()[-1]
    conv = await bot.conversation()
    assert conv["slots"]["booking_id"] == "B-1" and conv["flow"] is None
    # The profile took the bot's changes, and every turn is in the customer's log.
    r = await bot.client.get(f"/v1/customers/{conv['customer_id']}", headers=admin(bot.ws))
    profile = r.json()
    assert profile["stage"] == "in_service"
    assert profile["traits"]["car_model"] == "Octavia"
    assert profile["traits"]["last_booking_id"] == "B-1"
    r = await bot.client.get(f"/v1/customers/{conv['customer_id']}/events?limit=200", headers=admin(bot.ws))
    kinds = [(e["type"], e.get("name")) for e in r.json()["items"]]
    assert ("track", "Service Booked") in kinds
    assert kinds.count(("conversation.turn", None)) >= 6
    assert sum(1 for k in kinds if k[0] == "message.outbound") == len(bot.chat.sent)


async def test_a_replay_takes_no_input_twice(bot: Setup) -> None:
    """Turn records carry no dedup keys: a replay of the log must not run a turn again."""
    await book_with_phone(bot, "+7 916 123 45 67")
    before = await bot.conversation()

    async def records() -> list[tuple[str, str]]:
        r = await bot.client.get(
            f"/v1/customers/{before['customer_id']}/events?limit=200", headers=admin(bot.ws)
        )
        return sorted((e["type"], e["id"]) for e in r.json()["items"] if e["source"] == "bot")

    recorded = await records()
    assert sum(1 for kind, _ in recorded if kind == "conversation.turn") >= 6
    sent, calls = len(bot.chat.sent), len(bot.dms.calls)
    await bot.mayak.customers.replay(bot.ws["id"])
    await bot.mayak.drain()
    after = await bot.conversation()
    assert after["customer_id"] == before["customer_id"]  # the same id, rebuilt from the log
    assert (after["flow"], after["step"], after["slots"]) == (before["flow"], before["step"], before["slots"])
    assert await records() == recorded
    assert (len(bot.chat.sent), len(bot.dms.calls)) == (sent, calls)
    await bot.say(payload="book_service", title="Book a service visit")  # and it goes on from there
    assert len(bot.chat.sent) == sent + 1


async def test_integration_failure_takes_the_error_branch(bot: Setup) -> None:
    bot.dms.fail = True
    await bot.say("is my car ready?")
    assert "could not reach" in bot.chat.texts()[-1]
    assert (await bot.conversation())["status"] == "bot"


@pytest.mark.contract
async def test_the_waiting_queue_is_oldest_handoff_first_across_pages(bot: Setup) -> None:
    for visitor in ("v1", "v2", "v3"):  # conversations created in this order
        await bot.say("hello", visitor=visitor)
    for visitor in ("v3", "v1", "v2"):  # handed over in this one
        await bot.say("I want to talk to a person", visitor=visitor)
        await asyncio.sleep(0.003)  # distinct handoff times
    r = await bot.client.get("/v1/conversations", headers=admin(bot.ws))
    by_id = [c["id"] for c in r.json()["items"]]
    assert len(by_id) == 3 and by_id == sorted(by_id)  # no status filter: the oldest conversation first
    seen: list[str] = []
    cursor = None
    while True:
        params = {"status": "waiting_human", "limit": "1"} | ({"cursor": cursor} if cursor else {})
        r = await bot.client.get("/v1/conversations", params=params, headers=admin(bot.ws))
        assert r.status_code == 200, r.text
        seen += [c["id"] for c in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [by_id[2], by_id[0], by_id[1]]
    # a cursor of the other ordering is refused, not misread
    other = await bot.client.get("/v1/conversations?limit=1", headers=admin(bot.ws))
    r = await bot.client.get(
        "/v1/conversations",
        params={"status": "waiting_human", "cursor": other.json()["next_cursor"]},
        headers=admin(bot.ws),
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_cursor"


async def test_handoff_operator_reply_and_hand_back(bot: Setup) -> None:
    await bot.say("I want to talk to a person")
    conv = await bot.conversation()
    assert conv["status"] == "waiting_human" and conv["queue"] == "service_desk"
    r = await bot.client.get("/v1/conversations?status=waiting_human", headers=admin(bot.ws))
    assert [c["id"] for c in r.json()["items"]] == [conv["id"]]
    # While a person has it, the bot stays silent.
    before = len(bot.chat.sent)
    await bot.say("hello? anyone?")
    assert len(bot.chat.sent) == before
    r = await bot.client.post(
        f"/v1/conversations/{conv['id']}/messages",
        json={"text": "Hi, Olga here. How can I help?"},
        headers=admin(bot.ws),
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "human"
    await bot.mayak.drain()
    assert bot.chat.sent[-1][1].text == "Hi, Olga here. How can I help?"
    transcript = r.json()["transcript"]
    assert transcript[-1]["author"] == "operator" and transcript[-2]["text"] == "hello? anyone?"
    r = await bot.client.post(
        f"/v1/conversations/{conv['id']}/handback", json={"flow": "menu"}, headers=admin(bot.ws)
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "bot"
    await bot.mayak.drain()
    assert "what I can do" in bot.chat.texts()[-1]
    r = await bot.client.get(f"/v1/customers/{conv['customer_id']}/events?limit=200", headers=admin(bot.ws))
    types = {e["type"] for e in r.json()["items"]}
    assert {"conversation.handoff", "conversation.operator_message", "conversation.handed_back"} <= types


async def test_handback_to_unknown_flow_is_refused(bot: Setup) -> None:
    await bot.say("operator")
    conv = await bot.conversation()
    r = await bot.client.post(
        f"/v1/conversations/{conv['id']}/handback", json={"flow": "nope"}, headers=admin(bot.ws)
    )
    assert r.status_code == 400 and r.json()["code"] == "unknown_flow"


async def test_opt_out_works_even_with_an_operator(bot: Setup) -> None:
    await bot.say("operator")
    await bot.say("STOP")
    assert "marketing" in bot.chat.texts()[-1]
    conv = await bot.conversation()
    r = await bot.client.get(f"/v1/customers/{conv['customer_id']}", headers=admin(bot.ws))
    assert r.json()["consents"]["webchat"]["marketing"]["granted"] is False


async def test_proactive_service_message_when_the_dms_reports_completion(bot: Setup) -> None:
    await bot.say("hello", user_id="u-42")
    r = await bot.client.post(
        "/v1/track",
        json={
            "userId": "u-42",
            "event": "Service Completed",
            "properties": {"order_id": "WO-9", "car_model": "Kodiaq", "total": 1250000},
        },
        auth=(bot.ws["write_key"], ""),
    )
    assert r.status_code == 200
    await bot.mayak.drain()
    address, message = bot.chat.sent[-1]
    assert address == "v1"
    assert "Kodiaq is ready" in message.text and "12 500 RUB" in message.text
    assert message.buttons[0].url == "https://pay.demo-motors.example/WO-9"


async def test_proactive_waits_for_the_end_of_quiet_hours(bot: Setup) -> None:
    await bot.say("hello", user_id="u-7")
    conv = await bot.conversation()
    # Quiet around the clock except one minute: whatever the time now, the message is held.
    hour = (now_ms() // 3_600_000 + 2) % 24
    quiet = {"start": f"{(hour + 1) % 24:02d}:00", "end": f"{hour:02d}:00"}
    r = await bot.client.patch(
        f"/v1/customers/{conv['customer_id']}/preferences",
        json={"preferences": {"quiet_hours": quiet, "timezone": "UTC"}},
        headers=admin(bot.ws),
    )
    assert r.status_code == 200, r.text
    sent = len(bot.chat.sent)
    await bot.client.post(
        "/v1/track",
        json={"userId": "u-7", "event": "Service Completed", "properties": {}},
        auth=(bot.ws["write_key"], ""),
    )
    await bot.mayak.drain()
    assert len(bot.chat.sent) == sent
    async with bot.mayak.db.read() as c:
        fire_at = (await c.execute(sa.select(timers.c.fire_at).where(timers.c.kind == "bot"))).scalar_one()
    assert fire_at > now_ms()
    await bot.mayak.timers.run_once(now=fire_at + 1)
    await bot.mayak.drain()
    assert "is ready" in bot.chat.texts()[-1]


async def test_marketing_flow_needs_consent(bot: Setup, mayak: Mayak) -> None:
    loaded = load_folder(DEMO)
    definition = loaded.definition
    definition["flows"]["offer"] = {
        "trigger": {"events": [{"name": "Offer Ready", "purpose": "marketing"}]},
        "steps": [{"say": "A winter tyre offer for you"}],
    }
    await mayak.bots.publish(bot.ws["id"], definition)
    await bot.say("hello", user_id="u-1")
    track = {"userId": "u-1", "event": "Offer Ready", "properties": {}}
    await bot.client.post("/v1/track", json=track, auth=(bot.ws["write_key"], ""))
    await mayak.drain()
    assert "winter tyre" not in bot.chat.texts()[-1]
    conv = await bot.conversation()
    await bot.client.patch(
        f"/v1/customers/{conv['customer_id']}/consents",
        json={"consents": {"webchat": {"marketing": True}}},
        headers=admin(bot.ws),
    )
    await bot.client.post("/v1/track", json=track | {"messageId": "m2"}, auth=(bot.ws["write_key"], ""))
    await mayak.drain()
    assert "winter tyre" in bot.chat.texts()[-1]


async def test_conversation_continues_across_channels(bot: Setup) -> None:
    await bot.say("I want to book a service", user_id="u-9")
    assert "Which car" in bot.chat.texts()[-1]
    conv = await bot.conversation()
    now = now_ms()
    link = identity_linked(
        bot.ws["id"], conv["customer_id"], "telegram", "555", at=now, dedup_key="link:1", source="telegram"
    )
    await bot.mayak.writer.submit([link])
    await bot.mayak.drain()
    await bot.say("Octavia", visitor="555", channel="tg")
    assert bot.tg.sent and "Which day" in bot.tg.sent[-1][1].text
    assert (await bot.conversation())["slots"]["car"] == "Octavia"


async def test_state_survives_a_restart(bot: Setup, settings: Any) -> None:
    await bot.say("I want to book a service")
    await bot.mayak.close()
    again = Mayak(dataclasses.replace(settings), db=None)
    again.channels.register(bot.chat)  # type: ignore[arg-type]
    await again.start(workers=False)
    try:
        bot.mayak = again
        await bot.say("Octavia")
        assert "Which day" in bot.chat.texts()[-1]
    finally:
        await again.close()


async def test_flood_is_stored_but_throttled(bot: Setup) -> None:
    for i in range(20):
        bot.seq += 1
        now = now_ms()
        ev = inbound_event(
            bot.chat_channel,
            address="v1",
            timestamp=now,
            received_at=now,
            dedup_key=f"f{i}",
            text=f"hello {i}",
            anonymous_id="v1",
        )
        await bot.mayak.writer.submit([ev])
    await bot.mayak.drain()
    async with bot.mayak.db.read() as c:
        stored = (
            await c.execute(sa.select(sa.func.count()).where(events.c.name == "Message Received"))
        ).scalar_one()
    assert stored == 20
    assert len(bot.chat.sent) <= 10
    assert any("faster than I can read" in t for t in bot.chat.texts())


async def test_a_very_long_message_is_handled(bot: Setup) -> None:
    await bot.say("x" * 10_000)
    assert bot.chat.sent, "the bot answered"


async def test_new_version_applies_between_flows_and_retired_version_moves(bot: Setup, mayak: Mayak) -> None:
    await bot.say("I want to book a service")  # in flow book_service on version 1
    definition = load_folder(DEMO).definition
    definition["texts"]["ask_date"] = {"en": "Pick a day, please", "ru": "Выберите день"}
    published = await mayak.bots.publish(bot.ws["id"], definition)
    assert published["current_version"] == 2
    await bot.say("Octavia")
    assert "Which day" in bot.chat.texts()[-1]  # still version 1 mid-flow
    r = await bot.client.post(f"/v1/bots/{published['id']}/versions/1/retire", headers=admin(bot.ws))
    assert r.status_code == 200, r.text
    await bot.say("whenever")
    assert "Pick a day" in bot.chat.texts()[-1]  # moved to version 2 at the same step
    assert (await bot.conversation())["version"] == 2
    r = await bot.client.post(f"/v1/bots/{published['id']}/versions/2/retire", headers=admin(bot.ws))
    assert r.status_code == 409 and r.json()["code"] == "version_in_use"


async def test_template_failure_sends_a_safe_text(bot: Setup, mayak: Mayak) -> None:
    definition = load_folder(DEMO).definition
    definition["texts"]["thanks"] = {"en": "You are welcome {{ 1 / 0 }}", "ru": "Пожалуйста"}
    await mayak.bots.publish(bot.ws["id"], definition)
    await bot.say("thank you very much")
    assert "something went wrong" in bot.chat.texts()[-1]


async def test_publishing_an_invalid_bot_is_refused_with_lines(
    client: httpx.AsyncClient, ws: dict[str, Any]
) -> None:
    files = {"bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - goto: nowhere\n"}
    r = await client.post("/v1/bots", json={"files": files}, headers=admin(ws))
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == "invalid_bot"
    assert body["issues"][0]["file"] == "bot.yaml" and body["issues"][0]["line"] == 5
    r = await client.get("/v1/bots", headers=admin(ws))
    assert r.json()["items"] == []


async def test_publishing_the_same_bot_twice_keeps_the_version(bot: Setup) -> None:
    files = {str(p.relative_to(DEMO)): p.read_text() for p in DEMO.rglob("*.yaml")}
    r = await bot.client.post("/v1/bots", json={"files": files}, headers=admin(bot.ws))
    assert r.status_code == 201 and r.json()["unchanged"] is True and r.json()["current_version"] == 1


async def test_conversations_of_another_workspace_are_invisible(bot: Setup) -> None:
    await bot.say("operator")
    conv = await bot.conversation()
    other = await bot.mayak.workspaces.create_workspace("Other")
    r = await bot.client.get(f"/v1/conversations/{conv['id']}", headers=admin(other))
    assert r.status_code == 404
    async with bot.mayak.db.read() as c:
        assert (await c.execute(sa.select(sa.func.count()).select_from(conversations))).scalar_one() == 1


async def test_export_holds_the_conversation_and_erase_removes_it(bot: Setup) -> None:
    await bot.say("I want to book a service")
    await bot.say("Octavia")
    conv = await bot.conversation()
    r = await bot.client.get(f"/v1/customers/{conv['customer_id']}/export", headers=admin(bot.ws))
    [exported] = r.json()["conversations"]
    assert exported["state"]["slots"] == {"car": "Octavia"} and exported["address"] == "v1"
    r = await bot.client.delete(f"/v1/customers/{conv['customer_id']}", headers=admin(bot.ws))
    assert r.status_code == 200, r.text
    async with bot.mayak.db.read() as c:
        assert (await c.execute(sa.select(sa.func.count()).select_from(conversations))).scalar_one() == 0
    # The erased visitor writes again: a new, empty conversation; nothing of the old one comes back.
    await bot.say("hello", visitor="v1")
    r = await bot.client.get("/v1/conversations", headers=admin(bot.ws))
    assert all(c["slots"] == {} for c in r.json()["items"])


async def test_a_national_phone_number_is_read_with_the_workspace_region(bot: Setup) -> None:
    # The test workspace's default region is GB: a British national number is a valid answer.
    await book_with_phone(bot, "07911 123456")
    assert bot.dms.calls, bot.chat.texts()
    assert bot.dms.calls[0]["request"]["json"]["phone"] == "+447911123456"


SURVEY_BOT = """\
bot:
  name: survey
intents:
  hello:
    examples: [hello there, hi survey, good day survey, greetings survey, hey survey]
flows:
  after_service:
    trigger: {events: [{name: Service Completed, purpose: service}]}
    steps:
      - say: "How was your visit? Rate us from 1 to 5."
"""


async def test_every_bot_triggered_by_a_business_event_gets_it(bot: Setup) -> None:
    r = await bot.client.post("/v1/bots", json={"files": {"bot.yaml": SURVEY_BOT}}, headers=admin(bot.ws))
    assert r.status_code == 201, r.text
    await bot.say("hello", user_id="u-5")
    sent = len(bot.chat.sent)
    r = await bot.client.post(
        "/v1/track",
        json={"userId": "u-5", "event": "Service Completed", "properties": {"car_model": "Kodiaq"}},
        auth=(bot.ws["write_key"], ""),
    )
    assert r.status_code == 200
    await bot.mayak.drain()
    texts = bot.chat.texts()[sent:]
    assert any("Kodiaq is ready" in t for t in texts), texts
    assert any("How was your visit" in t for t in texts), texts
    assert all(address == "v1" for address, _ in bot.chat.sent[sent:])
    r = await bot.client.get("/v1/conversations", headers=admin(bot.ws))
    assert len({c["bot_id"] for c in r.json()["items"]}) == 2  # one conversation per bot


def recorded_sql(monkeypatch: pytest.MonkeyPatch, method: str) -> list[str]:
    """Every statement later passed to ``FastSql.<method>`` (``fetch``, ``run_many``…), in order."""
    from mayak.db.fastsql import FastSql

    seen: list[str] = []
    original = getattr(FastSql, method)

    async def recording(self: FastSql, conn: Any, sql: str, *args: Any) -> Any:
        seen.append(sql)
        return await original(self, conn, sql, *args)

    monkeypatch.setattr(FastSql, method, recording)
    return seen


async def test_a_turn_reads_the_customer_the_pipeline_just_wrote(
    bot: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    await bot.say("/start")
    queries = recorded_sql(monkeypatch, "fetch")
    await bot.say(payload="book_service", title="Book a service visit")
    assert "Which car" in bot.chat.texts()[-1]
    # one read of the customer for the whole turn: the profile batch's, which the router reuses
    assert sum(bool(re.search(r"\b(FROM|JOIN) customers\b", q)) for q in queries) == 1, queries


async def test_a_turn_names_the_indexed_conversation_columns_only_when_they_change(
    bot: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rewrites every index whose column an UPDATE names: a plain turn names none."""
    await bot.say("/start")
    statements = recorded_sql(monkeypatch, "run_many")
    await bot.say(payload="book_service", title="Book a service visit")
    updates = [sql for sql in statements if sql.startswith("UPDATE conversations")]
    assert len(updates) == 1 and "status" not in updates[0] and "customer_id" not in updates[0]
    assert "state" in updates[0]
    statements.clear()
    await bot.say(payload="operator", title="Talk to a person")  # a handoff: the status changes
    updates = [sql for sql in statements if sql.startswith("UPDATE conversations")]
    assert any("status" in u for u in updates), updates
    assert (await bot.conversation())["status"] == "waiting_human"


async def test_conversations_started_together_are_inserted_in_one_statement(
    bot: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First messages from several visitors that share a write transaction start one conversation
    each, all written by one INSERT (one statement per conversation cost a first turn 1.7x a later one)."""
    statements = recorded_sql(monkeypatch, "run_many")
    now = now_ms()
    visitors = [f"v{i}" for i in range(5)]
    batch = [
        inbound_event(
            bot.chat_channel,
            address=v,
            timestamp=now,
            received_at=now,
            dedup_key=f"together:{v}",
            text="/start",
            anonymous_id=v,
        )
        for v in visitors
    ]
    await bot.mayak.writer.submit(batch)
    await bot.mayak.drain()
    inserts = [sql for sql in statements if sql.startswith("INSERT INTO conversations")]
    assert len(inserts) == 1, statements
    assert sorted(address for address, _ in bot.chat.sent) == visitors  # each greeted once
    async with bot.mayak.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    conversations.c.address,
                    conversations.c.status,
                    conversations.c.customer_id,
                    conversations.c.created_at,
                    conversations.c.channel_id,
                )
            )
        ).all()
    assert sorted(r.address for r in rows) == visitors
    assert len({r.customer_id for r in rows}) == 5  # one customer each
    assert all(r.status == "bot" and r.created_at and r.channel_id == bot.chat_channel.id for r in rows)
    await bot.say("/start", visitor="v3")  # a later turn updates the stored row
    r = await bot.client.get("/v1/conversations", headers=admin(bot.ws))
    assert len(r.json()["items"]) == 5


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Привет, когда будет готова машина?", "ru"),
        ("ЁЛКИ", "ru"),
        ("Hello, is my car ready?", "en"),
        ("Hi привет", "ru"),  # as many Cyrillic letters as Latin ones: Russian
        ("ok да", "ru"),
        ("okay да", "en"),
        ("/start abc", None),  # a command
        ("42 100", None),  # no letters
        ("a", None),  # one letter is not enough
        ("Ñandú ÖL", "en"),  # accented Latin letters do not count, the plain ones do
    ],
)
def test_the_script_of_a_message_gives_its_language(text: str, language: str | None) -> None:
    from mayak.bots.engine import _script_language

    assert _script_language(text) == language
