"""Admin API for event destinations and their delivery log (secret key required).

The service does the validation that needs knowledge (URL schemes, limits, ownership); the
pydantic models here give OpenAPI its schemas and turn obviously wrong shapes away early.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mayak.api.auth import get_mayak, require_secret
from mayak.api.idempotent import create_once
from mayak.idempotency import Answer
from mayak.workspaces.service import ApiKey

router = APIRouter(tags=["destinations"])


class DestinationCreate(BaseModel):
    """A new destination. Empty filter lists mean "every event"."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["CRM sync"])
    url: str = Field(min_length=1, max_length=2000, examples=["https://crm.example.com/hooks/mayak"])
    event_types: list[str] = Field(
        default_factory=list,
        description="Event types to send (identify, track, page, screen, group, alias, timer, …); [] = all.",
    )
    event_names: list[str] = Field(
        default_factory=list, description="Event names to send (e.g. 'Order Completed'); [] = all."
    )


class Destination(BaseModel):
    id: str
    name: str
    url: str
    event_types: list[str]
    event_names: list[str]
    enabled: bool
    created_at: str = Field(description="RFC 3339")


class DestinationCreated(Destination):
    signing_secret: str = Field(
        description="Standard Webhooks secret (whsec_…) to verify deliveries; shown only in this answer."
    )


class DestinationList(BaseModel):
    items: list[Destination]
    next_cursor: str | None = None


class Deleted(BaseModel):
    id: str
    deleted: bool


class Delivery(BaseModel):
    id: str = Field(description="Also the webhook-id header of every attempt")
    destination_id: str | None
    status: str = Field(description="pending | in_flight | sent | failed | dead")
    attempts: int
    next_attempt_at: str | None
    last_error: str | None
    created_at: str
    updated_at: str
    event: dict[str, Any] | None


class DeliveryList(BaseModel):
    items: list[Delivery]
    next_cursor: str | None = None


class Attempt(BaseModel):
    id: str
    delivery_id: str
    attempt: int
    at: str
    status_code: int | None
    error: str | None
    duration_ms: int


class AttemptList(BaseModel):
    items: list[Attempt]
    next_cursor: str | None = None


@router.post("/v1/destinations", status_code=201, response_model=DestinationCreated)
async def create_destination(
    body: DestinationCreate,
    request: Request,
    key: ApiKey = Depends(require_secret),
    idempotency_key: str | None = Header(
        None, description="Retries with the same key get the first answer again (kept 24 h)"
    ),
) -> Response:
    mayak = get_mayak(request)

    async def create() -> Answer:
        created = await mayak.destinations.create(
            key.workspace_id,
            name=body.name,
            url=body.url,
            event_types=body.event_types,
            event_names=body.event_names,
        )
        return Answer(201, created)

    return await create_once(request, key, idempotency_key, create)


@router.get("/v1/destinations", response_model=DestinationList)
async def list_destinations(request: Request, key: ApiKey = Depends(require_secret)) -> dict[str, Any]:
    items = await get_mayak(request).destinations.list(key.workspace_id)
    return {"items": items, "next_cursor": None}


@router.get("/v1/destinations/{destination_id}", response_model=Destination)
async def get_destination(
    destination_id: str, request: Request, key: ApiKey = Depends(require_secret)
) -> dict[str, Any]:
    return await get_mayak(request).destinations.get(key.workspace_id, destination_id)


@router.delete("/v1/destinations/{destination_id}", response_model=Deleted)
async def delete_destination(
    destination_id: str, request: Request, key: ApiKey = Depends(require_secret)
) -> dict[str, Any]:
    return await get_mayak(request).destinations.delete(key.workspace_id, destination_id)


@router.get("/v1/destinations/{destination_id}/deliveries", response_model=DeliveryList)
async def list_deliveries(
    destination_id: str,
    request: Request,
    cursor: str | None = Query(default=None, description="next_cursor of the previous page"),
    limit: int = Query(default=50, description="1-200"),
    status: str | None = Query(default=None, description="pending | in_flight | sent | failed | dead"),
    key: ApiKey = Depends(require_secret),
) -> dict[str, Any]:
    return await get_mayak(request).destinations.list_deliveries(
        key.workspace_id, destination_id, cursor=cursor, limit=limit, status=status
    )


@router.get("/v1/deliveries/{delivery_id}/attempts", response_model=AttemptList)
async def list_attempts(
    delivery_id: str, request: Request, key: ApiKey = Depends(require_secret)
) -> dict[str, Any]:
    items = await get_mayak(request).destinations.list_attempts(key.workspace_id, delivery_id)
    return {"items": items, "next_cursor": None}
