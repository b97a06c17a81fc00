"""Segment-spec validation and normalisation of single events (no HTTP, no database)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mayak.errors import EventRejected
from mayak.ingest.segment import message_dedup_key, normalise_event, nul_path
from mayak.timeutil import parse_rfc3339_ms

RECEIVED = parse_rfc3339_ms("2025-06-01T12:00:00Z")


def norm(raw: Any, *, forced: str | None = "track", sent: int | None = None) -> Any:
    return normalise_event(
        raw,
        workspace_id="ws_1",
        received_at=RECEIVED,
        batch_sent_at=sent,
        forced_type=forced,
        actor="key_1",
        max_event_bytes=32 * 1024,
        max_depth=32,
    )


def rejected(raw: Any, **kw: Any) -> tuple[str, str | None]:
    with pytest.raises(EventRejected) as info:
        norm(raw, **kw)
    return info.value.code, info.value.param


def test_skew_formula() -> None:
    ev = norm(
        {"userId": "u", "event": "E", "timestamp": "2030-01-01T00:00:00Z", "sentAt": "2030-01-01T00:00:30Z"}
    )
    assert ev.timestamp == RECEIVED - 30_000
    assert ev.payload["timestamp"] == "2025-06-01T11:59:30.000Z"
    assert ev.payload["originalTimestamp"] == "2030-01-01T00:00:00Z"
    assert ev.payload["receivedAt"] == "2025-06-01T12:00:00.000Z"


def test_batch_sent_at_is_used_unless_the_event_has_its_own() -> None:
    base = {"userId": "u", "event": "E", "timestamp": "2025-06-01T09:00:00Z"}
    sent = parse_rfc3339_ms("2025-06-01T09:00:10Z")
    assert norm(base, sent=sent).timestamp == RECEIVED - 10_000
    own = base | {"sentAt": "2025-06-01T09:01:00Z"}
    assert norm(own, sent=sent).timestamp == RECEIVED - 60_000


def test_offsets_and_precision() -> None:
    ev = norm({"userId": "u", "event": "E", "timestamp": "2025-05-31T23:30:00.123456-03:00"})
    assert ev.payload["timestamp"] == "2025-06-01T02:30:00.123Z"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Z",
        "not a time",
        "2025-13-01T00:00:00Z",
        "2025-06-01T12:00:00+25:00",
        "x" * 41,
        12,
        True,
        {"t": 1},
        "0001-01-01T00:00:00+14:00",
        "1969-12-31T23:59:59Z",
    ],
)
def test_bad_timestamps(value: Any) -> None:
    assert rejected({"userId": "u", "event": "E", "timestamp": value}) == ("invalid_timestamp", "$.timestamp")


def test_nul_anywhere_is_refused_with_its_path() -> None:
    assert rejected(
        {"userId": "u", "event": "E", "properties": {"items": [{"sku": "a"}, {"sku": "b\u0000"}]}}
    ) == (
        "invalid_character",
        "$.properties.items[1].sku",
    )
    assert rejected({"userId": "u", "event": "E", "context": {"k\u0000": 1}}) == (
        "invalid_character",
        "$.context",
    )
    assert rejected({"userId": "u\u0000", "event": "E"}) == ("invalid_character", "$.userId")
    # a backslash followed by "u0000" is ordinary text
    assert (
        norm({"userId": "u", "event": "E", "properties": {"p": "\\u0000"}}).payload["properties"]["p"]
        == "\\u0000"
    )


def test_short_type_names_in_batches() -> None:
    assert norm({"type": "t", "userId": "u", "event": "E"}, forced=None).type == "track"
    assert norm({"type": "i", "userId": "u"}, forced=None).type == "identify"
    assert rejected({"type": "x", "userId": "u"}, forced=None) == ("unknown_type", "$.type")
    assert rejected({"userId": "u"}, forced=None) == ("unknown_type", "$.type")


def test_write_key_is_dropped_and_identifiers_normalised() -> None:
    ev = norm({"userId": 42, "anonymousId": "", "event": "E", "writeKey": "wk_secret"})
    assert "writeKey" not in ev.payload
    assert ev.payload["userId"] == "42"
    assert ev.actor == "key_1" and ev.source == "api"


def test_dedup_keys() -> None:
    assert message_dedup_key("abc") == "mid:abc"
    assert len(message_dedup_key("m" * 296)) == 300
    long_a, long_b = message_dedup_key("m" * 297), message_dedup_key("m" * 298)
    assert len(long_a) <= 300 and long_a != long_b and long_a.startswith("mid#")
    assert norm({"userId": "u", "event": "E", "messageId": "abc"}).dedup_key == "mid:abc"
    assert norm({"userId": "u", "event": "E"}).dedup_key is None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.dictionaries(
        st.sampled_from(
            [
                "userId",
                "anonymousId",
                "event",
                "name",
                "timestamp",
                "sentAt",
                "messageId",
                "traits",
                "properties",
                "context",
                "type",
                "groupId",
                "previousId",
            ]
        ),
        json_values,
        max_size=8,
    ),
    forced=st.sampled_from([None, "track", "identify", "page", "group", "alias"]),
)
def test_any_json_is_either_an_event_or_a_clean_rejection(raw: dict[str, Any], forced: str | None) -> None:
    """No input may raise anything but EventRejected (a 500 would mean a crash on bad input)."""
    try:
        ev = norm(raw, forced=forced)
    except EventRejected as exc:
        assert exc.code and exc.param is not None and exc.param.startswith("$")
        return
    assert ev.timestamp <= RECEIVED and ev.timestamp >= 0
    assert ev.payload["userId" if "userId" in ev.payload else "anonymousId"]


@settings(max_examples=300, deadline=None)
@given(
    consents=json_values | st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    preferences=json_values
    | st.dictionaries(
        st.sampled_from(["preferred_channel", "language", "timezone", "quiet_hours", "x"]),
        json_values,
        max_size=3,
    ),
)
def test_any_consents_or_preferences_are_checked_cleanly(consents: Any, preferences: Any) -> None:
    for traits in ({"consents": consents}, {"preferences": preferences}):
        try:
            norm({"userId": "u", "traits": traits}, forced="identify")
        except EventRejected as exc:
            assert exc.code in ("invalid_consents", "invalid_preferences", "invalid_character"), exc.code
            assert exc.param is not None and exc.param.startswith("$.traits.")


def test_identify_traits_from_context_traits() -> None:
    """RudderStack's SDKs put an identify's traits only in context.traits."""
    ctx = {"traits": {"email": "r@example.com", "plan": "gold"}, "library": {"name": "analytics-python"}}
    ev = norm({"userId": "u", "context": ctx}, forced="identify")
    assert ev.payload["traits"] == {"email": "r@example.com", "plan": "gold"}
    both = norm({"userId": "u", "traits": {"plan": "top"}, "context": ctx}, forced="identify")
    assert both.payload["traits"] == {"plan": "top"}
    track = norm({"userId": "u", "event": "E", "context": ctx})
    assert "traits" not in track.payload
    bad = {"userId": "u", "context": {"traits": {"consents": {"email": {"marketing": 1}}}}}
    assert rejected(bad, forced="identify") == (
        "invalid_consents",
        "$.context.traits.consents.email.marketing",
    )


def test_nul_path_helper() -> None:
    assert nul_path({"a": [1, "ok", {"b": "x\u0000"}]}, "$.traits") == "$.traits.a[2].b"
    assert nul_path({"a": [1, "ok"]}) is None
