"""Ids: prefixed, 26 Crockford base32 characters in the ULID layout (48-bit ms, 80 random bits)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from mayak import ids

ULID_RE = re.compile(r"^evt_[0-9A-HJKMNP-TV-Z]{26}$")


def _layout(ms: int, rnd: bytes) -> str:
    """The id the layout defines for this time and these 16 random bytes (five bits of each, the
    low ones), by integer arithmetic."""
    value = ms
    for byte in rnd:
        value = (value << 5) | (byte & 31)
    digits = []
    for _ in range(26):
        digits.append(ids._ALPHABET[value & 31])
        value >>= 5
    return "evt_" + "".join(reversed(digits))


@pytest.mark.parametrize("count", [1, 2, 3, 16, 101])
def test_new_ids_follow_the_layout(monkeypatch: Any, count: int) -> None:
    """The bulk encoder (one translation of all the random bytes) gives exactly the layout's ids."""
    ms = 1_764_000_000_123
    rnd = bytes((i * 37 + 11) % 256 for i in range(16 * count))
    monkeypatch.setattr(ids.os, "urandom", lambda n: rnd[:n])
    monkeypatch.setattr(ids.time, "time", lambda: (ms + 0.4) / 1000)
    got = ids.new_ids("evt", count)
    assert got == [_layout(ms, rnd[i * 16 : i * 16 + 16]) for i in range(count)]
    assert all(ULID_RE.match(i) for i in got)
    assert got[0][:14] == ids.new_id("evt", ms)[:14]  # the same time part as new_id's


def test_new_ids_are_unique_and_sort_by_time(monkeypatch: Any) -> None:
    batch = ids.new_ids("evt", 1000)
    assert len(set(batch)) == 1000 and all(ULID_RE.match(i) for i in batch)
    monkeypatch.setattr(ids.time, "time", lambda: 4_000_000_000.0)  # a later millisecond
    later = ids.new_ids("evt", 5)
    assert max(batch) < min(later)


def test_every_random_character_is_equally_likely(monkeypatch: Any) -> None:
    """Each of the 256 byte values maps to one of the 32 characters, each character from 8 of them:
    uniform random bytes give uniform characters (80 random bits an id)."""
    monkeypatch.setattr(ids.os, "urandom", lambda n: bytes(range(256))[:n])
    tails = "".join(i[-16:] for i in ids.new_ids("evt", 16))
    assert sorted(set(tails)) == sorted(ids._ALPHABET)
    assert {tails.count(ch) for ch in ids._ALPHABET} == {8}
