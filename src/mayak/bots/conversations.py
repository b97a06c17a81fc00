"""Conversations for people: the queue waiting for an operator, replies, hand-back to the bot.

Every operator action is an event in the customer's log (``conversation.operator_message``,
``conversation.handed_back``, ``conversation.handoff_requested``, with the acting key as actor); the
bot router applies it in the pipeline like any other input, so the reply goes out through the
outbox on the customer's channel and the conversation's state changes in the same transaction.
Each call returns once the pipeline has applied its event.
"""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa

from mayak.bots.engine import STATUS_BOT, STATUS_HUMAN, STATUS_WAITING
from mayak.bots.store import BotStore
from mayak.channels.events import INBOUND_NAMES
from mayak.db.database import Database
from mayak.db.schema import conversations, events, key_of
from mayak.errors import Conflict, InvalidRequest, NotFound
from mayak.ingest.writer import IngestWriter
from mayak.pipeline.customers import apply_admin_event, check_limit, decode_cursor, encode_cursor
from mayak.pipeline.processor import Pipeline
from mayak.timeutil import ms_to_rfc3339

STATUSES = (STATUS_BOT, STATUS_WAITING, STATUS_HUMAN)
Buttons = list[dict[str, Any]]  # module level: inside the class, ``list`` names the method
MAX_REPLY = 4096
TRANSCRIPT = 50


class ConversationService:
    def __init__(self, db: Database, writer: IngestWriter, pipeline: Pipeline, store: BotStore):
        self.db = db
        self.writer = writer
        self.pipeline = pipeline
        self.store = store

    async def list(
        self,
        ws_id: str,
        *,
        status: str | None = None,
        queue: str | None = None,
        customer_id: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """Conversations; filtered by a status a person is involved in (waiting, human), the oldest
        handoff first across pages (a queue), otherwise the oldest conversation first."""
        limit = check_limit(limit)
        query = sa.select(conversations).where(conversations.c.workspace_id == ws_id)
        if status is not None:
            if status not in STATUSES:
                raise InvalidRequest("invalid_status", f"status is one of {', '.join(STATUSES)}", "$.status")
            query = query.where(conversations.c.status == status)
        if queue is not None:
            query = query.where(conversations.c.queue == queue)
        if customer_id is not None:
            query = query.where(conversations.c.customer_id == customer_id)
        by_handoff = status in (STATUS_WAITING, STATUS_HUMAN)
        # a conversation handed over has a handoff time; 0 keeps the order total if one has none
        handoff = sa.func.coalesce(conversations.c.handoff_at, 0)
        if cursor and by_handoff:
            after = decode_cursor(cursor, list)
            if len(after) != 2 or not isinstance(after[0], int) or not isinstance(after[1], str):
                raise InvalidRequest("invalid_cursor", "the cursor is not one this API returned", "$.cursor")
            query = query.where(sa.tuple_(handoff, conversations.c.id) > sa.tuple_(after[0], after[1]))
        elif cursor:
            query = query.where(conversations.c.id > decode_cursor(cursor, str))
        order = (handoff, conversations.c.id) if by_handoff else (conversations.c.id,)
        query = query.order_by(*order).limit(limit + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        items = [_view(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor([last.handoff_at or 0, last.id] if by_handoff else last.id)
        return {"items": items, "next_cursor": next_cursor}

    async def get(self, ws_id: str, conversation_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            row = await _row(conn, ws_id, conversation_id)
            transcript = await _transcript(conn, ws_id, row.customer_id)
        return _view(row) | {"transcript": transcript}

    async def reply(
        self, ws_id: str, conversation_id: str, *, text: str, buttons: Buttons, actor: str
    ) -> dict[str, Any]:
        text = (text or "").strip()
        if not text:
            raise InvalidRequest("empty_text", "text must not be empty", "$.text")
        if len(text) > MAX_REPLY:
            raise InvalidRequest("text_too_long", f"text is at most {MAX_REPLY} characters", "$.text")
        for i, b in enumerate(buttons):
            if not isinstance(b.get("title"), str) or not (b.get("payload") or b.get("url")):
                raise InvalidRequest(
                    "invalid_button", "a button needs a title and a payload or url", f"$.buttons[{i}]"
                )
        row = await self._conversation(ws_id, conversation_id)
        if row.channel_id is None:
            raise Conflict("no_channel", "the customer has not written on any channel yet")
        payload = {"conversation_id": conversation_id, "text": text, "buttons": buttons}
        await self._append(ws_id, row.customer_id, "conversation.operator_message", payload, actor)
        return await self.get(ws_id, conversation_id)

    async def hand_back(
        self, ws_id: str, conversation_id: str, *, flow: str | None, actor: str
    ) -> dict[str, Any]:
        row = await self._conversation(ws_id, conversation_id)
        if flow is not None:
            bot = await self._current_bot(ws_id, row.bot_id)
            if flow not in bot.flows:
                raise InvalidRequest("unknown_flow", f"the bot has no flow `{flow}`", "$.flow")
        if row.status == STATUS_BOT and flow is None:
            raise Conflict("not_with_operator", "the bot already has this conversation")
        payload: dict[str, Any] = {"conversation_id": conversation_id}
        if flow is not None:
            payload["flow"] = flow
        await self._append(ws_id, row.customer_id, "conversation.handed_back", payload, actor)
        return await self.get(ws_id, conversation_id)

    async def take_over(
        self, ws_id: str, conversation_id: str, *, queue: str | None, reason: str | None, actor: str
    ) -> dict[str, Any]:
        row = await self._conversation(ws_id, conversation_id)
        if row.status != STATUS_BOT:
            raise Conflict("already_with_operator", "the conversation is already with a person")
        payload = {"conversation_id": conversation_id, "queue": queue, "reason": reason or "operator"}
        await self._append(ws_id, row.customer_id, "conversation.handoff_requested", payload, actor)
        return await self.get(ws_id, conversation_id)

    async def _current_bot(self, ws_id: str, bot_id: str) -> Any:
        async with self.db.read() as conn:
            for found, version in await self.store.workspace_bots(conn, ws_id):
                if found == bot_id:
                    return (await self.store.compiled(conn, bot_id, version))[0]
        raise NotFound("bot")

    async def _conversation(self, ws_id: str, conversation_id: str) -> Any:
        async with self.db.read() as conn:
            return await _row(conn, ws_id, conversation_id)

    async def _append(
        self, ws_id: str, customer_id: str, etype: str, payload: dict[str, Any], actor: str
    ) -> None:
        await apply_admin_event(
            self.db, self.writer, self.pipeline, ws_id, customer_id, etype, payload, actor
        )


async def _row(conn: Any, ws_id: str, conversation_id: str) -> Any:
    row = (
        await conn.execute(
            sa.select(conversations).where(
                conversations.c.workspace_id == ws_id, conversations.c.id == conversation_id
            )
        )
    ).first()
    if row is None:
        raise NotFound("conversation", "$.conversation_id")
    return row


async def _transcript(conn: Any, ws_id: str, customer_id: str) -> list[dict[str, Any]]:
    """The last messages both ways, oldest first."""
    rows = (
        await conn.execute(
            sa.select(
                events.c.id,
                events.c.type,
                events.c.name,
                events.c.source,
                events.c.timestamp,
                events.c.payload,
            )
            .where(
                events.c.workspace_id == ws_id,
                events.c.customer_key == key_of(ws_id, customer_id),
                sa.or_(
                    sa.and_(events.c.type == "track", events.c.name.in_(sorted(INBOUND_NAMES))),
                    events.c.type == "message.outbound",
                ),
            )
            .order_by(events.c.seq.desc())
            .limit(TRANSCRIPT)
        )
    ).all()
    out = []
    for r in reversed(rows):
        body = orjson.loads(r.payload)
        if r.type == "message.outbound":
            msg = body.get("message") or {}
            out.append(
                {
                    "id": r.id,
                    "direction": "out",
                    "author": r.source,
                    "text": msg.get("text"),
                    "buttons": msg.get("buttons", []),
                    "channel": body.get("channel"),
                    "at": ms_to_rfc3339(r.timestamp),
                }
            )
        else:
            props = body.get("properties") or {}
            out.append(
                {
                    "id": r.id,
                    "direction": "in",
                    "author": "customer",
                    "text": props.get("text") if r.name != "Button Clicked" else props.get("title"),
                    "payload": props.get("payload"),
                    "channel": props.get("channel"),
                    "at": ms_to_rfc3339(r.timestamp),
                }
            )
    return out


def _view(row: Any) -> dict[str, Any]:
    state = orjson.loads(row.state)
    return {
        "id": row.id,
        "customer_id": row.customer_id,
        "bot_id": row.bot_id,
        "version": row.version,
        "status": row.status,
        "queue": row.queue,
        "reason": row.reason,
        "handoff_at": ms_to_rfc3339(row.handoff_at) if row.handoff_at else None,
        "channel_id": row.channel_id,
        "flow": state.get("flow"),
        "step": state.get("step"),
        "slots": state.get("slots", {}),
        "created_at": ms_to_rfc3339(row.created_at),
        "updated_at": ms_to_rfc3339(row.updated_at),
    }
