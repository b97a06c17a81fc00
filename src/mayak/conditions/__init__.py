"""Mayak's one condition language: safe, null-safe expressions for branches, segments, triggers, journeys.

>>> from mayak.conditions import parse
>>> rule = parse('stage == "in_service" and traits.car.model in ["Octavia", "Kodiaq"]')
>>> rule.evaluate({"stage": "in_service", "traits": {"car": {"model": "Kodiaq"}}})
True
>>> sorted(rule.paths)
['stage', 'traits.car.model']

The syntax is a small subset of Python expressions, parsed with :mod:`ast` and checked against a
whitelist; nothing is ever passed to ``eval``/``exec``/``compile``. See ``docs/conditions.md``.
"""

from mayak.conditions import nodes
from mayak.conditions.condition import Condition, parse
from mayak.conditions.errors import ConditionError
from mayak.conditions.functions import BUILTINS
from mayak.conditions.parser import MAX_DEPTH, MAX_LENGTH
from mayak.conditions.paths import render_path, split_path
from mayak.conditions.semantics import to_number

BUILTIN_FUNCTIONS: frozenset[str] = frozenset(BUILTINS)
"""Names of the built-in functions (always available; a caller's function may not replace one)."""

__all__ = [
    "BUILTIN_FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Condition",
    "ConditionError",
    "nodes",
    "parse",
    "render_path",
    "split_path",
    "to_number",
]
