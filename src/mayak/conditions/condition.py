"""A parsed condition: what it reads, and a fast, null-safe evaluation."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from mayak.conditions.compiler import Test, compile_test
from mayak.conditions.nodes import Call, Expr, Path, walk
from mayak.conditions.parser import parse_tree

_NO_FUNCTIONS: Mapping[str, Callable[..., Any]] = {}


class Condition:
    """A condition, parsed once and evaluated many times (thread-safe, immutable).

    - ``source``: the text it was parsed from;
    - ``node``: its typed syntax tree (:mod:`mayak.conditions.nodes`), for other backends such as SQL;
    - ``paths``: the scope paths it reads, in canonical form (``traits.car.model``, ``slots.items[0]``,
      ``traits["first name"]``);
    - ``functions_used``: the names of the functions it calls, built-in or the caller's.
    """

    __slots__ = ("_test", "functions_used", "node", "paths", "source")

    source: str
    node: Expr
    paths: frozenset[str]
    functions_used: frozenset[str]

    def __init__(self, source: str, node: Expr):
        self.source = source
        self.node = node
        nodes = walk(node)
        self.paths = frozenset(item.dotted for item in nodes if isinstance(item, Path))
        self.functions_used = frozenset(item.name for item in nodes if isinstance(item, Call))
        self._test: Test = compile_test(node)

    def evaluate(
        self, scope: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]] | None = None
    ) -> bool:
        """Whether the condition holds for ``scope``.

        ``scope`` maps root names (``traits``, ``slots``, ``stage``…) to plain data: mappings, lists,
        strings, numbers, booleans, None. A ``now`` key (epoch ms, RFC 3339 or a datetime), when present,
        is the time ``days_since`` counts to. ``functions`` supplies the functions named at parse time
        beyond the built-ins. Never raises on data; raises :class:`ConditionError`
        (``condition_function_unavailable``) only if the condition calls a function not supplied, and
        lets a supplied function's own exception through.
        """
        return self._test(scope, _NO_FUNCTIONS if functions is None else functions)

    def __repr__(self) -> str:
        return f"Condition({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and other.node == self.node

    def __hash__(self) -> int:
        return hash(self.node)


def parse(
    text: str, roots: Collection[str] | None = None, functions: Collection[str] | None = None
) -> Condition:
    """Parse ``text`` into a :class:`Condition`, or raise :class:`ConditionError`.

    ``roots``, when given, is every name a path may start with (``{"slots", "traits", …}``): any other is
    refused with ``condition_unknown_root``, so a typo is caught when a bot or segment is saved, not
    silently read as null. ``functions`` names the caller's own functions (``count_events``,
    ``last_event``…) the text may call besides the built-ins; their implementations are passed to
    :meth:`Condition.evaluate`.
    """
    return Condition(text, parse_tree(text, roots, functions))
