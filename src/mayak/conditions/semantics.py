"""What the operators mean on data: null-safe, type-strict, never raising.

The rules, in one place (``docs/conditions.md`` explains them to people):

- a missing path (or a step through something that is not a mapping or list) is null (``None``);
- ``==``/``!=`` are strict: numbers compare by value (``1 == 1.0``), but a boolean is never a number and a
  numeric string is never a number (``"3" == 3`` is false); null equals only null;
- ``<``, ``<=``, ``>``, ``>=`` are defined for two numbers, two strings (code-point order) or two values of
  the same date/time type; anything else, null included, is false;
- ``in``/``not in`` look up an element of a list, a substring of a string or a key of a mapping; with null
  on either side, or a container that cannot hold the left value, both are false;
- truthiness is Python's: null, false, 0, "", [] and {} are falsy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time
from typing import Any, TypeGuard

from mayak.conditions.nodes import Segment

_ORDERED_SAME_TYPE = (datetime, date, time)


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or float, not a bool (booleans are never numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def equals(a: Any, b: Any) -> bool:
    """Strict equality (see the module docstring)."""
    ta, tb = type(a), type(b)
    if ta is tb and ta is not list and ta is not tuple and ta is not dict:
        return bool(a == b)
    if a is None or b is None or ta is bool or tb is bool:
        return False
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and str.__eq__(a, b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return bool(a == b)
    if isinstance(a, list | tuple | Mapping) and isinstance(b, list | tuple | Mapping):
        try:
            return _equal_containers(a, b)
        except RecursionError:  # absurdly deep data
            return False
    return False


def _equal_containers(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(equals(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return len(a) == len(b) and all(key in b and equals(value, b[key]) for key, value in a.items())
    return False


def _ordered(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` may be ordered against each other."""
    if isinstance(a, str):
        return isinstance(b, str)
    if is_number(a):
        return is_number(b)
    return isinstance(a, _ORDERED_SAME_TYPE) and type(a) is type(b)


def less(a: Any, b: Any) -> bool:
    try:
        return _ordered(a, b) and bool(a < b)
    except TypeError:  # naive against aware datetimes
        return False


def less_equal(a: Any, b: Any) -> bool:
    try:
        return _ordered(a, b) and bool(a <= b)
    except TypeError:
        return False


def greater(a: Any, b: Any) -> bool:
    return less(b, a)


def greater_equal(a: Any, b: Any) -> bool:
    return less_equal(b, a)


def membership(needle: Any, haystack: Any) -> bool | None:
    """``needle in haystack``, or None where that is undefined (then ``in`` and ``not in`` are false)."""
    if needle is None or haystack is None:
        return None
    if isinstance(haystack, str):
        return str.__contains__(haystack, needle) if isinstance(needle, str) else None
    if isinstance(haystack, list | tuple):
        return any(equals(needle, item) for item in haystack)
    if isinstance(haystack, Mapping):
        return needle in haystack if isinstance(needle, str) else None
    return None


def contained(needle: Any, haystack: Any) -> bool:
    return membership(needle, haystack) is True


def not_contained(needle: Any, haystack: Any) -> bool:
    return membership(needle, haystack) is False


def truthy(value: Any) -> bool:
    try:
        return bool(value)
    except Exception:  # an odd object a caller's function returned; treat it as present
        return True


_MAX_INT_BITS = 256


def arithmetic(op: str, a: Any, b: Any) -> int | float | None:
    if not (is_number(a) and is_number(b)):
        return None
    result: int | float
    try:
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > _MAX_INT_BITS:
                return None
            result = a * b
        elif b == 0:
            return None
        else:
            result = a / b
    except (OverflowError, ValueError):
        return None
    if isinstance(result, float) and math.isnan(result):
        return None
    return result


def negate(value: Any) -> int | float | None:
    return -value if is_number(value) else None


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_GROUP_SEPARATORS = re.compile(r"(?<=\d)[ \u00a0\u2009\u202f](?=\d{3}(?:\D|$))")


def to_number(value: Any) -> int | float | None:
    """``number(x)``: the one explicit conversion to a number.

    Numbers pass through; a string that is a decimal number (optionally signed, with a ``.`` decimal
    point and an exponent, surrounding whitespace ignored, digits grouped by spaces as in ``15 000``)
    becomes an int or a float; anything else (booleans, ``"15,5"``, ``"1e400"``, ``"nan"``) is null.
    """
    if is_number(value):
        return value if not (isinstance(value, float) and not math.isfinite(value)) else None
    if not isinstance(value, str) or len(value) > 64:
        return None
    text = _GROUP_SEPARATORS.sub("", value.strip())
    if not text.isascii():
        return None
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        result = float(text)
        return result if math.isfinite(result) else None
    return None


def step(value: Any, segment: Segment) -> Any:
    """One step of a path: a key of a mapping or an index into a list; anything else is null.

    Only mappings and lists/tuples are entered (never an object's attributes), so a condition cannot
    reach Python internals whatever it names.
    """
    if isinstance(value, Mapping):
        found = value.get(segment)
        if found is None and isinstance(segment, int):
            return value.get(str(segment))
        return found
    if isinstance(value, list | tuple):
        if isinstance(segment, str):
            if not (segment.isascii() and segment.isdigit()):
                return None
            segment = int(segment)
        try:
            return value[segment]
        except IndexError:
            return None
    return None


def lookup(value: Any, segments: Sequence[Segment]) -> Any:
    for segment in segments:
        if value is None:
            return None
        value = step(value, segment)
    return value
