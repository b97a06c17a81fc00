"""The web-chat channel: an embeddable widget talking to Mayak over a WebSocket.

Inbound: the socket (``GET /v1/webchat/{channel_id}/ws``, see ``api.webchat_routes``) authenticates
the visitor (write key, origin, optional signed user token), then turns each ``message`` or
``button`` frame into a ``Message Received`` / ``Button Clicked`` event, appends it through the
group-committing writer and answers ``ack`` only once it is committed. The widget keeps every
message until its ack, so a dropped connection loses nothing and a resend is stored once (the
dedup key carries the widget's ``client_id``).

Outbound: ``send`` (called by the outbox for rows of kind ``message``) pushes the message to every
open socket of that visitor in this process (the ``Hub``). A visitor who is not connected misses
only the live push: the message is in the log as a ``message.outbound`` event and comes back in the
``welcome`` history of the next connection, so delivery counts as done either way. The frame is
also published on the push bus (``mayak.bus``), and every other process pushes it to the sockets
it holds (see docs/webchat.md, Delivery semantics).

The protocol is documented in docs/webchat.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.websockets import WebSocket

from mayak.bus import LocalBus
from mayak.channels import user_tokens
from mayak.channels.base import MESSAGE_KIND, Button, Capabilities, ChannelRecord, OutboundMessage, fit
from mayak.channels.events import INBOUND_NAMES, MAX_TEXT, inbound_event
from mayak.db.schema import customers, events, identities, key_of
from mayak.delivery.outbox import DeliveryOutcome
from mayak.errors import AuthenticationError, InvalidRequest, NotFound
from mayak.pipeline.identity import ANONYMOUS_ID, USER_ID
from mayak.timeutil import ms_to_rfc3339, now_ms

if TYPE_CHECKING:
    from mayak.platform import Mayak

log = structlog.get_logger("mayak.webchat")

TYPE = "webchat"
CLOSE_KIND = "webchat_close"  # on the push bus: close a deleted channel's sockets everywhere
OUTBOUND_TYPE = "message.outbound"
USER_TOKENS_PURPOSE = "user_tokens"

# WebSocket close codes (4000-4999 are the application's own).
CLOSE_PROTOCOL = 4400  # the first frame was not a valid hello
CLOSE_AUTH = 4401  # no / unknown / revoked write key; forged or expired user token
CLOSE_FORBIDDEN = 4403  # a key of another workspace, a secret key, an origin not allowed, channel disabled
CLOSE_NOT_FOUND = 4404  # no web-chat channel with this id
CLOSE_HELLO_TIMEOUT = 4408  # no hello within HELLO_TIMEOUT_S
CLOSE_TOO_SLOW = 4429  # the browser does not read its frames (too many queued)
CLOSE_GONE = 4410  # the channel was deleted while connected

HELLO_TIMEOUT_S = 10.0
HISTORY_LIMIT = 50
HISTORY_SCAN = 500  # events read to find the channel's last HISTORY_LIMIT messages
MAX_FRAME_CHARS = 256 * 1024
MAX_QUEUED_FRAMES = 256
RATE_CAPACITY = 20  # messages a visitor may send in a burst…
RATE_PER_S = 5.0  # …refilled at this rate: 5 messages per second sustained
SECRET_TTL_S = 5.0
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_VISITOR_RE = re.compile(r"^[A-Za-z0-9_-]{8,100}$")
_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_URL_SCHEMES = frozenset({"http", "https", "mailto", "tel"})


# -- frames ------------------------------------------------------------------------------------


class Refused(Exception):
    """The handshake fails: an error frame, then the socket is closed with ``close_code``."""

    def __init__(self, close_code: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.close_code = close_code
        self.code = code
        self.message = message
        self.param = param


class FrameError(Exception):
    """A bad frame after the handshake: answered with an error frame, the socket stays open."""

    def __init__(self, message: str, param: str = "$", client_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.client_id = client_id


def error_frame(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "param": param, **extra}


def buttons_json(buttons: tuple[Button, ...]) -> list[dict[str, Any]]:
    """Buttons as the widget gets them; a URL button whose scheme a browser could run is dropped."""
    out = []
    for b in buttons:
        if b.url is not None and urlsplit(b.url).scheme.lower() not in _URL_SCHEMES:
            continue
        out.append(b.to_json())
    return out


def message_frame(message_id: str, message: OutboundMessage, at_ms: int) -> dict[str, Any]:
    return {
        "type": "message",
        "id": message_id,
        "text": message.text,
        "buttons": buttons_json(message.buttons),
        "at": ms_to_rfc3339(at_ms),
    }


# -- configuration -----------------------------------------------------------------------------


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{title?, greeting?, allowed_origins?}``; everything is public (a web chat has no secrets)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        param = f"$.config.{key}"
        if key in ("title", "greeting"):
            limit = 100 if key == "title" else 1000
            if not isinstance(value, str) or not value.strip() or len(value) > limit:
                raise InvalidRequest(
                    "invalid_config", f"{key} must be a string of 1-{limit} characters", param
                )
            out[key] = value.strip()
        elif key == "allowed_origins":
            if not isinstance(value, list) or not value or len(value) > 50:
                raise InvalidRequest(
                    "invalid_config",
                    'allowed_origins must be a list of 1-50 origins (["*"] allows any; leave it out to '
                    "use the workspace's allowed_origins setting)",
                    param,
                )
            for i, origin in enumerate(value):
                if not isinstance(origin, str) or not (origin == "*" or _ORIGIN_RE.match(origin)):
                    raise InvalidRequest(
                        "invalid_config",
                        'an origin is "*" or scheme://host[:port], e.g. https://shop.example.com',
                        f"{param}[{i}]",
                    )
            out[key] = [o.lower() for o in value]
        else:
            raise InvalidRequest("invalid_config", f"unknown web-chat setting {key!r}", param)
    return out


def origin_allowed(origin: str, allowed: list[str], host: str | None) -> bool:
    """``origin`` (the browser's Origin header) may open a socket: listed, ``*`` listed, or the page
    was served by this Mayak itself (the demo page: same host and port)."""
    origin = origin.lower()
    if "*" in allowed or origin in allowed:
        return True
    return host is not None and urlsplit(origin).netloc == host.lower()


# -- rate limit --------------------------------------------------------------------------------


class TokenBucket:
    """``capacity`` messages at once, refilled at ``rate`` per second."""

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.rate = rate
        self.clock = clock
        self.tokens = capacity
        self.at = clock()

    def take(self) -> float:
        """Take a token; 0.0 when granted, else the seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


# -- connections -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class Connection:
    """One open socket. Frames go out through a queue and a writer task, so neither the outbox nor
    another visitor ever waits for a slow browser; one that stops reading is closed."""

    def __init__(self, websocket: WebSocket, channel_id: str):
        self.websocket = websocket
        self.channel_id = channel_id
        self.visitor_id = ""
        self.closed = False
        self._queue: asyncio.Queue[str | _Close] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._write(), name="mayak-webchat-writer")

    def send(self, frame: dict[str, Any]) -> bool:
        if self.closed:
            return False
        if self._queue.qsize() >= MAX_QUEUED_FRAMES:
            self.close(CLOSE_TOO_SLOW, "too_slow")
            return False
        self._queue.put_nowait(orjson.dumps(frame).decode())
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(_Close(code, reason))

    async def _write(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Close):
                    await self.websocket.close(item.code, item.reason)
                    return
                await self.websocket.send_text(item)
        except Exception:  # the browser went away; the reader notices too
            self.closed = True

    async def finish(self, *, flush_s: float = 2.0) -> None:
        """Close (after what is queued has gone out, for at most ``flush_s``) and stop the writer."""
        self.close()
        task = self._task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=flush_s)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def gone(self) -> None:
        """The browser closed the socket: nothing more can be sent."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()


class Hub:
    """Open sockets by (channel, visitor), in this process."""

    def __init__(self) -> None:
        self._sockets: dict[tuple[str, str], set[Connection]] = {}

    def add(self, conn: Connection) -> None:
        self._sockets.setdefault((conn.channel_id, conn.visitor_id), set()).add(conn)

    def remove(self, conn: Connection) -> None:
        key = (conn.channel_id, conn.visitor_id)
        conns = self._sockets.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._sockets[key]

    def push(self, channel_id: str, visitor_id: str, frame: dict[str, Any]) -> int:
        """Queue ``frame`` on every socket of the visitor; returns how many took it."""
        return sum(c.send(frame) for c in list(self._sockets.get((channel_id, visitor_id), ())))

    def close_channel(self, channel_id: str, code: int, reason: str) -> int:
        closed = 0
        for (ch, _), conns in list(self._sockets.items()):
            if ch == channel_id:
                for c in list(conns):
                    c.send(error_frame("channel_deleted", "this chat is no longer available"))
                    c.close(code, reason)
                    closed += 1
        return closed

    def close_all(self, code: int = 1012, reason: str = "restart") -> int:
        """Close every socket (the widget reconnects unless the code tells it not to)."""
        conns = [c for group in self._sockets.values() for c in group]
        for c in conns:
            c.close(code, reason)
        return len(conns)

    def connected(self, channel_id: str, visitor_id: str) -> int:
        return len(self._sockets.get((channel_id, visitor_id), ()))

    def __len__(self) -> int:
        return sum(len(c) for c in self._sockets.values())


@dataclass(slots=True)
class Session:
    """A socket after a successful hello."""

    conn: Connection
    channel: ChannelRecord
    key_id: str
    visitor_id: str
    user_id: str | None
    context: dict[str, Any]
    bucket: TokenBucket


# -- the adapter -------------------------------------------------------------------------------


class WebChatAdapter:
    type: ClassVar[str] = TYPE
    capabilities = Capabilities(max_text=4096, buttons=True, url_buttons=True, markdown=False)

    def __init__(self, mayak: Mayak):
        self.mayak = mayak
        self.hub = Hub()
        self.hello_timeout_s = HELLO_TIMEOUT_S
        self.rate_capacity: float = RATE_CAPACITY
        self.rate_per_s = RATE_PER_S
        self._secrets: dict[str, tuple[float, str]] = {}

    @property
    def instant_push(self) -> bool:
        """Sends never fail, and on the in-process bus every socket they could reach lives in this
        process: a crash that loses a push after the commit closes those sockets too, and the next
        connection's history shows the message. The outbox then records the row as sent when it is
        written and pushes right after the commit (``OutboxDispatcher.instant``). Across processes
        (NATS, PostgreSQL bus) rows take the ordinary way."""
        return isinstance(self.mayak.bus, LocalBus)

    # -- ChannelAdapter ------------------------------------------------------------------------

    def validate_config(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return validate_config(config), {}

    async def activate(self, channel: ChannelRecord) -> dict[str, Any]:
        return {}

    async def deactivate(self, channel: ChannelRecord) -> None:
        """Close the channel's sockets here, and (through the push bus) in the other processes."""
        self.hub.close_channel(channel.id, CLOSE_GONE, "channel_deleted")
        self.mayak.bus.publish(CLOSE_KIND, channel.id, "", {"code": CLOSE_GONE, "reason": "channel_deleted"})

    def _closed_elsewhere(self, channel_id: str, address: str, frame: dict[str, Any]) -> None:
        code = frame.get("code")
        reason = frame.get("reason")
        self.hub.close_channel(
            channel_id,
            code if isinstance(code, int) else CLOSE_GONE,
            reason if isinstance(reason, str) else "channel_deleted",
        )

    async def send(
        self, channel: ChannelRecord, address: str, message: OutboundMessage, message_id: str
    ) -> DeliveryOutcome:
        """Push to the visitor's open sockets here and publish on the push bus for the sockets other
        processes hold (at most once, never failing: see mayak/bus.py). Done even when no socket is
        open: the message is in the log (``message.outbound``) and the next connection's history
        shows it."""
        # No log line per push: at thousands of messages a second structlog's lazy logger costs
        # more than the push itself.
        frame = message_frame(message_id, message, now_ms())
        self.hub.push(channel.id, address, frame)
        self.mayak.bus.publish(TYPE, channel.id, address, frame)
        return DeliveryOutcome(True)

    # -- user tokens ---------------------------------------------------------------------------

    async def user_token_secret(self, ws_id: str) -> str:
        cached = self._secrets.get(ws_id)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        secret = await self.mayak.workspaces.signing_secret(ws_id, USER_TOKENS_PURPOSE)
        if len(self._secrets) > 10_000:
            self._secrets.clear()
        self._secrets[ws_id] = (time.monotonic() + SECRET_TTL_S, secret)
        return secret

    async def rotate_user_token_secret(self, ws_id: str) -> str:
        """A new secret; tokens signed with the old one stop verifying (here at once, in other
        processes within a few seconds)."""
        import secrets as random_secrets

        secret = "whsec_" + random_secrets.token_urlsafe(32)
        async with self.mayak.db.write() as conn:
            await self.mayak.workspaces.store_secret(conn, ws_id, USER_TOKENS_PURPOSE, secret)
        self._secrets.pop(ws_id, None)
        return secret

    async def mint_user_token(
        self, ws_id: str, user_id: str, ttl_s: int, *, email: str | None = None, name: str | None = None
    ) -> tuple[str, int]:
        secret = await self.user_token_secret(ws_id)
        now = int(time.time())
        token = user_tokens.mint(secret, user_id, ttl_s, now=now, email=email, name=name)
        return token, now + ttl_s

    # -- the socket ----------------------------------------------------------------------------

    async def serve(self, websocket: WebSocket, channel_id: str) -> None:
        """Run one web-chat socket from accept to close."""
        await websocket.accept()
        conn = Connection(websocket, channel_id)
        conn.start()
        try:
            session = await self._handshake(conn, channel_id)
        except Refused as refused:
            conn.send(error_frame(refused.code, refused.message, refused.param))
            conn.close(refused.close_code, refused.code)
            await conn.finish()
            return
        except _Gone:
            conn.gone()
            return
        except Exception:
            log.exception("webchat_handshake_failed", channel=channel_id)
            conn.send(error_frame("internal_error", "the chat is unavailable; try again later"))
            conn.close(1011, "internal_error")
            await conn.finish()
            return
        self.hub.add(conn)
        try:
            await self._converse(session)
        except _Gone:
            conn.gone()
        except Exception:
            log.exception("webchat_socket_failed", channel=channel_id)
            conn.close(1011, "internal_error")
        finally:
            self.hub.remove(conn)
            await conn.finish()

    async def _receive_text(self, websocket: WebSocket) -> str | None:
        """The next text frame; None for a binary one; ``_Gone`` when the browser closed."""
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise _Gone
        text = message.get("text")
        return text if isinstance(text, str) else None

    async def _handshake(self, conn: Connection, channel_id: str) -> Session:
        websocket = conn.websocket
        try:
            channel = await self.mayak.channels.record(None, channel_id)
        except NotFound:
            raise Refused(CLOSE_NOT_FOUND, "channel_not_found", "no web chat with this id") from None
        if channel.type != TYPE:
            raise Refused(CLOSE_NOT_FOUND, "channel_not_found", "no web chat with this id")
        if channel.status != "active":
            raise Refused(CLOSE_FORBIDDEN, "channel_disabled", "this chat is switched off")
        origin = websocket.headers.get("origin")
        if origin:
            allowed = channel.config.get("allowed_origins")
            if allowed is None:
                settings = await self.mayak.workspaces.settings(channel.workspace_id)
                allowed = list(settings.get("allowed_origins", ["*"]))
            if not origin_allowed(origin, allowed, websocket.headers.get("host")):
                raise Refused(
                    CLOSE_FORBIDDEN, "origin_not_allowed", f"origin {origin!r} may not open this chat"
                )
        try:
            text = await asyncio.wait_for(self._receive_text(websocket), self.hello_timeout_s)
        except TimeoutError:
            raise Refused(CLOSE_HELLO_TIMEOUT, "hello_timeout", "no hello frame in time") from None
        hello = _parse(text)
        if hello is None or hello.get("type") != "hello":
            raise Refused(CLOSE_PROTOCOL, "hello_required", "the first frame must be a hello", "$.type")
        visitor_id = hello.get("visitor_id")
        if not isinstance(visitor_id, str) or not _VISITOR_RE.match(visitor_id):
            raise Refused(
                CLOSE_PROTOCOL,
                "invalid_frame",
                "visitor_id must be 8-100 letters, digits, '-' or '_' (a UUID)",
                "$.visitor_id",
            )
        key_id = await self._check_key(hello.get("write_key"), channel)
        user_id, traits = await self._check_token(hello.get("user_token"), channel)
        context = _context(hello.get("context"), websocket.headers.get("user-agent"))
        if traits:
            context["traits"] = traits
        conn.visitor_id = visitor_id
        customer_id, history = await self.history(channel, visitor_id, user_id)
        welcome: dict[str, Any] = {
            "type": "welcome",
            "visitor_id": visitor_id,
            "history": history,
            "config": {
                "title": channel.config.get("title") or channel.name,
                "greeting": channel.config.get("greeting"),
            },
        }
        if customer_id is not None:
            welcome["customer_id"] = customer_id
        if user_id is not None:
            welcome["user_id"] = user_id
        conn.send(welcome)
        bucket = TokenBucket(self.rate_capacity, self.rate_per_s)
        return Session(conn, channel, key_id, visitor_id, user_id, context, bucket)

    async def _check_key(self, presented: Any, channel: ChannelRecord) -> str:
        if not isinstance(presented, str) or not presented:
            raise Refused(
                CLOSE_AUTH, "missing_key", "send the workspace's write key as write_key", "$.write_key"
            )
        try:
            key = await self.mayak.workspaces.authenticate(presented)
        except AuthenticationError as exc:
            raise Refused(CLOSE_AUTH, exc.code, exc.message, "$.write_key") from None
        if key.kind != "write":
            raise Refused(
                CLOSE_FORBIDDEN,
                "secret_key_not_allowed",
                "a secret key must never reach a browser; use the write key",
                "$.write_key",
            )
        if key.workspace_id != channel.workspace_id:
            raise Refused(
                CLOSE_FORBIDDEN,
                "key_not_for_channel",
                "the write key is not of this chat's workspace",
                "$.write_key",
            )
        return key.id

    async def _check_token(self, token: Any, channel: ChannelRecord) -> tuple[str | None, dict[str, Any]]:
        if token is None or token == "":
            return None, {}
        if not isinstance(token, str):
            raise Refused(CLOSE_AUTH, user_tokens.INVALID, "user_token must be a string", "$.user_token")
        secret = await self.user_token_secret(channel.workspace_id)
        try:
            claims = user_tokens.verify(secret, token, time.time())
        except user_tokens.UserTokenError as exc:
            raise Refused(CLOSE_AUTH, exc.code, exc.message, "$.user_token") from None
        traits = {k: claims[k] for k in ("email", "name") if isinstance(claims.get(k), str) and claims[k]}
        return str(claims["sub"]), traits

    async def _converse(self, session: Session) -> None:
        conn = session.conn
        while True:
            text = await self._receive_text(conn.websocket)
            try:
                if text is None:
                    raise FrameError("frames are JSON text; binary frames are not supported")
                frame = _parse(text)
                if frame is None:
                    raise FrameError("the frame is not a JSON object (or is over 256 KiB)")
                kind = frame.get("type")
                if kind == "ping":
                    conn.send({"type": "pong"})
                elif kind in ("message", "button"):
                    await self._inbound(session, frame)
                elif kind == "hello":
                    raise FrameError("hello was already received", "$.type")
                else:
                    raise FrameError("type must be message, button or ping", "$.type")
            except FrameError as exc:
                extra = {"client_id": exc.client_id} if exc.client_id else {}
                conn.send(error_frame("invalid_frame", exc.message, exc.param, **extra))

    async def _inbound(self, session: Session, frame: dict[str, Any]) -> None:
        client_id = frame.get("client_id")
        if not isinstance(client_id, str) or not _ID_RE.match(client_id):
            raise FrameError("client_id must be 1-100 letters, digits or . _ : -", "$.client_id")
        text = payload = title = None
        if frame["type"] == "message":
            text = frame.get("text")
            if not isinstance(text, str) or not text.strip():
                raise FrameError("text must be a non-empty string", "$.text", client_id)
            if len(text) > MAX_TEXT:
                raise FrameError(f"text is over {MAX_TEXT:,} characters", "$.text", client_id)
            if "\x00" in text:
                raise FrameError("text must not contain U+0000", "$.text", client_id)
        else:
            payload, title = frame.get("payload"), frame.get("title")
            if not isinstance(payload, str) or not payload or len(payload) > 1000 or "\x00" in payload:
                raise FrameError("payload must be a string of 1-1000 characters", "$.payload", client_id)
            if title is not None and (not isinstance(title, str) or len(title) > 200 or "\x00" in title):
                raise FrameError("title must be a string of at most 200 characters", "$.title", client_id)
        wait = session.bucket.take()
        if wait > 0:
            session.conn.send(
                error_frame(
                    "rate_limited",
                    "too many messages; resend this one later",
                    None,
                    client_id=client_id,
                    retry_after_ms=math.ceil(wait * 1000),
                )
            )
            return
        now = now_ms()
        channel = session.channel
        event = inbound_event(
            channel,
            address=session.visitor_id,
            anonymous_id=session.visitor_id,
            user_id=session.user_id,
            text=text,
            payload=payload,
            title=title,
            external_id=client_id,
            timestamp=now,
            received_at=now,
            dedup_key=f"webchat:{channel.id}:{session.visitor_id}:{client_id}",
            context=orjson.loads(orjson.dumps(session.context)),  # events own their payload
        )
        event.actor = session.key_id
        try:
            result = await self.mayak.writer.submit([event])
        except Exception as exc:
            log.warning("webchat_submit_failed", channel=channel.id, error=str(exc))
            session.conn.send(
                error_frame(
                    "storage_error",
                    "the message could not be stored; resend it",
                    None,
                    client_id=client_id,
                    retry_after_ms=1000,
                )
            )
            return
        ack: dict[str, Any] = {"type": "ack", "client_id": client_id, "duplicate": result.duplicates > 0}
        if event.id and not result.duplicates:
            ack["id"] = event.id
        session.conn.send(ack)

    # -- history -------------------------------------------------------------------------------

    async def history(
        self, channel: ChannelRecord, visitor_id: str, user_id: str | None
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """(customer id, the last HISTORY_LIMIT messages of this channel, oldest first).

        The customer is the token's user or else the visitor's anonymous profile. An anonymous
        visitor whose profile is identified (the browser was used logged in before) gets no history:
        reading a logged-in customer's conversation needs that customer's token.
        """
        ws_id = channel.workspace_id
        async with self.mayak.db.read() as conn:
            customer_id = None
            if user_id is not None:
                customer_id = await _owner(conn, ws_id, USER_ID, user_id)
            if customer_id is None:
                anon = await _owner(conn, ws_id, ANONYMOUS_ID, visitor_id)
                if anon is not None:
                    row = (
                        await conn.execute(
                            sa.select(customers.c.identified).where(
                                customers.c.workspace_id == ws_id, customers.c.id == anon
                            )
                        )
                    ).first()
                    customer_id = anon if row is not None and not row.identified else None
            if customer_id is None:
                return None, []
            rows = (
                await conn.execute(
                    sa.select(events.c.id, events.c.type, events.c.timestamp, events.c.payload)
                    .where(
                        events.c.workspace_id == ws_id,
                        events.c.customer_key == key_of(ws_id, customer_id),
                        sa.or_(
                            sa.and_(events.c.type == "track", events.c.name.in_(sorted(INBOUND_NAMES))),
                            events.c.type == OUTBOUND_TYPE,
                        ),
                    )
                    .order_by(events.c.seq.desc())
                    .limit(HISTORY_SCAN)
                )
            ).all()
        items: list[list[dict[str, Any]]] = []
        for row in rows:
            entries = self._history_entries(channel.id, row)
            if entries:
                items.append(entries)
                if len(items) >= HISTORY_LIMIT:
                    break
        return customer_id, [entry for entries in reversed(items) for entry in entries]

    def _history_entries(self, channel_id: str, row: Any) -> list[dict[str, Any]]:
        body = orjson.loads(row.payload)
        at = ms_to_rfc3339(row.timestamp)
        if row.type == OUTBOUND_TYPE:
            if body.get("channel_id") != channel_id or not isinstance(body.get("message"), dict):
                return []
            parts = fit(OutboundMessage.from_json(body["message"]), self.capabilities)
            return [
                {
                    "id": row.id if len(parts) == 1 else f"{row.id}.{i}",
                    "direction": "out",
                    "text": part.text,
                    "buttons": buttons_json(part.buttons),
                    "at": at,
                }
                for i, part in enumerate(parts)
            ]
        props = body.get("properties") or {}
        if props.get("channel_id") != channel_id:
            return []
        entry: dict[str, Any] = {"id": row.id, "direction": "in", "at": at}
        if "payload" in props:
            entry["text"] = props.get("title") or props["payload"]
            entry["payload"] = props["payload"]
        else:
            entry["text"] = props.get("text", "")
        if props.get("external_id"):
            entry["client_id"] = props["external_id"]
        return [entry]


class _Gone(Exception):
    """The browser closed the socket."""


def _parse(text: str | None) -> dict[str, Any] | None:
    if text is None or len(text) > MAX_FRAME_CHARS:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _context(raw: Any, user_agent: str | None) -> dict[str, Any]:
    """What the widget tells about the moment (locale, time zone, page) plus the browser's UA."""
    out: dict[str, Any] = {}
    if user_agent:
        out["userAgent"] = user_agent[:1000]
    if isinstance(raw, dict):
        for key in ("locale", "timezone"):
            value = raw.get(key)
            if isinstance(value, str) and 0 < len(value) <= 100 and "\x00" not in value:
                out[key] = value
        page = raw.get("page")
        if isinstance(page, dict):
            kept = {
                k: v
                for k in ("url", "title", "referrer", "path")
                if isinstance(v := page.get(k), str) and len(v) <= 2000 and "\x00" not in v
            }
            if kept:
                out["page"] = kept
    return out


async def _owner(conn: AsyncConnection, ws_id: str, kind: str, value: str) -> str | None:
    """The surviving customer holding identity (kind, value), if any."""
    row = (
        await conn.execute(
            sa.select(customers.c.id)
            .join(identities, identities.c.customer_key == customers.c.key)
            .where(identities.c.workspace_id == ws_id, identities.c.kind == kind, identities.c.value == value)
        )
    ).first()
    if row is None:
        return None
    customer_id: str = row[0]
    for _ in range(64):  # merge chains are compressed on every merge; this is a safety bound
        merged = (
            await conn.execute(
                sa.select(customers.c.merged_into).where(
                    customers.c.workspace_id == ws_id, customers.c.id == customer_id
                )
            )
        ).first()
        if merged is None or merged[0] is None:
            return customer_id
        customer_id = merged[0]
    return None


def adapter_of(mayak: Mayak) -> WebChatAdapter:
    adapter = mayak.channels.adapters.get(TYPE)
    if not isinstance(adapter, WebChatAdapter):
        raise RuntimeError("the web-chat adapter is not installed")
    return adapter


def install(mayak: Mayak) -> None:
    """Register the adapter with ``mayak.channels`` (and anything else it needs)."""
    adapter = WebChatAdapter(mayak)
    mayak.bus.subscribe(TYPE, adapter.hub.push)  # frames other processes publish for our sockets
    mayak.bus.subscribe(CLOSE_KIND, adapter._closed_elsewhere)  # a channel deleted in another process
    mayak.channels.register(adapter)
    mayak.outbox.instant(MESSAGE_KIND, mayak.channels.instant)
