"""Reading request bodies safely: size limits on the *decompressed* bytes, gzip streamed.

A gzip bomb is refused as soon as the inflated size passes the limit, without inflating the rest.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from mayak.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

JSON_TYPES = ("application/json", "text/plain", "")


def check_content_type(content_type: str | None) -> None:
    """Segment clients send application/json; browser beacons send text/plain (no CORS preflight)."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if base not in JSON_TYPES and not base.endswith("+json"):
        raise UnsupportedMediaType(
            "unsupported_content_type", f"content type {base!r} is not accepted; send application/json", None
        )


async def read_limited(chunks: AsyncIterator[bytes], encoding: str | None, limit: int) -> bytes:
    """Collect the body, inflating gzip/deflate on the fly, refusing more than ``limit`` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        inflater = None
    elif enc in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif enc == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise UnsupportedMediaType(
            "unsupported_content_encoding", f"content encoding {enc!r} is not supported"
        )
    out = bytearray()

    def too_large() -> PayloadTooLarge:
        return PayloadTooLarge(
            "request_too_large", f"the request body is larger than {limit} bytes (after decompression)"
        )

    async for chunk in chunks:
        if not chunk:
            continue
        if inflater is None:
            out += chunk
            if len(out) > limit:
                raise too_large()
            continue
        data = chunk
        while data:
            try:
                piece = inflater.decompress(data, limit + 1 - len(out))
            except zlib.error as exc:
                raise InvalidRequest("invalid_compression", "the body is not valid gzip data") from exc
            out += piece
            if len(out) > limit:
                raise too_large()
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
    if inflater is not None:
        try:
            out += inflater.flush()
        except zlib.error as exc:
            raise InvalidRequest("invalid_compression", "the body is not valid gzip data") from exc
        if len(out) > limit:
            raise too_large()
        if not inflater.eof and out:
            raise InvalidRequest("invalid_compression", "the gzip stream is truncated")
    return bytes(out)


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("invalid_json", "the request body is empty", "$")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("invalid_utf8", "the request body is not valid UTF-8", "$") from exc
        reason = str(exc).lower()
        if "recursion" in reason or "depth limit" in reason:  # orjson stops at 1024 levels
            raise InvalidRequest("too_deep", "the JSON is nested too deeply", "$") from exc
        raise InvalidRequest("invalid_json", f"the request body is not valid JSON: {exc}", "$") from exc
