"""Compile a condition's syntax tree into nested Python closures (no ``eval``, no bytecode generation).

Each node becomes a function of ``(scope, functions)``. ``compile_test`` gives one returning a real bool
(what :meth:`Condition.evaluate` runs), ``compile_value`` one returning the node's value. Common shapes
get specialised closures (a path of one to three keys, a comparison against a literal, membership in a
literal list), which keeps a three-clause condition at about a microsecond.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from mayak.conditions import functions as fns
from mayak.conditions.errors import ConditionError
from mayak.conditions.nodes import (
    And,
    Arithmetic,
    Call,
    Compare,
    CompareOp,
    Expr,
    ListLiteral,
    Literal,
    Member,
    Negate,
    Not,
    Or,
    Path,
    Scalar,
)
from mayak.conditions.regex import SafePattern, compile_safe
from mayak.conditions.semantics import (
    arithmetic,
    contained,
    equals,
    greater,
    greater_equal,
    less,
    less_equal,
    lookup,
    negate,
    not_contained,
    step,
    truthy,
)

Scope: TypeAlias = Mapping[str, Any]
Functions: TypeAlias = Mapping[str, Callable[..., Any]]
Value: TypeAlias = Callable[[Scope, Functions], Any]
Test: TypeAlias = Callable[[Scope, Functions], bool]

_FLIPPED: dict[str, CompareOp] = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    "<": less,
    "<=": less_equal,
    ">": greater,
    ">=": greater_equal,
}
_FAST_ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def compile_test(node: Expr) -> Test:
    if isinstance(node, Compare):
        return _compare(node)
    if isinstance(node, And):
        return _and([compile_test(operand) for operand in node.operands])
    if isinstance(node, Or):
        return _or([compile_test(operand) for operand in node.operands])
    if isinstance(node, Not):
        inner = compile_test(node.operand)
        return lambda s, f: not inner(s, f)
    if isinstance(node, Literal):
        constant = truthy(node.value)
        return lambda s, f: constant
    if isinstance(node, Call) and node.name == "exists":
        argument = compile_value(node.args[0])
        return lambda s, f: argument(s, f) is not None
    value = compile_value(node)
    return lambda s, f: truthy(value(s, f))


def compile_value(node: Expr) -> Value:
    if isinstance(node, Literal):
        literal = node.value
        return lambda s, f: literal
    if isinstance(node, ListLiteral):
        items = node.values
        return lambda s, f: items
    if isinstance(node, Path):
        return _path(node)
    if isinstance(node, Member):
        base = compile_value(node.base)
        segments = node.segments
        return lambda s, f: lookup(base(s, f), segments)
    if isinstance(node, Negate):
        operand = compile_value(node.operand)
        return lambda s, f: negate(operand(s, f))
    if isinstance(node, Arithmetic):
        op, left, right = node.op, compile_value(node.left), compile_value(node.right)
        return lambda s, f: arithmetic(op, left(s, f), right(s, f))
    if isinstance(node, Call):
        return _call(node)
    test = compile_test(node)
    return test


def _and(parts: list[Test]) -> Test:
    if len(parts) == 2:
        a, b = parts
        return lambda s, f: a(s, f) and b(s, f)
    if len(parts) == 3:
        a, b, c = parts
        return lambda s, f: a(s, f) and b(s, f) and c(s, f)

    def all_of(s: Scope, f: Functions) -> bool:
        return all(part(s, f) for part in parts)

    return all_of


def _or(parts: list[Test]) -> Test:
    if len(parts) == 2:
        a, b = parts
        return lambda s, f: a(s, f) or b(s, f)
    if len(parts) == 3:
        a, b, c = parts
        return lambda s, f: a(s, f) or b(s, f) or c(s, f)

    def any_of(s: Scope, f: Functions) -> bool:
        return any(part(s, f) for part in parts)

    return any_of


def _path(node: Path) -> Value:
    root, rest = node.root, node.segments[1:]
    if not rest:
        return lambda s, f: s.get(root)
    if len(rest) == 1 and isinstance(rest[0], str):
        key = rest[0]

        def get2(s: Scope, f: Functions) -> Any:
            value = s.get(root)
            if type(value) is dict:
                return value.get(key)
            return None if value is None else step(value, key)

        return get2
    if len(rest) == 2 and isinstance(rest[0], str) and isinstance(rest[1], str):
        key1, key2 = rest

        def get3(s: Scope, f: Functions) -> Any:
            value = s.get(root)
            if type(value) is dict:
                value = value.get(key1)
                if type(value) is dict:
                    return value.get(key2)
                return None if value is None else step(value, key2)
            return None if value is None else lookup(value, rest)

        return get3
    return lambda s, f: lookup(s.get(root), rest)


def _compare(node: Compare) -> Test:
    op, left_node, right_node = node.op, node.left, node.right
    if isinstance(left_node, Literal) and not isinstance(right_node, Literal) and op in _FLIPPED:
        op, left_node, right_node = _FLIPPED[op], right_node, left_node
    left = compile_value(left_node)
    if isinstance(right_node, Literal):
        if op == "==":
            return _equals_literal(left, right_node.value)
        if op == "!=":
            positive = _equals_literal(left, right_node.value)
            return lambda s, f: not positive(s, f)
        if op in _ORDERING:
            return _order_literal(op, left, right_node.value)
    if isinstance(right_node, ListLiteral) and op in ("in", "not in"):
        return _in_list(left, right_node.values, negated=op == "not in")
    right = compile_value(right_node)
    if op == "==":
        return lambda s, f: equals(left(s, f), right(s, f))
    if op == "!=":
        return lambda s, f: not equals(left(s, f), right(s, f))
    if op == "in":
        return lambda s, f: contained(left(s, f), right(s, f))
    if op == "not in":
        return lambda s, f: not_contained(left(s, f), right(s, f))
    ordering = _ORDERING[op]
    return lambda s, f: ordering(left(s, f), right(s, f))


def _equals_literal(left: Value, constant: Scalar) -> Test:
    if constant is None:
        return lambda s, f: left(s, f) is None
    if constant is True or constant is False:
        return lambda s, f: left(s, f) is constant
    if isinstance(constant, str):

        def equals_str(s: Scope, f: Functions) -> bool:
            value = left(s, f)
            return value == constant if type(value) is str else equals(value, constant)

        return equals_str

    def equals_number(s: Scope, f: Functions) -> bool:
        value = left(s, f)
        kind = type(value)
        return value == constant if kind is int or kind is float else equals(value, constant)

    return equals_number


def _order_literal(op: str, left: Value, constant: Scalar) -> Test:
    ordering = _ORDERING[op]
    if isinstance(constant, bool) or constant is None:
        return lambda s, f: False
    fast = _FAST_ORDERING[op]  # the plain operator, once both sides are known to be comparable
    if isinstance(constant, str):

        def order_str(s: Scope, f: Functions) -> bool:
            value = left(s, f)
            return fast(value, constant) if type(value) is str else ordering(value, constant)

        return order_str

    def order_number(s: Scope, f: Functions) -> bool:
        value = left(s, f)
        kind = type(value)
        return fast(value, constant) if kind is int or kind is float else ordering(value, constant)

    return order_number


def _in_list(left: Value, items: tuple[Scalar, ...], *, negated: bool) -> Test:
    if items and all(type(item) is str for item in items):
        strings = frozenset(items)
        if negated:

            def not_in_strings(s: Scope, f: Functions) -> bool:
                value = left(s, f)
                return value not in strings if type(value) is str else not_contained(value, items)

            return not_in_strings

        def in_strings(s: Scope, f: Functions) -> bool:
            value = left(s, f)
            return value in strings if type(value) is str else contained(value, items)

        return in_strings
    if negated:
        return lambda s, f: not_contained(left(s, f), items)
    return lambda s, f: contained(left(s, f), items)


def _call(node: Call) -> Value:
    name = node.name
    args = [compile_value(argument) for argument in node.args]
    if name == "matches" and isinstance(node.args[1], Literal) and isinstance(node.args[1].value, str):
        pattern: SafePattern = compile_safe(node.args[1].value)  # validated by the parser already
        text = args[0]
        return lambda s, f: pattern.search(text(s, f))
    if name == "days_since":
        timestamp = args[0]
        now_node = node.kwarg("now")
        if now_node is not None:
            now = compile_value(now_node)

            def days_since_given(s: Scope, f: Functions) -> float | None:
                current = now(s, f)
                return None if current is None else fns.fn_days_since(timestamp(s, f), current)

            return days_since_given
        return lambda s, f: fns.fn_days_since(timestamp(s, f), s.get("now"))
    plain = fns.PLAIN.get(name)
    if plain is not None:
        if len(args) == 1:
            only = args[0]
            return lambda s, f: plain(only(s, f))
        first, second = args
        return lambda s, f: plain(first(s, f), second(s, f))
    kwargs = [(key, compile_value(value)) for key, value in node.kwargs]
    position = node.position

    def call_extra(s: Scope, f: Functions) -> Any:
        function = f.get(name)
        if function is None:
            raise ConditionError(
                "condition_function_unavailable",
                f"the condition calls {name}() but no such function was passed to evaluate()",
                position,
            )
        return function(*[arg(s, f) for arg in args], **{key: value(s, f) for key, value in kwargs})

    return call_extra
