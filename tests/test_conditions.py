"""The condition language: results over a sample scope, refusals with code and column, null safety,
no way into Python internals, and parsing that never fails with anything but ConditionError."""

from __future__ import annotations

import ast
import builtins
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mayak.conditions import (
    BUILTIN_FUNCTIONS,
    Condition,
    ConditionError,
    nodes,
    parse,
    render_path,
    split_path,
    to_number,
)

ROOTS = {"slots", "traits", "consents", "context", "stage", "event", "profile", "preferences"}

SCOPE: dict[str, Any] = {
    "stage": "in_service",
    "traits": {
        "email": "anna@example.com",
        "city": "Moscow",
        "first name": "Анна",
        "age": 34,
        "score": 7.5,
        "vip": True,
        "blocked": False,
        "empty": "",
        "zero": 0,
        "phone": None,
        "car": {"model": "Kodiaq", "year": 2021},
        "tags": ["vip", "fleet"],
        "orders": [{"total": 120}, {"total": 80}],
        "last_visit": "2024-05-02T00:00:00Z",
        "signed_up_ms": 1_704_067_200_000,  # 2024-01-01T00:00:00Z
        "mileage_text": "15 000",
    },
    "slots": {"mileage": 16000, "answer": "Да", "reply": "yes please", "code": "3"},
    "consents": {"marketing": {"telegram": True, "email": False}},
    "context": {"local_hour": 10, "channel": "telegram"},
    "event": {"name": "Order Completed", "properties": {"total": 150, "currency": "EUR"}},
    "now": "2024-06-01T00:00:00Z",
}


def check(text: str, scope: dict[str, Any] | None = None, **kwargs: Any) -> bool:
    return parse(text, roots=ROOTS | {"now"}, **kwargs).evaluate(SCOPE if scope is None else scope)


# --------------------------------------------------------------------------------------------------
# Results over the sample scope

CASES: list[tuple[str, bool]] = [
    # the examples of the brief
    ('stage == "in_service" and traits.car.model in ["Octavia", "Kodiaq"]', True),
    ("slots.mileage >= 15000 or not consents.marketing.telegram", True),
    ('exists(traits.email) and lower(traits.city) == "moscow"', True),
    ("context.local_hour >= 9 and context.local_hour < 21", True),
    ('matches(lower(slots.answer), "^(yes|да)$")', True),
    # literals and booleans
    ("true", True),
    ("false", False),
    ("null", False),
    ("True and not False", True),
    ("traits.vip", True),
    ("traits.vip == true", True),
    ("traits.blocked == false", True),
    ("not traits.blocked", True),
    ("traits.vip and traits.blocked", False),
    ("traits.vip or traits.blocked", True),
    # equality is strict
    ("traits.age == 34", True),
    ("traits.age == 34.0", True),
    ('traits.age == "34"', False),
    ("slots.code == 3", False),
    ('slots.code == "3"', True),
    ("traits.vip == 1", False),
    ("traits.zero == false", False),
    ("traits.age != 35", True),
    ('traits.car == {"model": "x"}'.replace('{"model": "x"}', "null"), False),
    ('traits.tags == ["vip", "fleet"]', True),
    ('traits.tags == ("vip", "fleet")', True),
    ('traits.tags != ["fleet", "vip"]', True),
    # ordering
    ("traits.score > 7", True),
    ("traits.score <= 7.5", True),
    ("0 < traits.age < 100", True),
    ("18 <= traits.age <= 30", False),
    ("traits.age > traits.score", True),
    ('traits.city < "N"', True),
    ('traits.last_visit >= "2024-05-01"', True),
    ("slots.code < 5", False),
    ("slots.code >= 0", False),
    ("traits.vip > 0", False),
    ("traits.tags > 1", False),
    # membership
    ('traits.city in ["Moscow", "Kazan"]', True),
    ('traits.city not in ["Moscow", "Kazan"]', False),
    ('"vip" in traits.tags', True),
    ('"gold" not in traits.tags', True),
    ('"Mos" in traits.city', True),
    ('"telegram" in consents.marketing', True),
    ('"sms" not in consents.marketing', True),
    ("traits.age in [33, 34, 35]", True),
    ("traits.age in [33.0, 34.0]", True),
    ("traits.vip in [1, 2]", False),
    ("traits.age not in [1, true]", True),
    ("3 in slots.code", False),
    ("3 not in slots.code", False),
    ("null in [null]", False),
    # paths
    ('traits["first name"] == "Анна"', True),
    ("traits.orders[0].total == 120", True),
    ("traits.orders[-1].total == 80", True),
    ("traits.orders[5].total == null", True),
    ('traits.tags[0] == "vip"', True),
    ('traits["car"]["model"] == "Kodiaq"', True),
    ("traits.car.model.name == null", True),
    ('event.properties.currency == "EUR"', True),
    # arithmetic
    ("traits.age + 1 == 35", True),
    ("traits.age * 2 > 60", True),
    ("traits.score / 2 == 3.75", True),
    ("traits.age - 40 < 0", True),
    ("-traits.age == -34", True),
    ("traits.age / 0 == null", True),
    ("traits.city + 1 == null", True),
    ("traits.vip + 1 == null", True),
    ("-traits.city == null", True),
    # functions
    ("exists(traits.email)", True),
    ("exists(traits.phone)", False),
    ("exists(traits.empty)", True),
    ("exists(traits.nothing)", False),
    ("len(traits.tags) == 2", True),
    ("len(traits.city) == 6", True),
    ("len(traits.car) == 2", True),
    ("len(traits.age) == null", True),
    ('upper(traits.city) == "MOSCOW"', True),
    ("lower(traits.age) == null", True),
    ('contains(traits.tags, "fleet")', True),
    ('contains(traits.city, "osc")', True),
    ('contains(traits.car, "model")', True),
    ("contains(traits.age, 3)", False),
    ('starts_with(traits.email, "anna@")', True),
    ('ends_with(traits.email, "@example.com")', True),
    ('starts_with(traits.age, "3")', False),
    ('any_of(traits.city, ["Kazan", "Moscow"])', True),
    ('any_of(traits.tags, ["gold", "fleet"])', True),
    ('any_of(traits.tags, ["gold"])', False),
    ("any_of(traits.nothing, [null])", False),
    ('matches(slots.reply, "^yes")', True),
    ('matches(slots.reply, "(?i)^YES")', True),
    ('matches(slots.answer, "^(yes|да)$")', False),
    ('matches(traits.age, "3")', False),
    ("number(traits.mileage_text) == 15000", True),
    ("number(slots.code) == 3", True),
    ("number(traits.city) == null", True),
    ("days_since(traits.last_visit) == 30", True),
    ("days_since(traits.signed_up_ms) > 150", True),
    ('days_since(traits.last_visit, now="2024-05-03T12:00:00Z") == 1.5', True),
    ("days_since(traits.city) == null", True),
    ("days_since(traits.nothing) < 1", False),
    # multi-line with comments
    ("stage == 'in_service'  # the service stage\n  and traits.age > 18", True),
    ("(\n  traits.vip or\n  traits.blocked\n)", True),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_table(text: str, expected: bool) -> None:
    result = check(text)
    assert result is expected


def test_evaluate_returns_a_real_bool_for_any_value() -> None:
    for text in [
        "traits.age",
        "traits.tags",
        "traits.car",
        "traits.empty",
        "traits.nothing",
        "traits.score * 2",
    ]:
        assert type(parse(text).evaluate(SCOPE)) is bool


# --------------------------------------------------------------------------------------------------
# Null safety: a missing path is null; only ==/!= are defined on null

MISSING = ["traits.nothing", "traits.car.engine.power", "profile.at.all", "traits.tags[9]", "traits.age.x"]


@pytest.mark.parametrize("path", MISSING)
def test_missing_paths_are_null(path: str) -> None:
    assert check(f"{path} == null")
    assert not check(f"{path} != null")
    assert check(f"{path} != 5")
    assert not check(f"{path} == 5")
    assert not check(f'{path} == ""')
    for op in ["<", "<=", ">", ">="]:
        assert not check(f"{path} {op} 5"), op
        assert not check(f"5 {op} {path}"), op
        assert not check(f'{path} {op} "a"'), op
    assert not check(f"{path} in [1, 2]")
    assert not check(f"{path} not in [1, 2]")
    assert not check(f"1 in {path}")
    assert not check(f"1 not in {path}")
    assert not check(f"{path}")
    assert check(f"not {path}")
    assert not check(f"exists({path})")
    assert check(f"lower({path}) == null")
    assert check(f"({path} + 1) == null")


def test_null_with_operators_on_scope_values() -> None:
    assert not check("traits.phone > 0")
    assert check("traits.phone == null")
    assert not check('"a" in traits.phone')


def test_empty_scope_and_non_dict_roots() -> None:
    condition = parse('traits.city == "Moscow" or slots.mileage > 100 or stage.x == 1')
    assert condition.evaluate({}) is False
    assert condition.evaluate({"traits": "a string", "slots": [1, 2], "stage": 5}) is False
    assert condition.evaluate({"traits": None}) is False


def test_objects_in_the_scope_are_never_entered() -> None:
    class Car:
        model = "Kodiaq"
        secret = "s3cr3t"

    scope = {"traits": {"car": Car()}}
    assert not parse('traits.car.model == "Kodiaq"').evaluate(scope)
    assert parse("traits.car.secret == null").evaluate(scope)
    assert parse('traits["__class__"] == null').evaluate(scope)
    assert parse("exists(traits.car)").evaluate(scope)


def test_absurd_data_gives_answers_not_errors() -> None:
    def nested(depth: int) -> list[Any]:
        root: list[Any] = []
        current = root
        for _ in range(depth):
            child: list[Any] = []
            current.append(child)
            current = child
        return root

    scope = {"a": nested(5000), "b": nested(5000), "huge": 10**400, "inf": float("inf")}
    for text in [
        "a == b",
        "a != b",
        "contains(a, b)",
        "any_of(a, [1])",
        "days_since(huge) > 1",
        "days_since(inf) > 1",
        "huge + 1.5 > 0",
        "huge / 3 > 0",
        "inf - inf > 0",
    ]:
        assert type(parse(text).evaluate(scope)) is bool, text
    assert parse("huge > 1.5 and number(inf) == null and huge * huge * huge == null").evaluate(scope)


def test_numeric_strings_are_not_coerced() -> None:
    assert not check("slots.code == 3")
    assert not check("slots.code > 2")
    assert check("number(slots.code) > 2")


# --------------------------------------------------------------------------------------------------
# Refusals: code and position (0-based offset; column is 1-based)

REFUSALS: list[tuple[str, str, int | None]] = [
    ("", "condition_syntax", 0),
    ("   ", "condition_syntax", 0),
    ("traits.age >", "condition_syntax", 12),
    ("traits.age ==== 3", "condition_syntax", None),  # where Python's parser gives up
    ("a) or (b", "condition_syntax", 1),
    ("a, b", "condition_syntax", 0),
    ("x = 1", "condition_syntax", None),
    ("a\x00", "condition_syntax", 1),
    ('a == "\ud800"', "condition_syntax", 6),
    ("lambda: 1", "condition_forbidden", 0),
    ("[x for x in traits.tags]", "condition_forbidden", 0),
    ("1 if traits.vip else 2", "condition_forbidden", 0),
    ("(x := 1)", "condition_forbidden", 1),
    ('{"a": 1}', "condition_forbidden", 0),
    ("{1, 2}", "condition_forbidden", 0),
    ('f"{traits.age}"', "condition_forbidden", 0),
    ('b"x"', "condition_forbidden", 0),
    ("1j", "condition_forbidden", 0),
    ("...", "condition_forbidden", 0),
    ("traits.age ** 2", "condition_forbidden", 0),
    ("traits.age // 2", "condition_forbidden", 0),
    ("traits.age % 2", "condition_forbidden", 0),
    ("traits.age | 2", "condition_forbidden", 0),
    ("~traits.age", "condition_forbidden", 0),
    ("+traits.age", "condition_forbidden", 0),
    ("traits.phone is None", "condition_forbidden", 0),
    ("traits.phone is not None", "condition_forbidden", 0),
    ("traits.tags[0:1]", "condition_forbidden", 12),
    ("traits[traits.key]", "condition_forbidden", 7),
    ("traits[True]", "condition_forbidden", 7),
    ("traits[1.5]", "condition_forbidden", 7),
    ("[traits.age]", "condition_forbidden", 1),
    ("true.x", "condition_forbidden", 0),
    ('"abc".upper', "condition_forbidden", 0),
    ("(traits.a or traits.b).c", "condition_forbidden", 1),
    ("traits.city.lower()", "condition_forbidden", 12),
    ("lower(*traits.tags)", "condition_forbidden", 6),
    ("lower(**traits.car)", "condition_forbidden", 8),
    ("foo(traits.age)", "condition_unknown_function", 0),
    ("eval('1')", "condition_unknown_function", 0),
    ("getattr(traits, 'x')", "condition_unknown_function", 0),
    ("trait.age > 3", "condition_unknown_root", 0),
    ("traits.age > 3 and slot.mileage", "condition_unknown_root", 19),
    ("exists()", "condition_bad_arguments", 0),
    ("lower(traits.a, traits.b)", "condition_bad_arguments", 0),
    ("days_since(traits.x, when=1)", "condition_bad_arguments", 0),
    ("matches(slots.answer, 3)", "condition_bad_arguments", 22),
    ("matches(slots.answer, [1])", "condition_bad_arguments", 22),
    ('matches(slots.answer, "(")', "condition_bad_regex", 22),
    ('matches(slots.answer, "(a+)+$")', "condition_bad_regex", 22),
    ('matches(slots.answer, "(a|aa)*b")', "condition_bad_regex", 22),
    (r'matches(slots.answer, "(\\w)\\1")', "condition_bad_regex", 22),
    ('matches(slots.answer, "a*a*a*b")', "condition_bad_regex", 22),
    ('matches(slots.answer, "' + "x" * 201 + '")', "condition_bad_regex", 22),
    ("not " * 40 + "traits.vip", "condition_too_deep", 132),
    ("-" * 1000 + "1", "condition_too_deep", 33),
    ("x" * 4001, "condition_too_long", 4000),
]


@pytest.mark.parametrize(("text", "code", "position"), REFUSALS)
def test_refusals(text: str, code: str, position: int | None) -> None:
    with pytest.raises(ConditionError) as caught:
        parse(text, roots=ROOTS | {"a", "b", "x"})
    error = caught.value
    assert error.code == code, error.message
    assert error.position is not None and 0 <= error.position <= len(text)
    if position is not None:
        assert error.position == position, error.message
    assert error.column == error.position + 1
    assert f"column {error.column})" in error.message
    assert error.to_dict()["type"] == "invalid_request"
    assert error.to_dict()["code"] == code


def test_positions_count_characters_and_lines() -> None:
    with pytest.raises(ConditionError) as caught:
        parse('"ы" == traits.__b')
    assert (caught.value.position, caught.value.column) == (14, 15)
    with pytest.raises(ConditionError) as caught:
        parse('traits.city == "Москва" and\n  слоты.x == 1', roots=ROOTS)
    error = caught.value
    assert (error.code, error.position, error.line, error.column) == ("condition_unknown_root", 30, 2, 3)
    assert "line 2, column 3" in error.message
    with pytest.raises(ConditionError) as caught:
        parse("traits.vip and\r\n  traits.x ==")
    assert (caught.value.line, caught.value.column) == (2, 14)


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(ConditionError, match="did you mean 'traits'"):
        parse("trait.age > 3", roots=ROOTS)
    with pytest.raises(ConditionError, match="did you mean 'starts_with'"):
        parse('start_with(traits.email, "a")')
    with pytest.raises(ConditionError, match="a path starts with one of"):
        parse("zzz > 3", roots=ROOTS)


def test_no_roots_means_any_root() -> None:
    assert parse("anything.at.all == null").evaluate({})


# --------------------------------------------------------------------------------------------------
# No way into Python internals

ATTACKS = [
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "__import__('os').system('true')",
    "__builtins__",
    "traits.__dict__",
    "traits.__class__.__mro__",
    "lower.__globals__",
    "exists.__call__(1)",
    "traits.get('x')",
    "traits.keys()",
    "open('/etc/passwd')",
    "eval('1')",
    "exec('1')",
    "compile('1', '', 'eval')",
    "globals()",
    "vars(traits)",
    "type(traits)",
    "[].__len__()",
    "(lambda: 1)()",
    "traits.__getattribute__('x')",
    "lower(x=__import__('os'))",
    "contains(traits.tags, __debug__)",
    "len(traits, __name__=1)",
]


@pytest.mark.parametrize("text", ATTACKS)
def test_python_internals_are_unreachable(text: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse(text)
    assert caught.value.code in {"condition_forbidden", "condition_unknown_function", "condition_syntax"}


def test_nothing_is_executed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing and evaluating never call eval/exec, and compile only to build a syntax tree."""
    real_compile = builtins.compile

    def parse_only(*args: Any, **kwargs: Any) -> Any:
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        assert flags & ast.PyCF_ONLY_AST, "compile() used for something other than parsing"
        return real_compile(*args, **kwargs)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", parse_only)
    for text, expected in CASES:
        assert parse(text).evaluate(SCOPE) is expected


# --------------------------------------------------------------------------------------------------
# The caller's functions


def test_callers_functions() -> None:
    calls: list[tuple[Any, ...]] = []

    def count_events(name: str, days: int | None = None) -> int:
        calls.append((name, days))
        return 2 if name == "Service Completed" else 0

    def last_event(name: str) -> dict[str, Any] | None:
        return {"properties": {"total": 150}} if name == "Order Completed" else None

    functions = {"count_events": count_events, "last_event": last_event}
    names = ["count_events", "last_event"]
    assert parse('count_events("Service Completed", days=30) > 0', functions=names).evaluate(SCOPE, functions)
    assert calls == [("Service Completed", 30)]
    assert parse('last_event("Order Completed").properties.total > 100', functions=names).evaluate(
        SCOPE, functions
    )
    assert not parse('last_event("Nope").properties.total > 100', functions=names).evaluate(SCOPE, functions)
    assert parse("count_events(event.name, days=slots.mileage) == 0", functions=names).evaluate(
        SCOPE, functions
    )
    assert calls[-1] == ("Order Completed", 16000)


def test_callers_function_must_be_named_at_parse_and_passed_at_evaluate() -> None:
    with pytest.raises(ConditionError) as caught:
        parse('count_events("x") > 0')
    assert caught.value.code == "condition_unknown_function"
    condition = parse('traits.vip and count_events("x") > 0', functions=["count_events"])
    with pytest.raises(ConditionError) as caught:
        condition.evaluate(SCOPE)
    assert caught.value.code == "condition_function_unavailable"
    assert not condition.evaluate({"traits": {"vip": False}})  # short-circuit: never called


def test_builtins_cannot_be_replaced() -> None:
    condition = parse('lower(traits.city) == "moscow"', functions=["lower"])
    assert condition.evaluate(SCOPE, {"lower": lambda value: "nope"})
    assert {"exists", "len", "lower", "upper", "contains", "starts_with", "matches", "any_of"} <= (
        BUILTIN_FUNCTIONS
    )
    assert {"days_since", "number", "ends_with"} <= BUILTIN_FUNCTIONS


# --------------------------------------------------------------------------------------------------
# days_since and now


def test_days_since_reads_now_from_the_scope_in_any_form() -> None:
    condition = parse("days_since(traits.last_visit) == 30")
    base = {"traits": {"last_visit": "2024-05-02T00:00:00Z"}}
    assert condition.evaluate({**base, "now": "2024-06-01T00:00:00Z"})
    assert condition.evaluate({**base, "now": 1_717_200_000_000})
    assert condition.evaluate({**base, "now": datetime(2024, 6, 1, tzinfo=UTC)})
    assert condition.evaluate({**base, "now": datetime(2024, 6, 1)})  # naive: UTC
    assert not condition.evaluate({**base, "now": "not a time"})


def test_days_since_without_now_uses_the_clock() -> None:
    assert parse('days_since("2020-01-01T00:00:00Z") > 365').evaluate({})
    assert parse('days_since("2999-01-01T00:00:00Z") < 0').evaluate({})


def test_days_since_explicit_now() -> None:
    assert check('days_since("2024-01-01", now=event.timestamp) == null')  # now given but missing
    assert check('days_since("2024-01-01T00:00:00Z", now=1704153600000) == 1')
    assert check('days_since(traits.signed_up_ms, now="2024-01-11T00:00:00+00:00") == 10')


# --------------------------------------------------------------------------------------------------
# number()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        (2.5, 2.5),
        ("15000", 15000),
        (" 15 000 ", 15000),
        ("1\u00a0234\u00a0567", 1234567),
        ("-3", -3),
        ("+3.25", 3.25),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("15,5", None),
        ("1,000", None),
        ("1 00", None),
        ("abc", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("1e400", None),
        ("١٢", None),
        (True, None),
        (None, None),
        ([1], None),
        (float("nan"), None),
        ("9" * 65, None),
    ],
)
def test_number(value: Any, expected: Any) -> None:
    result = to_number(value)
    assert result == expected and type(result) is type(expected)


# --------------------------------------------------------------------------------------------------
# What a parsed condition exposes


def test_paths_functions_and_source() -> None:
    text = (
        'stage == "in_service" and traits.car.model in ["Octavia"] and exists(traits["first name"])'
        ' and traits.orders[0].total > 1 and count_events("x") > 0 and last_event("y").properties.z'
    )
    condition = parse(text, functions=["count_events", "last_event"])
    assert condition.source == text
    assert condition.paths == {"stage", "traits.car.model", 'traits["first name"]', "traits.orders[0].total"}
    assert condition.functions_used == {"exists", "count_events", "last_event"}
    assert repr(condition) == f"Condition({text!r})"
    assert isinstance(condition, Condition)


def test_tree_is_small_and_regular() -> None:
    tree = parse("0 < traits.age <= 10 and traits.x in [-1, null, true] or not -traits.y").node
    age = nodes.Path(("traits", "age"))
    assert tree == nodes.Or(
        (
            nodes.And(
                (
                    nodes.And(
                        (
                            nodes.Compare("<", nodes.Literal(0), age),
                            nodes.Compare("<=", age, nodes.Literal(10)),
                        )
                    ),
                    nodes.Compare(
                        "in",
                        nodes.Path(("traits", "x")),
                        nodes.ListLiteral((nodes.Literal(-1), nodes.Literal(None), nodes.Literal(True))),
                    ),
                )
            ),
            nodes.Not(nodes.Negate(nodes.Path(("traits", "y")))),
        )
    )
    assert parse("traits.age>1") == parse("traits.age  >  1")
    assert hash(parse("traits.age>1")) == hash(parse("(traits.age > 1)"))
    assert parse("-5 == traits.x").node == nodes.Compare("==", nodes.Literal(-5), nodes.Path(("traits", "x")))


# --------------------------------------------------------------------------------------------------
# render_path


def test_render_path() -> None:
    assert render_path(SCOPE, "traits.car.model") == "Kodiaq"
    assert render_path(SCOPE, "traits.tags.1") == "fleet"
    assert render_path(SCOPE, "traits.tags[1]") == "fleet"
    assert render_path(SCOPE, "traits.orders[-1].total") == 80
    assert render_path(SCOPE, 'traits["first name"]') == "Анна"
    assert render_path(SCOPE, ["traits", "orders", 0, "total"]) == 120
    assert render_path(SCOPE, "traits.car.model.x") is None
    assert render_path(SCOPE, "traits.nothing") is None
    assert render_path(SCOPE, "stage") == "in_service"
    assert render_path({"a": {"0": "zero"}}, "a[0]") == "zero"
    assert render_path({"a": "text"}, "a.0") is None  # strings are not indexed
    assert render_path(SCOPE, []) is None
    for bad in ["", ".a", "a..b", "a[", "a[x]", 'a["unterminated]']:
        with pytest.raises(ValueError):
            split_path(bad)


def test_paths_round_trip_through_render_path() -> None:
    condition = parse(
        'traits["first name"] != null and traits.orders[1].total > 0 and traits.car.model != ""'
    )
    for path in condition.paths:
        assert render_path(SCOPE, path) is not None, path


# --------------------------------------------------------------------------------------------------
# Properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
scopes = st.dictionaries(
    st.sampled_from(["traits", "slots", "stage", "a", "b", "now"]), json_values, max_size=6
)

TOKENS = [
    "traits",
    "slots",
    "a",
    "b",
    ".",
    "x",
    "y",
    "[",
    "]",
    "(",
    ")",
    ",",
    "0",
    "-1",
    "2.5",
    '"s"',
    "'ы'",
    "true",
    "false",
    "null",
    "None",
    "and",
    "or",
    "not",
    "in",
    "not in",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "**",
    "%",
    "lambda",
    ":",
    "__class__",
    "__import__",
    "if",
    "else",
    "for",
    "is",
    "exists",
    "len",
    "lower",
    "contains",
    "matches",
    "any_of",
    "days_since",
    "number",
    "now",
    "=",
    "\n",
    "#",
    '"(a+)+"',
    '"^x$"',
    "{",
    "}",
    "*",
    "@",
    "!",
    "\\",
    "'",
    '"',
    "1e999",
    "9" * 30,
    "f",
    "j",
]


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_random_text_only_ever_raises_condition_error(text: str) -> None:
    try:
        parse(text)
    except ConditionError as error:
        assert error.code.startswith("condition_")
        assert error.position is None or 0 <= error.position <= len(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=14).map(" ".join), scopes)
def test_random_token_soup_parses_or_refuses_and_evaluates_safely(text: str, scope: dict[str, Any]) -> None:
    try:
        condition = parse(text, roots={"traits", "slots", "a", "b", "x", "y"})
    except ConditionError as error:
        assert error.code.startswith("condition_")
        assert error.position is None or 0 <= error.position <= len(text)
        return
    assert type(condition.evaluate(scope)) is bool


PARSED_CASES = [parse(text) for text, _ in CASES]


@settings(max_examples=200, deadline=None)
@given(scopes)
def test_evaluation_never_raises_on_data(scope: dict[str, Any]) -> None:
    for condition in PARSED_CASES:
        assert type(condition.evaluate(scope)) is bool


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_in_and_not_in_are_complementary_unless_undefined(left: Any, right: Any) -> None:
    scope = {"a": left, "b": right}
    inside = parse("a in b").evaluate(scope)
    outside = parse("a not in b").evaluate(scope)
    assert not (inside and outside)
    equal = parse("a == b").evaluate(scope)
    assert equal is not parse("a != b").evaluate(scope)
    if isinstance(left, float) and math.isnan(left):
        return
    assert parse("a == a").evaluate(scope) or (isinstance(left, list | dict) and "nan" in repr(left))
