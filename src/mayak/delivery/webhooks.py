"""Standard Webhooks (https://www.standardwebhooks.com) signing and verification.

Why this scheme: it is what Svix, and a growing list of providers, send, so receivers can verify
Mayak's webhooks with the official ``standardwebhooks`` libraries in any language, and Mayak can
verify inbound hooks signed the same way with ``verify()``.

The signed content is ``f"{webhook-id}.{webhook-timestamp}.{body}"``; the signature is
``v1,`` + base64(HMAC-SHA256(key, content)), where the key is the base64-decoded part of the
``whsec_…`` secret. ``webhook-signature`` may carry several space-separated signatures (secret
rotation); one match is enough. The timestamp bounds replays to ``tolerance_s`` either side.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

from mayak.errors import InvalidRequest

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


def new_webhook_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes (the spec asks for 24-64)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_`` secret (the prefix is optional, as in the reference libraries)."""
    encoded = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret must be base64 after the 'whsec_' prefix") from exc


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one message."""
    content = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def headers(secret: str, msg_id: str, body: bytes, now_s: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt.

    ``msg_id`` must stay the same across retries of one message (receivers deduplicate on it); the
    timestamp, and therefore the signature, is fresh on every attempt.
    """
    ts = int(time.time()) if now_s is None else int(now_s)
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(ts),
        HEADER_SIGNATURE: sign(secret, msg_id, ts, body),
    }


def _header(source: Mapping[str, str], name: str) -> str | None:
    value = source.get(name)
    if value is not None:
        return value
    for key, val in source.items():  # plain dicts are case-sensitive; HTTP headers are not
        if key.lower() == name:
            return val
    return None


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now_s: int | None = None,
) -> None:
    """Check a message's Standard Webhooks signature; return quietly or raise ``InvalidRequest``.

    Codes: ``missing_signature_headers`` (a header is absent or empty),
    ``signature_timestamp_out_of_window`` (older or newer than ``tolerance_s``),
    ``invalid_signature`` (no ``v1`` signature matches, or the timestamp is not an integer).
    """
    msg_id = _header(headers, HEADER_ID)
    ts_raw = _header(headers, HEADER_TIMESTAMP)
    sig_header = _header(headers, HEADER_SIGNATURE)
    if not msg_id or not ts_raw or not sig_header:
        raise InvalidRequest(
            "missing_signature_headers",
            "webhook-id, webhook-timestamp and webhook-signature headers are all required",
            status=401,
        )
    try:
        ts = int(ts_raw.strip())
    except ValueError as exc:
        raise InvalidRequest("invalid_signature", "webhook-timestamp is not an integer", status=401) from exc
    now = int(time.time()) if now_s is None else int(now_s)
    if abs(now - ts) > tolerance_s:
        raise InvalidRequest(
            "signature_timestamp_out_of_window",
            f"webhook-timestamp is more than {tolerance_s} s away from the current time",
            status=401,
        )
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1].encode()
    for candidate in sig_header.split():
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value.encode(), expected):
            return
    raise InvalidRequest("invalid_signature", "no webhook-signature matches the message", status=401)
