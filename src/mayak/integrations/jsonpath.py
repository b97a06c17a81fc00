"""A small, safe JSONPath subset for hook mappings: ``$``, ``.name``, ``[3]``, ``[-1]``, ``['odd key']``.

Why not full JSONPath: a mapping must pick exactly one value, so filters, wildcards and recursive
descent have no meaning here, and a tiny grammar can be validated up front with a precise error.

Grammar::

    path     := "$" segment*
    segment  := "." name | "[" index "]" | "[" quoted "]"
    name     := [A-Za-z_][A-Za-z0-9_-]*          (use the quoted form for anything else)
    index    := "-"? digit+                       (negative counts from the end)
    quoted   := "'" chars "'" | '"' chars '"'    (backslash escapes the quote and itself)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_PATH_CHARS = 300
MAX_SEGMENTS = 32
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_INDEX_RE = re.compile(r"-?[0-9]{1,9}")

Segment = str | int


class PathError(ValueError):
    """The path is not in the supported subset; ``str(exc)`` says why and where."""


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""What ``JsonPath.get`` answers when the path leads nowhere."""


@dataclass(frozen=True, slots=True)
class JsonPath:
    text: str
    segments: tuple[Segment, ...]

    def get(self, document: Any) -> Any:
        """The value at this path, or ``MISSING`` (a key absent, an index out of range, a wrong type)."""
        value = document
        for seg in self.segments:
            if isinstance(seg, int):
                if not isinstance(value, list) or not -len(value) <= seg < len(value):
                    return MISSING
                value = value[seg]
            else:
                if not isinstance(value, dict) or seg not in value:
                    return MISSING
                value = value[seg]
        return value

    def __str__(self) -> str:
        return self.text


def parse(text: Any) -> JsonPath:
    """Parse and validate a path; raises ``PathError`` with a message naming the position."""
    if not isinstance(text, str):
        raise PathError("a path must be a string such as '$.customer.id'")
    if not text.startswith("$"):
        raise PathError("a path must start with '$' (the body's root), e.g. '$.customer.id'")
    if len(text) > MAX_PATH_CHARS:
        raise PathError(f"a path may be at most {MAX_PATH_CHARS} characters")
    segments: list[Segment] = []
    i, n = 1, len(text)
    while i < n:
        ch = text[i]
        if ch == ".":
            match = _NAME_RE.match(text, i + 1)
            if match is None:
                raise PathError(f"expected a name after '.' at position {i + 1}; quote odd keys as ['key']")
            segments.append(match.group())
            i = match.end()
        elif ch == "[":
            if i + 1 < n and text[i + 1] in "'\"":
                key, i = _quoted(text, i + 1)
                segments.append(key)
            else:
                match = _INDEX_RE.match(text, i + 1)
                if match is None:
                    raise PathError(f"expected an index or a quoted key after '[' at position {i + 1}")
                segments.append(int(match.group()))
                i = match.end()
            if i >= n or text[i] != "]":
                raise PathError(f"expected ']' at position {i}")
            i += 1
        else:
            raise PathError(f"unexpected {ch!r} at position {i}; use '.name', '[0]' or ['key']")
        if len(segments) > MAX_SEGMENTS:
            raise PathError(f"a path may have at most {MAX_SEGMENTS} steps")
    return JsonPath(text, tuple(segments))


def _quoted(text: str, start: int) -> tuple[str, int]:
    """Read a quoted key starting at the quote; return it and the position after the closing quote."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in (quote, "\\"):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == quote:
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise PathError(f"unterminated quoted key starting at position {start}")


def child(base: str, segment: Segment) -> str:
    """``base`` extended by one step, in the same notation (for error ``param``s)."""
    if isinstance(segment, int):
        return f"{base}[{segment}]"
    if _NAME_RE.fullmatch(segment):
        return f"{base}.{segment}"
    escaped = segment.replace("\\", "\\\\").replace("'", "\\'")
    return f"{base}['{escaped}']"
