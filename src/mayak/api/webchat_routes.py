"""Web chat: the visitor's socket, the widget script, a demo page, and user tokens (admin).

The socket protocol is in docs/webchat.md and ``mayak.channels.webchat``.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mayak.api.auth import get_mayak, require_secret
from mayak.api.idempotent import create_once
from mayak.channels import user_tokens
from mayak.channels.webchat import TYPE, adapter_of
from mayak.errors import InvalidRequest, NotFound
from mayak.idempotency import Answer
from mayak.platform import Mayak
from mayak.timeutil import ms_to_rfc3339
from mayak.workspaces.service import ApiKey

router = APIRouter(tags=["webchat"])

_KEY_RE = re.compile(r"^wk_[A-Za-z0-9_-]{1,100}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,4096}$")
DEFAULT_TTL_S = 3600
SCRIPT_CACHE = "public, max-age=300"
DEMO_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@lru_cache(maxsize=4)
def static_file(name: str) -> bytes:
    return (resources.files("mayak") / "static" / name).read_bytes()


@router.websocket("/v1/webchat/{channel_id}/ws")
async def webchat_socket(websocket: WebSocket, channel_id: str) -> None:
    mayak: Mayak = websocket.app.state.mayak
    await adapter_of(mayak).serve(websocket, channel_id)


def _script() -> Response:
    return Response(
        static_file("widget.js"),
        media_type="text/javascript; charset=utf-8",
        headers={"Cache-Control": SCRIPT_CACHE, "X-Content-Type-Options": "nosniff"},
    )


@router.get("/widget.js", summary="The web-chat widget script (embed with a <script> tag)")
async def widget_script() -> Response:
    return _script()


@router.get("/v1/webchat/widget.js", summary="The web-chat widget script (same as /widget.js)")
async def widget_script_v1() -> Response:
    return _script()


@router.get(
    "/v1/webchat/{channel_id}/demo",
    summary="A page with the widget for this channel: open it and chat with the bot",
    response_class=Response,
)
async def demo_page(
    channel_id: str,
    request: Request,
    key: str | None = Query(None, description="The workspace's write key (wk_…), public anyway"),
    user_token: str | None = Query(None, description="Optional signed user token to chat as a user"),
) -> Response:
    channel = await get_mayak(request).channels.record(None, channel_id)
    if channel.type != TYPE:
        raise NotFound("channel", "$.channel_id")
    if user_token is not None and not _TOKEN_RE.match(user_token):
        raise InvalidRequest("invalid_user_token", "user_token is not a JWT", "$.user_token")
    esc = html.escape
    if key is None or not _KEY_RE.match(key):
        body = (
            "<p>Add the workspace's write key to this page's address: "
            "<code>?key=wk_…</code> (the key is public: it is in every page that embeds the widget).</p>"
        )
        script = ""
    else:
        token_attr = f' data-user-token="{esc(user_token)}"' if user_token else ""
        body = "<p>The chat button is in the bottom right corner. Say hello to the bot.</p>"
        script = (
            f'<script src="/widget.js" data-channel="{esc(channel.id)}" data-key="{esc(key)}"'
            f'{token_attr} data-open="true" async></script>'
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(channel.name)} — Mayak web chat demo</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#222}}
code{{background:#f3f3f3;padding:.1em .3em;border-radius:3px}}</style></head>
<body><h1>{esc(channel.name)}</h1>{body}
<p>Embed it on your site with:</p>
<pre><code>&lt;script src="{esc(str(request.base_url))}widget.js" data-channel="{esc(channel.id)}"
        data-key="wk_…" async&gt;&lt;/script&gt;</code></pre>
{script}</body></html>
"""
    return Response(
        page,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": DEMO_CSP,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )


# -- user tokens (admin) -------------------------------------------------------------------------


class UserTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=300, description="The site's user id (Segment userId)")
    ttl_s: int = Field(
        DEFAULT_TTL_S, ge=60, le=user_tokens.MAX_TTL_S, description="Seconds the token is valid"
    )
    email: str | None = Field(None, max_length=254, description="Copied to the events' context.traits")
    name: str | None = Field(None, max_length=200, description="Copied to the events' context.traits")


class UserToken(BaseModel):
    token: str
    expires_at: str


class UserTokenSecret(BaseModel):
    secret: str = Field(description="The HMAC-SHA256 key for user tokens (the whole string, UTF-8)")
    algorithm: str = "HS256"


@router.post("/v1/webchat/user_tokens", status_code=201, response_model=UserToken)
async def create_user_token(
    body: UserTokenCreate,
    request: Request,
    key: ApiKey = Depends(require_secret),
    idempotency_key: str | None = Header(None, description="Retries with the same key get the first answer"),
) -> Response:
    """Mint a signed user token for a logged-in visitor (for backends that prefer not to sign
    tokens themselves); pass it to the widget as ``data-user-token``."""
    mayak = get_mayak(request)
    if body.user_id != body.user_id.strip():
        raise InvalidRequest("invalid_parameter", "user_id must not start or end with spaces", "$.user_id")

    async def create() -> Answer:
        token, expires = await adapter_of(mayak).mint_user_token(
            key.workspace_id, body.user_id, body.ttl_s, email=body.email, name=body.name
        )
        return Answer(201, {"token": token, "expires_at": ms_to_rfc3339(expires * 1000)})

    return await create_once(request, key, idempotency_key, create)


@router.get("/v1/webchat/user_token_secret", response_model=UserTokenSecret)
async def get_user_token_secret(request: Request, key: ApiKey = Depends(require_secret)) -> Any:
    """The secret a site's backend signs user tokens with (keep it server side)."""
    secret = await adapter_of(get_mayak(request)).user_token_secret(key.workspace_id)
    return {"secret": secret, "algorithm": user_tokens.ALGORITHM}


@router.post("/v1/webchat/user_token_secret/rotate", response_model=UserTokenSecret)
async def rotate_user_token_secret(request: Request, key: ApiKey = Depends(require_secret)) -> Any:
    """Replace the secret; tokens signed with the old one are refused from now on."""
    secret = await adapter_of(get_mayak(request)).rotate_user_token_secret(key.workspace_id)
    return {"secret": secret, "algorithm": user_tokens.ALGORITHM}
