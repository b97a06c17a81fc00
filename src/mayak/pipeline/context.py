"""Derived profile context from Segment's ``context`` object: device type, locale, time zone, place."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_FEATURE_RE = re.compile(r"kaios|opera mini|j2me|midp|series ?40|nokia|symbian|feature ?phone", re.I)
_TABLET_RE = re.compile(r"ipad|tablet|kindle|silk|playbook|(android(?!.*mobile))", re.I)
_PHONE_RE = re.compile(r"iphone|ipod|android.*mobile|windows phone|mobile|blackberry", re.I)
_BOT_RE = re.compile(r"bot|crawler|spider|curl|python-requests|httpx", re.I)
_LOCATION_FIELDS = ("city", "country", "region", "latitude", "longitude", "speed")


@lru_cache(maxsize=4096)
def valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


@lru_cache(maxsize=4096)
def classify_user_agent(ua: str) -> str:
    if _FEATURE_RE.search(ua):
        return "feature_phone"
    if _TABLET_RE.search(ua):
        return "tablet"
    if _PHONE_RE.search(ua):
        return "smartphone"
    if _BOT_RE.search(ua):
        return "bot"
    return "desktop"


def device_type(context: dict[str, Any]) -> str | None:
    device = context.get("device")
    if isinstance(device, dict):
        dtype = str(device.get("type") or "").lower()
        if dtype in ("ios", "android", "smartphone", "mobile", "phone"):
            model = str(device.get("model") or "").lower()
            return "tablet" if "ipad" in model or "tablet" in model else "smartphone"
        if dtype in ("tablet", "desktop", "feature_phone", "tv", "car", "iot", "watch"):
            return dtype
        if dtype in ("feature phone", "featurephone"):
            return "feature_phone"
    ua = context.get("userAgent")
    if isinstance(ua, str) and ua:
        return classify_user_agent(ua[:512])
    return None


def channel_hints(context: dict[str, Any]) -> list[str]:
    hints = []
    library = context.get("library")
    lib_name = str(library.get("name", "")) if isinstance(library, dict) else ""
    if "page" in context or lib_name.startswith("analytics.js") or "userAgent" in context:
        hints.append("web")
    if "app" in context or lib_name.startswith(
        ("analytics-ios", "analytics-android", "analytics-react-native")
    ):
        hints.append("mobile_app")
    return hints


def derive(context: dict[str, Any]) -> dict[str, Any]:
    """The profile fields an event's context tells us (only those it actually carries)."""
    out: dict[str, Any] = {}
    tz = context.get("timezone")
    if isinstance(tz, str) and valid_timezone(tz):
        out["timezone"] = tz
    locale = context.get("locale")
    if isinstance(locale, str) and 0 < len(locale) <= 35:
        out["locale"] = locale
    dtype = device_type(context)
    if dtype:
        out["device_type"] = dtype
    location = context.get("location")
    if isinstance(location, dict):
        place = {
            k: location[k]
            for k in _LOCATION_FIELDS
            if k in location and isinstance(location[k], (str, int, float))
        }
        if place:
            out["location"] = place
    return out
