"""Admin API for channels (secret key required): web chat, Telegram.

Channel-specific inbound routes (the Telegram webhook, the web-chat socket) live with their adapters.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mayak.api.auth import get_mayak, require_secret
from mayak.api.idempotent import create_once
from mayak.idempotency import Answer
from mayak.workspaces.service import ApiKey

router = APIRouter(tags=["channels"])


class ChannelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(examples=["telegram"], description="webchat | telegram")
    name: str = Field(min_length=1, max_length=200, examples=["Demo Motors bot"])
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Per type. telegram: {bot_token, api_base_url?}; webchat: {title?, greeting?}. "
        "Secret values are stored encrypted and never returned.",
    )
    bot_id: str | None = Field(default=None, description="The bot that answers on this channel")


class ChannelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bot_id: str | None = None
    status: str | None = Field(default=None, description="active | disabled")


class Channel(BaseModel):
    id: str
    type: str
    name: str
    bot_id: str | None
    config: dict[str, Any]
    status: str
    created_at: str


class ChannelList(BaseModel):
    items: list[Channel]
    next_cursor: str | None = None


class Deleted(BaseModel):
    id: str
    deleted: bool


@router.post("/v1/channels", status_code=201, response_model=Channel)
async def create_channel(
    body: ChannelCreate,
    request: Request,
    key: ApiKey = Depends(require_secret),
    idempotency_key: str | None = Header(None, description="Retries with the same key get the first answer"),
) -> Response:
    mayak = get_mayak(request)

    async def create() -> Answer:
        created = await mayak.channels.create(
            key.workspace_id, type=body.type, name=body.name, config=body.config, bot_id=body.bot_id
        )
        return Answer(201, created)

    return await create_once(request, key, idempotency_key, create)


@router.get("/v1/channels", response_model=ChannelList)
async def list_channels(request: Request, key: ApiKey = Depends(require_secret)) -> dict[str, Any]:
    return {"items": await get_mayak(request).channels.list(key.workspace_id), "next_cursor": None}


@router.get("/v1/channels/{channel_id}", response_model=Channel)
async def get_channel(channel_id: str, request: Request, key: ApiKey = Depends(require_secret)) -> Any:
    return await get_mayak(request).channels.get(key.workspace_id, channel_id)


@router.patch("/v1/channels/{channel_id}", response_model=Channel)
async def update_channel(
    channel_id: str, body: ChannelUpdate, request: Request, key: ApiKey = Depends(require_secret)
) -> Any:
    return await get_mayak(request).channels.update(
        key.workspace_id, channel_id, bot_id=body.bot_id, status=body.status
    )


@router.delete("/v1/channels/{channel_id}", response_model=Deleted)
async def delete_channel(channel_id: str, request: Request, key: ApiKey = Depends(require_secret)) -> Any:
    return await get_mayak(request).channels.delete(key.workspace_id, channel_id)
