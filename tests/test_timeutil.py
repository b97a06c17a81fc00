from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from mayak.timeutil import ms_to_rfc3339, parse_rfc3339_ms

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(st.integers(min_value=-(10**13), max_value=253402300799999))
def test_formatting_matches_the_standard_library(ms: int) -> None:
    exact = (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert ms_to_rfc3339(ms) == exact
    assert parse_rfc3339_ms(exact) == ms


def test_none_stays_none() -> None:
    assert ms_to_rfc3339(None) is None
