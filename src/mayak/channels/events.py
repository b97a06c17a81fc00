"""Normalised inbound events: what every channel adapter appends to the log.

A customer's message is a Segment ``track`` event, so identity resolution, profiles, destinations and
(later) segments treat it like any other behaviour: ``Message Received`` for text and commands,
``Button Clicked`` for a pressed button. The channel address is an identity
(``context.externalIds``: ``telegram`` chat id; a web-chat visitor is the ``anonymousId``), so the
pipeline finds or creates the customer. ``properties`` carry what the bot needs::

    {"channel": "telegram", "channel_id": "ch_…", "address": "12345",
     "text": "…", "payload": "…" (buttons), "title": "…" (buttons), "external_id": "…"}

``identity.linked`` attaches a channel address to a known customer (a Telegram ``/start`` deep link
with a one-time token): the pipeline gives the identity to that customer, merging an anonymous
profile the address already had.
"""

from __future__ import annotations

from typing import Any

from mayak.channels.base import ChannelRecord
from mayak.eventlog import NewEvent

MESSAGE_RECEIVED = "Message Received"
BUTTON_CLICKED = "Button Clicked"
INBOUND_NAMES = frozenset({MESSAGE_RECEIVED, BUTTON_CLICKED})
IDENTITY_LINKED = "identity.linked"
MAX_TEXT = 10_000  # characters kept of one inbound text (the event limit is 32 KiB)


def inbound_event(
    channel: ChannelRecord,
    *,
    address: str,
    timestamp: int,
    received_at: int,
    dedup_key: str,
    text: str | None = None,
    payload: str | None = None,
    title: str | None = None,
    external_id: str | None = None,
    identity_kind: str | None = None,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    context: dict[str, Any] | None = None,
) -> NewEvent:
    """One customer action on a channel as a log event.

    ``identity_kind`` names the address as an identity (``telegram``); web chat passes the visitor id
    as ``anonymous_id`` instead (and ``user_id`` from a verified user token).
    """
    name = BUTTON_CLICKED if payload is not None else MESSAGE_RECEIVED
    props: dict[str, Any] = {"channel": channel.type, "channel_id": channel.id, "address": address}
    if text is not None:
        props["text"] = text[:MAX_TEXT]
        if len(text) > MAX_TEXT:
            props["truncated"] = True
    if payload is not None:
        props["payload"] = payload
    if title is not None:
        props["title"] = title
    if external_id is not None:
        props["external_id"] = external_id
    ctx: dict[str, Any] = dict(context or {})
    ctx["channel"] = channel.type
    if identity_kind:
        ctx["externalIds"] = [{"type": identity_kind, "id": address, "collection": "users"}]
    body: dict[str, Any] = {"type": "track", "event": name, "properties": props, "context": ctx}
    if user_id:
        body["userId"] = user_id
    if anonymous_id:
        body["anonymousId"] = anonymous_id
    if not user_id and not anonymous_id and not identity_kind:
        raise ValueError("an inbound event needs an identity: identity_kind, user_id or anonymous_id")
    return NewEvent(
        workspace_id=channel.workspace_id,
        type="track",
        name=name,
        timestamp=timestamp,
        received_at=received_at,
        source=channel.type,
        dedup_key=dedup_key,
        payload=body,
    )


def identity_linked(
    workspace_id: str, customer_id: str, kind: str, value: str, *, at: int, dedup_key: str, source: str
) -> NewEvent:
    """Give the identity (kind, value) to ``customer_id`` (see module docstring)."""
    return NewEvent(
        workspace_id=workspace_id,
        type=IDENTITY_LINKED,
        timestamp=at,
        received_at=at,
        source=source,
        customer_id=customer_id,
        dedup_key=dedup_key,
        payload={"kind": kind, "value": value},
    )
