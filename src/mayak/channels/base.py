"""The channel port: how Mayak hears customers on a messenger and how it speaks to them.

An adapter does three things:

* **inbound** — its HTTP/WebSocket route turns what the messenger sends into normalised events
  (``mayak.channels.events``) and appends them to the log; the bot router reacts to the events;
* **outbound** — ``send`` delivers one channel-neutral ``OutboundMessage`` that ``fit`` has already
  cut to the adapter's ``Capabilities`` (text length, buttons, formatting);
* **delivery status** — ``send`` answers a ``DeliveryOutcome`` that the outbox records (sent,
  retry later, or dead). A retryable failure may carry ``retry_after_ms``, the messenger's own word
  on when to come back (Telegram's ``retry_after``); the outbox then waits at least that long.

One bot message may reach the messenger as several calls (``fit`` cuts it into parts; an adapter may
cut a part again). An adapter runs each such call through ``mayak.delivery.outbox.step``: the
outbox row counts the calls that succeeded, and a retry skips them, so the customer does not get the
earlier parts twice. The calls must come in the same order on every attempt (``fit`` and the
adapter's own cut are deterministic) and the adapter must stop at the first failed call.

Messages reach ``send`` only through the outbox (kind ``message``), never from a request handler,
so a crash between a state change and its message loses neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from mayak.delivery.outbox import DeliveryOutcome

MESSAGE_KIND = "message"  # outbox kind of outbound messages


@dataclass(frozen=True, slots=True)
class Button:
    """A button under a message: a ``payload`` the bot receives back when pressed, or a ``url``."""

    title: str
    payload: str | None = None
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"title": self.title}
        if self.payload is not None:
            out["payload"] = self.payload
        if self.url is not None:
            out["url"] = self.url
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Button:
        return cls(str(data["title"]), data.get("payload"), data.get("url"))


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What the bot (or an operator) says, before any channel's limits are applied.

    ``format`` is ``plain`` or ``markdown`` (a small subset: ``*bold*``, ``_italic_``, links).
    """

    text: str
    buttons: tuple[Button, ...] = ()
    format: str = "plain"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.buttons:
            out["buttons"] = [b.to_json() for b in self.buttons]
        if self.format != "plain":
            out["format"] = self.format
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutboundMessage:
        buttons = tuple(Button.from_json(b) for b in data.get("buttons") or ())
        return cls(str(data.get("text", "")), buttons, str(data.get("format", "plain")))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a channel can show. ``fit`` negotiates a message down to these."""

    max_text: int = 4096
    buttons: bool = True
    max_buttons: int = 10
    max_button_title: int = 64
    url_buttons: bool = True
    markdown: bool = False


@dataclass(slots=True)
class ChannelRecord:
    """A configured channel with its secret settings decrypted (server-side only)."""

    id: str
    workspace_id: str
    type: str
    name: str
    bot_id: str | None
    config: dict[str, Any]
    secrets: dict[str, Any] = field(default_factory=dict)
    status: str = "active"


class ChannelAdapter(Protocol):
    """One messenger. Implementations live next to this module (``webchat``, ``telegram``)."""

    type: ClassVar[str]
    capabilities: Capabilities

    def validate_config(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check a ``POST /v1/channels`` config; split it into (public config, secret config).

        Raise ``mayak.errors.InvalidRequest`` with a ``$.config.…`` param for bad input.
        """
        ...

    async def activate(self, channel: ChannelRecord) -> dict[str, Any]:
        """Called once after the channel row is stored (e.g. Telegram ``setWebhook``); returns
        extra public config to store (may be empty). Raising removes the channel again."""
        ...

    async def deactivate(self, channel: ChannelRecord) -> None:
        """Called when the channel is deleted (e.g. Telegram ``deleteWebhook``); best effort."""
        ...

    async def send(
        self, channel: ChannelRecord, address: str, message: OutboundMessage, message_id: str
    ) -> DeliveryOutcome:
        """Deliver one already-fitted message to ``address`` (chat id, visitor id…)."""
        ...


def fit(message: OutboundMessage, caps: Capabilities) -> list[OutboundMessage]:
    """Cut a message to what a channel can show: long text is split at paragraph, line or word
    boundaries; buttons go under the last part; a channel without buttons gets them as a numbered
    list in the text (the bot understands a typed number or title as a press); over-long button
    titles are shortened; markdown markers are stripped where the channel cannot render them."""
    text = message.text if caps.markdown or message.format != "markdown" else strip_markdown(message.text)
    buttons = list(message.buttons)
    if not caps.url_buttons:
        for b in buttons:
            if b.url:
                text += f"\n{b.title}: {b.url}"
        buttons = [b for b in buttons if not b.url]
    if buttons and not caps.buttons:
        text += "\n" + "\n".join(f"{i}. {b.title}" for i, b in enumerate(buttons, 1))
        buttons = []
    limit = caps.max_button_title
    buttons = [Button(_shorten(b.title, limit), b.payload, b.url) for b in buttons[: caps.max_buttons]]
    fmt = message.format if caps.markdown else "plain"
    parts = split_text(text, caps.max_text)
    out = [OutboundMessage(part, (), fmt) for part in parts]
    out[-1] = OutboundMessage(out[-1].text, tuple(buttons), fmt)
    return out


def split_text(text: str, limit: int) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` characters, preferring natural boundaries."""
    if limit <= 0:
        raise ValueError("limit must be positive")
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = -1
        for sep in ("\n\n", "\n", ". ", " "):
            pos = window.rfind(sep)
            if pos > limit // 2:
                cut = pos + len(sep)
                break
        if cut <= 0:
            cut = limit
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    parts.append(rest)
    return [p for p in parts if p] or [""]


def strip_markdown(text: str) -> str:
    out = []
    for ch in text:
        if ch in "*_`":
            continue
        out.append(ch)
    return "".join(out)


def _shorten(title: str, limit: int) -> str:
    return title if len(title) <= limit else title[: max(1, limit - 1)] + "…"
