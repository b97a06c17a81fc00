"""Text → syntax tree: Python's own parser, then a whitelist of what a condition may contain.

The text is parsed with :func:`ast.parse` (``mode="eval"``; never compiled or executed) inside a pair of
parentheses, so a condition may span lines and carry ``#`` comments; a text that tries to close those
parentheses itself is refused. Every node of Python's tree is then either translated into a
:mod:`mayak.conditions.nodes` node or refused with a :class:`ConditionError` naming the place.
"""

from __future__ import annotations

import ast
import difflib
import io
import re
import tokenize
from collections.abc import Collection

from mayak.conditions.errors import ConditionError
from mayak.conditions.functions import BUILTINS
from mayak.conditions.nodes import (
    And,
    Arithmetic,
    ArithmeticOp,
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
    Segment,
)
from mayak.conditions.regex import UnsafePattern, compile_safe

MAX_LENGTH = 4000
"""Longest condition text, in characters."""
MAX_DEPTH = 32
"""Deepest nesting of operators, calls and paths."""

LITERAL_NAMES = {"true": True, "false": False, "null": None}

_COMPARE_OPS: dict[type[ast.cmpop], CompareOp] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
}
_ARITHMETIC_OPS: dict[type[ast.operator], ArithmeticOp] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
}
_OPERATOR_TEXT: dict[type[ast.AST], str] = {
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.Invert: "~",
    ast.UAdd: "unary +",
}
_FORBIDDEN_TEXT: dict[type[ast.AST], str] = {
    ast.Lambda: "lambda is",
    ast.IfExp: "a conditional expression (x if c else y) is",
    ast.NamedExpr: "assignment (:=) is",
    ast.Dict: "a dict literal is",
    ast.Set: "a set literal is",
    ast.ListComp: "a comprehension is",
    ast.SetComp: "a comprehension is",
    ast.DictComp: "a comprehension is",
    ast.GeneratorExp: "a comprehension is",
    ast.JoinedStr: "an f-string is",
    ast.FormattedValue: "an f-string is",
    ast.Await: "await is",
    ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
    ast.Starred: "* unpacking is",
    ast.Slice: "a slice is",
}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _is_dunder(name: str) -> bool:
    return name.startswith("__")


class _Converter:
    def __init__(self, source: str, roots: Collection[str] | None, functions: Collection[str] | None):
        self.source = source
        if isinstance(roots, str) or isinstance(functions, str):
            raise TypeError("roots and functions are collections of names, not a single string")
        self.roots = None if roots is None else frozenset(roots)
        self.functions = frozenset(BUILTINS) | frozenset(functions or ())
        starts = [0]
        starts.extend(match.end() for match in _LINE_BREAK.finditer(source))
        self.line_starts = starts

    # -- positions ---------------------------------------------------------------------------------

    def offset(self, lineno: int, char_col: int) -> int:
        """0-based offset into the source of a (wrapped-text line, character column) pair."""
        index = lineno - 2  # line 1 is the opening parenthesis we added
        if index < 0:
            return 0
        if index >= len(self.line_starts):
            return len(self.source)
        return min(self.line_starts[index] + max(char_col, 0), len(self.source))

    def position(self, node: ast.AST) -> int:
        return self.byte_offset(getattr(node, "lineno", 2), getattr(node, "col_offset", 0))

    def attribute_position(self, node: ast.Attribute) -> int:
        """Where the attribute's own name starts (``node.col_offset`` is where the whole chain starts)."""
        end_line, end_col = node.end_lineno, node.end_col_offset
        if end_line is None or end_col is None:
            return self.position(node)
        return self.byte_offset(end_line, end_col - len(node.attr.encode("utf-8")))

    def byte_offset(self, lineno: int, byte_col: int) -> int:
        """0-based offset into the source of a (wrapped-text line, UTF-8 byte column) pair."""
        index = lineno - 2
        if 0 <= index < len(self.line_starts):
            start = self.line_starts[index]
            line = self.source[start : start + byte_col + 1]
            encoded = line.encode("utf-8", "surrogatepass")[: max(byte_col, 0)]
            return self.offset(lineno, len(encoded.decode("utf-8", "ignore")))
        return self.offset(lineno, byte_col)

    def error(self, code: str, message: str, where: ast.AST | int) -> ConditionError:
        position = where if isinstance(where, int) else self.position(where)
        return ConditionError(code, message, position, source=self.source)

    def forbidden(self, node: ast.AST | int, what: str) -> ConditionError:
        return self.error("condition_forbidden", f"{what} not allowed in a condition", node)

    # -- translation -------------------------------------------------------------------------------

    def convert(self, node: ast.AST, depth: int = 0) -> Expr:
        if depth > MAX_DEPTH:
            raise self.error(
                "condition_too_deep", f"the condition nests deeper than {MAX_DEPTH} levels", node
            )
        depth += 1
        position = self.position(node)
        if isinstance(node, ast.BoolOp):
            operands = tuple(self.convert(value, depth) for value in node.values)
            return And(operands, position) if isinstance(node.op, ast.And) else Or(operands, position)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node, depth, position)
        if isinstance(node, ast.BinOp):
            op = _ARITHMETIC_OPS.get(type(node.op))
            if op is None:
                raise self.forbidden(node, f"the operator {_OPERATOR_TEXT.get(type(node.op), '?')} is")
            return Arithmetic(op, self.convert(node.left, depth), self.convert(node.right, depth), position)
        if isinstance(node, ast.Compare):
            return self.compare(node, depth, position)
        if isinstance(node, ast.Constant):
            return self.literal(node)
        if isinstance(node, ast.Name):
            if node.id in LITERAL_NAMES:
                return Literal(LITERAL_NAMES[node.id], position)
            return self.path(node, depth)
        if isinstance(node, ast.Attribute | ast.Subscript):
            return self.path(node, depth)
        if isinstance(node, ast.List | ast.Tuple):
            return ListLiteral(tuple(self.list_item(item) for item in node.elts), position)
        if isinstance(node, ast.Call):
            return self.call(node, depth, position)
        raise self.forbidden(node, _FORBIDDEN_TEXT.get(type(node), f"{type(node).__name__} is"))

    def unary(self, node: ast.UnaryOp, depth: int, position: int) -> Expr:
        if isinstance(node.op, ast.Not):
            return Not(self.convert(node.operand, depth), position)
        if isinstance(node.op, ast.USub):
            operand = self.convert(node.operand, depth)
            if (
                isinstance(operand, Literal)
                and isinstance(operand.value, int | float)
                and not isinstance(operand.value, bool)
            ):
                return Literal(-operand.value, position)
            return Negate(operand, position)
        raise self.forbidden(node, f"the operator {_OPERATOR_TEXT.get(type(node.op), '?')} is")

    def compare(self, node: ast.Compare, depth: int, position: int) -> Expr:
        operands = [self.convert(node.left, depth)]
        operands.extend(self.convert(comparator, depth) for comparator in node.comparators)
        parts: list[Expr] = []
        for index, op in enumerate(node.ops):
            symbol = _COMPARE_OPS.get(type(op))
            if symbol is None:  # is, is not
                raise self.error(
                    "condition_forbidden",
                    "'is' is not allowed in a condition; compare with == null or != null instead",
                    node,
                )
            left_position = position if index == 0 else self.position(node.comparators[index - 1])
            parts.append(Compare(symbol, operands[index], operands[index + 1], left_position))
        return parts[0] if len(parts) == 1 else And(tuple(parts), position)

    def literal(self, node: ast.Constant) -> Literal:
        value = node.value
        if value is None or isinstance(value, str | int | float):  # bool is an int
            return Literal(value, self.position(node))
        kind = {bytes: "bytes literals are", complex: "complex numbers are"}.get(
            type(value), "this constant is"
        )
        raise self.forbidden(node, kind)

    def list_item(self, node: ast.AST) -> Literal:
        if isinstance(node, ast.Constant):
            return self.literal(node)
        if isinstance(node, ast.Name) and node.id in LITERAL_NAMES:
            return Literal(LITERAL_NAMES[node.id], self.position(node))
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)
            and not isinstance(node.operand.value, bool)
        ):
            return Literal(-node.operand.value, self.position(node))
        raise self.error(
            "condition_forbidden", "a list may hold only literals (strings, numbers, true, false, null)", node
        )

    def path(self, node: ast.AST, depth: int) -> Expr:
        segments: list[Segment] = []
        current = node
        while isinstance(current, ast.Attribute | ast.Subscript):
            if isinstance(current, ast.Attribute):
                if _is_dunder(current.attr):
                    raise self.forbidden(self.attribute_position(current), f"the name {current.attr!r} is")
                segments.append(current.attr)
            else:
                segments.append(self.subscript_key(current.slice))
            current = current.value
        segments.reverse()
        position = self.position(node)
        if isinstance(current, ast.Name):
            name = current.id
            if name in LITERAL_NAMES:
                raise self.forbidden(current, f"reading a field of {name} is")
            if _is_dunder(name):
                raise self.forbidden(current, f"the name {name!r} is")
            if self.roots is not None and name not in self.roots:
                raise self.error("condition_unknown_root", self.unknown("root", name, self.roots), current)
            return Path((name, *segments), position)
        if isinstance(current, ast.Call):
            return Member(self.convert(current, depth), tuple(segments), position)
        raise self.forbidden(current, "reading a field of this expression is")

    def subscript_key(self, node: ast.AST) -> Segment:
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str | int)
            and not isinstance(node.value, bool)
        ):
            return node.value
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) is int
        ):
            return -node.operand.value
        if isinstance(node, ast.Slice):
            raise self.forbidden(node, "slices are")
        raise self.error("condition_forbidden", "a [key] must be a string or integer literal", node)

    def call(self, node: ast.Call, depth: int, position: int) -> Expr:
        if not isinstance(node.func, ast.Name):
            where = self.attribute_position(node.func) if isinstance(node.func, ast.Attribute) else node.func
            raise self.forbidden(where, "calling a method or a computed function is")
        name = node.func.id
        if _is_dunder(name):
            raise self.forbidden(node.func, f"the name {name!r} is")
        if name not in self.functions:
            raise self.error(
                "condition_unknown_function", self.unknown("function", name, self.functions), node
            )
        args: list[Expr] = []
        for argument in node.args:
            if isinstance(argument, ast.Starred):
                raise self.forbidden(argument, "* unpacking is")
            args.append(self.convert(argument, depth))
        kwargs: list[tuple[str, Expr]] = []
        for keyword in node.keywords:
            if keyword.arg is None:
                raise self.forbidden(keyword.value, "** unpacking is")
            if _is_dunder(keyword.arg):
                raise self.forbidden(keyword, f"the name {keyword.arg!r} is")
            kwargs.append((keyword.arg, self.convert(keyword.value, depth)))
        signature = BUILTINS.get(name)
        if signature is not None:
            unknown = [key for key, _ in kwargs if key not in signature.kwargs]
            if not signature.min_args <= len(args) <= signature.max_args or unknown:
                raise self.error("condition_bad_arguments", f"{name}() is called as {signature.usage}", node)
            if name == "matches":
                self.check_pattern(node.args[1], args[1])
        return Call(name, tuple(args), tuple(kwargs), position)

    def check_pattern(self, node: ast.AST, pattern: Expr) -> None:
        if isinstance(pattern, ListLiteral) or (
            isinstance(pattern, Literal) and not isinstance(pattern.value, str)
        ):
            raise self.error("condition_bad_arguments", "the pattern of matches() must be a string", node)
        if isinstance(pattern, Literal) and isinstance(pattern.value, str):
            try:
                compile_safe(pattern.value)
            except UnsafePattern as exc:
                raise self.error("condition_bad_regex", str(exc), node) from None

    def unknown(self, kind: str, name: str, known: Collection[str]) -> str:
        message = f"unknown {kind} {name!r}"
        close = difflib.get_close_matches(name, sorted(known), n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        elif kind == "root":
            message += f"; a path starts with one of {', '.join(sorted(known))}"
        return message


def _unmatched_closer(text: str) -> int | None:
    """Offset of the first closing bracket that closes nothing, if Python's tokenizer can find it."""
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.OP and token.string in "([{":
                depth += 1
            elif token.type == tokenize.OP and token.string in ")]}":
                depth -= 1
                if depth < 0:
                    line, column = token.start
                    starts = [0, *(match.end() for match in _LINE_BREAK.finditer(text))]
                    return starts[line - 1] + column if line - 1 < len(starts) else None
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    return None


def parse_tree(
    text: str, roots: Collection[str] | None = None, functions: Collection[str] | None = None
) -> Expr:
    """Parse and check ``text``; the typed tree, or :class:`ConditionError`."""
    if not isinstance(text, str):
        raise ConditionError("condition_syntax", "a condition must be a string")
    if len(text) > MAX_LENGTH:
        raise ConditionError(
            "condition_too_long", f"a condition may have at most {MAX_LENGTH} characters", MAX_LENGTH
        )
    converter = _Converter(text, roots, functions)
    if not text.strip():
        raise ConditionError("condition_syntax", "the condition is empty", 0, source=text)
    if "\x00" in text:
        raise converter.error(
            "condition_syntax", "a condition may not contain a NUL character", text.index("\x00")
        )
    try:
        tree = ast.parse(f"(\n{text}\n)", mode="eval")
    except SyntaxError as exc:
        where = converter.offset(exc.lineno or 2, (exc.offset or 1) - 1)
        raise converter.error("condition_syntax", f"not a valid expression: {exc.msg}", where) from None
    except (RecursionError, MemoryError):
        raise converter.error(
            "condition_too_deep", f"the condition nests deeper than {MAX_DEPTH} levels", 0
        ) from None
    except UnicodeError:
        where = next((i for i, char in enumerate(text) if "\ud800" <= char <= "\udfff"), 0)
        raise converter.error("condition_syntax", "the condition is not valid Unicode text", where) from None
    except (ValueError, OverflowError) as exc:
        raise converter.error("condition_syntax", f"not a valid expression: {exc}", 0) from None
    body = tree.body
    last_line = len(converter.line_starts) + 1
    if body.lineno < 2 or (body.end_lineno or last_line) > last_line:
        # the text closed our parentheses itself ("a) or (b") or is a bare tuple ("a, b")
        unmatched = _unmatched_closer(text)
        if unmatched is not None:
            raise converter.error("condition_syntax", "not a valid expression: unmatched ')'", unmatched)
        raise converter.error("condition_syntax", "not a single expression (a bare comma?)", 0)
    try:
        return converter.convert(body)
    except RecursionError:
        raise converter.error(
            "condition_too_deep", f"the condition nests deeper than {MAX_DEPTH} levels", 0
        ) from None
