"""The FastAPI application: routers, the flat error shape, request ids and structured access logs."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mayak import __version__
from mayak.api import (
    admin_routes,
    bots_routes,
    channels_routes,
    errors,
    hooks_routes,
    ingest_routes,
    ops_routes,
    telegram_routes,
    webchat_routes,
)
from mayak.api.destinations_routes import router as destinations_router
from mayak.platform import Mayak

log = structlog.get_logger("mayak.http")


class RequestContext:
    """Pure ASGI middleware (cheap on the hot path): request id header, latency metric, access log."""

    def __init__(self, app: ASGIApp, mayak: Mayak):
        self.app = app
        self.mayak = mayak

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:100]
                break
        request_id = request_id or uuid.uuid4().hex
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.mayak.metrics.request_seconds.labels(label).observe(elapsed)
            if status >= 400 or not scope["path"].startswith("/v1/"):
                log.info(
                    "request",
                    request_id=request_id,
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    ms=round(elapsed * 1000, 2),
                )


def create_app(mayak: Mayak, *, manage: bool = True, workers: bool = True) -> FastAPI:
    """Build the app; with ``manage`` the app starts and stops ``mayak`` with its own lifespan."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage:
            await mayak.start(workers=workers)
        try:
            yield
        finally:
            if manage:
                await mayak.close()

    app = FastAPI(
        title="Mayak",
        version=__version__,
        description="Connected customer-experience platform. Errors everywhere have the shape "
        "`{type, code, message, param}`; see docs/errors.md for the codes.",
        lifespan=lifespan,
    )
    app.state.mayak = mayak
    errors.install(app)
    app.include_router(ingest_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(destinations_router)
    app.include_router(bots_routes.router)
    app.include_router(channels_routes.router)
    app.include_router(telegram_routes.router)
    app.include_router(webchat_routes.router)
    app.include_router(hooks_routes.router)
    app.include_router(ops_routes.router)
    app.add_middleware(RequestContext, mayak=mayak)
    return app
