"""Segment-compatible event collection: ``/v1/identify`` … ``/v1/batch`` and the browser's short paths.

A batch accepts its valid events and reports each rejected one (index, code, JSON path). A request
in which nothing is acceptable is a 400 carrying the same ``errors`` list.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from mayak.api.auth import authenticate_write, get_mayak, key_from_headers
from mayak.api.errors import error_response, json_response
from mayak.errors import EventRejected, InvalidRequest, MayakError, PermissionDenied
from mayak.eventlog import NewEvent
from mayak.ingest.body import check_content_type, parse_json, read_limited
from mayak.ingest.segment import SHORT_TYPES, normalise_event
from mayak.timeutil import ms_to_rfc3339, now_ms, parse_rfc3339_ms

router = APIRouter(tags=["ingestion"])

CHECK_SLICE = 20  # events a batch request checks between yields to the event loop

_EVENT_SCHEMA = {
    "type": "object",
    "description": "A Segment-spec event (see docs/ingestion.md). `writeKey` may be sent in the body.",
    "properties": {
        "userId": {"type": "string"},
        "anonymousId": {"type": "string"},
        "messageId": {"type": "string"},
        "timestamp": {"type": "string", "format": "date-time"},
        "sentAt": {"type": "string", "format": "date-time"},
        "event": {"type": "string"},
        "name": {"type": "string"},
        "traits": {"type": "object"},
        "properties": {"type": "object"},
        "context": {"type": "object"},
        "groupId": {"type": "string"},
        "previousId": {"type": "string"},
    },
}
_BATCH_SCHEMA = {
    "type": "object",
    "required": ["batch"],
    "properties": {"batch": {"type": "array", "items": _EVENT_SCHEMA}, "sentAt": {"type": "string"}},
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Accepted (durably stored): `{success, accepted, duplicates, errors[]}`"},
    400: {"description": "Nothing acceptable; flat error with `errors[]` for batches"},
    401: {"description": "Missing, unknown or revoked write key"},
    403: {"description": "A secret key used for ingestion, or an origin not allowed"},
    413: {"description": "Event or request too large (after decompression)"},
    415: {"description": "Unsupported content type or encoding"},
}


def _cors_headers(origin: str | None) -> dict[str, str]:
    if not origin:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


async def ingest(request: Request, kind: str) -> Response:
    mayak = get_mayak(request)
    settings = mayak.settings
    origin = request.headers.get("origin")
    try:
        check_content_type(request.headers.get("content-type"))
        raw = await read_limited(
            request.stream(), request.headers.get("content-encoding"), settings.max_request_bytes
        )
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise InvalidRequest("invalid_body", "the body must be a JSON object", "$")
        presented = key_from_headers(request)
        if presented is None and isinstance(body.get("writeKey"), str):
            presented = body["writeKey"]
        key = await authenticate_write(mayak, presented)
        if origin:
            allowed = (await mayak.workspaces.settings(key.workspace_id)).get("allowed_origins", ["*"])
            if "*" not in allowed and origin not in allowed:
                refused, origin = origin, None  # no CORS grant for an origin the workspace does not allow
                raise PermissionDenied(
                    "origin_not_allowed", f"origin {refused!r} may not send events to this workspace"
                )
        received = now_ms()
        if kind == "batch":
            items = body.get("batch")
            if not isinstance(items, list):
                raise InvalidRequest("invalid_batch", "batch must be an array of events", "$.batch")
            if not items:
                raise InvalidRequest("empty_batch", "the batch holds no events", "$.batch")
            sent_raw = body.get("sentAt")
            try:
                batch_sent = parse_rfc3339_ms(sent_raw) if isinstance(sent_raw, str) else None
            except ValueError as exc:
                raise InvalidRequest(
                    "invalid_timestamp", "sentAt is not an RFC 3339 timestamp", "$.sentAt"
                ) from exc
            base, forced = "$.batch", None
        else:
            items, batch_sent, base, forced = [body], None, "", kind
        accepted: list[NewEvent] = []
        errors: list[dict[str, Any]] = []
        # PostgreSQL: checking the events is a request's one long stretch of CPU. It should run
        # while the ingest writer waits on the database, and not hold up the writer's next step
        # when the database answers. So one batch is checked at a time (the gate), yielding every
        # CHECK_SLICE events: the writer's next step waits for one slice at most. (On SQLite the
        # writer is the process's CPU; serialising the checks only made its groups smaller.)
        received_text = ms_to_rfc3339(received)
        gate = mayak.check_gate if len(items) > CHECK_SLICE else None
        async with gate or contextlib.nullcontext():
            for index, item in enumerate(items):
                if gate is not None and index and not index % CHECK_SLICE:
                    await asyncio.sleep(0)
                try:
                    accepted.append(
                        normalise_event(
                            item,
                            workspace_id=key.workspace_id,
                            received_at=received,
                            batch_sent_at=batch_sent,
                            forced_type=forced,
                            actor=key.id,
                            max_event_bytes=settings.max_event_bytes,
                            max_depth=settings.max_json_depth,
                            received_text=received_text,
                        )
                    )
                except EventRejected as exc:
                    prefix = f"{base}[{index}]" if kind == "batch" else "$"
                    param = prefix + (exc.param or "$")[1:]
                    errors.append({"index": index, "code": exc.code, "message": exc.message, "param": param})
                    mayak.metrics.events_rejected.labels(exc.code).inc()
        if not accepted:
            if kind != "batch":  # already counted as rejected above
                e = errors[0]
                status = 413 if e["code"] == "event_too_large" else 400
                refusal = InvalidRequest(e["code"], e["message"], e["param"], status=status)
                return _with_cors(error_response(refusal), origin)
            return _with_cors(
                json_response(
                    {
                        "type": "invalid_request",
                        "code": "batch_rejected",
                        "message": "no event in the batch was acceptable",
                        "param": "$.batch",
                        "errors": errors,
                    },
                    400,
                ),
                origin,
            )
        result = await mayak.writer.submit(accepted)
        return _with_cors(
            json_response(
                {
                    "success": True,
                    "accepted": result.accepted,
                    "duplicates": result.duplicates,
                    "errors": errors,
                }
            ),
            origin,
        )
    except MayakError as exc:
        if exc.type == "invalid_request":
            mayak.metrics.events_rejected.labels(exc.code).inc()
        return _with_cors(error_response(exc), origin)


def _with_cors(response: Response, origin: str | None) -> Response:
    response.headers.update(_cors_headers(origin))
    return response


def _route(kind: str, path: str, *, schema: dict[str, Any], include: bool = True) -> None:
    async def endpoint(request: Request) -> Response:
        return await ingest(request, kind)

    endpoint.__name__ = f"ingest_{kind}_{path.strip('/').replace('/', '_')}"
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        include_in_schema=include,
        responses=_RESPONSES,
        summary=f"Collect {kind} events" if kind == "batch" else f"Collect one {kind} event",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        },
    )


for _kind in ("identify", "track", "page", "screen", "group", "alias"):
    _route(_kind, f"/v1/{_kind}", schema=_EVENT_SCHEMA)
_route("batch", "/v1/batch", schema=_BATCH_SCHEMA)
_route("batch", "/v1/import", schema=_BATCH_SCHEMA, include=False)
for _short, _kind in SHORT_TYPES.items():
    _route(_kind, f"/v1/{_short}", schema=_BATCH_SCHEMA if _kind == "batch" else _EVENT_SCHEMA, include=False)


@router.options("/v1/{path:path}", include_in_schema=False)
async def preflight(request: Request, path: str) -> Response:
    """Browsers preflight JSON posts; the workspace's origin list is enforced on the real request."""
    origin = request.headers.get("origin")
    headers = _cors_headers(origin) | {
        "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization, Content-Encoding",
        "Access-Control-Max-Age": "86400",
    }
    return Response(status_code=204, headers=headers)
