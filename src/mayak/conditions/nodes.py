"""The typed syntax tree of a condition.

This is the contract between the parser and whatever executes a condition: the in-process compiler
(:mod:`mayak.conditions.compiler`) today, a SQL compiler for segments over the profile table later. Nodes
are immutable and compare by meaning: ``position`` (the 0-based character offset into the source, for
error messages) takes no part in equality.

Chained comparisons are already split (``0 < x < 10`` is ``And(Compare(0 < x), Compare(x < 10))``), unary
minus on a number literal is folded into the literal, and ``true``/``false``/``null`` are literals, so a
backend sees a small, regular tree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal as Lit
from typing import TypeAlias

Scalar: TypeAlias = str | int | float | bool | None
Segment: TypeAlias = str | int
CompareOp: TypeAlias = Lit["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
ArithmeticOp: TypeAlias = Lit["+", "-", "*", "/"]


@dataclass(frozen=True, slots=True)
class Literal:
    """A string, integer, float, boolean or null written in the condition."""

    value: Scalar
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ListLiteral:
    """``["Octavia", "Kodiaq"]`` (or a tuple): literals only, so a backend can bind it as a parameter."""

    items: tuple[Literal, ...]
    position: int = field(default=0, compare=False)

    @property
    def values(self) -> tuple[Scalar, ...]:
        return tuple(item.value for item in self.items)


@dataclass(frozen=True, slots=True)
class Path:
    """A read from the evaluation scope: ``traits.car.model``, ``traits["first name"]``, ``slots.items[0]``.

    ``segments[0]`` is the root (a name such as ``traits``); later segments are keys (str) or list
    indexes (int, negative counting from the end).
    """

    segments: tuple[Segment, ...]
    position: int = field(default=0, compare=False)

    @property
    def root(self) -> str:
        return str(self.segments[0])

    @property
    def dotted(self) -> str:
        return format_path(self.segments)


@dataclass(frozen=True, slots=True)
class Member:
    """A read into the value a function returned: ``last_event("Order Completed").properties.total``."""

    base: Expr
    segments: tuple[Segment, ...]
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Negate:
    """Unary minus of something that is not a literal (``-traits.balance``)."""

    operand: Expr
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Arithmetic:
    """``left op right`` over numbers; anything else (or division by zero) yields null."""

    op: ArithmeticOp
    left: Expr
    right: Expr
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Expr, ...]
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Expr, ...]
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Compare:
    """One binary comparison; chains are split into an :class:`And` of these by the parser."""

    op: CompareOp
    left: Expr
    right: Expr
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Call:
    """A call of a built-in function or of one the caller named at parse time."""

    name: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()
    position: int = field(default=0, compare=False)

    def kwarg(self, name: str) -> Expr | None:
        for key, value in self.kwargs:
            if key == name:
                return value
        return None


Expr: TypeAlias = (
    Literal | ListLiteral | Path | Member | Not | Negate | Arithmetic | And | Or | Compare | Call
)


def format_path(segments: tuple[Segment, ...] | list[Segment]) -> str:
    """The canonical text of a path: ``traits.car.model``, ``slots.items[0]``, ``traits["first name"]``.

    :func:`mayak.conditions.render_path` reads this form back.
    """
    parts: list[str] = []
    for index, segment in enumerate(segments):
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
        elif segment.isidentifier():
            parts.append(segment if index == 0 else f".{segment}")
        else:
            parts.append(f"[{json.dumps(segment, ensure_ascii=False)}]")
    return "".join(parts)


def walk(node: Expr) -> list[Expr]:
    """Every node of the tree, parents before children."""
    out: list[Expr] = []
    stack: list[Expr] = [node]
    while stack:
        current = stack.pop()
        out.append(current)
        children: tuple[Expr, ...]
        if isinstance(current, Member):
            children = (current.base,)
        elif isinstance(current, Not | Negate):
            children = (current.operand,)
        elif isinstance(current, Arithmetic | Compare):
            children = (current.left, current.right)
        elif isinstance(current, And | Or):
            children = current.operands
        elif isinstance(current, Call):
            children = current.args + tuple(value for _, value in current.kwargs)
        elif isinstance(current, ListLiteral):
            children = current.items
        else:
            children = ()
        stack.extend(reversed(children))
    return out
