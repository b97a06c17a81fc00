"""How an inbound hook's JSON body becomes one Segment ``track`` event on a customer.

A mapping is validated once, when the hook is created, and stored in its normal form::

    {
      "event": "Service Completed",            # a fixed event name, or instead …
      "event_path": "$.type",                   # … the name read from the body (exactly one of the two)
      "identity": {"kind": "crm_id", "path": "$.customer.id"},
      "properties_path": "$.data",              # optional; default "$" (the whole body)
      "timestamp_path": "$.occurred_at"         # optional; default: the time of receipt
    }

Identity kinds: ``user_id`` becomes the event's ``userId``, ``anonymous_id`` its ``anonymousId``;
any other kind (``crm_id``, ``email``, ``phone``, ``telegram`` …) goes to ``context.externalIds``
as ``{"type": kind, "id": value}``, where the pipeline resolves (and, for e-mail and phone,
normalises) it. An identity nobody has yet creates a new customer, as in Segment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from mayak.errors import InvalidRequest, PayloadTooLarge
from mayak.eventlog import NewEvent
from mayak.ingest.segment import MAX_DEDUP_KEY_LEN, MAX_ID_LEN, MAX_NAME_LEN, depth_ok, nul_path
from mayak.integrations import jsonpath
from mayak.integrations.jsonpath import MISSING, JsonPath, PathError
from mayak.pipeline.identity import ANONYMOUS_ID, EMAIL, PHONE, USER_ID, normalise, normalise_kind
from mayak.timeutil import ms_to_rfc3339, parse_rfc3339_ms

SOURCE = "hook"
FIELDS = frozenset({"event", "event_path", "identity", "properties_path", "timestamp_path"})
MS_THRESHOLD = 100_000_000_000  # a numeric timestamp at or above this is in milliseconds, else seconds


@dataclass(frozen=True, slots=True)
class Mapping:
    """A validated mapping, ready to apply."""

    event: str | None
    event_path: JsonPath | None
    identity_kind: str
    identity_path: JsonPath
    properties_path: JsonPath
    timestamp_path: JsonPath | None

    def to_json(self) -> dict[str, Any]:
        """The stored (and shown) normal form."""
        out: dict[str, Any] = {}
        if self.event is not None:
            out["event"] = self.event
        if self.event_path is not None:
            out["event_path"] = self.event_path.text
        out["identity"] = {"kind": self.identity_kind, "path": self.identity_path.text}
        out["properties_path"] = self.properties_path.text
        out["timestamp_path"] = self.timestamp_path.text if self.timestamp_path else None
        return out


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest("invalid_mapping", message, param)


def _path(value: Any, param: str) -> JsonPath:
    try:
        return jsonpath.parse(value)
    except PathError as exc:
        raise _invalid(str(exc), param) from exc


def parse_mapping(raw: Any, base: str = "$.mapping") -> Mapping:
    """Validate a mapping as sent to ``POST /v1/hooks``; errors are ``invalid_mapping`` with a param."""
    if not isinstance(raw, dict):
        raise _invalid("mapping must be an object", base)
    for key in raw:
        if key not in FIELDS:
            raise _invalid(
                f"unknown mapping field {key!r}; known: {', '.join(sorted(FIELDS))}", f"{base}.{key}"
            )

    event = raw.get("event")
    event_path_raw = raw.get("event_path")
    if (event is None) == (event_path_raw is None):
        raise _invalid("give exactly one of event (a fixed name) and event_path", f"{base}.event")
    if event is not None and (not isinstance(event, str) or not event.strip() or len(event) > MAX_NAME_LEN):
        raise _invalid(f"event must be a name of 1-{MAX_NAME_LEN} characters", f"{base}.event")
    event_path = None if event_path_raw is None else _path(event_path_raw, f"{base}.event_path")

    identity = raw.get("identity")
    if not isinstance(identity, dict):
        raise _invalid('identity must be an object {"kind": …, "path": …}', f"{base}.identity")
    for key in identity:
        if key not in ("kind", "path"):
            raise _invalid(f"unknown identity field {key!r}", f"{base}.identity.{key}")
    kind = identity.get("kind")
    if not isinstance(kind, str) or normalise_kind(kind) != kind:
        raise _invalid(
            "identity.kind must be lower-case letters, digits and '_' (1-40, starting with a letter), "
            "e.g. user_id, email, phone, crm_id",
            f"{base}.identity.kind",
        )
    identity_path = _path(identity.get("path"), f"{base}.identity.path")

    props_raw = raw.get("properties_path")
    properties_path = _path("$" if props_raw is None else props_raw, f"{base}.properties_path")
    ts_raw = raw.get("timestamp_path")
    timestamp_path = None if ts_raw is None else _path(ts_raw, f"{base}.timestamp_path")
    return Mapping(
        event=event.strip() if isinstance(event, str) else None,
        event_path=event_path,
        identity_kind=kind,
        identity_path=identity_path,
        properties_path=properties_path,
        timestamp_path=timestamp_path,
    )


@dataclass(frozen=True, slots=True)
class HookInfo:
    """What the event records about the hook and the delivery it came from."""

    hook_id: str
    hook_name: str
    workspace_id: str
    webhook_id: str


def dedup_key(hook_id: str, webhook_id: str) -> str:
    """``hook:{hook_id}:{webhook-id}``; a webhook-id too long for the key column is hashed."""
    key = f"hook:{hook_id}:{webhook_id}"
    if len(key) > MAX_DEDUP_KEY_LEN:
        key = f"hook#{hook_id}:" + hashlib.sha256(webhook_id.encode()).hexdigest()
    return key


def build_event(
    mapping: Mapping,
    body: Any,
    info: HookInfo,
    *,
    received_at: int,
    region: str,
    max_event_bytes: int,
    max_depth: int,
) -> NewEvent:
    """Apply ``mapping`` to a hook's parsed body; refusals carry the body's JSON path as ``param``."""
    value = _identity(mapping, body, region)
    name = _event_name(mapping, body)
    props = mapping.properties_path.get(body)
    if props is MISSING or props is None:
        props = {}
    if not isinstance(props, dict):
        raise InvalidRequest(
            "invalid_properties", "the properties must be a JSON object", mapping.properties_path.text
        )
    timestamp, original = _timestamp(mapping, body, received_at)

    context: dict[str, Any] = {
        "hook": {"id": info.hook_id, "name": info.hook_name, "webhook_id": info.webhook_id}
    }
    payload: dict[str, Any] = {"type": "track", "event": name, "properties": props}
    if mapping.identity_kind == USER_ID:
        payload["userId"] = value
    elif mapping.identity_kind == ANONYMOUS_ID:
        payload["anonymousId"] = value
    else:
        context["externalIds"] = [{"type": mapping.identity_kind, "id": value}]
    payload["context"] = context
    if original is not None:
        payload["originalTimestamp"] = original
    payload["timestamp"] = ms_to_rfc3339(timestamp)
    payload["receivedAt"] = ms_to_rfc3339(received_at)

    if not depth_ok(payload, max_depth):
        raise InvalidRequest("too_deep", f"the event would nest deeper than {max_depth} levels", "$")
    dumped = orjson.dumps(payload)
    if len(dumped) > max_event_bytes:
        raise PayloadTooLarge(
            "event_too_large",
            f"the event would be {len(dumped)} bytes; the limit is {max_event_bytes} "
            "(pick the part you need with properties_path)",
            mapping.properties_path.text,
        )
    if b"\\u0000" in dumped and (at := nul_path(body)) is not None:
        raise InvalidRequest("invalid_character", "text must not contain NUL (\\u0000) characters", at)
    return NewEvent(
        workspace_id=info.workspace_id,
        type="track",
        name=name,
        timestamp=timestamp,
        received_at=received_at,
        payload=payload,
        source=SOURCE,
        actor=info.hook_id,
        dedup_key=dedup_key(info.hook_id, info.webhook_id),
    )


def _event_name(mapping: Mapping, body: Any) -> str:
    if mapping.event is not None:
        return mapping.event
    assert mapping.event_path is not None
    at = mapping.event_path.text
    name = mapping.event_path.get(body)
    if name is MISSING or name is None or (isinstance(name, str) and not name.strip()):
        raise InvalidRequest("event_name_missing", f"the body has no event name at {at}", at)
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN:
        raise InvalidRequest(
            "invalid_event_name",
            f"the event name at {at} must be a string of 1-{MAX_NAME_LEN} characters",
            at,
        )
    return name.strip()


def _identity(mapping: Mapping, body: Any, region: str) -> str:
    at = mapping.identity_path.text
    kind = mapping.identity_kind
    raw = mapping.identity_path.get(body)
    if raw is MISSING or raw is None or raw == "":
        raise InvalidRequest("identity_missing", f"the body has no {kind} at {at}", at)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise InvalidRequest("invalid_identity", f"the {kind} at {at} must be a string or an integer", at)
    text = str(raw).strip()
    if not text or len(text) > MAX_ID_LEN:
        raise InvalidRequest("invalid_identity", f"the {kind} at {at} must be 1-{MAX_ID_LEN} characters", at)
    if kind in (EMAIL, PHONE) and normalise(kind, text, region) is None:
        raise InvalidRequest("invalid_identity", f"the value at {at} is not a usable {kind}", at)
    return text


def _timestamp(mapping: Mapping, body: Any, received_at: int) -> tuple[int, Any]:
    """(event time in ms, the original value or None); the future is clamped to the receipt."""
    if mapping.timestamp_path is None:
        return received_at, None
    at = mapping.timestamp_path.text
    raw = mapping.timestamp_path.get(body)
    if raw is MISSING or raw is None:
        return received_at, None
    try:
        if isinstance(raw, str):
            ms = parse_rfc3339_ms(raw)
        elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
            ms = int(raw) if abs(raw) >= MS_THRESHOLD else int(raw * 1000)
        else:
            raise ValueError("not a timestamp")
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(
            "invalid_timestamp", f"the value at {at} is not an RFC 3339 time or Unix seconds", at
        ) from exc
    if ms < 0:
        raise InvalidRequest("invalid_timestamp", f"the time at {at} is before 1970", at)
    return min(ms, received_at), raw
