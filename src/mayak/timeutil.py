"""Time on the wire is RFC 3339 UTC; time in storage is integer milliseconds since the epoch."""

from __future__ import annotations

import time
from datetime import UTC, datetime


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
    return int(dt.timestamp() * 1000)


def ms_to_rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
