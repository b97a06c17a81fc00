"""The one way a POST that creates something honours ``Idempotency-Key`` (see mayak/idempotency.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.responses import Response

from mayak.api.auth import get_mayak
from mayak.api.errors import json_response
from mayak.idempotency import Answer, fingerprint
from mayak.workspaces.service import ApiKey


async def create_once(
    request: Request, key: ApiKey, idempotency_key: str | None, create: Callable[[], Awaitable[Answer]]
) -> Response:
    """Run ``create``, or answer the first answer again for a retried key (``Idempotent-Replayed``)."""
    request_print = fingerprint(request.method, request.url.path, await request.body())
    answer = await get_mayak(request).idempotency.run(
        key.workspace_id, idempotency_key, request_print, create
    )
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return json_response(answer.body, answer.status, headers)
