"""Signed user tokens (HS256 JWT) without a server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import orjson
import pytest

from mayak.channels.user_tokens import EXPIRED, INVALID, UserTokenError, mint, verify

SECRET = "whsec_test-secret"
NOW = 1_800_000_000.0


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made(
    claims: dict[str, object], header: dict[str, object] | None = None, secret: str = SECRET
) -> str:
    """A token built the way a site's backend would, without Mayak's code."""
    head = _b64(orjson.dumps(header or {"alg": "HS256", "typ": "JWT"}))
    body = _b64(orjson.dumps(claims))
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def test_mint_and_verify_round_trip() -> None:
    token = mint(SECRET, "user-1", 300, now=NOW, email="a@example.com", name=None)
    claims = verify(SECRET, token, NOW + 10)
    assert claims == {"sub": "user-1", "iat": int(NOW), "exp": int(NOW) + 300, "email": "a@example.com"}
    header = orjson.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}


def test_a_token_made_elsewhere_verifies() -> None:
    claims = verify(SECRET, hand_made({"sub": "42", "exp": NOW + 60, "name": "Ann"}), NOW)
    assert claims["sub"] == "42" and claims["name"] == "Ann"


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (hand_made({"sub": "u", "exp": NOW + 60}, secret="another"), INVALID),
        (hand_made({"sub": "u", "exp": NOW + 60}, header={"alg": "none"}), INVALID),
        (hand_made({"sub": "u", "exp": NOW + 60}, header={"alg": "HS512"}), INVALID),
        (hand_made({"sub": "u"}), INVALID),  # no exp
        (hand_made({"sub": "u", "exp": "tomorrow"}), INVALID),
        (hand_made({"sub": "u", "exp": True}), INVALID),
        (hand_made({"sub": "", "exp": NOW + 60}), INVALID),
        (hand_made({"sub": 42, "exp": NOW + 60}), INVALID),
        (hand_made({"sub": " u", "exp": NOW + 60}), INVALID),
        (hand_made({"sub": "u" * 301, "exp": NOW + 60}), INVALID),
        (hand_made({"sub": "u", "exp": NOW + 60, "email": 5}), INVALID),
        (hand_made({"sub": "u", "exp": NOW + 60, "nbf": NOW + 600}), INVALID),
        (hand_made({"sub": "u", "exp": NOW - 31}), EXPIRED),
        ("a.b", INVALID),
        ("a.b.c.d", INVALID),
        ("!!!.###.$$$", INVALID),
        ("", INVALID),
        ("x" * 5000, INVALID),
    ],
)
def test_refused(token: str, code: str) -> None:
    with pytest.raises(UserTokenError) as info:
        verify(SECRET, token, NOW)
    assert info.value.code == code and info.value.param == "$.user_token"
    assert info.value.status == 401


def test_tampering_with_the_payload_breaks_the_signature() -> None:
    head, _, sig = mint(SECRET, "user-1", 300, now=NOW).split(".")
    body = _b64(orjson.dumps({"sub": "admin", "exp": NOW + 300}))
    with pytest.raises(UserTokenError, match="signature"):
        verify(SECRET, f"{head}.{body}.{sig}", NOW)


def test_clock_skew_leeway() -> None:
    token = mint(SECRET, "u", 60, now=NOW)
    assert verify(SECRET, token, NOW + 60 + 29)["sub"] == "u"
    with pytest.raises(UserTokenError) as info:
        verify(SECRET, token, NOW + 60 + 30)
    assert info.value.code == EXPIRED


def test_mint_checks_its_input() -> None:
    for sub in ("", " x", "x" * 301):
        with pytest.raises(ValueError):
            mint(SECRET, sub, 60)
    with pytest.raises(ValueError):
        mint(SECRET, "u", 0)
    assert verify(SECRET, mint(SECRET, "u", 60), time.time())["sub"] == "u"
