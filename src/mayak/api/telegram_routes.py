"""Telegram: the Bot API webhook (inbound updates) and deep-link tokens (admin, secret key).

The webhook is authenticated by the secret token Mayak gave Telegram in ``setWebhook``, not by an
API key: Telegram sends it back in ``X-Telegram-Bot-Api-Secret-Token`` with every update.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Body, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mayak.api.auth import get_mayak, require_secret
from mayak.api.errors import json_response
from mayak.api.idempotent import create_once
from mayak.channels import link_tokens
from mayak.channels.telegram import CHANNEL_TYPE, SECRET_HEADER, receive_update
from mayak.errors import AuthenticationError, NotFound
from mayak.idempotency import Answer
from mayak.ingest.body import read_limited
from mayak.timeutil import ms_to_rfc3339
from mayak.workspaces.service import ApiKey

router = APIRouter(tags=["telegram"])


@router.post(
    "/v1/telegram/{channel_id}/webhook",
    summary="Telegram Bot API webhook (called by Telegram, authenticated by the secret token)",
    responses={
        200: {"description": "Recorded, a duplicate, or ignored; may name a Bot API method to perform"},
        400: {"description": "invalid_update: the body is not a Bot API Update (param: JSON path)"},
        401: {"description": "invalid_secret_token: X-Telegram-Bot-Api-Secret-Token missing or wrong"},
        404: {"description": "not_found: no Telegram channel with this id"},
    },
)
async def telegram_webhook(channel_id: str, request: Request) -> Response:
    mayak = get_mayak(request)
    if len(channel_id) > 40:
        raise NotFound("channel", "$.channel_id")
    channel = await mayak.channels.record(None, channel_id)
    if channel.type != CHANNEL_TYPE:
        raise NotFound("channel", "$.channel_id")
    presented = request.headers.get(SECRET_HEADER)
    expected = str(channel.secrets.get("webhook_secret") or "")
    if not presented or not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise AuthenticationError(
            "invalid_secret_token",
            f"{SECRET_HEADER} is missing or does not match the channel's webhook secret",
        )
    if channel.status != "active":
        return json_response({"ok": True, "ignored": "the channel is disabled"})
    raw = await read_limited(
        request.stream(), request.headers.get("content-encoding"), mayak.settings.max_request_bytes
    )
    return json_response(await receive_update(mayak, channel, raw))


class LinkTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_seconds: int = Field(
        default=link_tokens.DEFAULT_TTL_S,
        ge=link_tokens.MIN_TTL_S,
        le=link_tokens.MAX_TTL_S,
        description="How long the token can be used (60 s to 30 days; default 24 h)",
    )


class ChannelLink(BaseModel):
    channel_id: str
    type: str
    url: str


class LinkTokenCreated(BaseModel):
    object: str = "link_token"
    token: str = Field(description="Shown only in this answer; works once")
    customer_id: str
    expires_at: str = Field(description="RFC 3339")
    links: dict[str, str] = Field(
        description="Per channel type, a deep link for the first active channel of that type"
    )
    channel_links: list[ChannelLink] = Field(description="A deep link for every active channel")


@router.post(
    "/v1/customers/{customer_id}/link_tokens",
    status_code=201,
    response_model=LinkTokenCreated,
    tags=["telegram"],
    summary="A one-time deep-link token that links a messenger chat to this customer",
)
async def create_link_token(
    customer_id: str,
    request: Request,
    body: LinkTokenCreate | None = Body(default=None),
    key: ApiKey = Depends(require_secret),
    idempotency_key: str | None = Header(None, description="Retries with the same key get the first answer"),
) -> Response:
    mayak = get_mayak(request)
    ttl = (body or LinkTokenCreate()).ttl_seconds

    async def create() -> Answer:
        customer = await mayak.customers.get(key.workspace_id, customer_id)  # a merged id: its survivor
        issued = await link_tokens.create_link_token(mayak.db, key.workspace_id, customer["id"], ttl_s=ttl)
        found: list[dict[str, Any]] = []
        for channel in await mayak.channels.list(key.workspace_id):
            username = channel["config"].get("bot_username")
            if channel["type"] == CHANNEL_TYPE and channel["status"] == "active" and username:
                url = f"https://t.me/{username}?start={issued.token}"
                found.append({"channel_id": channel["id"], "type": CHANNEL_TYPE, "url": url})
        links: dict[str, str] = {}
        for link in found:
            links.setdefault(link["type"], link["url"])
        return Answer(
            201,
            {
                "object": "link_token",
                "token": issued.token,
                "customer_id": issued.customer_id,
                "expires_at": ms_to_rfc3339(issued.expires_at),
                "links": links,
                "channel_links": found,
            },
        )

    return await create_once(request, key, idempotency_key, create)
