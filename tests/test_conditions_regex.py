"""matches(): Python's re, with patterns that could backtrack catastrophically refused up front."""

from __future__ import annotations

import pytest

from mayak.conditions import ConditionError, parse
from mayak.conditions.regex import (
    MAX_MATCH_INPUT,
    MAX_PATTERN_LENGTH,
    MIN_SAFE_INPUT,
    UnsafePattern,
    compile_cached,
    compile_safe,
)

ACCEPTED = [
    ("^(yes|да)$", MAX_MATCH_INPUT),
    ("refund|возврат", MAX_MATCH_INPUT),
    (r"^\+?\d{10,15}$", MAX_MATCH_INPUT),
    (r"^(?:\d{1,3}\.){3}\d{1,3}$", MAX_MATCH_INPUT),
    ("(?i)^да", MAX_MATCH_INPUT),
    ("(a|b)*c", MAX_MATCH_INPUT),  # single characters: a class, not an alternation
    (".*refund.*", MAX_MATCH_INPUT),  # the .* at either end are dropped
    ("refund.*order", 2672),
    (r"^[\w.+-]+@[\w-]+\.[\w.-]+$", 208),
    ("(?:ab|cd)*+", 3333),  # possessive: an alternation inside is fine
    ("^a*a*a*b", 223),  # anchored: tried at one position only
    ("a+\\w*+!", 255),  # possessive, but still n steps for each of n splits at n positions
]


@pytest.mark.parametrize(("pattern", "max_input"), ACCEPTED)
def test_accepted_patterns_and_the_input_they_run_on(pattern: str, max_input: int) -> None:
    compiled = compile_safe(pattern)
    assert MIN_SAFE_INPUT <= compiled.max_input == max_input <= MAX_MATCH_INPUT


REFUSED = [
    "(",
    "(a+)+b",
    "(a*)*b",
    "(a|aa)*b",
    "(ab|cd)*",
    r"^[\w.+-]+@[\w-]+(\.[\w-]+)+$",
    r"(\w)\1",
    r"(?P<x>a)(?P=x)",
    "(a)(?(1)a|b)",
    "a*a*a*b",
    "(?m)^a*a*a*b",  # ^ matches after every newline: not an anchor
    "a.*a.*a.*b",
    "(a|a){30}",
    "a{0,16}" * 10,
    "(?>.*a.*a.*a.*b)",
    "x" * (MAX_PATTERN_LENGTH + 1),
]


@pytest.mark.parametrize("pattern", REFUSED)
def test_refused_patterns(pattern: str) -> None:
    with pytest.raises(UnsafePattern):
        compile_safe(pattern)
    with pytest.raises(ConditionError) as caught:
        parse(f"matches(slots.answer, {pattern!r})")
    assert caught.value.code == "condition_bad_regex"
    assert caught.value.position == len("matches(slots.answer, ")


def test_search_semantics_and_the_input_cap() -> None:
    condition = parse('matches(slots.text, "refund|возврат")')
    assert condition.evaluate({"slots": {"text": "I want a refund now"}})
    assert condition.evaluate({"slots": {"text": "хочу ВОЗВРАТ".lower()}})
    assert not condition.evaluate({"slots": {"text": "thanks"}})
    assert not condition.evaluate({"slots": {"text": 5}})
    long_text = "x" * MAX_MATCH_INPUT + " refund"
    assert not condition.evaluate({"slots": {"text": long_text}})  # longer than the cap: no match


def test_pattern_known_only_at_evaluation() -> None:
    condition = parse("matches(slots.text, traits.pattern)")
    assert condition.evaluate({"slots": {"text": "abc"}, "traits": {"pattern": "^a"}})
    assert not condition.evaluate(
        {"slots": {"text": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!"}, "traits": {"pattern": "(a+)+$"}}
    )
    assert not condition.evaluate({"slots": {"text": "abc"}, "traits": {"pattern": "("}})
    assert not condition.evaluate({"slots": {"text": "abc"}, "traits": {"pattern": None}})
    assert compile_cached("(a+)+$") is None
    assert compile_cached("^a") is compile_cached("^a")
