"""Reading request bodies: streaming decompression that stops at the limit, and JSON parsing."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator

import orjson
import pytest

from mayak.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from mayak.ingest.body import check_content_type, parse_json, read_limited

LIMIT = 500 * 1024


class Chunks:
    """An async body stream that counts how much of it the reader pulled."""

    def __init__(self, data: bytes, size: int):
        self.parts = [data[i : i + size] for i in range(0, len(data), size)]
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            self.pulled += 1
            yield part


def bomb_stream(inflated_mb: int) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join([co.compress(block) for _ in range(inflated_mb)] + [co.flush()])


async def test_gzip_bomb_stops_after_the_first_chunks() -> None:
    data = bomb_stream(200)  # 200 MB of zeros in about 200 KB
    stream = Chunks(data, 1024)
    assert len(stream.parts) > 150
    with pytest.raises(PayloadTooLarge) as info:
        await read_limited(stream.__aiter__(), "gzip", LIMIT)
    assert info.value.code == "request_too_large" and info.value.status == 413
    assert stream.pulled <= 2, f"read {stream.pulled} of {len(stream.parts)} chunks before refusing"


async def test_plain_body_stops_at_the_limit() -> None:
    stream = Chunks(b"x" * (10 * LIMIT), 64 * 1024)
    with pytest.raises(PayloadTooLarge):
        await read_limited(stream.__aiter__(), None, LIMIT)
    assert stream.pulled == LIMIT // (64 * 1024) + 1


@pytest.mark.parametrize("encoding", [None, "identity", "gzip", "GZIP", "x-gzip", "deflate"])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
async def test_exact_limit_is_accepted_one_more_byte_is_not(encoding: str | None, chunk: int) -> None:
    def encode(raw: bytes) -> bytes:
        if encoding is None or encoding == "identity":
            return raw
        if encoding == "deflate":
            return zlib.compress(raw)
        return gzip.compress(raw)

    size = 20_000 if chunk == 1 else LIMIT
    exact = b"a" * size
    got = await read_limited(Chunks(encode(exact), chunk).__aiter__(), encoding, size)
    assert got == exact
    with pytest.raises(PayloadTooLarge):
        await read_limited(Chunks(encode(exact + b"a"), chunk).__aiter__(), encoding, size)


async def test_bad_compressed_streams() -> None:
    with pytest.raises(InvalidRequest) as info:
        await read_limited(Chunks(b"definitely not gzip", 5).__aiter__(), "gzip", LIMIT)
    assert info.value.code == "invalid_compression" and info.value.status == 400
    truncated = gzip.compress(orjson.dumps({"userId": "u" * 1000}))[:-20]
    with pytest.raises(InvalidRequest) as info:
        await read_limited(Chunks(truncated, 100).__aiter__(), "gzip", LIMIT)
    assert info.value.code == "invalid_compression"
    with pytest.raises(UnsupportedMediaType) as unsupported:
        await read_limited(Chunks(b"x", 1).__aiter__(), "br", LIMIT)
    assert unsupported.value.code == "unsupported_content_encoding" and unsupported.value.status == 415


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "text/plain;charset=UTF-8",
        "APPLICATION/JSON",
        "application/vnd.segment+json",
    ],
)
def test_accepted_content_types(content_type: str | None) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/html", "image/png"],
)
def test_refused_content_types(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        check_content_type(content_type)
    assert info.value.code == "unsupported_content_type"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"\xff", "invalid_utf8"),
        (b'"\xed\xa0\x80"', "invalid_utf8"),  # an encoded surrogate
        (b"[" * 1100 + b"]" * 1100, "too_deep"),
        (b"[" * 100_000, "too_deep"),
    ],
)
def test_parse_json_errors(raw: bytes, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_json(raw)
    assert (info.value.code, info.value.param) == (code, "$")


def test_parse_json_ok() -> None:
    assert parse_json(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
