"""The bot router: a pipeline consumer that runs conversation turns in the pipeline's transaction.

For each processed event that concerns a bot (a customer's message or button, an integration's
answer, a bot timer, an operator's action, a business event that triggers a flow or ends a wait)
it loads the customer's conversation, runs one ``Turn`` of the engine, and writes what the turn
decided: the conversation row, outbox rows for messages and calls, derived events, timers. All of it
commits with the pipeline's cursor (a crash loses it together with the cursor's move), and a
conversation remembers the ``seq`` of the last input it took and skips one at or before it (a replay
of the log runs no turn again); outbox keys and timer keys also derive from the cause event's id.

Versions: a conversation runs on the version it started its flow on. When it is idle (no flow), the
next input starts on the bot's current version: the **safe point** between flows. If its version has
been retired meanwhile, the conversation moves to the current version at once: to the same flow and
step when the current version still has that flow with that many steps, otherwise to idle (the
input is then handled as a fresh start).
"""

from __future__ import annotations

import asyncio
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.bots.compiled import CompiledBot
from mayak.bots.engine import STATUS_BOT, STATUS_HUMAN, STATUS_WAITING, Customer, Input, State, Turn
from mayak.bots.store import RETIRED, BotStore
from mayak.channels.events import INBOUND_NAMES
from mayak.channels.service import ChannelService
from mayak.db.database import Database
from mayak.db.fastsql import FastSql, load_json
from mayak.db.schema import events, identities, key_of
from mayak.delivery import timers
from mayak.delivery.outbox import OutboxItem, enqueue
from mayak.errors import NotFound
from mayak.eventlog import LoggedEvent, NewEvent, append
from mayak.ids import derived_id
from mayak.pipeline.batch import HELD_PROFILES
from mayak.timeutil import ms_to_rfc3339, now_ms

log = structlog.get_logger("mayak.bots")

TIMER_KIND = "bot"
CHANNEL_SOURCES = frozenset({"telegram", "webchat"})
CONVERSATION_EVENTS = frozenset(
    {"conversation.operator_message", "conversation.handed_back", "conversation.handoff_requested"}
)
HISTORY = 30
# Conversation columns a turn writes (one executemany per batch, driver-level). Most turns change
# only unindexed ones: SQLite rewrites the entries of every index whose column an UPDATE names, even
# to the same value (measured: ~10 µs a row against ~90-120 µs with the two indexes named), so the
# indexed ones (and those that change with them) are named only when one of them changed.
_CONV_TURN = ("version", "state", "channel_id", "address", "updated_at")
_CONV_INDEXED = ("customer_id", "bot_id", "status", "queue", "reason", "handoff_at")


@dataclass
class _Conv:
    id: str
    customer_id: str
    bot_id: str
    version: int
    status: str
    state: State
    channel_id: str | None
    address: str | None
    queue: str | None
    reason: str | None
    handoff_at: int | None
    created_at: int
    updated_at: int = 0
    new: bool = False
    dirty: bool = False
    stored: tuple[Any, ...] = ()  # the _CONV_INDEXED columns as loaded

    def indexed(self) -> tuple[Any, ...]:
        return (self.customer_id, self.bot_id, self.status, self.queue, self.reason, self.handoff_at)


@dataclass
class _Work:
    event: LoggedEvent
    inp: Input
    bot_id: str | None  # None: find by conversation id
    conversation_id: str | None = None
    channel_id: str | None = None
    address: str | None = None


class BotRouter:
    def __init__(self, db: Database, store: BotStore, channels: ChannelService):
        self.db = db
        self.store = store
        self.channels = channels

    async def route(self, conn: AsyncConnection, ws_id: str, batch: list[LoggedEvent]) -> int:
        published = await self.store.workspace_bots(conn, ws_id)
        if not published:
            return 0
        current: dict[str, CompiledBot] = {}
        for bot_id, version in published:
            # A current version is never retired, so its status needs no query when it is compiled.
            bot = self.store.cache.get(bot_id, version)
            if bot is None:
                bot = (await self.store.compiled(conn, bot_id, version))[0]
            current[bot_id] = bot
        triggers = {name for bot in current.values() for name in (*bot.event_triggers, *bot.waited_events)}
        work: list[_Work] = []
        for ev in batch:
            work.extend(await self._work_for(ev, ws_id, current, triggers))
        if not work:
            return 0
        run = _Run(self, conn, ws_id, current, await self.channels.workspaces.default_region(ws_id))
        await run.load([w.event.customer_id for w in work if w.event.customer_id])
        for item in work:
            await run.turn(item)
        await run.write()
        return len(run.outbox)

    async def preunderstand(self, batch: Sequence[NewEvent]) -> None:
        """Ask a slow NLU engine (an LLM, sentence embeddings) about customers' messages before they
        are appended, in a thread: the turn then reads the answer from the event
        (``properties.nlu``) instead of calling out while it holds the pipeline's transaction.

        Only messages to a channel whose bot's current version has a slow engine; a turn that runs
        on another version (a conversation finishing a flow on an older one) asks its own engine.
        A failed call leaves the message as it was (the engine's own fallback has answered by then).
        """
        for ev in batch:
            if ev.type != "track" or ev.name != "Message Received" or ev.source not in CHANNEL_SOURCES:
                continue
            props = ev.payload.get("properties")
            if not isinstance(props, dict):
                continue
            props.pop("nlu", None)  # only this method writes it
            text = props.get("text")
            text = text.strip() if isinstance(text, str) else ""
            if not text or text.startswith("/"):
                continue
            if not self._may_be_slow(ev.workspace_id):
                continue
            bot = await self._slow_bot(ev.workspace_id, str(props.get("channel_id") or ""))
            if bot is None:
                continue
            try:
                parsed = await asyncio.to_thread(bot.understand, text)
            except Exception as exc:  # the turn asks again; its failure takes the usual path
                log.warning("bot_preunderstand_failed", bot=bot.bot_id, error=repr(exc))
                continue
            best = None if parsed is None else parsed.intent
            props["nlu"] = {
                "bot_id": bot.bot_id,
                "version": bot.version,
                "intent": None if best is None else {"name": best.name, "confidence": float(best.confidence)},
            }

    def _may_be_slow(self, ws_id: str) -> bool:
        """False when the caches show that none of the workspace's current versions has a slow
        engine (the common case, decided without a query or a channel lookup)."""
        published = self.store.cached_bots(ws_id)
        if published is None:
            return True
        return any(self.store.known_slow_nlu(bot_id, version) is not False for bot_id, version in published)

    async def _slow_bot(self, ws_id: str, channel_id: str) -> CompiledBot | None:
        """The current version of the bot that answers on ``channel_id``, compiled, when its NLU
        engine is slow; else None (outside any transaction; from the caches when they have it, as
        they do for every message but the first few). Slowness is read from the stored definition,
        so a process that only appends never compiles (trains) a bot with a fast engine."""
        published = self.store.cached_bots(ws_id)
        if published is None:
            async with self.db.read() as conn:
                published = await self.store.workspace_bots(conn, ws_id)
        versions = dict(published)
        bot_id = await self._bot_for_channel(ws_id, channel_id, versions) if versions else None
        if bot_id is None:
            return None
        version = versions[bot_id]
        bot = self.store.cache.get(bot_id, version)
        if bot is not None:
            return bot if bot.slow_nlu else None
        async with self.db.read() as conn:
            if not await self.store.slow_nlu(conn, bot_id, version):
                return None
            return (await self.store.compiled(conn, bot_id, version))[0]

    async def _work_for(
        self, ev: LoggedEvent, ws_id: str, current: dict[str, CompiledBot], triggers: set[str]
    ) -> list[_Work]:
        """What ``ev`` asks of the bots: usually one turn, one per bot for a business event that
        several bots trigger on or wait for."""
        if ev.customer_id is None:
            return []
        p = ev.payload
        if ev.type == "track" and ev.name in INBOUND_NAMES and ev.source in CHANNEL_SOURCES:
            props = p.get("properties") or {}
            channel_id = str(props.get("channel_id") or "")
            bot_id = await self._bot_for_channel(ws_id, channel_id, current)
            if bot_id is None:
                return []
            kind = "button" if ev.name == "Button Clicked" else "message"
            text = props.get("text") if isinstance(props.get("text"), str) else None
            inp = Input(
                kind, ev.timestamp, ev.id, text=text, payload=props.get("payload"), title=props.get("title")
            )
            if isinstance(props.get("nlu"), dict):
                inp.data["nlu"] = props["nlu"]  # a slow engine's answer (see preunderstand)
            if props.get("link") == "linked":
                inp.data["linked"] = True  # a deep link just joined this chat to the customer
            return [_Work(ev, inp, bot_id, channel_id=channel_id, address=str(props.get("address") or ""))]
        if ev.type == "integration.result":
            return [
                _Work(ev, Input("result", ev.received_at, ev.id, data=p), None, str(p.get("conversation_id")))
            ]
        if ev.type == "timer" and ev.name == TIMER_KIND:
            data = dict(p.get("payload") or {}) | {"key": p.get("key")}
            return [
                _Work(ev, Input("timer", ev.received_at, ev.id, data=data), None, data.get("conversation_id"))
            ]
        if ev.type in CONVERSATION_EVENTS:
            kind = {
                "conversation.operator_message": "operator",
                "conversation.handed_back": "handback",
                "conversation.handoff_requested": "handoff",
            }[ev.type]
            inp = Input(kind, ev.received_at, ev.id, text=p.get("text"), data=p)
            return [_Work(ev, inp, None, str(p.get("conversation_id")))]
        if ev.type == "track" and ev.name in triggers and ev.source not in CHANNEL_SOURCES:
            props = p.get("properties")
            # Every bot that triggers on or waits for this event gets it, each with its own input
            # (a turn notes the flow it starts in the input's data).
            return [
                _Work(
                    ev,
                    Input(
                        "event",
                        ev.timestamp,
                        ev.id,
                        name=ev.name,
                        data=dict(props) if isinstance(props, dict) else {},
                    ),
                    bot_id,
                )
                for bot_id, bot in current.items()
                if ev.name in bot.event_triggers or ev.name in bot.waited_events
            ]
        return []

    async def _bot_for_channel(self, ws_id: str, channel_id: str, current: dict[str, Any]) -> str | None:
        if channel_id:
            try:
                channel = await self.channels.record(ws_id, channel_id)
            except NotFound:
                channel = None
            if channel is not None and channel.bot_id in current:
                return channel.bot_id
        return next(iter(current), None)


class _Run:
    """One batch's worth of turns: loads what they need, runs them, writes what they decided."""

    def __init__(
        self,
        router: BotRouter,
        conn: AsyncConnection,
        ws_id: str,
        current: dict[str, CompiledBot],
        region: str,
    ):
        self.router = router
        self.region = region  # the workspace's default phone region: how national numbers are read
        self.conn = conn
        self.ws = ws_id
        self.current = current
        self.convs: dict[tuple[str, str], _Conv] = {}
        self.by_id: dict[str, _Conv] = {}
        self.customers: dict[str, Customer] = {}
        self.keys: dict[str, int] = {}  # customer id -> number, for customers not merged away
        self.outbox: list[OutboxItem] = []
        self.events: list[NewEvent] = []
        self.timers: list[tuple[str, dict[str, Any], str]] = []
        self.cancels: list[str] = []
        self.compiled: dict[tuple[str, int], tuple[CompiledBot, str]] = {}

    async def load(self, customer_ids: list[str]) -> None:
        ids = sorted(set(customer_ids))
        if not ids:
            return
        sql = FastSql(self.router.db.dialect)
        rows = await sql.fetch(
            self.conn,
            "SELECT id, customer_id, bot_id, version, status, state, channel_id, address, queue, reason, "
            f"handoff_at, created_at, updated_at FROM conversations WHERE workspace_id = {sql.p(1)} "
            f"AND customer_id {sql.in_list(2)}",
            (self.ws, sql.list_param(ids)),
        )
        for r in rows:
            conv = _Conv(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                State.from_json(orjson.loads(r[5])),
                r[6],
                r[7],
                r[8],
                r[9],
                r[10],
                r[11],
                r[12],
            )
            conv.stored = conv.indexed()
            key = (conv.customer_id, conv.bot_id)
            # After a merge a customer can own two rows for one bot: the most recent one goes on.
            if key not in self.convs or conv.updated_at > self.convs[key].updated_at:
                self.convs[key] = conv
            self.by_id[conv.id] = conv
        # The pipeline's batch holds most of them already, as just written.
        held = HELD_PROFILES.get() or {}
        missing: list[str] = []
        for cid in ids:
            profile = held.get(cid)
            if profile is None or profile.merged_into:
                missing.append(cid)
                continue
            self.keys[cid] = profile.key
            self.customers[cid] = Customer(
                cid,
                dict(profile.traits),  # a turn's `set` updates its copy as it goes
                profile.consents,
                profile.preferences,
                profile.context,
                profile.stage,
                region=self.region,
            )
        if not missing:
            return
        rows = await sql.fetch(
            self.conn,
            "SELECT id, traits, consents, preferences, context, stage, key, merged_into FROM customers "
            f"WHERE workspace_id = {sql.p(1)} AND id {sql.in_list(2)}",
            (self.ws, sql.list_param(missing)),
        )
        for r in rows:
            if r[7] is None:
                self.keys[r[0]] = r[6]
            self.customers[r[0]] = Customer(
                r[0], _json(r[1]), _json(r[2]), _json(r[3]), _json(r[4]), r[5], region=self.region
            )

    async def _history(self, customer: Customer) -> None:
        number = self.keys.get(customer.id)
        rows = await self.conn.execute(
            sa.select(events.c.type, events.c.name, events.c.timestamp, events.c.payload)
            .where(
                events.c.workspace_id == self.ws,
                events.c.customer_key == (number if number is not None else key_of(self.ws, customer.id)),
            )
            .order_by(events.c.seq.desc())
            .limit(HISTORY)
        )
        out = []
        for r in rows:
            payload = orjson.loads(r.payload)
            out.append(
                {
                    "type": r.type,
                    "name": r.name,
                    "at": ms_to_rfc3339(r.timestamp),
                    "at_ms": r.timestamp,
                    "properties": payload.get("properties") or {},
                }
            )
        customer.events = out

    async def _version(self, bot_id: str, version: int) -> tuple[CompiledBot, str]:
        key = (bot_id, version)
        if key not in self.compiled:
            self.compiled[key] = await self.router.store.compiled(self.conn, bot_id, version)
        return self.compiled[key]

    def _conversation(self, customer_id: str, bot_id: str, at: int, cause: str) -> _Conv:
        conv = self.convs.get((customer_id, bot_id))
        if conv is None:
            bot = self.current[bot_id]
            conv = _Conv(
                derived_id("conv", at, f"{customer_id}:{bot_id}:{cause}"),
                customer_id,
                bot_id,
                bot.version,
                STATUS_BOT,
                State(),
                None,
                None,
                None,
                None,
                None,
                at,
                new=True,
            )
            self.convs[(customer_id, bot_id)] = conv
            self.by_id[conv.id] = conv
        return conv

    async def turn(self, item: _Work) -> None:
        ev = item.event
        if item.bot_id is None:
            conv = self.by_id.get(item.conversation_id or "")
            if conv is None:
                return  # a stale timer or result of an erased conversation
        else:
            assert ev.customer_id is not None
            conv = self._conversation(ev.customer_id, item.bot_id, ev.received_at, ev.id)
        if ev.seq <= conv.state.seq:
            return  # taken already: the log is read again (a replay); its records are in the log
        customer = self.customers.get(conv.customer_id)
        if customer is None:
            return
        bot = await self._bot_for(conv)
        if bot is None:
            return
        conv.state.seq = ev.seq  # saved only with what the input changed (see ``dirty``)
        if item.channel_id:
            conv.channel_id, conv.address = item.channel_id, item.address
        channel_type = await self._channel_type(conv)
        if item.inp.kind == "event" and not self._proactive_allowed(bot, conv, customer, item, channel_type):
            return
        if bot.uses_history and not customer.events:
            await self._history(customer)
        turn = Turn(bot, conv.state, customer, conv.status, channel_type, conv.id)
        fx = turn.run(item.inp)
        conv.dirty = True
        self._apply(conv, bot, item, fx, channel_type)

    async def _bot_for(self, conv: _Conv) -> CompiledBot | None:
        current = self.current.get(conv.bot_id)
        if current is None:
            return None  # the bot was deleted
        if conv.state.flow is None:
            conv.version = current.version  # the safe point: between flows
            return current
        if conv.version == current.version:
            return current  # the current version: active by definition
        bot, status = await self._version(conv.bot_id, conv.version)
        if status == RETIRED and conv.version != current.version:
            st = conv.state
            flow = current.flows.get(st.flow or "")
            if flow is None or st.step >= len(flow["steps"]):
                st.flow, st.step, st.waiting, st.stack, st.form_field = None, 0, None, [], 0
            conv.version = current.version
            return current
        return bot

    def _proactive_allowed(
        self, bot: CompiledBot, conv: _Conv, customer: Customer, item: _Work, channel_type: str | None
    ) -> bool:
        """Pick the first matching trigger; hold it in quiet hours; drop marketing without consent."""
        inp = item.inp
        st = conv.state
        if st.waiting and st.waiting.get("event") == inp.name:
            return True  # ends a wait: not a new message the customer did not ask for
        probe = Turn(bot, State(slots=dict(st.slots)), customer)
        probe.now = inp.at
        trigger = probe.match_trigger(inp.name or "", inp.data)
        if trigger is not None:
            if trigger.purpose == "marketing" and not _marketing_allowed(customer, channel_type):
                self._record(
                    conv, "message.suppressed", {"flow": trigger.flow, "reason": "no_marketing_consent"}, item
                )
                return False
            opens = _quiet_until(customer, inp.at)
            if opens is not None:
                key = f"{conv.id}:deferred:{item.event.id}"
                self.timers.append(
                    (
                        key,
                        {
                            "fire_at": opens,
                            "payload": {
                                "kind": "deferred_flow",
                                "conversation_id": conv.id,
                                "flow": trigger.flow,
                                "event": {"name": inp.name, **inp.data},
                            },
                        },
                        conv.customer_id,
                    )
                )
                self._record(
                    conv, "message.deferred", {"flow": trigger.flow, "until": ms_to_rfc3339(opens)}, item
                )
                return False
            inp.data["_flow"] = trigger.flow
            return True
        return False

    async def _channel_type(self, conv: _Conv) -> str | None:
        if conv.channel_id is None:
            await self._find_channel(conv)
        if conv.channel_id is None:
            return None
        try:
            return (await self.router.channels.record(self.ws, conv.channel_id)).type
        except NotFound:
            return None

    async def _find_channel(self, conv: _Conv) -> None:
        """A customer we have not talked to in this conversation: reach them where we can."""
        rows = (
            await self.conn.execute(
                sa.select(identities.c.kind, identities.c.value).where(
                    identities.c.workspace_id == self.ws,
                    identities.c.customer_key == key_of(self.ws, conv.customer_id),
                    identities.c.kind.in_(("telegram", "anonymous_id")),
                )
            )
        ).all()
        preferred = (self.customers.get(conv.customer_id) or Customer("")).preferences.get(
            "preferred_channel"
        )
        order = ["telegram", "webchat"]
        if preferred in order:
            order.remove(preferred)
            order.insert(0, preferred)
        for channel_type in order:
            kind = "telegram" if channel_type == "telegram" else "anonymous_id"
            for k, value in rows:
                if k != kind:
                    continue
                channel = await self.router.channels.first_of_type(self.ws, channel_type)
                if channel is not None:
                    conv.channel_id, conv.address = channel.id, value
                    return

    def _apply(self, conv: _Conv, bot: CompiledBot, item: _Work, fx: Any, channel_type: str | None) -> None:
        ev = item.event
        base = f"{ev.id}:{conv.id}"
        for i, (message, source) in enumerate(fx.messages):
            key = f"msg:{base}:{i}"
            body = {
                "channel_id": conv.channel_id,
                "channel": channel_type,
                "address": conv.address,
                "message": message.to_json(),
                "conversation_id": conv.id,
            }
            if conv.channel_id and conv.address:
                self.outbox.append(
                    OutboxItem(
                        workspace_id=self.ws,
                        kind="message",
                        payload={
                            "channel_id": conv.channel_id,
                            "address": conv.address,
                            "message": message.to_json(),
                        },
                        idempotency_key=key,
                        customer_id=conv.customer_id,
                        target=conv.channel_id,
                    )
                )
            else:
                body["undeliverable"] = "no_channel"
            self._event(conv, "message.outbound", body, None, source=source)
        for i, call in enumerate(fx.calls):
            self.outbox.append(
                OutboxItem(
                    workspace_id=self.ws,
                    kind="integration_call",
                    payload=call,
                    idempotency_key=f"call:{call['call_id']}",
                    customer_id=conv.customer_id,
                    target=f"call:{i}",
                )
            )
        for i, change in enumerate(fx.events):
            self.events.append(
                NewEvent(
                    workspace_id=self.ws,
                    type=change["type"],
                    name=change.get("name"),
                    timestamp=ev.received_at,
                    received_at=ev.received_at,
                    source="bot",
                    actor=conv.bot_id,
                    customer_id=conv.customer_id,
                    dedup_key=f"bot:{base}:{i}",
                    payload=change["payload"],
                )
            )
        if fx.consent_off and channel_type:
            self._event(
                conv,
                "customer.consents_set",
                {"consents": {channel_type: {"marketing": False}}},
                f"optout:{base}",
            )
        for timer in fx.timers:
            self.timers.append((timer["key"], timer, conv.customer_id))
        self.cancels.extend(fx.cancel_timers)
        if fx.status is not None and fx.status != conv.status:
            conv.status = fx.status
            if fx.status == STATUS_WAITING:
                conv.queue, conv.reason, conv.handoff_at = fx.queue, fx.reason, ev.received_at
                self._event(
                    conv, "conversation.handoff", {"queue": fx.queue, "reason": fx.reason}, f"handoff:{base}"
                )
            elif fx.status == STATUS_BOT:
                conv.queue, conv.reason, conv.handoff_at = None, None, None
            elif fx.status == STATUS_HUMAN and conv.handoff_at is None:
                conv.handoff_at = ev.received_at
        summary = fx.summary | {"bot_id": conv.bot_id, "version": conv.version, "cause_event_id": ev.id}
        self._event(conv, "conversation.turn", summary, None)

    def _event(
        self,
        conv: _Conv,
        etype: str,
        payload: dict[str, Any],
        key: str | None,
        *,
        source: str = "bot",
    ) -> None:
        """A record of the turn, appended with its cause's transaction. Without ``key`` it takes no
        dedup key: the cause's input is taken once (the pipeline's cursor commits with it, and a
        replay skips an input the conversation has taken, see ``turn``), so a turn's records cannot
        repeat, and a dedup key per message and per turn only cost two index writes."""
        self.events.append(
            NewEvent(
                workspace_id=self.ws,
                type=etype,
                timestamp=0,
                received_at=0,
                source=source,
                actor=conv.bot_id,
                customer_id=conv.customer_id,
                dedup_key=None if key is None else key[:300],
                payload=payload | {"conversation_id": conv.id},
            )
        )

    def _record(self, conv: _Conv, etype: str, payload: dict[str, Any], item: _Work) -> None:
        conv.dirty = True
        self._event(conv, etype, payload, f"{etype}:{item.event.id}:{conv.id}")

    async def write(self) -> None:
        db, conn = self.router.db, self.conn
        now = now_ms()
        created: list[tuple[Any, ...]] = []
        turned: list[tuple[Any, ...]] = []  # only _CONV_TURN changed
        moved: list[tuple[Any, ...]] = []  # an indexed column changed too
        for conv in self.convs.values():
            if not conv.dirty:
                continue
            state = orjson.dumps(conv.state.to_json()).decode()
            row = (conv.version, state, conv.channel_id, conv.address, now)
            if conv.new:
                created.append((*row, *conv.indexed(), conv.id, self.ws, conv.created_at))
                conv.new = False
            else:
                indexed = conv.indexed()
                if indexed == conv.stored:
                    turned.append((*row, conv.id))
                else:
                    moved.append((*row, *indexed, conv.id))
            conv.stored = conv.indexed()
            conv.dirty = False
        sql = FastSql(db.dialect)
        if created:  # one statement for every conversation the group started (a first turn each)
            columns = (*_CONV_TURN, *_CONV_INDEXED, "id", "workspace_id", "created_at")
            await sql.run_many(
                conn,
                f"INSERT INTO conversations ({', '.join(columns)}) VALUES ({sql.values(len(columns))})",
                created,
            )
        for rows, names in ((turned, _CONV_TURN), (moved, _CONV_TURN + _CONV_INDEXED)):
            if rows:
                assignments = ", ".join(f"{name} = {sql.p(i + 1)}" for i, name in enumerate(names))
                await sql.run_many(
                    conn, f"UPDATE conversations SET {assignments} WHERE id = {sql.p(len(names) + 1)}", rows
                )
        for key in self.cancels:
            await timers.cancel(conn, self.ws, key)
        for key, timer, customer_id in self.timers:
            await timers.schedule(
                db,
                conn,
                workspace_id=self.ws,
                key=key,
                kind=TIMER_KIND,
                fire_at=int(timer["fire_at"]),
                payload=timer["payload"],
                customer_id=customer_id,
            )
        if self.outbox:
            await enqueue(db, conn, self.outbox)
        if self.events:
            for ev in self.events:
                ev.received_at = ev.received_at or now
                ev.timestamp = ev.timestamp or now
                ev.customer_key = self.keys.get(ev.customer_id or "")  # attributed as appended
            await append(db, conn, self.events)


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    loaded = load_json(value) if value is not None else {}
    return loaded if isinstance(loaded, dict) else {}


def _marketing_allowed(customer: Customer, channel_type: str | None) -> bool:
    consents = customer.consents
    for channel in ([channel_type] if channel_type else list(consents)) + ["all"]:
        entry = (consents.get(channel) or {}).get("marketing")
        if isinstance(entry, dict) and entry.get("granted"):
            return True
    return False


def _quiet_until(customer: Customer, at: int) -> int | None:
    """When the customer's quiet hours hold a message sent at ``at``: the end of them (epoch ms)."""
    quiet = customer.preferences.get("quiet_hours")
    if not isinstance(quiet, dict):
        return None
    try:
        start_h, start_m = (int(x) for x in str(quiet["start"]).split(":"))
        end_h, end_m = (int(x) for x in str(quiet["end"]).split(":"))
    except (KeyError, ValueError):
        return None
    tz_name = customer.preferences.get("timezone") or customer.context.get("timezone") or "UTC"
    try:
        tz = zoneinfo.ZoneInfo(str(tz_name))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        tz = zoneinfo.ZoneInfo("UTC")
    local = datetime.fromtimestamp(at / 1000, tz=UTC).astimezone(tz)
    minutes = local.hour * 60 + local.minute
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    inside = (start <= minutes < end) if start < end else (minutes >= start or minutes < end)
    if not inside or start == end:
        return None
    opens = local.replace(hour=end_h, minute=end_m, second=0, microsecond=0)
    if opens <= local:
        opens += timedelta(days=1)
    return int(opens.timestamp() * 1000)
