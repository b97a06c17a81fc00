"""Time on the wire is RFC 3339 UTC; time in storage is integer milliseconds since the epoch."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_rfc3339_ms(value: str) -> int:
    """Parse an ISO 8601 / RFC 3339 timestamp into epoch milliseconds; naive times are taken as UTC.

    Raises ValueError on anything that is not a timestamp.
    """
    if not value or len(value) > 40:
        raise ValueError("not a timestamp")
    if value[-1] in "zZ":
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS  # exact: float seconds would lose a millisecond now and then


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MINUTE_PREFIXES: dict[int, str] = {}


def ms_to_rfc3339(ms: int | None) -> str | None:
    """``2026-01-02T03:04:05.678Z``. Hot (twice per ingested event): the date-and-minute prefix is
    formatted once per minute and cached, the rest is arithmetic."""
    if ms is None:
        return None
    minute, rest = divmod(ms, 60_000)
    prefix = _MINUTE_PREFIXES.get(minute)
    if prefix is None:
        if len(_MINUTE_PREFIXES) > 4096:
            _MINUTE_PREFIXES.clear()
        prefix = datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:")
        if len(prefix) != 17:  # years before 1000 or after 9999: no fast path
            return (_EPOCH + ms * _MS).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        _MINUTE_PREFIXES[minute] = prefix
    seconds, millis = divmod(rest, 1000)
    return f"{prefix}{seconds:02d}.{millis:03d}Z"
