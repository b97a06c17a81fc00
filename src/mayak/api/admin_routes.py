"""The admin API (secret key): customers, their events, changes, GDPR export and erase, workspace settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from mayak.api.auth import get_mayak, require_secret
from mayak.api.errors import json_response
from mayak.workspaces.service import ApiKey

router = APIRouter(tags=["customers"])


class TraitsBody(BaseModel):
    traits: dict[str, Any] = Field(
        description="Traits to set; `consents` and `preferences` are reserved keys"
    )


class ConsentsBody(BaseModel):
    consents: dict[str, dict[str, bool]] = Field(
        description="channel -> purpose (marketing | service | transactional) -> granted"
    )


class PreferencesBody(BaseModel):
    preferences: dict[str, Any] = Field(
        description="preferred_channel, language, timezone, quiet_hours {start, end} (HH:MM)"
    )


class StageBody(BaseModel):
    stage: str = Field(description="One of the workspace's journey stages")


class SettingsBody(BaseModel):
    default_region: str | None = None
    journey_stages: list[str] | None = None
    allowed_origins: list[str] | None = None


@router.get("/v1/customers", summary="List customers (cursor pagination, fixed filters)")
async def list_customers(
    request: Request,
    trait: str | None = Query(None, description="NAME:VALUE, trait equals value (compared as text)"),
    stage: str | None = None,
    seen_since: str | None = Query(None, description="RFC 3339; last seen at or after"),
    identity_kind: str | None = Query(None, description="has an identity of this kind"),
    identity: str | None = Query(None, description="KIND:VALUE; answers the one customer with this identity"),
    cursor: str | None = None,
    limit: int = 50,
    key: ApiKey = Depends(require_secret),
) -> Response:
    customers = get_mayak(request).customers
    if identity is not None:
        return json_response(await customers.find_by_identity(key.workspace_id, identity))
    page = await customers.list(
        key.workspace_id,
        trait=trait,
        stage=stage,
        seen_since=seen_since,
        identity_kind=identity_kind,
        cursor=cursor,
        limit=limit,
    )
    return json_response(page)


@router.get(
    "/v1/customers/{customer_id}", summary="One customer (a merged-away id answers with its survivor)"
)
async def get_customer(customer_id: str, request: Request, key: ApiKey = Depends(require_secret)) -> Response:
    return json_response(await get_mayak(request).customers.get(key.workspace_id, customer_id))


@router.get("/v1/customers/{customer_id}/events", summary="A customer's events, newest first")
async def customer_events(
    customer_id: str,
    request: Request,
    type: str | None = None,
    name: str | None = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    key: ApiKey = Depends(require_secret),
) -> Response:
    page = await get_mayak(request).customers.list_events(
        key.workspace_id,
        customer_id,
        type=type,
        name=name,
        since=since,
        until=until,
        cursor=cursor,
        limit=limit,
    )
    return json_response(page)


@router.patch("/v1/customers/{customer_id}/traits", summary="Set traits (recorded as an event)")
async def set_traits(
    customer_id: str, body: TraitsBody, request: Request, key: ApiKey = Depends(require_secret)
) -> Response:
    return json_response(
        await get_mayak(request).customers.set_traits(key.workspace_id, customer_id, body.traits, key.id)
    )


@router.patch("/v1/customers/{customer_id}/consents", summary="Grant or withdraw consents")
async def set_consents(
    customer_id: str, body: ConsentsBody, request: Request, key: ApiKey = Depends(require_secret)
) -> Response:
    return json_response(
        await get_mayak(request).customers.set_consents(key.workspace_id, customer_id, body.consents, key.id)
    )


@router.patch("/v1/customers/{customer_id}/preferences", summary="Set preferences")
async def set_preferences(
    customer_id: str, body: PreferencesBody, request: Request, key: ApiKey = Depends(require_secret)
) -> Response:
    return json_response(
        await get_mayak(request).customers.set_preferences(
            key.workspace_id, customer_id, body.preferences, key.id
        )
    )


@router.put("/v1/customers/{customer_id}/stage", summary="Set the journey stage")
async def set_stage(
    customer_id: str, body: StageBody, request: Request, key: ApiKey = Depends(require_secret)
) -> Response:
    return json_response(
        await get_mayak(request).customers.set_stage(key.workspace_id, customer_id, body.stage, key.id)
    )


@router.get("/v1/customers/{customer_id}/export", summary="GDPR export: everything held on the person")
async def export_customer(
    customer_id: str, request: Request, key: ApiKey = Depends(require_secret)
) -> Response:
    return json_response(await get_mayak(request).customers.export(key.workspace_id, customer_id))


@router.delete("/v1/customers/{customer_id}", summary="GDPR erase; later events for the person are dropped")
async def erase_customer(
    customer_id: str, request: Request, key: ApiKey = Depends(require_secret)
) -> Response:
    return json_response(await get_mayak(request).customers.erase(key.workspace_id, customer_id, key.id))


@router.get("/v1/workspace", tags=["workspace"], summary="The workspace of the presented key")
async def get_workspace(request: Request, key: ApiKey = Depends(require_secret)) -> Response:
    mayak = get_mayak(request)
    ws = await mayak.workspaces.get_workspace(key.workspace_id)
    keys = await mayak.workspaces.list_keys(key.workspace_id)
    return json_response({"id": ws["id"], "name": ws["name"], "settings": ws["settings"], "keys": keys})


@router.patch("/v1/workspace/settings", tags=["workspace"], summary="Change workspace settings")
async def update_settings(
    body: SettingsBody, request: Request, key: ApiKey = Depends(require_secret)
) -> Response:
    mayak = get_mayak(request)
    changes = body.model_dump(exclude_none=True)
    settings = await mayak.workspaces.update_settings(key.workspace_id, changes)
    return json_response({"settings": settings})
