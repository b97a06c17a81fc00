"""Ids: prefixed, 26 Crockford base32 characters in the ULID layout (48-bit ms, 80 random bits)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from mayak import ids

ULID_RE = re.compile(r"^evt_[0-9A-HJKMNP-TV-Z]{26}$")


def _layout(ms: int, rnd: bytes) -> str:
    """The id the layout defines for this time and these random bytes, by integer arithmetic."""
    value = (ms << 80) | int.from_bytes(rnd, "big")
    digits = []
    for _ in range(26):
        digits.append(ids._ALPHABET[value & 31])
        value >>= 5
    return "evt_" + "".join(reversed(digits))


@pytest.mark.parametrize("count", [1, 2, 3, 16, 101])
def test_new_ids_follow_the_layout(monkeypatch: Any, count: int) -> None:
    """The bulk encoder (one base32 pass over all the random bytes) gives exactly the layout's ids."""
    ms = 1_764_000_000_123
    rnd = bytes((i * 37 + 11) % 256 for i in range(10 * count))
    monkeypatch.setattr(ids.os, "urandom", lambda n: rnd[:n])
    monkeypatch.setattr(ids.time, "time", lambda: (ms + 0.4) / 1000)
    got = ids.new_ids("evt", count)
    assert got == [_layout(ms, rnd[i * 10 : i * 10 + 10]) for i in range(count)]
    assert all(ULID_RE.match(i) for i in got)
    assert got[0][:14] == ids.new_id("evt", ms)[:14]  # the same time part as new_id's


def test_new_ids_are_unique_and_sort_by_time(monkeypatch: Any) -> None:
    batch = ids.new_ids("evt", 1000)
    assert len(set(batch)) == 1000 and all(ULID_RE.match(i) for i in batch)
    monkeypatch.setattr(ids.time, "time", lambda: 4_000_000_000.0)  # a later millisecond
    later = ids.new_ids("evt", 5)
    assert max(batch) < min(later)
