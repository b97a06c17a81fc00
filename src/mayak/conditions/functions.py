"""The built-in functions of the condition language: their arity and what they do on data.

Every built-in is total: on a value of the wrong type (null included) it answers null or false, never
raises. The compiler calls the ``fn_*`` functions here; ``exists``, ``matches`` and ``days_since`` also
get special handling there (a constant pattern is compiled once; ``days_since`` reads ``now`` from the
scope).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mayak.conditions.regex import compile_cached
from mayak.conditions.semantics import equals, is_number, membership, to_number
from mayak.timeutil import parse_rfc3339_ms

_DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Signature:
    min_args: int
    max_args: int
    kwargs: frozenset[str] = frozenset()
    usage: str = ""


BUILTINS: Mapping[str, Signature] = {
    "exists": Signature(1, 1, usage="exists(value)"),
    "len": Signature(1, 1, usage="len(value)"),
    "lower": Signature(1, 1, usage="lower(text)"),
    "upper": Signature(1, 1, usage="upper(text)"),
    "contains": Signature(2, 2, usage="contains(haystack, needle)"),
    "starts_with": Signature(2, 2, usage="starts_with(text, prefix)"),
    "ends_with": Signature(2, 2, usage="ends_with(text, suffix)"),
    "matches": Signature(2, 2, usage='matches(text, "regex")'),
    "any_of": Signature(2, 2, usage='any_of(value, ["a", "b"])'),
    "days_since": Signature(1, 1, frozenset({"now"}), usage="days_since(timestamp, now=...)"),
    "number": Signature(1, 1, usage="number(value)"),
}
"""Name → arity of every built-in function. A caller's own function may not reuse these names."""


def fn_exists(value: Any) -> bool:
    return value is not None


def fn_len(value: Any) -> int | None:
    if isinstance(value, str | list | tuple | Mapping):
        return len(value)
    return None


def fn_lower(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) else None


def fn_upper(value: Any) -> str | None:
    return value.upper() if isinstance(value, str) else None


def fn_contains(haystack: Any, needle: Any) -> bool:
    return membership(needle, haystack) is True


def fn_starts_with(text: Any, prefix: Any) -> bool:
    return isinstance(text, str) and isinstance(prefix, str) and text.startswith(prefix)


def fn_ends_with(text: Any, suffix: Any) -> bool:
    return isinstance(text, str) and isinstance(suffix, str) and text.endswith(suffix)


def fn_matches(text: Any, pattern: Any) -> bool:
    """``matches`` with a pattern known only at evaluation time (a constant one is compiled at parse)."""
    if not isinstance(text, str) or not isinstance(pattern, str):
        return False
    compiled = compile_cached(pattern)
    return compiled is not None and compiled.search(text)


def fn_any_of(value: Any, options: Any) -> bool:
    """``value`` equals one of ``options``; or, when ``value`` is a list, one of its items does."""
    if value is None or not isinstance(options, list | tuple):
        return False
    if isinstance(value, list | tuple):
        return any(equals(item, option) for item in value for option in options)
    return any(equals(value, option) for option in options)


def to_epoch_ms(value: Any) -> float | None:
    """Epoch milliseconds of an RFC 3339 string, a number (already epoch ms) or a datetime; else None."""
    if is_number(value):
        try:
            result = float(value)
        except OverflowError:
            return None
        return result if math.isfinite(result) else None
    if isinstance(value, str):
        try:
            return float(parse_rfc3339_ms(value))
        except (ValueError, OverflowError):
            return None
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.timestamp() * 1000.0
    return None


def fn_days_since(timestamp: Any, now: Any) -> float | None:
    """Days (fractional) from ``timestamp`` to ``now``; negative when the timestamp is in the future.

    ``now`` None means the wall clock (the compiler passes the scope's ``now`` when there is one).
    """
    then = to_epoch_ms(timestamp)
    if then is None:
        return None
    current = time.time() * 1000.0 if now is None else to_epoch_ms(now)
    if current is None:
        return None
    days = (current - then) / _DAY_MS
    return days if math.isfinite(days) else None


PLAIN: Mapping[str, Callable[..., Any]] = {
    "exists": fn_exists,
    "len": fn_len,
    "lower": fn_lower,
    "upper": fn_upper,
    "contains": fn_contains,
    "starts_with": fn_starts_with,
    "ends_with": fn_ends_with,
    "matches": fn_matches,
    "any_of": fn_any_of,
    "number": to_number,
}
"""Built-ins that are a plain function of their arguments' values."""
