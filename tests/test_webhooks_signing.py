"""Standard Webhooks signing: the published vector, an independent HMAC, tampering, the time window."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from mayak.delivery import webhooks
from mayak.errors import InvalidRequest

# The test vector published with the Standard Webhooks specification (also in Svix's docs).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def independent_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, msg_id.encode() + b"." + str(ts).encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_published_vector() -> None:
    assert webhooks.sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    assert independent_signature(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIGNATURE}
    webhooks.verify(SPEC_SECRET, headers, SPEC_BODY, now_s=SPEC_TS + 10)


def test_new_secret_shape_and_independent_hmac() -> None:
    secret = webhooks.new_webhook_secret()
    assert secret.startswith("whsec_")
    assert 24 <= len(base64.b64decode(secret[6:])) <= 32
    assert secret != webhooks.new_webhook_secret()
    body = '{"ü": "snow ☃"}'.encode()
    assert webhooks.sign(secret, "obx_1", 1_700_000_000, body) == independent_signature(
        secret, "obx_1", 1_700_000_000, body
    )


def test_headers_round_trip_and_case_insensitive_lookup() -> None:
    secret = webhooks.new_webhook_secret()
    body = b'{"a":1}'
    h = webhooks.headers(secret, "obx_42", body, now_s=1_700_000_000)
    assert h["webhook-id"] == "obx_42"
    assert h["webhook-timestamp"] == "1700000000"
    assert h["webhook-signature"].startswith("v1,")
    webhooks.verify(secret, h, body, now_s=1_700_000_100)
    upper = {k.title(): v for k, v in h.items()}  # Webhook-Id, … as some proxies send them
    webhooks.verify(secret, upper, body, now_s=1_700_000_100)


def test_several_signatures_one_match_is_enough() -> None:
    old, new = webhooks.new_webhook_secret(), webhooks.new_webhook_secret()
    body = b"{}"
    h = webhooks.headers(new, "obx_1", body, now_s=1000)
    h["webhook-signature"] = f"v1,AAAA {webhooks.sign(old, 'obx_1', 1000, body)} {h['webhook-signature']}"
    webhooks.verify(new, h, body, now_s=1000)
    webhooks.verify(old, h, body, now_s=1000)


def _code(exc: pytest.ExceptionInfo[InvalidRequest]) -> str:
    return exc.value.code


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("body", b'{"a":2}'),
        ("webhook-id", "obx_other"),
        ("webhook-timestamp", "1700000001"),
        ("webhook-signature", "v1,Zm9vYmFy"),
        ("webhook-signature", "v2," + "x" * 44),
        ("secret", "whsec_" + base64.b64encode(b"k" * 32).decode()),
    ],
)
def test_tampering_is_rejected(field: str, value: str | bytes) -> None:
    secret = webhooks.new_webhook_secret()
    body = b'{"a":1}'
    h = webhooks.headers(secret, "obx_1", body, now_s=1_700_000_000)
    if isinstance(value, bytes):
        body = value
    elif field == "secret":
        secret = value
    else:
        h[field] = value
    with pytest.raises(InvalidRequest) as exc:
        webhooks.verify(secret, h, body, now_s=1_700_000_000)
    assert _code(exc) == "invalid_signature"


def test_missing_headers() -> None:
    secret = webhooks.new_webhook_secret()
    h = webhooks.headers(secret, "obx_1", b"{}", now_s=5000)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        partial = {k: v for k, v in h.items() if k != name}
        with pytest.raises(InvalidRequest) as exc:
            webhooks.verify(secret, partial, b"{}", now_s=5000)
        assert _code(exc) == "missing_signature_headers"


def test_time_window() -> None:
    secret = webhooks.new_webhook_secret()
    h = webhooks.headers(secret, "obx_1", b"{}", now_s=10_000)
    webhooks.verify(secret, h, b"{}", now_s=10_300)  # exactly at the edge
    webhooks.verify(secret, h, b"{}", now_s=9_700)
    for now in (10_301, 9_699):
        with pytest.raises(InvalidRequest) as exc:
            webhooks.verify(secret, h, b"{}", now_s=now)
        assert _code(exc) == "signature_timestamp_out_of_window"
    webhooks.verify(secret, h, b"{}", now_s=10_900, tolerance_s=1000)


def test_non_integer_timestamp() -> None:
    secret = webhooks.new_webhook_secret()
    h = webhooks.headers(secret, "obx_1", b"{}", now_s=10_000)
    h["webhook-timestamp"] = "soon"
    with pytest.raises(InvalidRequest) as exc:
        webhooks.verify(secret, h, b"{}", now_s=10_000)
    assert _code(exc) == "invalid_signature"
