"""Event destinations: business systems that receive a workspace's events as signed webhooks.

Why through the outbox: the pipeline routes each processed batch here inside its own write
transaction, so a delivery row exists if and only if the event was processed; its idempotency key
``{event_id}:{destination_id}`` makes reprocessing after a crash add nothing. Delivery is at least
once, signed per Standard Webhooks, with ``webhook-id`` = the outbox row id on every retry so the
receiver can deduplicate.
"""

from __future__ import annotations

import email.utils
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak import __version__ as _mayak_version
from mayak.config import Settings
from mayak.db.database import Database
from mayak.db.schema import destinations, outbox, outbox_attempts, signing_secrets
from mayak.delivery import webhooks
from mayak.delivery.http_client import OwnsHttpClient
from mayak.delivery.outbox import STATUSES, DeliveryOutcome, OutboxItem, OutboxRow, enqueue
from mayak.errors import InvalidRequest, NotFound
from mayak.eventlog import LoggedEvent, event_json
from mayak.ids import new_id
from mayak.timeutil import ms_to_rfc3339, now_ms
from mayak.workspaces.service import WorkspaceService

WEBHOOK_KIND = "webhook"
SECRET_PURPOSE = "destination"
SEGMENT_TYPES = ("identify", "track", "page", "screen", "group", "alias")
MAX_DESTINATIONS = 100
MAX_TYPES = 50
MAX_NAMES = 500
MAX_PAGE = 200
CACHE_TTL_S = 5.0  # other processes' creates and deletes become visible to routing within this
CACHE_WORKSPACES = 4096
RESPONSE_SNIPPET = 300


@dataclass(frozen=True, slots=True)
class _Route:
    """A destination as the router needs it: who, and which events."""

    id: str
    types: frozenset[str]
    names: frozenset[str]

    def matches(self, event: LoggedEvent) -> bool:
        if self.types and event.type not in self.types:
            return False
        return not self.names or (event.name is not None and event.name in self.names)


# Module-level aliases: inside the class, ``list`` names the method, not the builtin.
Records = list[dict[str, Any]]
RouteList = list[_Route]


class DestinationService(OwnsHttpClient):
    """CRUD for destinations, routing of processed events into the outbox, and webhook delivery."""

    def __init__(
        self,
        db: Database,
        workspaces: WorkspaceService,
        settings: Settings,
        *,
        client: httpx.AsyncClient | None = None,
    ):
        self.db = db
        self.workspaces = workspaces
        self.settings = settings
        self._client = client
        self._owns_client = client is None
        self.client_timeout = settings.webhook_timeout_s
        self._routes: OrderedDict[str, tuple[float, list[_Route]]] = OrderedDict()
        self._secrets: dict[str, str] = {}

    # -- administration ------------------------------------------------------------------------

    async def create(
        self,
        ws_id: str,
        *,
        name: str,
        url: str,
        event_types: list[str] | None = None,
        event_names: list[str] | None = None,
    ) -> dict[str, Any]:
        """Create a destination; the answer carries ``signing_secret``, which is never shown again."""
        clean_name = _validate_name(name)
        clean_url = _validate_url(url)
        types = _validate_strings(event_types, "event_types", MAX_TYPES, 40)
        names = _validate_strings(event_names, "event_names", MAX_NAMES, 200)
        secret = webhooks.new_webhook_secret()
        dest_id = new_id("dst")
        now = now_ms()
        async with self.db.write() as conn:
            count = (
                await conn.execute(sa.select(sa.func.count()).where(destinations.c.workspace_id == ws_id))
            ).scalar_one()
            if count >= MAX_DESTINATIONS:
                raise InvalidRequest(
                    "too_many_destinations",
                    f"a workspace can have at most {MAX_DESTINATIONS} destinations; delete one first",
                )
            secret_id = await self.workspaces.store_secret(conn, ws_id, SECRET_PURPOSE, secret)
            values = {
                "id": dest_id,
                "workspace_id": ws_id,
                "name": clean_name,
                "url": clean_url,
                "event_types": types,
                "event_names": names,
                "secret_id": secret_id,
                "enabled": True,
                "created_at": now,
            }
            await conn.execute(destinations.insert().values(**values))
        self._invalidate(ws_id)
        self._secrets[secret_id] = secret
        return _public(values) | {"signing_secret": secret}

    async def list(self, ws_id: str) -> Records:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(destinations)
                .where(destinations.c.workspace_id == ws_id)
                .order_by(destinations.c.id)
            )
            return [_public(r._mapping) for r in rows]

    async def get(self, ws_id: str, dest_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            return _public(await _owned_destination(conn, ws_id, dest_id))

    async def delete(self, ws_id: str, dest_id: str) -> dict[str, Any]:
        """Delete a destination and its secret; its undelivered rows are dead-lettered on their next try."""
        async with self.db.write() as conn:
            row = await _owned_destination(conn, ws_id, dest_id)
            await conn.execute(destinations.delete().where(destinations.c.id == dest_id))
            await conn.execute(signing_secrets.delete().where(signing_secrets.c.id == row["secret_id"]))
        self._invalidate(ws_id)
        self._secrets.pop(row["secret_id"], None)
        return {"id": dest_id, "deleted": True}

    async def list_deliveries(
        self,
        ws_id: str,
        dest_id: str,
        *,
        cursor: str | None = None,
        limit: int = 50,
        status: str | None = None,
    ) -> dict[str, Any]:
        """Outbox rows for one destination, newest first; ``cursor`` is the last id of the previous page."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest("invalid_limit", f"limit must be between 1 and {MAX_PAGE}", "$.limit")
        if status is not None and status not in STATUSES:
            raise InvalidRequest("invalid_status", f"status must be one of {', '.join(STATUSES)}", "$.status")
        if cursor is not None and (not cursor.startswith("obx_") or len(cursor) > 40):
            raise InvalidRequest("invalid_cursor", "cursor is not one this API returned", "$.cursor")
        c = outbox.c
        query = sa.select(outbox).where(c.workspace_id == ws_id, c.target == dest_id, c.kind == WEBHOOK_KIND)
        if status is not None:
            query = query.where(c.status == status)
        if cursor is not None:
            query = query.where(c.id < cursor)
        query = query.order_by(c.id.desc()).limit(limit + 1)
        async with self.db.read() as conn:
            await _owned_destination(conn, ws_id, dest_id)
            rows = list((await conn.execute(query)).mappings())
        page = rows[:limit]
        return {
            "items": [_delivery(r) for r in page],
            "next_cursor": page[-1]["id"] if len(rows) > limit else None,
        }

    async def list_attempts(self, ws_id: str, delivery_id: str) -> Records:
        """Every attempt at one delivery, oldest first (at most ``outbox_max_attempts`` of them)."""
        a = outbox_attempts.c
        async with self.db.read() as conn:
            owner = (
                await conn.execute(
                    sa.select(outbox.c.id).where(outbox.c.id == delivery_id, outbox.c.workspace_id == ws_id)
                )
            ).first()
            if owner is None:
                raise NotFound("delivery")
            rows = await conn.execute(
                sa.select(outbox_attempts).where(a.outbox_id == delivery_id).order_by(a.attempt, a.at, a.id)
            )
            return [
                {
                    "id": r.id,
                    "delivery_id": r.outbox_id,
                    "attempt": r.attempt,
                    "at": ms_to_rfc3339(r.at),
                    "status_code": r.status_code,
                    "error": r.error,
                    "duration_ms": r.duration_ms,
                }
                for r in rows
            ]

    # -- routing (inside the pipeline's transaction) -------------------------------------------

    async def route(self, conn: AsyncConnection, workspace_id: str, events: Sequence[LoggedEvent]) -> int:
        """Enqueue one webhook per (event, matching destination); returns how many rows were new."""
        if not events:
            return 0
        routes = await self._routes_for(conn, workspace_id)
        if not routes:
            return 0
        items: list[OutboxItem] = []
        for event in events:
            if event.workspace_id != workspace_id:
                continue
            body: dict[str, Any] | None = None
            for dest in routes:
                if not dest.matches(event):
                    continue
                body = body or event_json(event, event.payload)
                items.append(
                    OutboxItem(
                        workspace_id=workspace_id,
                        kind=WEBHOOK_KIND,
                        payload={"destination_id": dest.id, "event": body},
                        idempotency_key=f"{event.id}:{dest.id}",
                        customer_id=event.customer_id,
                        target=dest.id,
                    )
                )
        return await enqueue(self.db, conn, items) if items else 0

    async def _routes_for(self, conn: AsyncConnection, ws_id: str) -> RouteList:
        cached = self._routes.get(ws_id)
        if cached is not None and cached[0] > time.monotonic():
            self._routes.move_to_end(ws_id)
            return cached[1]
        d = destinations.c
        rows = await conn.execute(
            sa.select(d.id, d.event_types, d.event_names)
            .where(d.workspace_id == ws_id, d.enabled.is_(True))
            .order_by(d.id)
        )
        routes = [_Route(r.id, frozenset(r.event_types or ()), frozenset(r.event_names or ())) for r in rows]
        self._routes[ws_id] = (time.monotonic() + CACHE_TTL_S, routes)
        self._routes.move_to_end(ws_id)
        while len(self._routes) > CACHE_WORKSPACES:
            self._routes.popitem(last=False)
        return routes

    def _invalidate(self, ws_id: str) -> None:
        self._routes.pop(ws_id, None)

    # -- delivery (the outbox handler for kind "webhook") --------------------------------------

    async def deliver(self, row: OutboxRow) -> DeliveryOutcome:
        """POST one signed webhook; 2xx is success, 410 Gone and a deleted destination are final."""
        async with self.db.read() as conn:
            dest = (
                await conn.execute(
                    sa.select(destinations.c.url, destinations.c.secret_id, destinations.c.enabled).where(
                        destinations.c.id == row.target, destinations.c.workspace_id == row.workspace_id
                    )
                )
            ).first()
        if dest is None:
            return DeliveryOutcome(False, None, "destination_deleted", retryable=False)
        if not dest.enabled:
            return DeliveryOutcome(False, None, "destination_disabled", retryable=False)
        secret = await self._secret(dest.secret_id)
        event = row.payload.get("event") or {}
        body = orjson.dumps(
            {
                "type": f"event.{event.get('type', 'unknown')}",
                "timestamp": event.get("timestamp"),
                "destination_id": row.target,
                "data": event,
            }
        )
        headers = webhooks.headers(secret, row.id, body)
        headers["content-type"] = "application/json"
        headers["user-agent"] = f"Mayak-Webhooks/{_mayak_version}"
        try:
            async with self.client.stream(
                "POST", dest.url, content=body, headers=headers, timeout=self.settings.webhook_timeout_s
            ) as resp:
                code = resp.status_code
                if 200 <= code < 300:
                    return DeliveryOutcome(True, code)
                snippet = await _snippet(resp)
                wait_ms = retry_after_ms(resp.headers.get("retry-after")) if code in (429, 503) else None
        except httpx.TimeoutException:
            return DeliveryOutcome(False, None, f"timeout after {self.settings.webhook_timeout_s:g} s")
        except httpx.HTTPError as exc:
            return DeliveryOutcome(False, None, f"{type(exc).__name__}: {exc}"[:500])
        error = f"HTTP {code}" + (f": {snippet}" if snippet else "")
        if 300 <= code < 400:
            error += " (redirects are not followed)"
        return DeliveryOutcome(False, code, error, retryable=code != 410, retry_after_ms=wait_ms)

    async def _secret(self, secret_id: str) -> str:
        secret = self._secrets.get(secret_id)
        if secret is None:
            secret = await self.workspaces.read_secret(secret_id)
            if len(self._secrets) >= 10_000:
                self._secrets.clear()
            self._secrets[secret_id] = secret
        return secret


# -- helpers -----------------------------------------------------------------------------------


async def _owned_destination(conn: AsyncConnection, ws_id: str, dest_id: str) -> Any:
    row = (
        await conn.execute(
            sa.select(destinations).where(destinations.c.id == dest_id, destinations.c.workspace_id == ws_id)
        )
    ).first()
    if row is None:
        raise NotFound("destination")
    return row._mapping


def _public(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "url": row["url"],
        "event_types": list(row["event_types"] or []),
        "event_names": list(row["event_names"] or []),
        "enabled": bool(row["enabled"]),
        "created_at": ms_to_rfc3339(row["created_at"]),
    }


def _delivery(row: Any) -> dict[str, Any]:
    payload = orjson.loads(row["payload"])
    waiting = row["status"] in ("pending", "failed")
    return {
        "id": row["id"],
        "destination_id": row["target"],
        "status": row["status"],
        "attempts": row["attempts"],
        "next_attempt_at": ms_to_rfc3339(row["next_attempt_at"]) if waiting else None,
        "last_error": row["last_error"],
        "created_at": ms_to_rfc3339(row["created_at"]),
        "updated_at": ms_to_rfc3339(row["updated_at"]),
        "event": payload.get("event") if isinstance(payload, dict) else None,
    }


async def _snippet(resp: httpx.Response) -> str:
    """The start of an error response, for the attempt log; never reads a huge body."""
    data = b""
    async for chunk in resp.aiter_bytes():
        data += chunk
        if len(data) >= RESPONSE_SNIPPET:
            break
    return data[:RESPONSE_SNIPPET].decode("utf-8", "replace").strip()


def _validate_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 200:
        raise InvalidRequest("invalid_name", "name must be 1-200 characters", "$.name")
    return name.strip()


def _validate_url(url: Any) -> str:
    if not isinstance(url, str) or not url or len(url) > 2000:
        raise InvalidRequest(
            "invalid_url", "url must be an http or https URL of at most 2000 characters", "$.url"
        )
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InvalidRequest("invalid_url", "url is not a valid URL", "$.url") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidRequest("invalid_url", "url must be an absolute http or https URL", "$.url")
    return url


def _validate_strings(values: Any, field: str, max_items: int, max_len: int) -> list[str]:
    """A list of distinct, non-empty strings (order kept); ``None`` means the empty list (= all)."""
    if values is None:
        return []
    code = f"invalid_{field}"
    if not isinstance(values, list):
        raise InvalidRequest(code, f"{field} must be a list of strings", f"$.{field}")
    if len(values) > max_items:
        raise InvalidRequest(code, f"{field} may list at most {max_items} entries", f"$.{field}")
    out: list[str] = []
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value or len(value) > max_len:
            raise InvalidRequest(
                code, f"each entry must be a string of 1-{max_len} characters", f"$.{field}[{i}]"
            )
        if value not in out:
            out.append(value)
    return out


def retry_after_ms(value: str | None, now: float | None = None) -> int | None:
    """An HTTP ``Retry-After`` (RFC 9110: delay seconds or an HTTP date) in milliseconds from now;
    None when absent or unreadable (the outbox's own backoff applies)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP date is always GMT; anything else is not one
    current = time.time() if now is None else now
    return max(0, int((when.timestamp() - current) * 1000))
