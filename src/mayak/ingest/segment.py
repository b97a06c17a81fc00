"""Validate and normalise Segment-spec events (identify, track, page, screen, group, alias).

Each event is checked on its own, so a batch can accept the good events and report the bad ones
with their index, code and JSON path. Timestamps are corrected for client clock skew the way the
Segment spec describes: ``timestamp = receivedAt - (sentAt - originalTimestamp)``; a time still in
the future is clamped to ``receivedAt``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from mayak.errors import EventRejected
from mayak.eventlog import NewEvent
from mayak.timeutil import ms_to_rfc3339, parse_rfc3339_ms

EVENT_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
# Short paths and single-letter types used by Segment's browser library.
SHORT_TYPES = {
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
    "b": "batch",
}
OBJECT_FIELDS = ("traits", "properties", "context", "integrations")
MAX_ID_LEN = 300
MAX_NAME_LEN = 200
MAX_DEDUP_KEY_LEN = 300  # dedup_keys.key is VARCHAR(300)
PURPOSES = frozenset({"marketing", "service", "transactional"})
_CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_HHMM_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def depth_ok(value: Any, limit: int) -> bool:
    """True when no container nests deeper than ``limit`` levels (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            for v in item.values():
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
        elif isinstance(item, list):
            for v in item:
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
    return True


def nul_path(value: Any, root: str = "$") -> str | None:
    """JSON path of a string (or of the object whose key) containing U+0000, if any.

    PostgreSQL's text and JSONB cannot store U+0000, so anything headed for the log or a profile
    (events here, admin changes too) must be refused with ``invalid_character`` at this path.
    """
    stack: list[tuple[Any, str]] = [(value, root)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path
        elif isinstance(item, dict):
            for k, v in item.items():
                if "\x00" in k:
                    return path
                stack.append((v, f"{path}.{k}"))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def _identifier(event: dict[str, Any], field: str) -> str | None:
    value = event.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise EventRejected("invalid_field_type", f"{field} must be a string", f"$.{field}")
    text = str(value)
    if len(text) > MAX_ID_LEN:
        raise EventRejected("field_too_long", f"{field} is longer than {MAX_ID_LEN} characters", f"$.{field}")
    return text


def _timestamp(event: dict[str, Any], field: str) -> int | None:
    value = event.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventRejected("invalid_timestamp", f"{field} must be an RFC 3339 string", f"$.{field}")
    try:
        return parse_rfc3339_ms(value)
    except (ValueError, OverflowError) as exc:
        raise EventRejected(
            "invalid_timestamp", f"{field} is not an RFC 3339 timestamp: {value[:40]!r}", f"$.{field}"
        ) from exc


def validate_consents(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise EventRejected(
            "invalid_consents", "consents must be an object of channel -> purpose -> boolean", path
        )
    for channel, purposes in value.items():
        if not _CHANNEL_RE.match(channel):
            raise EventRejected("invalid_consents", f"unknown channel name {channel!r}", f"{path}.{channel}")
        if not isinstance(purposes, dict):
            raise EventRejected(
                "invalid_consents", "a channel's consents must be an object", f"{path}.{channel}"
            )
        for purpose, granted in purposes.items():
            if purpose not in PURPOSES:
                raise EventRejected(
                    "invalid_consents",
                    "purpose must be marketing, service or transactional",
                    f"{path}.{channel}.{purpose}",
                )
            if not isinstance(granted, bool):
                raise EventRejected(
                    "invalid_consents", "consent must be true or false", f"{path}.{channel}.{purpose}"
                )


def validate_preferences(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise EventRejected("invalid_preferences", "preferences must be an object", path)
    for key, item in value.items():
        if key in ("preferred_channel", "language", "timezone"):
            if not isinstance(item, str) or len(item) > 64:
                raise EventRejected("invalid_preferences", f"{key} must be a short string", f"{path}.{key}")
            if key == "timezone":
                from mayak.pipeline.context import valid_timezone

                if not valid_timezone(item):
                    raise EventRejected("invalid_preferences", f"unknown timezone {item!r}", f"{path}.{key}")
        elif key == "quiet_hours":
            if item is None:
                continue
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("start"), str)
                or not isinstance(item.get("end"), str)
                or not _HHMM_RE.match(item["start"])
                or not _HHMM_RE.match(item["end"])
            ):
                raise EventRejected(
                    "invalid_preferences",
                    'quiet_hours must be {"start": "HH:MM", "end": "HH:MM"}',
                    f"{path}.{key}",
                )
        else:
            raise EventRejected("invalid_preferences", f"unknown preference {key!r}", f"{path}.{key}")


def normalise_event(
    raw: Any,
    *,
    workspace_id: str,
    received_at: int,
    batch_sent_at: int | None,
    forced_type: str | None,
    actor: str | None,
    max_event_bytes: int,
    max_depth: int,
    received_text: str | None = None,
) -> NewEvent:
    """Check one event and turn it into a log entry; raises EventRejected with a path relative to it.
    ``received_text``: ``received_at`` as RFC 3339, where the caller formatted it once for many."""
    if not isinstance(raw, dict):
        raise EventRejected("invalid_event", "an event must be a JSON object", "$")
    try:
        dumped = orjson.dumps(raw)
    except orjson.JSONEncodeError:
        if not depth_ok(raw, max_depth):
            raise EventRejected("too_deep", f"the event nests deeper than {max_depth} levels", "$") from None
        raise
    # Nesting needs an opening bracket per level: with no more brackets than levels allowed (brackets
    # inside strings count too, so this only errs towards walking), the walk can be skipped.
    if dumped.count(b"{") + dumped.count(b"[") > max_depth and not depth_ok(raw, max_depth):
        raise EventRejected("too_deep", f"the event nests deeper than {max_depth} levels", "$")
    size = len(dumped)
    if size > max_event_bytes:
        raise EventRejected(
            "event_too_large", f"the event is {size} bytes; the limit is {max_event_bytes}", "$"
        )
    if b"\\u0000" in dumped and (nul_at := nul_path(raw)) is not None:
        # PostgreSQL text and JSONB cannot hold U+0000: refuse it here, not fail the commit later
        raise EventRejected("invalid_character", "text must not contain NUL (\\u0000) characters", nul_at)
    etype = raw.get("type") if forced_type is None else forced_type
    if isinstance(etype, str):
        etype = SHORT_TYPES.get(etype, etype)
    if not isinstance(etype, str) or etype not in EVENT_TYPES:  # a list or object is unhashable
        raise EventRejected("unknown_type", f"type must be one of {', '.join(sorted(EVENT_TYPES))}", "$.type")
    for field in OBJECT_FIELDS:
        value = raw.get(field)
        if value is not None and not isinstance(value, dict):
            raise EventRejected("invalid_field_type", f"{field} must be an object", f"$.{field}")
    user_id = _identifier(raw, "userId")
    anonymous_id = _identifier(raw, "anonymousId")
    if user_id is None and anonymous_id is None:
        raise EventRejected("missing_identity", "an event needs a userId or an anonymousId", "$.userId")
    message_id = raw.get("messageId")
    if message_id is not None and (not isinstance(message_id, str) or len(message_id) > MAX_ID_LEN):
        raise EventRejected(
            "invalid_field_type", "messageId must be a string of at most 300 characters", "$.messageId"
        )

    name: str | None = None
    if etype == "track":
        name = raw.get("event")
        if not isinstance(name, str) or not name.strip():
            raise EventRejected("missing_field", "a track call needs an event name", "$.event")
    elif etype in ("page", "screen"):
        value = raw.get("name")
        if value is not None and not isinstance(value, str):
            raise EventRejected("invalid_field_type", "name must be a string", "$.name")
        name = value
    elif etype == "group":
        if _identifier(raw, "groupId") is None:
            raise EventRejected("missing_field", "a group call needs a groupId", "$.groupId")
    elif etype == "alias":
        if user_id is None:
            raise EventRejected("missing_field", "an alias call needs a userId", "$.userId")
        if _identifier(raw, "previousId") is None:
            raise EventRejected("missing_field", "an alias call needs a previousId", "$.previousId")
    if name is not None and len(name) > MAX_NAME_LEN:
        raise EventRejected("field_too_long", f"the name is longer than {MAX_NAME_LEN} characters", "$.event")

    traits = raw.get("traits")
    traits_at = "$.traits"
    if etype == "identify" and traits is None:
        context = raw.get("context")
        if isinstance(context, dict) and isinstance(context.get("traits"), dict):
            # RudderStack's SDKs send an identify's traits only as context.traits
            traits, traits_at = context["traits"], "$.context.traits"
    if traits:
        if "consents" in traits:
            validate_consents(traits["consents"], f"{traits_at}.consents")
        if "preferences" in traits:
            validate_preferences(traits["preferences"], f"{traits_at}.preferences")

    original = _timestamp(raw, "timestamp")
    sent_at = _timestamp(raw, "sentAt")
    if sent_at is None:
        sent_at = batch_sent_at
    if original is None:
        ts = received_at
    elif sent_at is not None:
        ts = received_at - (sent_at - original)
    else:
        ts = original
    ts = min(ts, received_at)
    if ts < 0:  # before 1970 (or a skew of decades): no event time, and not always representable
        raise EventRejected(
            "invalid_timestamp", "the (skew-corrected) timestamp is before 1970", "$.timestamp"
        )

    payload = dict(raw)
    payload.pop("writeKey", None)
    payload["type"] = etype
    if traits is not None and payload.get("traits") is None:
        payload["traits"] = traits
    if user_id is not None:
        payload["userId"] = user_id
    if anonymous_id is not None:
        payload["anonymousId"] = anonymous_id
    if original is not None:
        payload["originalTimestamp"] = raw["timestamp"]
    payload["timestamp"] = ms_to_rfc3339(ts)
    payload["receivedAt"] = received_text or ms_to_rfc3339(received_at)
    return NewEvent(
        workspace_id=workspace_id,
        type=etype,
        name=name,
        timestamp=ts,
        received_at=received_at,
        payload=payload,
        source="api",
        actor=actor,
        dedup_key=message_dedup_key(message_id) if message_id else None,
    )


def message_dedup_key(message_id: str) -> str:
    """``mid:<messageId>``; an id too long for the key column is keyed by its SHA-256 instead."""
    key = f"mid:{message_id}"
    if len(key) > MAX_DEDUP_KEY_LEN:
        key = "mid#" + hashlib.sha256(message_id.encode()).hexdigest()
    return key
