"""Signed user tokens: how a site tells the web chat who its logged-in visitor is.

A user token is a compact JWT (RFC 7519) signed with HMAC-SHA256 (``HS256``) under the workspace's
``user_tokens`` signing secret. The site's backend mints it when it renders a page for a logged-in
user and hands it to the widget (``data-user-token``); the web-chat socket verifies it and puts
``sub`` on the visitor's events as Segment ``userId``. Without the secret nobody can mint one, so a
visitor can never act as, or read the conversation of, another customer.

Claims: ``sub`` (required: the site's user id), ``exp`` (required: expiry, seconds since the epoch),
``iat`` and ``nbf`` (optional, seconds), ``email`` and ``name`` (optional strings, copied into the
events' ``context.traits``). Other claims are kept but not used.

Only ``HS256`` is accepted; the header's ``alg`` is checked before the signature, so neither
``none`` nor an algorithm switch gets through.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Any, TypeGuard

import orjson

from mayak.errors import AuthenticationError

ALGORITHM = "HS256"
MAX_TOKEN_CHARS = 4096
MAX_SUB_CHARS = 300  # an identity value's limit
MAX_TTL_S = 30 * 86_400
LEEWAY_S = 30  # clock skew allowed between the site's server and Mayak (exp and nbf)
_HEADER = {"alg": ALGORITHM, "typ": "JWT"}
INVALID = "invalid_user_token"
EXPIRED = "expired_user_token"


class UserTokenError(AuthenticationError):
    """A token that does not verify (``invalid_user_token``) or has expired (``expired_user_token``)."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message, "$.user_token")


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or any(c not in _B64_CHARS for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _sign(secret: str, signing_input: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha256).digest()


def mint(secret: str, sub: str, ttl_s: int, *, now: float | None = None, **claims: Any) -> str:
    """A token for user ``sub`` valid for ``ttl_s`` seconds; extra ``claims`` (``email``, ``name``…)
    are added as they are."""
    if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_SUB_CHARS or sub != sub.strip():
        raise ValueError("sub must be a non-empty string of at most 300 characters without outer spaces")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued = int(time.time() if now is None else now)
    payload = {"sub": sub, "iat": issued, "exp": issued + int(ttl_s)}
    payload.update({k: v for k, v in claims.items() if v is not None})
    signing_input = f"{_b64encode(orjson.dumps(_HEADER))}.{_b64encode(orjson.dumps(payload))}".encode()
    return f"{signing_input.decode()}.{_b64encode(_sign(secret, signing_input))}"


def verify(secret: str, token: str, now: float, *, leeway_s: int = LEEWAY_S) -> dict[str, Any]:
    """The claims of a valid token; raises ``UserTokenError`` otherwise.

    Checks, in order: shape, header (``alg`` must be ``HS256``), signature (constant time), claims
    (``sub`` a usable user id, ``exp`` present and numeric, ``email``/``name`` strings), then time
    (``exp`` in the past → ``expired_user_token``; ``nbf`` in the future → ``invalid_user_token``).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise UserTokenError(INVALID, "the user token is not a string of at most 4096 characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise UserTokenError(INVALID, "the user token is not a JWT (header.payload.signature)")
    try:
        header = orjson.loads(_b64decode(parts[0]))
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise UserTokenError(INVALID, "the user token is not valid base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
        raise UserTokenError(INVALID, "the user token must be signed with HS256")
    expected = _sign(secret, f"{parts[0]}.{parts[1]}".encode("ascii"))
    if not hmac.compare_digest(expected, signature):
        raise UserTokenError(INVALID, "the user token's signature does not match this workspace's secret")
    try:
        claims = orjson.loads(_b64decode(parts[1]))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise UserTokenError(INVALID, "the user token's payload is not valid base64url JSON") from None
    if not isinstance(claims, dict):
        raise UserTokenError(INVALID, "the user token's payload is not a JSON object")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_SUB_CHARS or sub != sub.strip():
        raise UserTokenError(INVALID, "the user token's sub must be a user id of 1-300 characters")
    exp = claims.get("exp")
    if not _is_number(exp):
        raise UserTokenError(INVALID, "the user token has no numeric exp (expiry, seconds since 1970)")
    for name in ("email", "name"):
        if name in claims and not isinstance(claims[name], str):
            raise UserTokenError(INVALID, f"the user token's {name} must be a string")
    nbf = claims.get("nbf")
    if nbf is not None and (not _is_number(nbf) or nbf > now + leeway_s):
        raise UserTokenError(INVALID, "the user token is not valid yet (nbf)")
    if exp <= now - leeway_s:
        raise UserTokenError(EXPIRED, "the user token has expired; ask the site for a new one")
    return claims


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["ALGORITHM", "EXPIRED", "INVALID", "UserTokenError", "mint", "verify"]
