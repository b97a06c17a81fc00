"""Regular expressions for ``matches``: Python's ``re``, refused where it could backtrack catastrophically.

``re`` has no time limit, so a pattern is analysed (on ``re``'s own parse of it) before it is accepted.
The analysis bounds the steps the backtracking matcher may take on an input of ``n`` characters by a
polynomial ``c * n**d``:

- a quantifier that may repeat without bound (``*``, ``+``, ``{n,}``, or more than 64 times) multiplies
  what follows it by ``n`` (it can give back any number of characters); its body must be unambiguous (no
  quantifier of variable count, no alternation of several characters inside), since a repeated
  ambiguous body is exponential (``(a+)+``, ``(a|aa)*``), unless the repeat is possessive (``*+``,
  ``++``), which never gives back what it took;
- a bounded quantifier ``{lo,hi}`` multiplies by its choices, an alternation adds its branches, an
  atomic group ``(?>…)`` or a lookaround costs its contents once;
- a pattern not anchored at the start (``^``, ``\\A``; ``(?m)^`` does not count) is tried at every
  position: one more factor ``n``;
- backreferences and conditional groups are refused outright;
- a leading or trailing ``.*`` is dropped first: it cannot change whether a search matches.

A pattern is accepted if it stays within :data:`STEP_BUDGET` steps on an input of at least
:data:`MIN_SAFE_INPUT` characters; it then runs on inputs up to the largest length that stays within
the budget (at most :data:`MAX_MATCH_INPUT`), and a longer input does not match. On a current CPU the
budget is at worst about a tenth of a second of matching, for a pathological pattern on a pathological
input; ordinary patterns run in microseconds. Patterns are limited to :data:`MAX_PATTERN_LENGTH`
characters.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from typing import Any

MAX_PATTERN_LENGTH = 200
MAX_MATCH_INPUT = 4096
MIN_SAFE_INPUT = 200
STEP_BUDGET = 10**8
_UNBOUNDED_OVER = 64
_HUGE = 10**18

_sre_parse: Any = importlib.import_module("re._parser")
_MAXREPEAT: int = int(importlib.import_module("re._constants").MAXREPEAT)


class UnsafePattern(ValueError):
    """The pattern is not valid, too long, or could backtrack catastrophically."""


@dataclass(frozen=True, slots=True)
class SafePattern:
    pattern: re.Pattern[str]
    max_input: int

    def search(self, text: Any) -> bool:
        """Whether ``text`` (a string no longer than ``max_input``) contains a match; else False."""
        if not isinstance(text, str) or len(text) > self.max_input:
            return False
        return self.pattern.search(text) is not None


# A cost is (c, d): at most c * n**d for an input of n characters.
_Cost = tuple[int, int]
_ZERO: _Cost = (0, 0)
_ONE: _Cost = (1, 0)
_N: _Cost = (1, 1)

_NESTED = (
    "a repeated group may not contain another quantifier of variable count or an alternation, since it "
    "can backtrack catastrophically; use a character class ([ab]* rather than (a|b)*), a possessive "
    "quantifier (*+, ++) or an atomic group (?>...)"
)


def _add(a: _Cost, b: _Cost) -> _Cost:
    return min(a[0] + b[0], _HUGE), max(a[1], b[1])


def _mul(a: _Cost, b: _Cost) -> _Cost:
    return min(a[0] * b[0], _HUGE), min(a[1] + b[1], 64)


def _repeat(ways: _Cost, work: _Cost, times: int) -> tuple[_Cost, _Cost]:
    """Ways and work of ``times`` copies of a body in sequence."""
    total_ways, total_work = _ONE, _ZERO
    for _ in range(times):
        total_work = _add(work, _mul(ways, total_work))
        total_ways = _mul(total_ways, ways)
        if total_work[0] >= _HUGE or total_work[1] >= 64:
            break
    return total_ways, total_work


def _analyse(items: Any) -> tuple[_Cost, _Cost]:
    """(ways, work) of a sequence of parsed items.

    ``ways`` bounds how many different ways the sequence can match one stretch of text (each is a
    backtracking alternative offered to what follows); ``work`` bounds the steps to explore it once.
    For a sequence A B: ways = ways(A) * ways(B), work = work(A) + ways(A) * work(B).
    """
    parts = [_item(op, av) for op, av in items]
    ways, work = _ONE, _ONE
    for part_ways, part_work in reversed(parts):
        work = _add(part_work, _mul(part_ways, work))
        ways = _mul(part_ways, ways)
    return ways, work


def _item(op: Any, av: Any) -> tuple[_Cost, _Cost]:
    name = getattr(op, "name", str(op))
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        lo, hi, body = av
        ways, work = _analyse(body)
        unbounded = hi == _MAXREPEAT or hi > _UNBOUNDED_OVER
        if name == "POSSESSIVE_REPEAT":  # commits: one way out, whatever the body
            return _ONE, _mul(_N, work) if unbounded else _mul((hi, 0), work)
        if unbounded:
            if ways != _ONE:
                raise UnsafePattern(_NESTED)
            return _N, _mul(_N, work)
        total_ways, total_work = _repeat(ways, work, hi)
        return _mul(total_ways, (hi - lo + 1, 0)), _mul(total_work, (hi - lo + 1, 0))
    if name == "BRANCH":
        ways, work = _ZERO, _ZERO
        for branch in av[1]:
            branch_ways, branch_work = _analyse(branch)
            ways, work = _add(ways, branch_ways), _add(work, branch_work)
        return ways, work
    if name == "SUBPATTERN":
        return _analyse(av[3])
    if name == "ATOMIC_GROUP":
        return _ONE, _analyse(av)[1]
    if name in ("ASSERT", "ASSERT_NOT"):
        return _ONE, _analyse(av[1])[1]
    if name.startswith("GROUPREF"):
        raise UnsafePattern("backreferences and conditional groups are not allowed")
    return _ONE, _ONE


def _anchored(items: Any) -> bool:
    for op, av in items:
        name = getattr(op, "name", str(op))
        if name == "AT":
            return getattr(av, "name", str(av)) in ("AT_BEGINNING", "AT_BEGINNING_STRING")
        if name == "SUBPATTERN":
            return _anchored(av[3])
        return False
    return False


def _safe_length(cost: _Cost) -> int:
    c, d = cost
    if c > STEP_BUDGET:
        return 0
    if d == 0:
        return MAX_MATCH_INPUT
    n = int((STEP_BUDGET / c) ** (1 / d))
    while n > 0 and c * n**d > STEP_BUDGET:
        n -= 1
    return min(n, MAX_MATCH_INPUT)


def _trim_wildcards(text: str) -> str:
    """Drop a leading or trailing ``.*`` (or ``.*?``): a search matches with it exactly when it matches
    without it, and without it the pattern is far cheaper to run."""
    while True:
        if text.startswith(".*?"):
            text = text[3:]
        elif text.startswith(".*") and not text.startswith(".*+"):
            text = text[2:]
        else:
            break
    while True:
        cut = 3 if text.endswith(".*?") else 2 if text.endswith(".*") else 0
        if not cut:
            return text
        head = text[:-cut]
        escapes = len(head) - len(head.rstrip("\\"))
        if escapes % 2:  # an escaped dot
            return text
        text = head


def compile_safe(text: str) -> SafePattern:
    """Compile ``text`` as a ``matches`` pattern, or raise :class:`UnsafePattern` saying why not."""
    if len(text) > MAX_PATTERN_LENGTH:
        raise UnsafePattern(f"a pattern may have at most {MAX_PATTERN_LENGTH} characters")
    text = _trim_wildcards(text)
    try:
        parsed = _sre_parse.parse(text, 0)
        pattern = re.compile(text)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise UnsafePattern(f"not a valid regular expression: {exc}") from None
    cost = _analyse(parsed)[1]
    if pattern.flags & re.MULTILINE or not _anchored(parsed):
        cost = _mul(_N, cost)  # re.search tries every start position
    max_input = _safe_length(cost)
    if max_input < MIN_SAFE_INPUT:
        raise UnsafePattern(
            "the pattern has too many overlapping quantifiers and could backtrack catastrophically; "
            "simplify it (matches() searches anywhere in the text, so a leading or trailing .* is not needed)"
        )
    return SafePattern(pattern, max_input)


@functools.lru_cache(maxsize=512)
def compile_cached(text: str) -> SafePattern | None:
    """For a pattern that is only known at evaluation time: the pattern, or None when it is refused."""
    try:
        return compile_safe(text)
    except UnsafePattern:
        return None
