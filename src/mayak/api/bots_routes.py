"""Admin API for bots and conversations (secret key required).

Publishing takes the bot's files as text (``{"files": {"bot.yaml": "…", "flows/book.yaml": "…"}}``)
so an invalid bot is answered with every problem as file, line and reason, exactly as
``mayak bot validate`` prints them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from mayak.api.auth import get_mayak, require_secret
from mayak.workspaces.service import ApiKey

router = APIRouter(tags=["bots"])


class BotFiles(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: dict[str, str] = Field(
        description="File name → YAML text; the same files as in the bot's folder", min_length=1
    )


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=4096)
    buttons: list[dict[str, Any]] = Field(default_factory=list, description="[{title, payload | url}]")


class HandBack(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flow: str | None = Field(default=None, description="Start this flow of the bot's current version")


class TakeOver(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue: str | None = None
    reason: str | None = Field(default=None, max_length=500)


@router.post("/v1/bots", status_code=201, summary="Publish a bot (a new immutable version)")
async def publish_bot(body: BotFiles, request: Request, key: ApiKey = Depends(require_secret)) -> Any:
    return await get_mayak(request).bots.publish_files(key.workspace_id, body.files)


@router.get("/v1/bots")
async def list_bots(request: Request, key: ApiKey = Depends(require_secret)) -> Any:
    return {"items": await get_mayak(request).bots.list(key.workspace_id), "next_cursor": None}


@router.get("/v1/bots/{bot_id}")
async def get_bot(bot_id: str, request: Request, key: ApiKey = Depends(require_secret)) -> Any:
    return await get_mayak(request).bots.get(key.workspace_id, bot_id)


@router.post("/v1/bots/{bot_id}/versions/{version}/retire", summary="Retire an old version")
async def retire_version(
    bot_id: str, version: int, request: Request, key: ApiKey = Depends(require_secret)
) -> Any:
    return await get_mayak(request).bots.retire(key.workspace_id, bot_id, version)


@router.get(
    "/v1/conversations", tags=["conversations"], summary="Conversations, e.g. those waiting for a person"
)
async def list_conversations(
    request: Request,
    status: str | None = Query(None, description="bot | waiting_human | human"),
    queue: str | None = None,
    customer_id: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    key: ApiKey = Depends(require_secret),
) -> Any:
    return await get_mayak(request).conversations.list(
        key.workspace_id, status=status, queue=queue, customer_id=customer_id, cursor=cursor, limit=limit
    )


@router.get("/v1/conversations/{conversation_id}", tags=["conversations"])
async def get_conversation(
    conversation_id: str, request: Request, key: ApiKey = Depends(require_secret)
) -> Any:
    return await get_mayak(request).conversations.get(key.workspace_id, conversation_id)


@router.post(
    "/v1/conversations/{conversation_id}/messages",
    tags=["conversations"],
    summary="An operator's reply, delivered on the customer's channel",
)
async def operator_reply(
    conversation_id: str, body: Reply, request: Request, key: ApiKey = Depends(require_secret)
) -> Any:
    return await get_mayak(request).conversations.reply(
        key.workspace_id, conversation_id, text=body.text, buttons=body.buttons, actor=key.id
    )


@router.post(
    "/v1/conversations/{conversation_id}/handback", tags=["conversations"], summary="Give it back to the bot"
)
async def hand_back(
    conversation_id: str, body: HandBack, request: Request, key: ApiKey = Depends(require_secret)
) -> Any:
    return await get_mayak(request).conversations.hand_back(
        key.workspace_id, conversation_id, flow=body.flow, actor=key.id
    )


@router.post(
    "/v1/conversations/{conversation_id}/handoff", tags=["conversations"], summary="A person takes over"
)
async def take_over(
    conversation_id: str, body: TakeOver, request: Request, key: ApiKey = Depends(require_secret)
) -> Any:
    return await get_mayak(request).conversations.take_over(
        key.workspace_id, conversation_id, queue=body.queue, reason=body.reason, actor=key.id
    )
