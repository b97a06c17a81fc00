"""One-time tokens that link a channel address to a customer Mayak already knows.

A business hands a known customer (logged in on its website, say) a deep link such as
``https://t.me/<bot>?start=<token>``; when the customer opens it, Telegram sends ``/start <token>``
from their chat, and the channel appends ``identity.linked`` for that chat. Only a SHA-256 hash of
the token is stored (the token itself is shown once, in the answer that created it); a token links
once, until it expires.

Tokens are 192 random bits in URL-safe base64 (32 characters), inside what a Telegram start
parameter allows (``A-Z a-z 0-9 _ -``, at most 64 characters). A fast hash is enough: the token is
a random secret, not a password, so there is nothing to brute-force offline.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database
from mayak.db.schema import link_tokens
from mayak.timeutil import now_ms

DEFAULT_TTL_S = 86_400
MIN_TTL_S = 60
MAX_TTL_S = 30 * 86_400
TOKEN_BYTES = 24
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


@dataclass(frozen=True, slots=True)
class LinkToken:
    """A freshly created token: ``token`` is shown once and never stored."""

    token: str
    customer_id: str
    expires_at: int  # epoch milliseconds


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(value: str) -> bool:
    return bool(TOKEN_RE.match(value))


async def create_link_token(
    db: Database, ws_id: str, customer_id: str, *, ttl_s: int = DEFAULT_TTL_S, now: int | None = None
) -> LinkToken:
    """Store a new token for ``customer_id`` (the caller checks that the customer exists).

    The customer's expired tokens are removed on the way, so the table holds only live and
    recently used ones.
    """
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    at = now_ms() if now is None else now
    token = secrets.token_urlsafe(TOKEN_BYTES)
    expires_at = at + ttl_s * 1000
    c = link_tokens.c
    async with db.write() as conn:
        await conn.execute(
            link_tokens.delete().where(
                c.workspace_id == ws_id, c.customer_id == customer_id, c.expires_at < at
            )
        )
        await conn.execute(
            link_tokens.insert().values(
                hash=token_hash(token),
                workspace_id=ws_id,
                customer_id=customer_id,
                expires_at=expires_at,
                used_at=None,
                created_at=at,
            )
        )
    return LinkToken(token, customer_id, expires_at)


async def is_known(db: Database, ws_id: str, token: str) -> bool:
    """Whether ``token`` was ever issued in this workspace (used, expired or not): a cheap read that
    keeps ordinary ``/start <campaign>`` parameters off the write path."""
    if not looks_like_token(token):
        return False
    c = link_tokens.c
    async with db.read() as conn:
        row = (
            await conn.execute(sa.select(c.hash).where(c.hash == token_hash(token), c.workspace_id == ws_id))
        ).first()
    return row is not None


async def consume(conn: AsyncConnection, ws_id: str, token: str, *, now: int | None = None) -> str | None:
    """Mark ``token`` used, inside the caller's write transaction; returns the customer it links to.

    None for an unknown, expired or already used token. The conditional UPDATE is the claim: of two
    concurrent uses exactly one matches ``used_at IS NULL``, and when the caller's transaction rolls
    back (the event append failed) the token is unused again, so a retried update can still link.
    """
    if not looks_like_token(token):
        return None
    at = now_ms() if now is None else now
    c = link_tokens.c
    result = await conn.execute(
        link_tokens.update()
        .where(
            c.hash == token_hash(token),
            c.workspace_id == ws_id,
            c.used_at.is_(None),
            c.expires_at > at,
        )
        .values(used_at=at)
        .returning(c.customer_id)
    )
    row = result.first()
    return None if row is None else str(row[0])
