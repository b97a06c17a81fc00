"""Identity keys: which values on an event name a person, and how each kind is normalised.

``email`` is trimmed and lower-cased (no provider-specific folding such as Gmail dots);
``phone`` becomes E.164, reading national numbers with the workspace's default region; an
unparseable phone or e-mail stays a trait but is not an identity. Other kinds (``telegram``,
``crm_id``, ``device`` …) come from Segment's ``context.externalIds`` and are kept verbatim.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any

import phonenumbers

USER_ID = "user_id"
ANONYMOUS_ID = "anonymous_id"
EMAIL = "email"
PHONE = "phone"
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

Key = tuple[str, str]


def normalise_email(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return _normalise_email(value)


@lru_cache(maxsize=65_536)
def _normalise_email(value: str) -> str | None:
    email = value.strip().lower()
    if len(email) > 254 or not _EMAIL_RE.match(email):
        return None
    return email


@lru_cache(maxsize=65_536)
def normalise_phone(value: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(value, region.upper())
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise(kind: str, value: Any, region: str) -> str | None:
    """The stored form of an identity value, or None when it is not a usable identity."""
    if kind == EMAIL:
        return normalise_email(value)
    if kind == PHONE:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return normalise_phone(value.strip(), region) if isinstance(value, str) and value.strip() else None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text if 0 < len(text) <= 300 else None


def normalise_kind(kind: Any) -> str | None:
    if not isinstance(kind, str):
        return None
    k = kind.strip().lower().replace("-", "_").replace(" ", "_")
    if k in ("userid", "user"):
        return USER_ID
    if k in ("anonymousid", "anonymous"):
        return ANONYMOUS_ID
    return k if _KIND_RE.match(k) else None


def event_keys(payload: dict[str, Any], region: str) -> tuple[Key | None, Key | None, list[Key]]:
    """(user_id key, anonymous_id key, other identity keys) carried by a Segment event."""
    uid = payload.get("userId")
    aid = payload.get("anonymousId")
    user = (USER_ID, uid) if uid else None
    anon = (ANONYMOUS_ID, aid) if aid else None
    others: list[Key] = []
    sources: list[dict[str, Any]] = []
    traits = payload.get("traits")
    if payload.get("type") == "identify" and isinstance(traits, dict):
        sources.append(traits)
    context = payload.get("context")
    if isinstance(context, dict):
        ctx_traits = context.get("traits")
        if isinstance(ctx_traits, dict):
            sources.append(ctx_traits)
        externals = context.get("externalIds")
        if isinstance(externals, list):
            for ext in externals:
                if isinstance(ext, dict):
                    kind = normalise_kind(ext.get("type"))
                    value = normalise(kind, ext.get("id"), region) if kind else None
                    if kind and value and kind not in (USER_ID, ANONYMOUS_ID):
                        others.append((kind, value))
    for src in sources:
        for kind in (EMAIL, PHONE):
            if kind in src:
                value = normalise(kind, src[kind], region)
                if value:
                    others.append((kind, value))
    if payload.get("type") == "alias":
        prev = payload.get("previousId")
        if prev:
            others.append(("previous_id", str(prev)))
    # Keep order, drop repeats.
    seen: set[Key] = set()
    unique = []
    for key in others:
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return user, anon, unique


def suppression_hash(workspace_id: str, key: Key) -> str:
    """What an erased person leaves behind: a salted digest of each identifier, nothing readable."""
    return hashlib.sha256(f"{workspace_id}\x00{key[0]}\x00{key[1]}".encode()).hexdigest()
