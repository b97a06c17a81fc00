"""A local Telegram Bot API emulator on a real socket, for driving Mayak the way Telegram does.

It serves ``/bot<token>/<method>`` with the Bot API's shapes (``{"ok": true, "result": …}`` or
``{"ok": false, "error_code", "description", "parameters"}``) for ``getMe``, ``setWebhook``,
``deleteWebhook``, ``sendMessage`` and ``answerCallbackQuery``, checks what real Telegram checks
(unknown token → 401, chat never seen → 400 ``chat not found``, text over 4096 UTF-16 units,
``callback_data`` over 64 bytes, webhook URL not HTTPS, secret token characters), records every
call, and can be told to fail a method (429 with ``retry_after``, 500, 400, 403…).

On the other side it plays Telegram's webhook sender: ``send_message``/``press_button``/``deliver``
POST an Update to the URL given to ``setWebhook`` with the secret token given there, and perform a
method named in Mayak's answer (the Bot API's "reply to the webhook" feature), as Telegram would.

Runs uvicorn in a daemon thread, so the adapter's ``httpx`` calls really go over TCP.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


@dataclass
class Call:
    method: str
    token: str
    params: dict[str, Any]
    status: int
    via: str = "http"  # or "webhook_reply": performed from the answer to a webhook request


@dataclass
class Failure:
    method: str
    status: int
    description: str
    retry_after: int | None
    times: int
    token: str | None
    skip: int = 0  # calls to let through before failing


@dataclass
class Bot:
    token: str
    id: int
    username: str
    webhook_url: str = ""
    secret_token: str | None = None
    allowed_updates: list[str] = field(default_factory=list)
    chats: set[int] = field(default_factory=set)  # chats that have talked to the bot
    blocked: set[int] = field(default_factory=set)  # chats whose user blocked the bot
    sent: list[dict[str, Any]] = field(default_factory=list)  # Message objects the bot sent
    open_queries: set[str] = field(default_factory=set)  # callback queries not yet answered


class TelegramEmulator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.bots: dict[str, Bot] = {}
        self.calls: list[Call] = []
        self._failures: list[Failure] = []
        self.require_https = True
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/bot{token}/{method}", self._endpoint, methods=["GET", "POST"])])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="telegram-emulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the Telegram emulator did not start")
            time.sleep(0.005)
        self.base_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def reset(self) -> None:
        with self._lock:
            self.bots.clear()
            self.calls.clear()
            self._failures.clear()
            self.require_https = True

    # -- set-up and inspection ---------------------------------------------------------------

    def add_bot(self, username: str = "mayak_test_bot") -> Bot:
        bot_id = 7_000_000_000 + next(self._ids)
        token = f"{bot_id}:AAH{next(self._ids):08d}emulatorTokenXyz_-abcdefgh"
        bot = Bot(token, bot_id, username)
        with self._lock:
            self.bots[token] = bot
        return bot

    def fail(
        self,
        method: str,
        status: int,
        description: str,
        *,
        retry_after: int | None = None,
        times: int = 1,
        bot: Bot | None = None,
        skip: int = 0,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with this error, after letting ``skip``
        calls through (``skip=1``: the second part of a split message fails)."""
        with self._lock:
            self._failures.append(
                Failure(method, status, description, retry_after, times, bot.token if bot else None, skip)
            )

    def calls_to(self, method: str, bot: Bot | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method and (bot is None or c.token == bot.token)]

    # -- the Bot API -------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        token, method = request.path_params["token"], request.path_params["method"]
        params: dict[str, Any] = dict(request.query_params)
        raw = await request.body()
        if raw:
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("application/json"):
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return _error(400, "Bad Request: can't parse JSON")
                if not isinstance(body, dict):
                    return _error(400, "Bad Request: parameters must be an object")
                params.update(body)
            else:
                params.update((await request.form()).items())
        status, answer = self.perform(token, method, params)
        return Response(orjson.dumps(answer), status_code=status, media_type="application/json")

    def perform(self, token: str, method: str, params: dict[str, Any], via: str = "http") -> tuple[int, Any]:
        with self._lock:
            bot = self.bots.get(token)
            if bot is None:
                status, answer = 401, _fail(401, "Unauthorized")
            else:
                status, answer = self._injected(token, method) or self._method(bot, method, params)
            self.calls.append(Call(method, token, params, status, via))
            return status, answer

    def _injected(self, token: str, method: str) -> tuple[int, Any] | None:
        for failure in self._failures:
            if failure.method == method and failure.times > 0 and failure.token in (None, token):
                if failure.skip > 0:
                    failure.skip -= 1
                    continue
                failure.times -= 1
                extra = {"retry_after": failure.retry_after} if failure.retry_after is not None else None
                return failure.status, _fail(failure.status, failure.description, extra)
        return None

    def _method(self, bot: Bot, method: str, params: dict[str, Any]) -> tuple[int, Any]:
        if method == "getMe":
            return 200, _ok(
                {
                    "id": bot.id,
                    "is_bot": True,
                    "first_name": "Mayak Test",
                    "username": bot.username,
                    "can_join_groups": True,
                    "can_read_all_group_messages": False,
                    "supports_inline_queries": False,
                }
            )
        if method == "setWebhook":
            return self._set_webhook(bot, params)
        if method == "deleteWebhook":
            bot.webhook_url, bot.secret_token = "", None
            return 200, _ok(True, "Webhook was deleted")
        if method == "sendMessage":
            return self._send_message(bot, params)
        if method == "answerCallbackQuery":
            query_id = params.get("callback_query_id")
            if query_id not in bot.open_queries:
                return 400, _fail(
                    400, "Bad Request: query is too old and response timeout expired or query ID is invalid"
                )
            bot.open_queries.discard(query_id)
            return 200, _ok(True)
        return 404, _fail(404, "Not Found")

    def _set_webhook(self, bot: Bot, params: dict[str, Any]) -> tuple[int, Any]:
        url = params.get("url")
        if not isinstance(url, str) or not url:
            return 400, _fail(400, "Bad Request: bad webhook: URL must be provided for webhook")
        if self.require_https and not url.startswith("https://"):
            return 400, _fail(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        secret = params.get("secret_token")
        if secret is not None and (not isinstance(secret, str) or not SECRET_RE.match(secret)):
            return 400, _fail(400, "Bad Request: secret token contains unallowed characters")
        allowed = params.get("allowed_updates")
        if isinstance(allowed, str):
            allowed = orjson.loads(allowed)
        bot.webhook_url, bot.secret_token = url, secret
        bot.allowed_updates = list(allowed or [])
        return 200, _ok(True, "Webhook was set")

    def _send_message(self, bot: Bot, params: dict[str, Any]) -> tuple[int, Any]:
        chat_id = params.get("chat_id")
        if isinstance(chat_id, str) and re.fullmatch(r"-?\d+", chat_id):
            chat_id = int(chat_id)
        if not isinstance(chat_id, int) or chat_id not in bot.chats:
            return 400, _fail(400, "Bad Request: chat not found")
        if chat_id in bot.blocked:
            return 403, _fail(403, "Forbidden: bot was blocked by the user")
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            return 400, _fail(400, "Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            return 400, _fail(400, "Bad Request: message is too long")
        markup = params.get("reply_markup")
        if isinstance(markup, str):
            markup = orjson.loads(markup)
        if markup is not None:
            problem = _check_keyboard(markup)
            if problem:
                return 400, _fail(400, f"Bad Request: {problem}")
        message: dict[str, Any] = {
            "message_id": next(self._ids),
            "from": {"id": bot.id, "is_bot": True, "first_name": "Mayak Test", "username": bot.username},
            "chat": {"id": chat_id, "first_name": "Ann", "type": "private"},
            "date": int(time.time()),
            "text": text,
        }
        if markup is not None:
            message["reply_markup"] = markup
        bot.sent.append(message)
        return 200, _ok(message)

    # -- Telegram's side of the webhook ------------------------------------------------------

    def user(self, chat_id: int, first_name: str = "Ann", **extra: Any) -> dict[str, Any]:
        return {"id": chat_id, "is_bot": False, "first_name": first_name, **extra}

    def message_update(
        self,
        bot: Bot,
        chat_id: int,
        text: str | None = None,
        *,
        sender: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """An Update with a private-chat message; the chat becomes one the bot may write to."""
        with self._lock:
            bot.chats.add(chat_id)
        message: dict[str, Any] = {
            "message_id": next(self._ids),
            "from": sender or self.user(chat_id, language_code="en"),
            "chat": {"id": chat_id, "first_name": "Ann", "type": "private"},
            "date": int(time.time()),
            **fields,
        }
        if text is not None:
            message["text"] = text
        return {"update_id": next(self._ids), "message": message}

    def callback_update(
        self, bot: Bot, chat_id: int, data: str, message: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        query_id = str(next(self._ids) * 1_000_003)
        with self._lock:
            bot.open_queries.add(query_id)
        query: dict[str, Any] = {
            "id": query_id,
            "from": self.user(chat_id, language_code="en"),
            "chat_instance": "-42",
            "data": data,
        }
        if message is not None:
            query["message"] = message
        return {"update_id": next(self._ids), "callback_query": query}

    def press_button(self, bot: Bot, chat_id: int, title: str) -> dict[str, Any]:
        """The Update Telegram sends when the user presses the button ``title`` under the latest
        message the bot sent to ``chat_id`` that has such a button."""
        for message in reversed(bot.sent):
            if message["chat"]["id"] != chat_id:
                continue
            for row in message.get("reply_markup", {}).get("inline_keyboard", []):
                for button in row:
                    if button.get("text") == title and "callback_data" in button:
                        return self.callback_update(bot, chat_id, button["callback_data"], message)
        raise AssertionError(f"no button {title!r} was sent to chat {chat_id}")

    async def deliver(
        self,
        client: httpx.AsyncClient,
        bot: Bot,
        update: dict[str, Any] | bytes,
        *,
        secret: str | None = "",
    ) -> httpx.Response:
        """POST ``update`` to the bot's webhook as Telegram does; ``secret=""`` sends the one from
        ``setWebhook``, ``None`` sends no header. ``client`` reaches Mayak (the test's ASGI client);
        only the path of the webhook URL is used, its host is the public URL Mayak advertised."""
        if not bot.webhook_url:
            raise AssertionError("no webhook is set for this bot")
        headers: dict[str, str | bytes] = {"content-type": "application/json"}
        token = bot.secret_token if secret == "" else secret
        if token is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = token.encode()
        body = update if isinstance(update, bytes) else orjson.dumps(update)
        resp = await client.post(urlsplit(bot.webhook_url).path, content=body, headers=headers)
        if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("application/json"):
            answer = resp.json()
            if isinstance(answer, dict) and isinstance(answer.get("method"), str):
                params = {k: v for k, v in answer.items() if k != "method"}
                self.perform(bot.token, answer["method"], params, via="webhook_reply")
        return resp


def _ok(result: Any, description: str | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": True, "result": result}
    if description:
        answer["description"] = description
    return answer


def _fail(code: int, description: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        answer["parameters"] = parameters
    return answer


def _error(code: int, description: str) -> Response:
    return Response(orjson.dumps(_fail(code, description)), status_code=code, media_type="application/json")


def _check_keyboard(markup: Any) -> str | None:
    rows = markup.get("inline_keyboard") if isinstance(markup, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        return 'field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays'
    for row in rows:
        for button in row:
            if not isinstance(button, dict) or not isinstance(button.get("text"), str):
                return "can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard"
            if "url" in button:
                if not str(button["url"]).startswith(("http://", "https://", "tg://")):
                    return (
                        f"inline keyboard button URL '{button['url']}' is invalid: unsupported URL protocol"
                    )
            elif "callback_data" in button:
                data = button["callback_data"]
                if not isinstance(data, str) or not 1 <= len(data.encode()) <= 64:
                    return "BUTTON_DATA_INVALID"
            else:
                return (
                    "can't parse inline keyboard button: "
                    "InlineKeyboardButton must have exactly one optional field"
                )
    return None


@pytest.fixture(scope="session")
def telegram_server() -> Iterator[TelegramEmulator]:
    emulator = TelegramEmulator()
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def tg(telegram_server: TelegramEmulator) -> TelegramEmulator:
    """The emulator, emptied for this test."""
    telegram_server.reset()
    return telegram_server
