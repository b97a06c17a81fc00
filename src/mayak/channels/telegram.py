"""The Telegram channel: Bot API calls out, webhook updates in, ``/start`` deep links.

Outbound (``TelegramAdapter.send``): one ``sendMessage`` per fitted part, plain text (no
``parse_mode``: ``capabilities.markdown`` is False, so ``fit`` strips markdown markers), buttons as
an inline keyboard. Each ``sendMessage`` is one outbox step (``mayak.delivery.outbox.step``): when a
later part fails, the retry resumes at that part instead of sending the earlier ones again. A 429
with a ``retry_after`` over 5 s is reported to the outbox (``retry_after_ms``), which comes back no
earlier than that; a shorter one is sat out within the attempt. Telegram limits ``callback_data`` to
64 bytes, so a button payload travels:

* as itself when it is 1-64 bytes of UTF-8 and does not start with ``~``;
* otherwise as a reference ``~<outbox row ULID>:<digest>`` (36 bytes): the message went out from
  that outbox row, whose payload keeps the full button list, and ``digest`` (the first 8 characters
  of the URL-safe base64 SHA-256 of the payload) picks the button. Resolving a press is a read of
  one row by primary key, survives restarts and needs no table of its own; it is scoped to the
  channel's workspace, the channel and the chat the message went to.

Inbound (``receive_update``): a ``message`` becomes ``Message Received``, a ``callback_query``
becomes ``Button Clicked``; both are deduplicated by ``telegram:<channel id>:<update_id>``, so an
update Telegram resends is stored once. The callback query is answered in the webhook's own HTTP
answer (``{"method": "answerCallbackQuery", …}``, a documented Bot API feature), which costs no
extra request, no task and no outbox row: the answer only stops the button's spinner, is useful for
a few seconds and has no business effect, so durability would buy nothing.

Deep links: ``/start <token>`` with a token from ``mayak.channels.link_tokens`` appends
``identity.linked`` before the message, in the same transaction that marks the token used.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import orjson
import sqlalchemy as sa
import structlog

from mayak import eventlog
from mayak.channels import link_tokens
from mayak.channels.base import Button, Capabilities, ChannelRecord, OutboundMessage
from mayak.channels.events import MAX_TEXT, identity_linked, inbound_event
from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import channels, outbox
from mayak.delivery.outbox import DeliveryOutcome, step
from mayak.errors import InvalidRequest
from mayak.eventlog import NewEvent
from mayak.timeutil import now_ms

if TYPE_CHECKING:
    from mayak.platform import Mayak

log = structlog.get_logger("mayak.telegram")

CHANNEL_TYPE = "telegram"
IDENTITY_KIND = "telegram"
API_BASE_URL = "https://api.telegram.org"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
ALLOWED_UPDATES = ("message", "callback_query")
TOKEN_RE = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{20,200}$")
MAX_TEXT_UTF16 = 4096  # Telegram counts UTF-16 code units; an emoji counts twice
CALLBACK_DATA_BYTES = 64
REF_PREFIX = "~"
REF_RE = re.compile(r"^~([0-9A-HJKMNP-TV-Z]{26}):([A-Za-z0-9_-]{8})$")
SHORT_TITLE = 15  # buttons go two to a row when every title is at most this long
EMPTY_TEXT = "\u2800"  # Telegram refuses an empty text; a blank Braille pattern shows nothing
URL_SCHEMES = ("http://", "https://", "tg://")
MAX_INLINE_RETRY_AFTER_S = 5.0
ERROR_CHARS = 500
START_RE = re.compile(r"^/start(?:@[A-Za-z0-9_]{1,64})?(?:\s+(\S+))?\s*$")
# Message content fields, in the order they are recognised (an animation also carries "document",
# a venue also carries "location").
CONTENT_KINDS = (
    "animation",
    "audio",
    "document",
    "photo",
    "sticker",
    "story",
    "video",
    "video_note",
    "voice",
    "contact",
    "dice",
    "game",
    "poll",
    "venue",
    "location",
    "invoice",
    "successful_payment",
    "paid_media",
)


# -- Bot API client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiResult:
    """One Bot API answer. ``status`` is None when no HTTP answer came (network error, timeout)."""

    ok: bool
    status: int | None
    result: Any = None
    description: str = ""
    retry_after: int | None = None


class TelegramAdapter:
    """The ``ChannelAdapter`` for Telegram; owns one ``httpx.AsyncClient`` (see ``close``)."""

    type: ClassVar[str] = CHANNEL_TYPE
    capabilities = Capabilities(
        max_text=4096, buttons=True, max_buttons=10, max_button_title=64, url_buttons=True, markdown=False
    )

    def __init__(self, settings: Settings, db: Database, *, client: httpx.AsyncClient | None = None):
        self.settings = settings
        self.db = db
        self._client = client
        self._owns_client = client is None
        self.max_inline_retry_after_s = MAX_INLINE_RETRY_AFTER_S
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.webhook_timeout_s, connect=5.0),
                follow_redirects=False,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
        return self._client

    async def close(self) -> None:
        """Close the HTTP client if this adapter created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
        self._client = None

    async def call(self, channel: ChannelRecord, method: str, params: dict[str, Any]) -> ApiResult:
        """POST one Bot API method; never raises for HTTP or network trouble, and never lets the bot
        token (part of the URL) into an error message."""
        token = str(channel.secrets.get("bot_token", ""))
        base = str(channel.config.get("api_base_url") or API_BASE_URL).rstrip("/")
        try:
            resp = await self.client.post(f"{base}/bot{token}/{method}", json=params)
        except httpx.TimeoutException:
            return ApiResult(False, None, description=f"timeout calling {method}")
        except httpx.HTTPError as exc:
            return ApiResult(False, None, description=_scrub(f"{type(exc).__name__}: {exc}", token))
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            snippet = resp.content[:200].decode("utf-8", "replace").strip()
            text = f"HTTP {resp.status_code}" + (f": {snippet}" if snippet else "")
            return ApiResult(False, resp.status_code, description=_scrub(text, token))
        if body.get("ok") is True and resp.status_code == 200:
            return ApiResult(True, 200, body.get("result"))
        params_out = body.get("parameters")
        retry_after = params_out.get("retry_after") if isinstance(params_out, dict) else None
        description = body.get("description")
        return ApiResult(
            False,
            resp.status_code,
            description=_scrub(str(description) if description else f"HTTP {resp.status_code}", token),
            retry_after=retry_after if isinstance(retry_after, int) and retry_after >= 0 else None,
        )

    # -- ChannelAdapter: administration ---------------------------------------------------------

    def validate_config(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        for key in config:
            if key not in ("bot_token", "api_base_url"):
                raise InvalidRequest(
                    "unknown_field", f"unknown telegram setting {key!r}", f"$.config.{key}"[:200]
                )
        token = config.get("bot_token")
        if not isinstance(token, str) or not token:
            raise InvalidRequest(
                "invalid_bot_token", "config.bot_token is required (from @BotFather)", "$.config.bot_token"
            )
        if not TOKEN_RE.match(token):
            raise InvalidRequest(
                "invalid_bot_token",
                "config.bot_token is not a Telegram bot token (<digits>:<letters, digits, _ and ->)",
                "$.config.bot_token",
            )
        base = config.get("api_base_url", API_BASE_URL)
        if not isinstance(base, str) or not _is_http_url(base):
            raise InvalidRequest(
                "invalid_api_base_url",
                "config.api_base_url must be an http or https URL (a local Bot API server)",
                "$.config.api_base_url",
            )
        public = {"api_base_url": base.rstrip("/")}
        secret = {"bot_token": token, "webhook_secret": secrets.token_urlsafe(32)}
        return public, secret

    async def activate(self, channel: ChannelRecord) -> dict[str, Any]:
        """``getMe`` (the bot's username, for deep links), then ``setWebhook``. Any refusal or network
        error answers 400 ``telegram_error``; the service then removes the channel row again."""
        me = await self.call(channel, "getMe", {})
        if not me.ok or not isinstance(me.result, dict):
            raise _telegram_error("getMe", me)
        username, bot_id = me.result.get("username"), me.result.get("id")
        if not isinstance(username, str) or not isinstance(bot_id, int):
            raise InvalidRequest(
                "telegram_error", "getMe answered without the bot's id and username", "$.config.bot_token"
            )
        await self._refuse_second_channel(channel, bot_id)
        url = webhook_url(self.settings.public_url, channel.id)
        hook = await self.call(
            channel,
            "setWebhook",
            {
                "url": url,
                "secret_token": channel.secrets["webhook_secret"],
                "allowed_updates": list(ALLOWED_UPDATES),
            },
        )
        if not hook.ok:
            raise _telegram_error("setWebhook", hook)
        return {"bot_username": username, "bot_id": bot_id, "webhook_url": url}

    async def _refuse_second_channel(self, channel: ChannelRecord, bot_id: int) -> None:
        """One channel per bot: a second ``setWebhook`` would silently take the first channel's
        updates, and deleting either would remove the other's webhook."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(channels.c.id, channels.c.workspace_id, channels.c.config).where(
                    channels.c.type == CHANNEL_TYPE, channels.c.id != channel.id
                )
            )
            for row in rows:
                if isinstance(row.config, dict) and row.config.get("bot_id") == bot_id:
                    where = row.id if row.workspace_id == channel.workspace_id else "another workspace"
                    raise InvalidRequest(
                        "bot_already_connected",
                        f"this bot is already connected to a channel ({where}); delete that channel first",
                        "$.config.bot_token",
                    )

    async def deactivate(self, channel: ChannelRecord) -> None:
        result = await self.call(channel, "deleteWebhook", {})
        if not result.ok:
            log.warning("telegram_delete_webhook_failed", channel=channel.id, error=result.description)

    # -- ChannelAdapter: delivery ---------------------------------------------------------------

    async def send(
        self, channel: ChannelRecord, address: str, message: OutboundMessage, message_id: str
    ) -> DeliveryOutcome:
        """``sendMessage`` for one fitted message: text parts over 4096 UTF-16 units are cut once more
        (``fit`` counts code points), the inline keyboard goes under the last part. Each call is an
        outbox step, so a part that an earlier attempt of the row sent is not sent again."""
        text = message.text
        keyboard: list[dict[str, Any]] = []
        for button in message.buttons:
            if button.url is not None and not button.url.startswith(URL_SCHEMES):
                text += f"\n{button.title}: {button.url}"  # Telegram refuses other URL schemes
                continue
            keyboard.append(self._button(button, message_id))
        if not text.strip() and not keyboard:
            return DeliveryOutcome(False, None, "the message has no text and no buttons", retryable=False)
        parts = split_utf16(text if text.strip() else EMPTY_TEXT, MAX_TEXT_UTF16)
        chat_id: int | str = int(address) if re.fullmatch(r"-?[0-9]{1,20}", address) else address
        outcome = DeliveryOutcome(True)
        for index, part in enumerate(parts):
            params: dict[str, Any] = {"chat_id": chat_id, "text": part}
            if keyboard and index == len(parts) - 1:
                params["reply_markup"] = {"inline_keyboard": _rows(keyboard)}
            outcome = await step(functools.partial(self._send_message, channel, params))
            if not outcome.ok:
                return outcome
        return outcome

    def _button(self, button: Button, message_id: str) -> dict[str, Any]:
        if button.url is not None:
            return {"text": button.title, "url": button.url}
        return {"text": button.title, "callback_data": callback_data(_button_payload(button), message_id)}

    async def _send_message(self, channel: ChannelRecord, params: dict[str, Any]) -> DeliveryOutcome:
        result = await self.call(channel, "sendMessage", params)
        if (
            result.status == 429
            and result.retry_after is not None
            and result.retry_after <= self.max_inline_retry_after_s
        ):
            # A short flood wait is cheaper to sit out here than to hand back to the outbox (a
            # recorded attempt, a claim, and the lane held all the same).
            await self.sleep(float(result.retry_after))
            result = await self.call(channel, "sendMessage", params)
        return outcome_of(result)


def outcome_of(result: ApiResult) -> DeliveryOutcome:
    """Telegram's answer as an outbox outcome: 429, 5xx and no answer are retried; the rest of the
    4xx (chat not found, bot blocked, bad request, revoked token) are final. A 429's
    ``retry_after`` becomes ``retry_after_ms``: the outbox comes back no earlier than that."""
    if result.ok:
        return DeliveryOutcome(True, result.status)
    code = result.status
    if code is None:
        return DeliveryOutcome(False, None, result.description or "no answer from Telegram")
    if code == 429:
        if result.retry_after is None:
            return DeliveryOutcome(False, code, result.description)
        error = f"{result.description} (retry after {result.retry_after} s)"
        return DeliveryOutcome(False, code, error, retry_after_ms=result.retry_after * 1000)
    return DeliveryOutcome(False, code, result.description, retryable=code >= 500)


def _scrub(text: str, token: str) -> str:
    """An error text without the bot token (httpx puts the URL, token included, into some errors)."""
    return (text.replace(token, "<token>") if token else text)[:ERROR_CHARS]


def _telegram_error(method: str, result: ApiResult) -> InvalidRequest:
    return InvalidRequest(
        "telegram_error", f"Telegram {method}: {result.description or 'failed'}", "$.config.bot_token"
    )


def _is_http_url(value: str) -> bool:
    if len(value) > 2000:
        return False
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def webhook_url(public_url: str, channel_id: str) -> str:
    return f"{public_url.rstrip('/')}/v1/telegram/{channel_id}/webhook"


def _rows(keyboard: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One button per row, or two per row when every title is short."""
    if len(keyboard) > 2 and all(len(b["text"]) <= SHORT_TITLE for b in keyboard):
        return [keyboard[i : i + 2] for i in range(0, len(keyboard), 2)]
    return [[b] for b in keyboard]


def _button_payload(button: Button) -> str:
    return button.payload if button.payload is not None else button.title


def payload_digest(payload: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(payload.encode()).digest())[:8].decode()


def callback_data(payload: str, message_id: str) -> str:
    """The ``callback_data`` for a button payload (see the module docstring)."""
    size = len(payload.encode())
    if 0 < size <= CALLBACK_DATA_BYTES and not payload.startswith(REF_PREFIX):
        return payload
    row_id = message_id.split(".", 1)[0]
    ulid = row_id[4:] if row_id.startswith("obx_") else "0" * 26
    return f"{REF_PREFIX}{ulid}:{payload_digest(payload)}"


async def resolve_callback_data(db: Database, channel: ChannelRecord, address: str, data: str) -> str | None:
    """The full payload behind a ``~`` reference, or None if this channel never sent it to this chat."""
    match = REF_RE.match(data)
    if match is None:
        return None
    c = outbox.c
    async with db.read() as conn:
        row = (
            await conn.execute(
                sa.select(c.payload).where(
                    c.id == f"obx_{match[1]}",
                    c.workspace_id == channel.workspace_id,
                    c.kind == "message",
                    c.target == channel.id,
                )
            )
        ).first()
    if row is None:
        return None
    try:
        payload = orjson.loads(row[0]) if isinstance(row[0], (str, bytes)) else row[0]
        if str(payload["address"]) != address:
            return None
        message = OutboundMessage.from_json(payload["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    for button in message.buttons:
        if button.url is None and payload_digest(_button_payload(button)) == match[2]:
            return _button_payload(button)
    return None


def split_utf16(text: str, limit: int) -> list[str]:
    """Cut ``text`` into parts of at most ``limit`` UTF-16 code units, at spaces or newlines when
    one lies in the second half of a part."""
    parts: list[str] = []
    rest = text
    while _utf16_len(rest) > limit:
        cut, units = 0, 0
        for i, ch in enumerate(rest):
            units += 2 if ord(ch) > 0xFFFF else 1
            if units > limit:
                cut = i
                break
        space = max(rest.rfind("\n", 0, cut), rest.rfind(" ", 0, cut))
        if space > cut // 2:
            cut = space + 1
        parts.append(rest[:cut].rstrip() or rest[:cut])
        rest = rest[cut:].lstrip()
    if rest or not parts:
        parts.append(rest)
    return parts


def _utf16_len(text: str) -> int:
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


# -- inbound: parsing an Update ----------------------------------------------------------------


def _invalid(path: str, message: str) -> InvalidRequest:
    return InvalidRequest("invalid_update", message, path)


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(path, f"{path} must be an object")
    return value


def _int(obj: dict[str, Any], key: str, path: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{path}.{key}", f"{path}.{key} must be an integer")
    return value


def _opt_int(obj: dict[str, Any], key: str, path: str) -> int | None:
    return None if obj.get(key) is None else _int(obj, key, path)


def _str(obj: dict[str, Any], key: str, path: str, *, required: bool = False, limit: int = 0) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _invalid(f"{path}.{key}", f"{path}.{key} must be a string")
    value = value.replace("\x00", "")  # PostgreSQL cannot store U+0000
    return value[:limit] if limit else value


@dataclass(slots=True)
class Sender:
    id: int | None
    first_name: str | None
    last_name: str | None
    username: str | None
    language_code: str | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("id", "first_name", "last_name", "username"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _sender(value: Any, path: str, *, required: bool) -> Sender | None:
    if value is None and not required:
        return None
    obj = _object(value, path)
    return Sender(
        id=_int(obj, "id", path) if required else _opt_int(obj, "id", path),
        first_name=_str(obj, "first_name", path, limit=200),
        last_name=_str(obj, "last_name", path, limit=200),
        username=_str(obj, "username", path, limit=100),
        language_code=_str(obj, "language_code", path, limit=35),
    )


@dataclass(slots=True)
class _Chat:
    id: int
    private: bool


def _chat(message: dict[str, Any], path: str) -> _Chat:
    chat = _object(message.get("chat"), f"{path}.chat")
    chat_id = _int(chat, "id", f"{path}.chat")
    kind = _str(chat, "type", f"{path}.chat")
    return _Chat(chat_id, kind in (None, "private"))


@dataclass(slots=True)
class IncomingMessage:
    message_id: int
    date: int
    chat: _Chat
    sender: Sender | None
    text: str | None
    caption: str | None
    kind: str


@dataclass(slots=True)
class IncomingCallback:
    id: str
    chat_id: int
    private: bool
    sender: Sender | None
    data: str
    title: str | None


@dataclass(slots=True)
class Update:
    update_id: int
    message: IncomingMessage | None = None
    callback: IncomingCallback | None = None
    ignored: str | None = None


def parse_update(raw: bytes) -> Update:
    """Validate the parts of a Bot API ``Update`` Mayak uses; anything else is left alone.

    Raises ``InvalidRequest("invalid_update", …, path)`` for malformed input.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid("$", "the body is not valid JSON") from exc
    update = _object(body, "$")
    update_id = _int(update, "update_id", "$")
    if update_id < 0:
        raise _invalid("$.update_id", "$.update_id must not be negative")
    if "message" in update:
        return Update(update_id, message=_message(_object(update["message"], "$.message"), "$.message"))
    if "callback_query" in update:
        return Update(update_id, callback=_callback(_object(update["callback_query"], "$.callback_query")))
    other = next((k for k in update if k != "update_id"), "nothing")
    return Update(update_id, ignored=f"update type {other!r} is not handled"[:200])


def _message(msg: dict[str, Any], path: str) -> IncomingMessage:
    message_id = _int(msg, "message_id", path)
    date = _int(msg, "date", path)
    if not 0 <= date < 2**33:
        raise _invalid(f"{path}.date", f"{path}.date must be a Unix time in seconds")
    chat = _chat(msg, path)
    sender = _sender(msg.get("from"), f"{path}.from", required=False)
    text = _str(msg, "text", path)
    caption = _str(msg, "caption", path, limit=MAX_TEXT)
    kind = "text" if text is not None else next((k for k in CONTENT_KINDS if k in msg), "other")
    return IncomingMessage(message_id, date, chat, sender, text, caption, kind)


def _callback(query: dict[str, Any]) -> IncomingCallback:
    path = "$.callback_query"
    query_id = _str(query, "id", path, required=True, limit=200) or ""
    sender_obj = _object(query.get("from"), f"{path}.from")
    sender = _sender(sender_obj, f"{path}.from", required=True)
    data = _str(query, "data", path) or ""
    chat_id, private, title = _int(sender_obj, "id", f"{path}.from"), True, None
    if query.get("message") is not None:
        message = _object(query["message"], f"{path}.message")
        chat = _chat(message, f"{path}.message")
        chat_id, private = chat.id, chat.private
        title = _button_title(message.get("reply_markup"), data)
    return IncomingCallback(query_id, chat_id, private, sender, data, title)


def _button_title(markup: Any, data: str) -> str | None:
    """The pressed button's text, from the keyboard Telegram echoes back with the message."""
    keyboard = markup.get("inline_keyboard") if isinstance(markup, dict) else None
    if not isinstance(keyboard, list):
        return None
    for row in keyboard:
        for button in row if isinstance(row, list) else ():
            if isinstance(button, dict) and button.get("callback_data") == data:
                text = button.get("text")
                return text.replace("\x00", "")[:200] if isinstance(text, str) else None
    return None


def start_parameter(text: str | None) -> str | None:
    """The parameter of ``/start <parameter>`` (a deep link), if the text is one."""
    if not text or not text.startswith("/start"):
        return None
    match = START_RE.match(text)
    return match[1] if match else None


# -- inbound: appending ------------------------------------------------------------------------


async def receive_update(mayak: Mayak, channel: ChannelRecord, raw: bytes) -> dict[str, Any]:
    """Record one webhook update; returns the webhook's answer body. The events are committed when
    this returns. Raises ``InvalidRequest`` for a malformed update."""
    update = parse_update(raw)
    dedup_key = f"telegram:{channel.id}:{update.update_id}"
    now = now_ms()
    if update.message is not None:
        msg = update.message
        if not msg.chat.private:
            return {"ok": True, "ignored": "not a private chat"}
        event = inbound_event(
            channel,
            address=str(msg.chat.id),
            timestamp=msg.date * 1000,
            received_at=now,
            dedup_key=dedup_key,
            text=msg.text,
            external_id=str(msg.message_id),
            identity_kind=IDENTITY_KIND,
            context=_context(msg.sender),
        )
        props = event.payload["properties"]
        props["kind"] = msg.kind
        if msg.caption is not None:
            props["caption"] = msg.caption
        if msg.sender is not None:
            props["sender"] = msg.sender.to_json()
        param = start_parameter(msg.text)
        if param is not None and await link_tokens.is_known(mayak.db, channel.workspace_id, param):
            await _append_start(mayak, channel, event, param, now)
        else:
            await mayak.writer.submit([event])
        return {"ok": True}
    if update.callback is not None:
        cb = update.callback
        if not cb.private:
            return {"ok": True, "ignored": "not a private chat"}
        address = str(cb.chat_id)
        payload = cb.data
        resolved = None
        if cb.data.startswith(REF_PREFIX):
            resolved = await resolve_callback_data(mayak.db, channel, address, cb.data)
        event = inbound_event(
            channel,
            address=address,
            timestamp=now,
            received_at=now,
            dedup_key=dedup_key,
            payload=resolved if resolved is not None else payload,
            title=cb.title,
            external_id=cb.id,
            identity_kind=IDENTITY_KIND,
            context=_context(cb.sender),
        )
        props = event.payload["properties"]
        if resolved is not None:
            props["callback_data"] = cb.data
        elif cb.data.startswith(REF_PREFIX):
            props["unresolved"] = True  # a reference Mayak cannot find: the bot will not understand it
        if cb.sender is not None:
            props["sender"] = cb.sender.to_json()
        await mayak.writer.submit([event])
        # Telegram performs a method named in the webhook's answer: the button stops spinning.
        return {"method": "answerCallbackQuery", "callback_query_id": cb.id}
    return {"ok": True, "ignored": update.ignored}


def _context(sender: Sender | None) -> dict[str, Any]:
    if sender is not None and sender.language_code:
        return {"locale": sender.language_code}
    return {}


async def _append_start(mayak: Mayak, channel: ChannelRecord, event: NewEvent, token: str, now: int) -> None:
    """``/start <link token>``: claim the token and append ``identity.linked`` + the message in one
    transaction, so the chat is linked exactly once even when Telegram resends the update (the
    resend finds the token used and its message a duplicate) and a failed append leaves the token
    unused. These events skip the writer's inline processing; the pipeline lane picks them up."""
    props = event.payload["properties"]
    address = str(props["address"])
    async with mayak.db.write() as conn:
        customer_id = await link_tokens.consume(conn, channel.workspace_id, token, now=now)
        batch: list[NewEvent] = []
        if customer_id is not None:
            batch.append(
                identity_linked(
                    channel.workspace_id,
                    customer_id,
                    IDENTITY_KIND,
                    address,
                    at=now,
                    dedup_key=f"{event.dedup_key}:link",
                    source=CHANNEL_TYPE,
                )
            )
            props["text"] = "/start"  # the token is spent; keep it out of the log
            props["link"] = "linked"
        else:
            props["link"] = "refused"  # used before, or expired
        batch.append(event)
        result = await eventlog.append(mayak.db, conn, batch, window_ms=mayak.writer.dedup_window_ms)
    mayak.notifier.notify()
    mayak.metrics.events_accepted.inc(result.accepted)
    if result.duplicates:
        mayak.metrics.events_deduplicated.inc(result.duplicates)
    if customer_id is not None and result.accepted:
        log.info("telegram_chat_linked", channel=channel.id, customer=customer_id)


def install(mayak: Mayak) -> None:
    """Register the adapter with ``mayak.channels``.

    The adapter's HTTP client is opened on first use; ``TelegramAdapter.close`` closes it (the
    platform has no shutdown hook for channel adapters yet).
    """
    mayak.channels.register(TelegramAdapter(mayak.settings, mayak.db))


__all__ = [
    "ApiResult",
    "TelegramAdapter",
    "callback_data",
    "install",
    "parse_update",
    "receive_update",
    "resolve_callback_data",
    "split_utf16",
    "webhook_url",
]
