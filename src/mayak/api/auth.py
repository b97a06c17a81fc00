"""Key extraction and the two dependencies every route uses: a write key or a secret key.

Segment's HTTP API authenticates with HTTP Basic (write key as user name, empty password); browsers
send ``writeKey`` in a text/plain body. ``Authorization: Bearer KEY`` works everywhere.
A key of the wrong kind gets its own code (``secret_key_not_allowed`` / ``secret_key_required``).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING

from fastapi import Request

from mayak.errors import AuthenticationError, PermissionDenied
from mayak.workspaces.service import ApiKey

if TYPE_CHECKING:
    from mayak.platform import Mayak


def get_mayak(request: Request) -> Mayak:
    m: Mayak = request.app.state.mayak
    return m


def key_from_headers(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthenticationError(
                "malformed_authorization", "the Basic credentials are not valid base64"
            ) from exc
        user, _, _password = decoded.partition(":")
        return user or None
    raise AuthenticationError(
        "malformed_authorization", "use 'Authorization: Basic' or 'Authorization: Bearer'"
    )


async def authenticate_write(mayak: Mayak, presented: str | None) -> ApiKey:
    if not presented:
        raise AuthenticationError(
            "missing_key", "send the write key as the Basic user name or as a Bearer token"
        )
    key = await mayak.workspaces.authenticate(presented)
    if key.kind != "write":
        raise PermissionDenied(
            "secret_key_not_allowed",
            "a secret key must not be used for ingestion; use the workspace's write key",
        )
    return key


async def require_secret(request: Request) -> ApiKey:
    """FastAPI dependency for admin routes."""
    presented = key_from_headers(request)
    if not presented:
        raise AuthenticationError("missing_key", "send a secret key as 'Authorization: Bearer sk_…'")
    mayak = get_mayak(request)
    key = await mayak.workspaces.authenticate(presented)
    if key.kind != "secret":
        raise PermissionDenied(
            "secret_key_required", "the admin API needs a secret key (sk_…), not a write key"
        )
    return key
