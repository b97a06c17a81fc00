"""The hook mapping's JSONPath subset and the event it builds, without HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from mayak.errors import InvalidRequest
from mayak.integrations import jsonpath
from mayak.integrations.jsonpath import MISSING, PathError
from mayak.integrations.mapping import HookInfo, build_event, dedup_key, parse_mapping

DOC = {"a": {"b": [10, {"c": "deep"}]}, "odd key": {"x.y": 1}, "it's": 2, "n": None}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("$", DOC),
        ("$.a.b[0]", 10),
        ("$.a.b[-1].c", "deep"),
        ("$['odd key']['x.y']", 1),
        ('$["odd key"].x', MISSING),
        ("$['it\\'s']", 2),
        ("$.n", None),
        ("$.a.b[2]", MISSING),
        ("$.a.b.c", MISSING),
        ("$.a[0]", MISSING),
        ("$.missing.deeper", MISSING),
    ],
)
def test_paths_pick_one_value(path: str, value: Any) -> None:
    got = jsonpath.parse(path).get(DOC)
    assert got is MISSING if value is MISSING else got == value


@pytest.mark.parametrize(
    "path",
    [
        "",
        "a.b",
        "$a",
        "$.",
        "$..a",
        "$.a[",
        "$.a[x]",
        "$.a['x",
        "$.a[*]",
        "$.a[?(@.b)]",
        5,
        None,
        "$" + ".a" * 33,
        "$.a b",
    ],
)
def test_bad_paths_are_refused(path: Any) -> None:
    with pytest.raises(PathError):
        jsonpath.parse(path)


def test_child_notation() -> None:
    assert jsonpath.child("$", "a") == "$.a"
    assert jsonpath.child("$.a", 3) == "$.a[3]"
    assert jsonpath.child("$", "odd key's") == "$['odd key\\'s']"


def test_mapping_normal_form_and_event() -> None:
    mapping = parse_mapping({"event_path": "$.t", "identity": {"kind": "phone", "path": "$.p"}})
    assert mapping.to_json() == {
        "event_path": "$.t",
        "identity": {"kind": "phone", "path": "$.p"},
        "properties_path": "$",
        "timestamp_path": None,
    }
    info = HookInfo("hook_1", "H", "ws_1", "msg-1")
    event = build_event(
        mapping,
        {"t": " Car Ready ", "p": "020 7946 0018"},
        info,
        received_at=1_700_000_000_000,
        region="GB",
        max_event_bytes=32_768,
        max_depth=32,
    )
    assert (event.type, event.name, event.source, event.dedup_key) == (
        "track",
        "Car Ready",
        "hook",
        "hook:hook_1:msg-1",
    )
    assert event.payload["context"]["externalIds"] == [{"type": "phone", "id": "020 7946 0018"}]
    assert event.timestamp == event.received_at == 1_700_000_000_000
    with pytest.raises(InvalidRequest) as err:
        build_event(
            mapping,
            {"t": "x", "p": "12"},
            info,
            received_at=1,
            region="GB",
            max_event_bytes=32_768,
            max_depth=32,
        )
    assert (err.value.code, err.value.param) == ("invalid_identity", "$.p")


def test_numeric_timestamps_and_long_ids() -> None:
    mapping = parse_mapping(
        {"event": "E", "identity": {"kind": "crm_id", "path": "$.id"}, "timestamp_path": "$.ts"}
    )
    info = HookInfo("hook_1", "H", "ws_1", "m")
    now = 1_800_000_000_000
    for ts, expected in (
        (1_700_000_000, 1_700_000_000_000),
        (1_700_000_000_123, 1_700_000_000_123),
        (1.5, 1500),
    ):
        event = build_event(
            mapping,
            {"id": 1, "ts": ts},
            info,
            received_at=now,
            region="GB",
            max_event_bytes=32_768,
            max_depth=32,
        )
        assert event.timestamp == expected
    with pytest.raises(InvalidRequest) as err:
        build_event(
            mapping, {"id": 1, "ts": -5}, info, received_at=now, region="GB", max_event_bytes=99, max_depth=32
        )
    assert err.value.code == "invalid_timestamp"
    long = dedup_key("hook_1", "x" * 400)
    assert len(long) <= 300 and long.startswith("hook#hook_1:")
