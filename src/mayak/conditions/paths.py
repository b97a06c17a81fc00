"""Dotted-path lookups over plain data, shared by conditions and whatever else reads ``traits.car.model``."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mayak.conditions.nodes import Segment
from mayak.conditions.semantics import lookup

_PART = re.compile(r'\.([^.\[\]]+)|\[(-?\d+)\]|\[("(?:[^"\\]|\\.)*")\]')
_ROOT = re.compile(r"[^.\[\]]+")


@functools.lru_cache(maxsize=4096)
def split_path(path: str) -> tuple[Segment, ...]:
    """``'traits.car.model'`` → ``('traits', 'car', 'model')``; ``'a.items[0]["first name"]'`` →
    ``('a', 'items', 0, 'first name')``. Raises ValueError on a malformed path."""
    root = _ROOT.match(path)
    if root is None:
        raise ValueError(f"not a path: {path!r}")
    segments: list[Segment] = [root.group()]
    position = root.end()
    while position < len(path):
        part = _PART.match(path, position)
        if part is None:
            raise ValueError(f"not a path: {path!r} (at {position})")
        key, index, quoted = part.groups()
        if key is not None:
            segments.append(key)
        elif index is not None:
            segments.append(int(index))
        else:
            segments.append(json.loads(quoted))
        position = part.end()
    return tuple(segments)


def render_path(scope: Mapping[str, Any], path: str | Sequence[Segment]) -> Any:
    """The value at ``path`` in ``scope``, or None where any step is missing.

    ``path`` is dotted text (``traits.car.model``; ``items.0`` or ``items[0]`` index a list;
    ``traits["first name"]`` for a key that is not a plain name) or a sequence of segments. Only
    mappings and lists are entered, never an object's attributes.
    """
    segments = split_path(path) if isinstance(path, str) else tuple(path)
    if not segments:
        return None
    return lookup(scope, segments)
