"""Inbound hooks (admin API + the public, signature-authenticated endpoint) and integration secrets.

Admin routes need a secret key; ``POST /v1/hooks/{hook_id}`` needs no key: the Standard Webhooks
signature made with the hook's ``signing_secret`` authenticates it. See docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mayak.api.auth import get_mayak, require_secret
from mayak.api.errors import json_response
from mayak.api.idempotent import create_once
from mayak.idempotency import Answer
from mayak.ingest.body import read_limited
from mayak.integrations.calls import integrations
from mayak.workspaces.service import ApiKey

router = APIRouter(tags=["hooks"])

_MAPPING_EXAMPLE = {
    "event": "Service Completed",
    "identity": {"kind": "crm_id", "path": "$.customer.id"},
    "properties_path": "$.data",
    "timestamp_path": "$.occurred_at",
}


class HookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["Service desk"])
    mapping: dict[str, Any] = Field(
        description="How a body becomes one track event: event | event_path, identity {kind, path}, "
        "properties_path (default $), timestamp_path (optional). Paths: $.a.b, $.list[0], $['odd key'].",
        examples=[_MAPPING_EXAMPLE],
    )


class Hook(BaseModel):
    id: str
    name: str
    mapping: dict[str, Any]
    enabled: bool
    path: str = Field(description="Where the business system POSTs: /v1/hooks/{id}")
    created_at: str = Field(description="RFC 3339")


class HookCreated(Hook):
    signing_secret: str = Field(
        description="Standard Webhooks secret (whsec_…) to sign with; shown only here."
    )


class HookList(BaseModel):
    items: list[Hook]
    next_cursor: str | None = None


class Deleted(BaseModel):
    id: str
    deleted: bool


class HookAccepted(BaseModel):
    success: bool
    duplicate: bool = Field(description="true when this webhook-id was accepted before (stored once)")
    event_id: str | None = Field(description="The logged event's id; null for a duplicate")


class SecretPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(min_length=1, max_length=8192, description="Stored encrypted; never shown again")


class Secret(BaseModel):
    name: str
    created_at: str


class SecretList(BaseModel):
    items: list[Secret]
    next_cursor: str | None = None


class SecretDeleted(BaseModel):
    name: str
    deleted: bool


# -- admin: hooks ------------------------------------------------------------------------------


@router.post("/v1/hooks", status_code=201, response_model=HookCreated, summary="Create an inbound hook")
async def create_hook(
    body: HookCreate,
    request: Request,
    key: ApiKey = Depends(require_secret),
    idempotency_key: str | None = Header(
        None, description="Retries with the same key get the first answer again (kept 24 h)"
    ),
) -> Response:
    mayak = get_mayak(request)
    hooks = integrations(mayak).hooks

    async def create() -> Answer:
        return Answer(201, await hooks.create(key.workspace_id, name=body.name, mapping=body.mapping))

    return await create_once(request, key, idempotency_key, create)


@router.get("/v1/hooks", response_model=HookList, summary="List inbound hooks")
async def list_hooks(request: Request, key: ApiKey = Depends(require_secret)) -> dict[str, Any]:
    return {"items": await integrations(get_mayak(request)).hooks.list(key.workspace_id), "next_cursor": None}


@router.get("/v1/hooks/{hook_id}", response_model=Hook, summary="One inbound hook")
async def get_hook(hook_id: str, request: Request, key: ApiKey = Depends(require_secret)) -> dict[str, Any]:
    return await integrations(get_mayak(request)).hooks.get(key.workspace_id, hook_id)


@router.delete("/v1/hooks/{hook_id}", response_model=Deleted, summary="Delete an inbound hook")
async def delete_hook(
    hook_id: str, request: Request, key: ApiKey = Depends(require_secret)
) -> dict[str, Any]:
    return await integrations(get_mayak(request)).hooks.delete(key.workspace_id, hook_id)


# -- public: deliveries ------------------------------------------------------------------------


@router.post(
    "/v1/hooks/{hook_id}",
    response_model=HookAccepted,
    summary="Deliver to an inbound hook (Standard Webhooks signature, no API key)",
    responses={
        400: {"description": "Body not JSON, or it does not fit the mapping (`param` = path in the body)"},
        401: {
            "description": "missing_signature_headers, signature_timestamp_out_of_window, invalid_signature"
        },
        404: {"description": "No such hook"},
        413: {"description": "Body or resulting event too large"},
    },
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    },
)
async def deliver_to_hook(
    hook_id: str,
    request: Request,
    webhook_id: str | None = Header(None, description="Message id; the same on every retry (dedup key)"),
    webhook_timestamp: str | None = Header(None, description="Unix seconds; within 5 minutes of now"),
    webhook_signature: str | None = Header(
        None, description="v1,<base64 HMAC-SHA256> (space-separated list)"
    ),
) -> Response:
    mayak = get_mayak(request)
    hooks = integrations(mayak).hooks
    hook = await hooks.find(hook_id)
    raw = await read_limited(
        request.stream(), request.headers.get("content-encoding"), mayak.settings.max_request_bytes
    )
    return json_response(await hooks.receive(hook, request.headers, raw))


# -- admin: integration secrets ----------------------------------------------------------------


@router.put(
    "/v1/secrets/{name}", response_model=Secret, tags=["secrets"], summary="Set an integration secret"
)
async def put_secret(
    name: str, body: SecretPut, request: Request, key: ApiKey = Depends(require_secret)
) -> dict[str, Any]:
    return await integrations(get_mayak(request)).secrets.put(key.workspace_id, name, body.value)


@router.get("/v1/secrets", response_model=SecretList, tags=["secrets"], summary="List integration secrets")
async def list_secrets(request: Request, key: ApiKey = Depends(require_secret)) -> dict[str, Any]:
    items = await integrations(get_mayak(request)).secrets.list(key.workspace_id)
    return {"items": items, "next_cursor": None}


@router.delete(
    "/v1/secrets/{name}",
    response_model=SecretDeleted,
    tags=["secrets"],
    summary="Delete an integration secret",
)
async def delete_secret(name: str, request: Request, key: ApiKey = Depends(require_secret)) -> dict[str, Any]:
    return await integrations(get_mayak(request)).secrets.delete(key.workspace_id, name)
