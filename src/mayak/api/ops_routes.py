"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from mayak.api.auth import get_mayak
from mayak.api.errors import json_response

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="The database answers")
async def readyz(request: Request) -> Response:
    ok = await get_mayak(request).db.ping()
    return json_response({"status": "ok" if ok else "unavailable", "database": ok}, 200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    mayak = get_mayak(request)
    await mayak.pipeline.lag()
    mayak.metrics.outbox_depth.set(await mayak.outbox.depth())
    return Response(generate_latest(mayak.metrics.registry), media_type=CONTENT_TYPE_LATEST)
