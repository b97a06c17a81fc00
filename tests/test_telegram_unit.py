"""The Telegram adapter's pure parts (text splitting, callback data, update parsing, outcomes) and
the link-token store."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from mayak.channels import link_tokens
from mayak.channels.telegram import (
    REF_RE,
    ApiResult,
    TelegramAdapter,
    callback_data,
    outcome_of,
    parse_update,
    payload_digest,
    split_utf16,
    start_parameter,
    webhook_url,
)
from mayak.config import Settings
from mayak.db.schema import link_tokens as link_tokens_table
from mayak.errors import InvalidRequest
from mayak.platform import Mayak
from mayak.timeutil import now_ms


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@pytest.mark.parametrize(
    "text",
    [
        "",
        "short",
        "a" * 4096,
        "a" * 4097,
        "word " * 2000,
        "😀" * 2048,
        "😀" * 2049,
        "a" + "😀" * 2048,  # the cut must not fall inside a surrogate pair
        "line\n" * 1500,
    ],
)
def test_split_utf16_keeps_parts_within_telegrams_limit(text: str) -> None:
    parts = split_utf16(text, 4096)
    assert all(_units(p) <= 4096 for p in parts)
    assert "".join(parts).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    if _units(text) <= 4096:
        assert parts == [text]


def test_split_utf16_prefers_spaces() -> None:
    text = " ".join(["abcdefghi"] * 1000)  # 9,999 characters
    parts = split_utf16(text, 4096)
    assert len(parts) == 3 and all(not p.startswith(" ") and not p.endswith(" ") for p in parts)
    assert " ".join(parts) == text


@pytest.mark.parametrize(
    ("payload", "raw"),
    [
        ("track_order", True),
        ("x" * 64, True),
        ("é" * 32, True),  # 64 bytes
        ("é" * 33, False),  # 66 bytes
        ("x" * 65, False),
        ("", False),
        ("~mine", False),  # "~" is reserved for references
    ],
)
def test_callback_data(payload: str, raw: bool) -> None:
    data = callback_data(payload, "obx_01JABCDEFGHJKMNPQRSTVWXYZ0.1")
    assert 1 <= len(data.encode()) <= 64
    if raw:
        assert data == payload
    else:
        match = REF_RE.match(data)
        assert match is not None
        assert match[1] == "01JABCDEFGHJKMNPQRSTVWXYZ0" and match[2] == payload_digest(payload)


def test_callback_data_outside_the_outbox_is_an_unresolvable_reference() -> None:
    assert callback_data("y" * 100, "adhoc") == "~" + "0" * 26 + ":" + payload_digest("y" * 100)


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ("/start abc_DEF-123", "abc_DEF-123"),
        ("/start@mayak_bot abc", "abc"),
        ("/start   abc  ", "abc"),
        ("/start", None),
        ("/start@mayak_bot", None),
        ("/starting abc", None),
        ("/start a b", None),
        ("hello /start abc", None),
        (None, None),
    ],
)
def test_start_parameter(text: str | None, param: str | None) -> None:
    assert start_parameter(text) == param


@pytest.mark.parametrize(
    ("result", "ok", "retryable"),
    [
        (ApiResult(True, 200, {}), True, True),
        (ApiResult(False, None, description="ConnectError"), False, True),
        (ApiResult(False, 429, description="Too Many Requests", retry_after=9), False, True),
        (ApiResult(False, 500, description="Internal Server Error"), False, True),
        (ApiResult(False, 502, description="Bad Gateway"), False, True),
        (ApiResult(False, 400, description="Bad Request: chat not found"), False, False),
        (ApiResult(False, 403, description="Forbidden: bot was blocked by the user"), False, False),
        (ApiResult(False, 401, description="Unauthorized"), False, False),
    ],
)
def test_outcomes(result: ApiResult, ok: bool, retryable: bool) -> None:
    outcome = outcome_of(result)
    assert (outcome.ok, outcome.status_code) == (ok, result.status)
    if not ok:
        assert outcome.retryable is retryable and result.description in (outcome.error or "")


def test_validate_config_splits_public_and_secret() -> None:
    adapter = TelegramAdapter(Settings(), None)  # type: ignore[arg-type]
    token = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
    public, secret = adapter.validate_config({"bot_token": token})
    assert public == {"api_base_url": "https://api.telegram.org"}
    assert secret["bot_token"] == token
    other = adapter.validate_config({"bot_token": token, "api_base_url": "http://127.0.0.1:8081/"})
    assert other[0] == {"api_base_url": "http://127.0.0.1:8081"}
    assert other[1]["webhook_secret"] != secret["webhook_secret"]
    with pytest.raises(InvalidRequest) as info:
        adapter.validate_config({"bot_token": "123456:" + "x" * 19})
    assert (info.value.code, info.value.param) == ("invalid_bot_token", "$.config.bot_token")


def test_webhook_url() -> None:
    assert webhook_url("https://cx.example.com/", "ch_1") == "https://cx.example.com/v1/telegram/ch_1/webhook"
    assert (
        webhook_url("https://example.com/mayak", "ch_1")
        == "https://example.com/mayak/v1/telegram/ch_1/webhook"
    )


def test_a_callback_without_its_message_answers_the_user_chat() -> None:
    update = parse_update(
        orjson.dumps({"update_id": 5, "callback_query": {"id": "q1", "from": {"id": 77, "first_name": "A"}}})
    )
    assert update.callback is not None
    assert (update.callback.chat_id, update.callback.data, update.callback.title) == (77, "", None)


def test_the_title_comes_from_the_echoed_keyboard() -> None:
    keyboard = {
        "inline_keyboard": [[{"text": "Yes", "callback_data": "y"}, {"text": "No", "callback_data": "n"}]]
    }
    message = {"message_id": 3, "date": 1, "chat": {"id": 9, "type": "private"}, "reply_markup": keyboard}
    update = parse_update(
        orjson.dumps(
            {
                "update_id": 6,
                "callback_query": {"id": "q", "from": {"id": 9}, "message": message, "data": "n"},
            }
        )
    )
    assert update.callback is not None and update.callback.title == "No"
    update = parse_update(
        orjson.dumps(
            {
                "update_id": 7,
                "callback_query": {"id": "q", "from": {"id": 9}, "message": message, "data": "z"},
            }
        )
    )
    assert update.callback is not None and update.callback.title is None


# -- link tokens -------------------------------------------------------------------------------


@pytest.mark.contract
async def test_a_link_token_links_once(mayak: Mayak, ws: dict[str, Any]) -> None:
    issued = await link_tokens.create_link_token(mayak.db, ws["id"], "cus_A", ttl_s=60)
    assert issued.expires_at - now_ms() <= 60_000
    async with mayak.db.read() as conn:
        stored = (await conn.execute(sa.select(link_tokens_table))).mappings().all()
    assert [r["hash"] for r in stored] == [link_tokens.token_hash(issued.token)]
    assert issued.token not in str(stored)
    assert await link_tokens.is_known(mayak.db, ws["id"], issued.token)
    assert not await link_tokens.is_known(mayak.db, "ws_other", issued.token)

    async def claim(ws_id: str = ws["id"], token: str = issued.token) -> str | None:
        async with mayak.db.write() as conn:
            return await link_tokens.consume(conn, ws_id, token)

    assert await claim("ws_other") is None  # another workspace cannot use it
    results = await asyncio.gather(claim(), claim(), claim())
    assert results.count("cus_A") == 1 and results.count(None) == 2
    assert await claim() is None
    assert await claim(token="not a token!") is None
    assert await link_tokens.is_known(mayak.db, ws["id"], issued.token)  # used, still known


@pytest.mark.contract
async def test_a_rolled_back_claim_leaves_the_token_usable(mayak: Mayak, ws: dict[str, Any]) -> None:
    issued = await link_tokens.create_link_token(mayak.db, ws["id"], "cus_B")
    with pytest.raises(RuntimeError):
        async with mayak.db.write() as conn:
            assert await link_tokens.consume(conn, ws["id"], issued.token) == "cus_B"
            raise RuntimeError("the append failed")
    async with mayak.db.write() as conn:
        assert await link_tokens.consume(conn, ws["id"], issued.token) == "cus_B"


@pytest.mark.contract
async def test_expired_tokens_do_not_link_and_are_cleared(mayak: Mayak, ws: dict[str, Any]) -> None:
    old = await link_tokens.create_link_token(mayak.db, ws["id"], "cus_C", ttl_s=60, now=now_ms() - 61_000)
    async with mayak.db.write() as conn:
        assert await link_tokens.consume(conn, ws["id"], old.token) is None
    await link_tokens.create_link_token(mayak.db, ws["id"], "cus_C")  # clears the customer's expired ones
    assert not await link_tokens.is_known(mayak.db, ws["id"], old.token)
    with pytest.raises(ValueError):
        await link_tokens.create_link_token(mayak.db, ws["id"], "cus_C", ttl_s=0)
