"""Turn every failure into the one flat error shape, and log the unexpected ones."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from mayak.errors import MayakError

log = structlog.get_logger("mayak.api")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: MayakError, extra: dict[str, Any] | None = None) -> Response:
    body = exc.to_dict()
    if extra:
        body.update(extra)
    return json_response(body, exc.status)


def _path(loc: tuple[Any, ...]) -> str:
    out = "$"
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(MayakError)
    async def _mayak_error(_request: Request, exc: MayakError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_parameter"
        return json_response(
            {
                "type": "invalid_request",
                "code": code,
                "message": str(first.get("msg")),
                "param": _path(tuple(first["loc"])),
            },
            400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers a body it cannot parse (e.g. nested past the recursion limit) with a plain 400
        code = {400: "invalid_json", 404: "route_not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        param = "$" if exc.status_code == 400 else None
        return json_response(
            {"type": "invalid_request", "code": code, "message": str(exc.detail), "param": param},
            exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return json_response(
            {
                "type": "api_error",
                "code": "internal_error",
                "message": "an unexpected error occurred",
                "param": None,
            },
            500,
        )
