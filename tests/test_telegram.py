"""The Telegram channel end to end, against a local Bot API emulator on a real socket: set-up,
webhook updates (secret token, dedup, malformed input), buttons, delivery and retries, deep links."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import httpx
import orjson
import pytest

from mayak.channels.telegram import TelegramAdapter
from mayak.platform import Mayak
from mayak.timeutil import ms_to_rfc3339, now_ms
from tests.conftest import admin, write_auth
from tests.telegram_emulator import TelegramEmulator
from tests.telegram_fixtures import (
    Telegram,
    adapter,
    connect,
    customer_of,
    settings,
    telegram,
    telegram_server,
    tg,
)

__all__ = ["adapter", "settings", "telegram", "telegram_server", "tg"]  # fixtures used by this module

SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


async def drain_retries(mayak: Mayak) -> None:
    """Deliver everything, pretending an hour passes before each further round of retries."""
    await mayak.drain()
    hours = 1
    while await mayak.outbox.run_once(now=now_ms() + hours * 3_600_000):
        hours += 1


# -- set-up ------------------------------------------------------------------------------------


@pytest.mark.contract
async def test_create_sets_the_webhook_and_delete_removes_it(
    client: httpx.AsyncClient,
    mayak: Mayak,
    ws: dict[str, Any],
    tg: TelegramEmulator,
    adapter: TelegramAdapter,
) -> None:
    channel, bot = await connect(client, ws, tg)
    url = f"https://mayak.example.com/v1/telegram/{channel['id']}/webhook"  # MAYAK_PUBLIC_URL, no "//"
    assert channel["config"] == {
        "api_base_url": tg.base_url,
        "bot_username": "mayak_test_bot",
        "bot_id": bot.id,
        "webhook_url": url,
    }
    assert [c.method for c in tg.calls] == ["getMe", "setWebhook"]
    params = tg.calls_to("setWebhook")[0].params
    secret = (await mayak.channels.record(ws["id"], channel["id"])).secrets["webhook_secret"]
    assert params == {"url": url, "secret_token": secret, "allowed_updates": ["message", "callback_query"]}
    assert SECRET_RE.match(secret) and len(secret) >= 32
    listed = (await client.get("/v1/channels", headers=admin(ws))).json()["items"]
    assert bot.token not in str(listed) and secret not in str(listed)

    r = await client.delete(f"/v1/channels/{channel['id']}", headers=admin(ws))
    assert r.status_code == 200 and r.json() == {"id": channel["id"], "deleted": True}
    assert tg.calls[-1].method == "deleteWebhook" and bot.webhook_url == ""


@pytest.mark.parametrize(
    ("config", "code", "param"),
    [
        ({}, "invalid_bot_token", "$.config.bot_token"),
        ({"bot_token": 12345}, "invalid_bot_token", "$.config.bot_token"),
        ({"bot_token": "not-a-token"}, "invalid_bot_token", "$.config.bot_token"),
        ({"bot_token": "abc:DEF123456789012345678901234567"}, "invalid_bot_token", "$.config.bot_token"),
        ({"bot_token": "123:short"}, "invalid_bot_token", "$.config.bot_token"),
        (
            {"bot_token": "123:AAH" + "x" * 32, "api_base_url": "ftp://x"},
            "invalid_api_base_url",
            "$.config.api_base_url",
        ),
        (
            {"bot_token": "123:AAH" + "x" * 32, "webhook_secret": "mine"},
            "unknown_field",
            "$.config.webhook_secret",
        ),
    ],
)
async def test_bad_config_is_refused_before_calling_telegram(
    client: httpx.AsyncClient,
    ws: dict[str, Any],
    tg: TelegramEmulator,
    config: dict[str, Any],
    code: str,
    param: str,
) -> None:
    r = await client.post(
        "/v1/channels", json={"type": "telegram", "name": "x", "config": config}, headers=admin(ws)
    )
    assert r.status_code == 400, r.text
    assert r.json() == r.json() | {"type": "invalid_request", "code": code, "param": param}
    assert "AAH" + "x" * 32 not in r.text  # the token is never echoed
    assert tg.calls == []
    assert (await client.get("/v1/channels", headers=admin(ws))).json()["items"] == []


async def test_telegram_refusals_leave_nothing_behind(
    client: httpx.AsyncClient,
    mayak: Mayak,
    ws: dict[str, Any],
    tg: TelegramEmulator,
    adapter: TelegramAdapter,
) -> None:
    async def create(token: str, base: str = tg.base_url) -> httpx.Response:
        body = {"type": "telegram", "name": "x", "config": {"bot_token": token, "api_base_url": base}}
        return await client.post("/v1/channels", json=body, headers=admin(ws))

    unknown = "999:AAHunknownTokenUnknownToken_-123456"
    r = await create(unknown)  # Telegram does not know the token: getMe answers 401 Unauthorized
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == "telegram_error" and body["param"] == "$.config.bot_token"
    assert "Unauthorized" in body["message"] and unknown not in r.text

    bot = tg.add_bot()
    tg.fail("setWebhook", 400, "Bad Request: bad webhook: Failed to resolve host: Name or service not known")
    r = await create(bot.token)
    assert r.status_code == 400 and "Failed to resolve host" in r.json()["message"]

    r = await create(bot.token, "http://127.0.0.1:9")  # nothing listens there
    assert r.status_code == 400 and r.json()["code"] == "telegram_error" and bot.token not in r.text

    assert (await client.get("/v1/channels", headers=admin(ws))).json()["items"] == []
    assert bot.webhook_url == ""

    # an http public URL is refused by Telegram itself, and the answer says why
    adapter.settings = dataclasses.replace(mayak.settings, public_url="http://127.0.0.1:8000")
    r = await create(bot.token)
    assert r.status_code == 400 and "HTTPS URL must be provided" in r.json()["message"]

    # one channel per bot: a second one would take the first one's webhook
    adapter.settings = mayak.settings
    await connect(client, ws, tg, bot)
    r = await create(bot.token)
    assert r.status_code == 400 and r.json()["code"] == "bot_already_connected"
    assert len((await client.get("/v1/channels", headers=admin(ws))).json()["items"]) == 1


# -- inbound -----------------------------------------------------------------------------------


@pytest.mark.contract
async def test_a_message_is_recorded_on_the_chat_customer(telegram: Telegram) -> None:
    sender = telegram.tg.user(123, "Ann", username="ann_k", last_name="K", language_code="pt-br")
    update = telegram.tg.message_update(telegram.bot, 123, "Hello there", sender=sender)
    r = await telegram.deliver(update)
    assert r.status_code == 200 and r.json() == {"ok": True}

    customer = await telegram.customer("telegram:123")
    assert [(i["kind"], i["value"]) for i in customer["identities"]] == [("telegram", "123")]
    assert customer["traits"] == {}  # a Telegram name is not a trait
    r = await telegram.client.get(f"/v1/customers/{customer['id']}/events", headers=admin(telegram.ws))
    [event] = r.json()["items"]
    assert event["name"] == "Message Received" and event["source"] == "telegram"
    assert event["timestamp"] == ms_to_rfc3339(update["message"]["date"] * 1000)
    props = event["payload"]["properties"]
    assert props == {
        "channel": "telegram",
        "channel_id": telegram.channel["id"],
        "address": "123",
        "text": "Hello there",
        "external_id": str(update["message"]["message_id"]),
        "kind": "text",
        "sender": {"id": 123, "first_name": "Ann", "last_name": "K", "username": "ann_k"},
    }
    assert event["payload"]["context"]["locale"] == "pt-br"


@pytest.mark.contract
async def test_a_resent_update_is_stored_once(telegram: Telegram) -> None:
    update = telegram.tg.message_update(telegram.bot, 124, "once")
    for _ in range(3):
        assert (await telegram.deliver(update)).status_code == 200
    assert len(await telegram.logged("Message Received")) == 1
    # the same update_id on another channel is another update
    _, bot2 = await connect(telegram.client, telegram.ws, telegram.tg)
    bot2.chats.add(124)
    assert (await telegram.tg.deliver(telegram.client, bot2, update)).status_code == 200
    assert len(await telegram.logged("Message Received")) == 2


async def test_the_secret_token_is_required(telegram: Telegram) -> None:
    update = telegram.tg.message_update(telegram.bot, 125, "let me in")
    for secret in (None, "wrong", "", "Ünïcode-secret"):
        r = await telegram.deliver(update, secret=secret if secret != "" else "x" * 300)
        assert r.status_code == 401, r.text
        assert r.json() == {
            "type": "authentication_error",
            "code": "invalid_secret_token",
            "message": r.json()["message"],
            "param": None,
        }
    r = await telegram.client.post(
        "/v1/telegram/ch_unknown/webhook",
        json=update,
        headers={"X-Telegram-Bot-Api-Secret-Token": telegram.bot.secret_token or ""},
    )
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert await telegram.logged() == []

    # a disabled channel answers 200 (Telegram would retry anything else) and records nothing
    r = await telegram.client.patch(
        f"/v1/channels/{telegram.channel['id']}", json={"status": "disabled"}, headers=admin(telegram.ws)
    )
    assert r.status_code == 200
    r = await telegram.deliver(update)
    assert r.status_code == 200 and r.json()["ignored"] == "the channel is disabled"
    assert await telegram.logged() == []


def _msg(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"message_id": 1, "date": 1_700_000_000, "chat": {"id": 5, "type": "private"}}
    return {"update_id": 10, "message": {**base, **fields}}


MALFORMED: list[tuple[Any, str]] = [
    (b"{not json", "$"),
    (b"\xff\xfe", "$"),
    (b'{"update_id": 1, "message": {"text": "\\ud800"}}', "$"),
    (b"", "$"),
    ([], "$"),
    ("update", "$"),
    ({"message": _msg()["message"]}, "$.update_id"),
    ({"update_id": "10", "message": _msg()["message"]}, "$.update_id"),
    ({"update_id": True, "message": _msg()["message"]}, "$.update_id"),
    ({"update_id": 1.5}, "$.update_id"),
    ({"update_id": -1}, "$.update_id"),
    ({"update_id": 10, "message": "hi"}, "$.message"),
    ({"update_id": 10, "message": {"message_id": 1, "date": 1_700_000_000}}, "$.message.chat"),
    (_msg(chat={"type": "private"}), "$.message.chat.id"),
    (_msg(chat={"id": "5"}), "$.message.chat.id"),
    (_msg(chat=[5]), "$.message.chat"),
    (_msg(text=123), "$.message.text"),
    (_msg(text=["a"]), "$.message.text"),
    (_msg(date="yesterday"), "$.message.date"),
    (_msg(date=10**15), "$.message.date"),
    (_msg(message_id=None), "$.message.message_id"),
    (_msg(**{"from": "Ann"}), "$.message.from"),
    (_msg(**{"from": {"id": 5, "first_name": 7}}), "$.message.from.first_name"),
    (_msg(caption={"x": 1}), "$.message.caption"),
    ({"update_id": 10, "callback_query": {"from": {"id": 5}, "data": "x"}}, "$.callback_query.id"),
    ({"update_id": 10, "callback_query": {"id": "q", "data": "x"}}, "$.callback_query.from"),
    (
        {"update_id": 10, "callback_query": {"id": "q", "from": {"first_name": "A"}}},
        "$.callback_query.from.id",
    ),
    ({"update_id": 10, "callback_query": {"id": "q", "from": {"id": 5}, "data": 7}}, "$.callback_query.data"),
    (
        {"update_id": 10, "callback_query": {"id": "q", "from": {"id": 5}, "message": {"chat": {}}}},
        "$.callback_query.message.chat.id",
    ),
]


async def test_malformed_updates_are_refused_with_a_path(telegram: Telegram) -> None:
    for update, param in MALFORMED:
        raw = update if isinstance(update, bytes) else orjson.dumps(update)
        r = await telegram.deliver(raw)
        assert r.status_code == 400, (update, r.text)
        expected = {"type": "invalid_request", "code": "invalid_update", "param": param}
        assert r.json() == r.json() | expected, update
    assert await telegram.logged() == []
    # the server is fine: the next good update goes through
    r = await telegram.message(5, "still here")
    assert r.status_code == 200 and len(await telegram.logged()) == 1


@pytest.mark.contract
async def test_other_kinds_of_message_and_update(telegram: Telegram) -> None:
    sticker = {"file_id": "CAAC", "file_unique_id": "u", "type": "regular", "width": 512, "height": 512}
    photo = [{"file_id": "AgAD", "file_unique_id": "p", "width": 90, "height": 90}]
    for update in (
        telegram.tg.message_update(telegram.bot, 130, sticker=sticker),
        telegram.tg.message_update(telegram.bot, 130, photo=photo, caption="my car"),
        telegram.tg.message_update(telegram.bot, 130, animation={"file_id": "a"}, document={"file_id": "a"}),
        telegram.tg.message_update(telegram.bot, 130, new_chat_title="service message"),
        telegram.tg.message_update(telegram.bot, 130, "x\x00y"),
    ):
        assert (await telegram.deliver(update)).status_code == 200
    props = [e["payload"]["properties"] for e in await telegram.logged("Message Received")]
    assert [p["kind"] for p in props] == ["sticker", "photo", "animation", "other", "text"]
    assert "text" not in props[0] and props[1]["caption"] == "my car" and "text" not in props[1]
    assert props[4]["text"] == "xy"  # U+0000 dropped (PostgreSQL cannot store it)

    edited = {
        "update_id": 999_001,
        "edited_message": telegram.tg.message_update(telegram.bot, 130, "edit")["message"],
    }
    group = telegram.tg.message_update(telegram.bot, -100_200, "hi all")
    group["message"]["chat"] = {"id": -100_200, "type": "supergroup", "title": "Fans"}
    for update in (edited, group, {"update_id": 999_002}, {"update_id": 999_003, "my_chat_member": {}}):
        r = await telegram.deliver(update)
        assert r.status_code == 200 and r.json()["ignored"], r.text
    assert len(await telegram.logged()) == 5


@pytest.mark.contract
async def test_a_10000_character_text(telegram: Telegram) -> None:
    text = ("Привет, мир! " * 800)[:10_000]
    assert (await telegram.message(140, text)).status_code == 200
    assert (await telegram.message(140, "😀" * 10_001)).status_code == 200
    first, second = [e["payload"]["properties"] for e in await telegram.logged("Message Received")]
    assert first["text"] == text and "truncated" not in first
    assert len(second["text"]) == 10_000 and second["truncated"] is True


# -- buttons -----------------------------------------------------------------------------------


@pytest.mark.contract
async def test_buttons_out_and_presses_back(telegram: Telegram) -> None:
    await telegram.message(150, "menu")
    long_payload = "book_service:" + "x" * 100  # over Telegram's 64 bytes
    tilde = "~looks-like-a-reference"
    message = {
        "text": "What would you like to do?",
        "buttons": [
            {"title": "Track my order", "payload": "track_order"},
            {"title": "Book a service appointment", "payload": long_payload},
            {"title": "Tilde", "payload": tilde},
            {"title": "Our website", "url": "https://shop.example.com/"},
            {"title": "Call us", "url": "mailto:help@example.com"},  # not a URL Telegram accepts
        ],
    }
    row_id = await telegram.say(150, message, "m1")
    await telegram.mayak.drain()
    [sent] = telegram.tg.calls_to("sendMessage")
    assert sent.status == 200
    assert sent.params["chat_id"] == 150
    assert sent.params["text"] == "What would you like to do?\nCall us: mailto:help@example.com"
    keyboard = sent.params["reply_markup"]["inline_keyboard"]
    assert [len(row) for row in keyboard] == [1, 1, 1, 1]
    buttons = [row[0] for row in keyboard]
    assert buttons[0] == {"text": "Track my order", "callback_data": "track_order"}
    assert buttons[1]["callback_data"].startswith("~" + row_id[4:] + ":")
    assert len(buttons[1]["callback_data"].encode()) <= 64
    assert buttons[2]["callback_data"].startswith("~") and buttons[2]["callback_data"] != tilde
    assert buttons[3] == {"text": "Our website", "url": "https://shop.example.com/"}
    [row] = await telegram.outbox_rows()
    assert row["status"] == "sent"

    for title, payload in (
        ("Book a service appointment", long_payload),
        ("Track my order", "track_order"),
        ("Tilde", tilde),
    ):
        r = await telegram.deliver(telegram.tg.press_button(telegram.bot, 150, title))
        assert r.status_code == 200
        assert r.json()["method"] == "answerCallbackQuery"
        answered = telegram.tg.calls_to("answerCallbackQuery")[-1]
        assert answered.via == "webhook_reply" and answered.status == 200
        event = (await telegram.logged("Button Clicked"))[-1]
        props = event["payload"]["properties"]
        assert (props["payload"], props["title"]) == (payload, title)
        assert "unresolved" not in props
    customer = await telegram.customer("telegram:150")
    assert {e["customer_id"] for e in await telegram.logged()} == {customer["id"]}


async def test_unknown_callback_data_is_recorded(telegram: Telegram) -> None:
    reference_elsewhere = "~" + "0" * 26 + ":abcdefgh"
    for data in ("something_old", reference_elsewhere, "~garbage", ""):
        r = await telegram.deliver(telegram.tg.callback_update(telegram.bot, 160, data))
        assert r.status_code == 200 and r.json()["method"] == "answerCallbackQuery"
    props = [e["payload"]["properties"] for e in await telegram.logged("Button Clicked")]
    assert [p["payload"] for p in props] == ["something_old", reference_elsewhere, "~garbage", ""]
    assert [p.get("unresolved", False) for p in props] == [False, True, True, False]

    # a reference to a message sent to another chat does not resolve for this one
    await telegram.message(161, "hi")
    await telegram.say(161, {"text": "x", "buttons": [{"title": "Long", "payload": "p" * 80}]}, "m2")
    await telegram.mayak.drain()
    data = telegram.tg.calls_to("sendMessage")[-1].params["reply_markup"]["inline_keyboard"][0][0][
        "callback_data"
    ]
    await telegram.deliver(telegram.tg.callback_update(telegram.bot, 160, data))
    last = (await telegram.logged("Button Clicked"))[-1]["payload"]["properties"]
    assert last["payload"] == data and last["unresolved"] is True


# -- delivery ----------------------------------------------------------------------------------


async def test_long_messages_are_split(telegram: Telegram) -> None:
    await telegram.message(170, "hi")
    words = " ".join(f"word{i}" for i in range(1000))[:5000]
    await telegram.say(170, {"text": words, "buttons": [{"title": "OK", "payload": "ok"}]}, "long")
    await telegram.mayak.drain()  # rows without a customer have no order of their own
    await telegram.say(170, {"text": "😀" * 3000}, "emoji")  # 3,000 characters, 6,000 UTF-16 units
    await telegram.mayak.drain()
    calls = telegram.tg.calls_to("sendMessage")
    assert [c.status for c in calls] == [200, 200, 200, 200]
    assert "reply_markup" not in calls[0].params and "reply_markup" in calls[1].params
    assert (calls[0].params["text"] + " " + calls[1].params["text"]) == words
    assert calls[2].params["text"] + calls[3].params["text"] == "😀" * 3000
    assert all(r["status"] == "sent" for r in await telegram.outbox_rows())


@pytest.mark.contract
async def test_retries_and_dead_letters(telegram: Telegram) -> None:
    await telegram.message(180, "hi")
    telegram.bot.chats.add(181)
    telegram.bot.blocked.add(181)

    telegram.tg.fail("sendMessage", 500, "Internal Server Error")
    flaky = await telegram.say(180, {"text": "one"}, "flaky")
    unknown = await telegram.say(999, {"text": "two"}, "unknown-chat")
    blocked = await telegram.say(181, {"text": "three"}, "blocked")
    await drain_retries(telegram.mayak)
    status = {r["id"]: (r["status"], r["last_error"]) for r in await telegram.outbox_rows()}
    assert status[flaky] == ("sent", None)
    assert [a[:2] for a in await telegram.attempts(flaky)] == [(1, 500), (2, 200)]
    assert status[unknown] == ("dead", "Bad Request: chat not found")
    assert await telegram.attempts(unknown) == [(1, 400, "Bad Request: chat not found")]
    assert status[blocked] == ("dead", "Forbidden: bot was blocked by the user")

    # no answer at all (Telegram unreachable) is retried until the outbox gives up
    telegram.tg.fail("sendMessage", 502, "Bad Gateway", times=10)
    gone = await telegram.say(180, {"text": "four"}, "gone")
    await drain_retries(telegram.mayak)
    assert [a[1] for a in await telegram.attempts(gone)] == [502, 502, 502]  # outbox_max_attempts = 3
    assert {r["id"]: r["status"] for r in await telegram.outbox_rows()}[gone] == "dead"


async def test_flood_control(telegram: Telegram) -> None:
    await telegram.message(190, "hi")
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    telegram.adapter.sleep = sleep
    telegram.tg.fail("sendMessage", 429, "Too Many Requests: retry after 2", retry_after=2)
    short = await telegram.say(190, {"text": "short wait"}, "short")
    await telegram.mayak.drain()
    assert slept == [2.0]  # sat out inside the attempt
    assert [a[:2] for a in await telegram.attempts(short)] == [(1, 200)]

    telegram.tg.fail("sendMessage", 429, "Too Many Requests: retry after 40", retry_after=40)
    long = await telegram.say(190, {"text": "long wait"}, "long")
    assert await telegram.mayak.outbox.run_once() == 1  # one attempt: the wait is left to the outbox
    [(number, code, error)] = await telegram.attempts(long)
    assert (number, code) == (1, 429) and error is not None and "retry after 40" in error
    assert {r["id"]: r["status"] for r in await telegram.outbox_rows()}[long] == "failed"
    await drain_retries(telegram.mayak)
    assert {r["id"]: r["status"] for r in await telegram.outbox_rows()}[long] == "sent"


# -- deep links --------------------------------------------------------------------------------


@pytest.mark.contract
@pytest.mark.both_modes
async def test_a_deep_link_gives_the_chat_to_a_known_customer(telegram: Telegram) -> None:
    # the chat wrote before: an anonymous Telegram profile
    await telegram.message(555, "hello?")
    r = await telegram.client.post(
        "/v1/identify", json={"userId": "u-1", "traits": {"name": "Ann"}}, auth=write_auth(telegram.ws)
    )
    assert r.status_code == 200
    await telegram.mayak.drain()
    anonymous = await telegram.customer("telegram:555")
    known = await telegram.customer("user_id:u-1")
    assert anonymous["id"] != known["id"]

    r = await telegram.client.post(f"/v1/customers/{known['id']}/link_tokens", headers=admin(telegram.ws))
    assert r.status_code == 201, r.text
    issued = r.json()
    token = issued["token"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", token)
    assert issued["links"] == {"telegram": f"https://t.me/mayak_test_bot?start={token}"}
    assert issued["customer_id"] == known["id"] and issued["expires_at"].endswith("Z")

    start = telegram.tg.message_update(telegram.bot, 555, f"/start {token}")
    assert (await telegram.deliver(start)).status_code == 200
    assert (await telegram.deliver(start)).status_code == 200  # Telegram resends it
    await telegram.mayak.drain()

    owner = await telegram.customer("telegram:555")
    assert owner["id"] == known["id"]
    assert {(i["kind"], i["value"]) for i in owner["identities"]} == {("telegram", "555"), ("user_id", "u-1")}
    assert owner["merged_ids"] == [anonymous["id"]]
    r = await telegram.client.get(f"/v1/customers/{anonymous['id']}", headers=admin(telegram.ws))
    assert r.json()["id"] == known["id"]  # merged into the known customer
    r = await telegram.client.get(
        f"/v1/customers/{known['id']}/events", params={"name": "Message Received"}, headers=admin(telegram.ws)
    )
    texts = [e["payload"]["properties"]["text"] for e in r.json()["items"]]
    assert sorted(texts) == ["/start", "hello?"]  # the spent token is not kept in the log
    linked = await telegram.logged()
    assert [e["type"] for e in linked].count("identity.linked") == 1
    starts = [
        e
        for e in linked
        if e["name"] == "Message Received" and e["payload"]["properties"]["text"] == "/start"
    ]
    assert len(starts) == 1 and starts[0]["payload"]["properties"]["link"] == "linked"
    kinds = [e["type"] if e["name"] is None else e["name"] for e in linked]
    assert kinds.index("identity.linked") < len(kinds) - 1 - kinds[::-1].index("Message Received")

    # the token works once: another chat using it stays anonymous
    await telegram.message(556, f"/start {token}")
    await telegram.mayak.drain()
    other = await telegram.customer("telegram:556")
    assert other["id"] != known["id"] and not other["identified"]
    last = (await telegram.logged("Message Received"))[-1]["payload"]["properties"]
    assert last["link"] == "refused" and last["text"] == f"/start {token}"

    # a replay rebuilds the same profiles: the link event named its customer, and that is kept
    await telegram.mayak.customers.replay(telegram.ws["id"])
    owner = await telegram.customer("telegram:555")
    assert owner["id"] == known["id"] and owner["merged_ids"] == [anonymous["id"]]


async def test_expired_and_unknown_start_parameters(telegram: Telegram) -> None:
    from mayak.channels import link_tokens

    await telegram.client.post("/v1/identify", json={"userId": "u-2"}, auth=write_auth(telegram.ws))
    await telegram.mayak.drain()
    known = await telegram.customer("user_id:u-2")
    old = await link_tokens.create_link_token(
        telegram.mayak.db, telegram.ws["id"], known["id"], ttl_s=60, now=now_ms() - 120_000
    )
    await telegram.message(570, f"/start {old.token}")
    await telegram.message(571, "/start promo_spring-2025")
    await telegram.message(572, "/start@mayak_test_bot")
    await telegram.mayak.drain()
    props = [e["payload"]["properties"] for e in await telegram.logged("Message Received")]
    assert [(p["text"], p.get("link")) for p in props] == [
        (f"/start {old.token}", "refused"),
        ("/start promo_spring-2025", None),
        ("/start@mayak_test_bot", None),
    ]
    for chat in (570, 571, 572):
        assert (await telegram.customer(f"telegram:{chat}"))["id"] != known["id"]


async def test_link_token_route(
    client: httpx.AsyncClient,
    mayak: Mayak,
    ws: dict[str, Any],
    tg: TelegramEmulator,
    adapter: TelegramAdapter,
) -> None:
    await client.post("/v1/identify", json={"userId": "u-3"}, auth=write_auth(ws))
    await mayak.drain()
    known = await customer_of(client, ws, "user_id:u-3")
    path = f"/v1/customers/{known['id']}/link_tokens"

    r = await client.post(path, json={"ttl_seconds": 600}, headers=admin(ws))
    assert r.status_code == 201 and r.json()["links"] == {} and r.json()["channel_links"] == []
    channel, _ = await connect(client, ws, tg)
    second, _ = await connect(client, ws, tg, tg.add_bot("second_bot"))
    r = await client.post(path, headers=admin(ws), json={})
    links = r.json()["channel_links"]
    assert [(link["channel_id"], link["url"].split("?")[0]) for link in links] == sorted(
        [(channel["id"], "https://t.me/mayak_test_bot"), (second["id"], "https://t.me/second_bot")]
    )
    assert r.json()["links"]["telegram"] == links[0]["url"]

    r = await client.post(path, headers=admin(ws) | {"Idempotency-Key": "k1"})
    again = await client.post(path, headers=admin(ws) | {"Idempotency-Key": "k1"})
    assert again.json()["token"] == r.json()["token"] and again.headers["Idempotent-Replayed"] == "true"

    r = await client.post("/v1/customers/cus_unknown/link_tokens", headers=admin(ws))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = await client.post(path, json={"ttl_seconds": 5}, headers=admin(ws))
    assert r.status_code == 400 and r.json()["param"] == "$.ttl_seconds"
    r = await client.post(path, json={"ttl": 600}, headers=admin(ws))
    assert r.status_code == 400 and r.json()["code"] == "invalid_parameter"
    r = await client.post(path, auth=write_auth(ws))
    assert r.status_code == 403 and r.json()["code"] == "secret_key_required"


async def test_openapi_documents_the_routes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/telegram/{channel_id}/webhook" in spec["paths"]
    assert "/v1/customers/{customer_id}/link_tokens" in spec["paths"]
