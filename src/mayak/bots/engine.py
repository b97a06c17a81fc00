"""The conversation engine: one input in, the next state and a list of effects out.

Pure: no I/O, no clock of its own (the input carries the time). The bot router feeds it inputs from
the log and writes what it returns (conversation state, outbox rows, events, timers) in the
pipeline's transaction; the conversation-test runner feeds it inputs from YAML. Both therefore
exercise exactly the same code.

A conversation is either idle (no flow) or inside a flow at a step. Running a flow executes steps
until one needs something from outside: an answer (``ask``, ``form``), an integration's result
(``call``), an event or a timeout (``wait``), or a person (``handoff``).
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import phonenumbers
import structlog

from mayak.bots.compiled import CompiledBot, action_of, duration_ms
from mayak.bots.templates import TemplateError, render, render_value
from mayak.channels.base import Button, OutboundMessage
from mayak.ids import derived_id

log = structlog.get_logger("mayak.bots")

MAX_STEPS_PER_TURN = 100
DEFAULT_TRIES = 3
STATUS_BOT, STATUS_WAITING, STATUS_HUMAN = "bot", "waiting_human", "human"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_YES = frozenset({"yes", "y", "yeah", "yep", "sure", "ok", "да", "ага", "конечно", "угу", "ок"})
_NO = frozenset({"no", "n", "nope", "нет", "не"})


@dataclass
class State:
    """What is persisted per conversation (as JSON in ``conversations.state``)."""

    flow: str | None = None
    step: int = 0
    slots: dict[str, Any] = field(default_factory=dict)
    stack: list[list[Any]] = field(default_factory=list)  # [[flow, step], …] to return to
    waiting: dict[str, Any] | None = None  # {"ask": n} | {"call": id} | {"event": name, "timer": key}
    tries: int = 0
    form_field: int = 0
    misses: int = 0
    recent: list[int] = field(default_factory=list)  # times of recent inbound messages (rate limit)
    warned: bool = False
    language: str | None = None
    event: dict[str, Any] = field(default_factory=dict)  # the event that started a proactive flow
    serial: int = 0  # counts effects, for deterministic ids
    seq: int = 0  # the log position of the last input the conversation took (see the bot router)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Input:
    """One thing that happened to the conversation.

    kind: ``message`` | ``button`` | ``event`` (a business event that may trigger or end a wait) |
    ``result`` (an integration call answered) | ``timer`` | ``operator`` (an operator's reply) |
    ``handback`` | ``handoff`` (an operator takes the conversation).
    """

    kind: str
    at: int
    id: str
    text: str | None = None
    payload: str | None = None
    title: str | None = None
    name: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Effects:
    messages: list[tuple[OutboundMessage, str]] = field(default_factory=list)  # (message, source)
    events: list[dict[str, Any]] = field(default_factory=list)  # {"type","name"?,"payload"}
    calls: list[dict[str, Any]] = field(default_factory=list)
    timers: list[dict[str, Any]] = field(default_factory=list)  # {"key","fire_at","payload"}
    cancel_timers: list[str] = field(default_factory=list)
    status: str | None = None  # a new conversation status
    queue: str | None = None
    reason: str | None = None
    consent_off: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Customer:
    """The customer as templates and conditions see them (read-only for the engine)."""

    id: str
    traits: dict[str, Any] = field(default_factory=dict)
    consents: dict[str, Any] = field(default_factory=dict)
    preferences: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    stage: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    region: str = "US"  # how national phone numbers are read (the workspace's default region)


class Turn:
    """Handles one input against one conversation. Create, call ``run``, read ``state``/``effects``."""

    def __init__(
        self,
        bot: CompiledBot,
        state: State,
        customer: Customer,
        status: str = STATUS_BOT,
        channel: str | None = None,
        conversation_id: str = "",
    ):
        self.bot = bot
        self.state = state
        self.customer = customer
        self.status = status
        self.channel = channel
        self.conversation_id = conversation_id
        self.fx = Effects()
        self.now = 0
        self.input: Input | None = None
        self.intent: dict[str, Any] | None = None
        self._steps = 0

    # -- entry ---------------------------------------------------------------------------------

    def run(self, inp: Input) -> Effects:
        self.input = inp
        self.now = inp.at
        st = self.state
        if st.language is None:
            st.language = self._language()
        before = (st.flow, st.step)
        try:
            self._dispatch(inp)
        except _Fail as fail:
            log.warning("bot_turn_failed", bot=self.bot.name, error=str(fail), flow=st.flow)
            self.say_builtin("error")
            self._reset_flow()
            self.fx.summary["error"] = str(fail)[:300]
        self.fx.summary.update(
            {
                "input": inp.kind,
                "flow_before": before[0],
                "step_before": before[1],
                "flow": st.flow,
                "step": st.step,
            }
        )
        if self.intent is not None:
            self.fx.summary["intent"] = self.intent
        return self.fx

    def _dispatch(self, inp: Input) -> None:
        st = self.state
        if inp.kind in ("message", "button"):
            text = (inp.text or "").strip()
            if text and text.casefold().strip(" .!") in self.bot.opt_out_words:
                self._opt_out()
                return
            if self.status in (STATUS_WAITING, STATUS_HUMAN):
                self.fx.summary["silent"] = "with_operator"
                return
            if self._throttled():
                return
            self._customer_spoke(inp)
        elif inp.kind == "result":
            if st.waiting and st.waiting.get("call") == inp.data.get("call_id"):
                self._call_answered(inp.data)
            else:
                self.fx.summary["ignored"] = "stale_result"
        elif inp.kind == "timer":
            self._timer(inp.data)
        elif inp.kind == "event":
            self._business_event(inp)
        elif inp.kind == "operator":
            self._operator_reply(inp)
        elif inp.kind == "handback":
            self._handback(inp)
        elif inp.kind == "handoff":
            self._handoff(inp.data.get("queue"), inp.data.get("reason") or "operator", None)

    # -- customer input ------------------------------------------------------------------------

    def _throttled(self) -> bool:
        st = self.state
        limit, per = self.bot.rate_limit
        st.recent = [t for t in st.recent if t > self.now - per][-limit:]
        if len(st.recent) >= limit:
            self.fx.summary["throttled"] = True
            if not st.warned:
                st.warned = True
                self.say_builtin("slow_down")
            return True
        st.recent.append(self.now)
        st.warned = False
        return False

    def _customer_spoke(self, inp: Input) -> None:
        st = self.state
        text = (inp.text or "").strip()
        spoken = _script_language(text)
        if (
            spoken in self.bot.languages
            and not self.customer.preferences.get("language")
            and not self._waiting_ask()
        ):
            # Answer in the language the customer writes in (not while they answer a question: a car
            # model or a name in Latin letters says nothing about a Russian speaker's language).
            st.language = spoken
        if inp.data.get("linked") and self._waiting_ask():
            # A deep link brought the customer here mid-conversation: carry on where they were.
            self._prompt_again()
            return
        if text.startswith("/"):
            command = text.split()[0].lower()
            flow = self.bot.command_flows.get(command)
            if flow is None and command == "/start":
                flow = self.bot.settings.get("start_flow")
            if flow:
                self._start_flow(flow, interrupt=True)
                return
        if inp.kind == "button" and inp.payload is not None:
            flow = self.bot.payload_flows.get(inp.payload)
            if flow and (self._is_global(flow) or not self._waiting_ask()):
                self._start_flow(flow, interrupt=True)
                return
        parsed = self._understand(text) if text else None
        if parsed is not None:
            flow = self.bot.intent_flows.get(parsed[0])
            if flow and self._is_global(flow):
                self._start_flow(flow, interrupt=True)
                return
        if self._waiting_ask():
            self._answer(inp, parsed)
            return
        if st.waiting and "call" in st.waiting:
            self.fx.summary["ignored"] = "call_pending"
            return
        if inp.kind == "button" and inp.payload is not None and parsed is None:
            # A button of an earlier message: its title may still name an intent.
            parsed = self._understand(inp.title or "") if inp.title else None
        if parsed is not None and parsed[0] in self.bot.intent_flows:
            self._start_flow(self.bot.intent_flows[parsed[0]], interrupt=False)
            return
        self._not_understood()

    def _understand(self, text: str) -> tuple[str, float] | None:
        known = self._understood_before(text)
        if known is not None:
            best = known[0]
        else:
            intent = self.bot.top_intent(text)
            best = None if intent is None else (intent.name, float(intent.confidence))
        if best is None:
            return None
        name, confidence = best
        self.intent = {"name": name, "confidence": round(confidence, 4)}
        if confidence < self.bot.threshold:
            return None
        return name, confidence

    def _understood_before(self, text: str) -> tuple[tuple[str, float] | None] | None:
        """What a slow NLU engine said about this very message before it was appended (see
        ``BotRouter.preunderstand``), when it was asked for this bot version; None when it was not."""
        inp = self.input
        nlu = inp.data.get("nlu") if inp is not None else None
        if (
            inp is None
            or not isinstance(nlu, dict)
            or nlu.get("bot_id") != self.bot.bot_id
            or nlu.get("version") != self.bot.version
            or text != (inp.text or "").strip()
        ):
            return None
        intent = nlu.get("intent")
        if isinstance(intent, dict):
            name, confidence = intent.get("name"), intent.get("confidence")
            if isinstance(name, str) and isinstance(confidence, int | float):
                return ((name, float(confidence)),)
        return (None,)

    def _waiting_ask(self) -> bool:
        return bool(self.state.waiting and "ask" in self.state.waiting)

    def _is_global(self, flow: str) -> bool:
        return bool(self.bot.flows[flow].get("global"))

    def _not_understood(self) -> None:
        st = self.state
        st.misses += 1
        self.fx.summary["not_understood"] = True
        if st.misses >= self.bot.fallback_after:
            st.misses = 0
            self._handoff(self.bot.settings.get("handoff_queue"), "not_understood", None)
            return
        fallback = self.bot.settings.get("fallback_flow")
        if fallback and fallback != st.flow:
            self._start_flow(fallback, interrupt=True, keep_misses=True)
        else:
            self.say_builtin("not_understood")
            if self._waiting_ask():
                self._prompt_again()

    # -- ask / form ------------------------------------------------------------------------------

    def _current_ask(self) -> dict[str, Any]:
        st = self.state
        assert st.flow is not None
        step = self.bot.flows[st.flow]["steps"][st.step]
        if "form" in step:
            ask: dict[str, Any] = step["form"]["fields"][st.form_field]
            return ask
        ask = step["ask"]
        return ask

    def _answer(self, inp: Input, parsed: tuple[str, float] | None) -> None:
        st = self.state
        ask = self._current_ask()
        value, ok = self._validate(ask, inp)
        if ok:
            st.slots[ask["slot"]] = value
            st.tries = 0
            st.misses = 0
            st.waiting = None
            self._after_field()
            return
        st.tries += 1
        if st.tries >= int(ask.get("tries", DEFAULT_TRIES)):
            st.tries = 0
            st.waiting = None
            self.fx.summary["ask_failed"] = ask["slot"]
            if "on_fail" in ask:
                self._jump(ask["on_fail"])
                self._run()
            else:
                self._reset_flow()
                self._not_understood()
            return
        retry = ask.get("retry")
        self.say(
            self.bot.text(retry, self._lang()) if retry else self.bot.builtin_text("retry", self._lang())
        )
        self._prompt_again()

    def _prompt_again(self) -> None:
        ask = self._current_ask()
        self._emit_ask(ask)

    def _after_field(self) -> None:
        st = self.state
        assert st.flow is not None
        step = self.bot.flows[st.flow]["steps"][st.step]
        if "form" in step:
            st.form_field += 1
            if self._next_form_field(step["form"]["fields"]):
                return
        st.form_field = 0
        st.step += 1
        self._run()

    def _next_form_field(self, fields: list[dict[str, Any]]) -> bool:
        """Ask the next form field that is still empty; False when the form is complete."""
        st = self.state
        while st.form_field < len(fields):
            ask = fields[st.form_field]
            if st.slots.get(ask["slot"]) is None and not self._skip(ask):
                self._emit_ask(ask)
                st.waiting = {"ask": st.step}
                return True
            st.form_field += 1
        return False

    def _skip(self, ask: dict[str, Any]) -> bool:
        return bool(ask.get("skip_if")) and self._test(ask["skip_if"])

    def _emit_ask(self, ask: dict[str, Any]) -> None:
        buttons = []
        kind = ask.get("type", "choice" if "choices" in ask else "text")
        for choice in ask.get("choices", []):
            title = self._render(self.bot.text(choice["title"], self._lang()))
            payload = choice.get("payload") or str(choice.get("value", title))
            buttons.append(Button(title, payload, choice.get("url")))
        if kind == "yes_no" and not buttons:
            lang = self._lang()
            buttons = [
                Button("Да" if lang == "ru" else "Yes", "yes"),
                Button("Нет" if lang == "ru" else "No", "no"),
            ]
        self.say(self.bot.text(ask["text"], self._lang()), buttons)

    def _validate(self, ask: dict[str, Any], inp: Input) -> tuple[Any, bool]:
        kind = ask.get("type", "choice" if "choices" in ask else "text")
        text = (inp.text or inp.title or "").strip()
        if kind == "choice":
            return self._choice(ask, inp, text)
        if kind == "yes_no":
            word = (inp.payload or text).casefold().strip(" .!")
            if word in _YES:
                return True, True
            if word in _NO:
                return False, True
            return None, False
        if not text:
            return None, False
        if kind == "text":
            return text[:1000], True
        if kind == "regex":
            return (text, True) if re.fullmatch(ask["pattern"], text[:1000]) else (None, False)
        if kind == "email":
            email = text.lower()
            return (email, True) if _EMAIL.match(email) and len(email) <= 254 else (None, False)
        if kind == "phone":
            try:
                number = phonenumbers.parse(text, self.customer.region)
            except phonenumbers.NumberParseException:
                return None, False
            if not phonenumbers.is_possible_number(number):
                return None, False
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), True
        if kind == "number":
            return self._number(ask, text)
        if kind in ("date", "time", "datetime"):
            return self._when(kind, text)
        return None, False

    def _choice(self, ask: dict[str, Any], inp: Input, text: str) -> tuple[Any, bool]:
        choices = ask.get("choices", [])
        folded = text.casefold()
        for i, choice in enumerate(choices, 1):
            title = self._render(self.bot.text(choice["title"], self._lang()))
            payload = choice.get("payload") or str(choice.get("value", title))
            value = choice.get("value", payload)
            if inp.payload is not None and inp.payload == payload:
                return value, True
            if folded and (folded == title.casefold() or folded == str(i) or folded == str(value).casefold()):
                return value, True
        return None, False

    def _number(self, ask: dict[str, Any], text: str) -> tuple[Any, bool]:
        from mayak.nlu.entities import extract_entities

        found = [e for e in extract_entities(text) if e.type == "number"]
        if not found:
            return None, False
        value = found[0].value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if ("min" in ask and value < ask["min"]) or ("max" in ask and value > ask["max"]):
            return None, False
        return value, True

    def _when(self, kind: str, text: str) -> tuple[Any, bool]:
        from mayak.nlu.entities import extract_entities

        tz = self._timezone()
        now = datetime.fromtimestamp(self.now / 1000, tz=UTC).astimezone(tz)
        wanted = {"date": ("date", "datetime"), "time": ("time", "datetime"), "datetime": ("datetime",)}[kind]
        for ent in extract_entities(text, now=now, tz=str(tz)):
            if ent.type in wanted:
                value = str(ent.value)
                if kind == "date" and ent.type == "datetime":
                    value = value[:10]
                elif kind == "time" and ent.type == "datetime":
                    value = value[11:16]
                return value, True
        return None, False

    # -- flows -----------------------------------------------------------------------------------

    def _start_flow(self, flow: str, *, interrupt: bool, keep_misses: bool = False) -> None:
        st = self.state
        if st.waiting and "timer" in st.waiting:
            self.fx.cancel_timers.append(st.waiting["timer"])
        returns = bool(self.bot.flows[flow].get("returns"))
        if interrupt and returns and st.flow is not None and st.flow != flow and self._waiting_ask():
            st.stack.append([st.flow, st.step, st.form_field])
            st.stack = st.stack[-5:]
        elif not returns:
            st.stack = []
        if not keep_misses:
            st.misses = 0
        st.flow, st.step, st.form_field, st.tries, st.waiting = flow, 0, 0, 0, None
        self.fx.summary.setdefault("started", flow)
        self._run()

    def _reset_flow(self) -> None:
        st = self.state
        st.flow, st.step, st.form_field, st.tries, st.waiting = None, 0, 0, 0, None
        st.stack = []

    def _finish_flow(self) -> None:
        st = self.state
        if st.stack:
            flow, step, form_field = st.stack.pop()
            if flow in self.bot.flows and step < len(self.bot.flows[flow]["steps"]):
                st.flow, st.step, st.form_field, st.tries, st.waiting = flow, step, form_field, 0, None
                return
        st.flow, st.step, st.form_field, st.waiting = None, 0, 0, None
        st.event = {}

    def _jump(self, target: str) -> None:
        st = self.state
        if target.startswith("flow:"):
            st.flow, st.step, st.form_field, st.waiting = target[5:], 0, 0, None
            return
        assert st.flow is not None
        st.step = self.bot.step_ids[st.flow][target]
        st.form_field, st.waiting = 0, None

    def _run(self) -> None:
        """Execute steps until one waits for the outside world or the flow ends."""
        st = self.state
        while st.flow is not None:
            self._steps += 1
            if self._steps > MAX_STEPS_PER_TURN:
                raise _Fail(f"more than {MAX_STEPS_PER_TURN} steps in one turn (a goto loop?)")
            steps = self.bot.flows[st.flow]["steps"]
            if st.step >= len(steps):
                self._finish_flow()
                if st.flow is not None:  # back in an interrupted flow: ask its question again
                    self._resume_ask()
                return
            step = steps[st.step]
            action = action_of(step)
            if getattr(self, f"_step_{action}")(step[action]):
                return

    def _resume_ask(self) -> None:
        st = self.state
        assert st.flow is not None
        step = self.bot.flows[st.flow]["steps"][st.step]
        if "form" in step:
            if not self._next_form_field(step["form"]["fields"]):
                st.step += 1
                self._run()
            return
        self._run()

    # Each _step_* returns True when the turn stops there (waiting), False to go on.

    def _step_say(self, body: Any) -> bool:
        if isinstance(body, dict) and "text" in body:
            buttons = [
                Button(
                    self._render(self.bot.text(b["title"], self._lang())),
                    b.get("payload"),
                    self._render(b["url"]) if b.get("url") else None,
                )
                for b in body.get("buttons", [])
            ]
            self.say(self.bot.text(body["text"], self._lang()), buttons)
        else:
            self.say(self.bot.text(body, self._lang()))
        self.state.step += 1
        return False

    def _step_ask(self, body: dict[str, Any]) -> bool:
        st = self.state
        if self._skip(body):
            st.step += 1
            return False
        self._emit_ask(body)
        st.waiting = {"ask": st.step}
        return True

    def _step_form(self, body: dict[str, Any]) -> bool:
        st = self.state
        if self._next_form_field(body["fields"]):
            return True
        st.form_field = 0
        st.step += 1
        return False

    def _step_call(self, body: dict[str, Any]) -> bool:
        st = self.state
        integration = self.bot.definition["integrations"][body["integration"]]
        scope = self.scope()
        call_id = self._effect_id("call")
        try:
            if "plugin" in integration:
                request: dict[str, Any] = {
                    "plugin": integration["plugin"],
                    "action": body.get("action", ""),
                    "args": render_value(body.get("json", {}), scope),
                }
            else:
                url = integration["base_url"].rstrip("/") + render(body.get("path", ""), scope)
                query = render_value(body.get("query") or {}, scope)
                if query:
                    from urllib.parse import urlencode

                    url += ("&" if "?" in url else "?") + urlencode(
                        {k: v for k, v in query.items() if v is not None}
                    )
                req: dict[str, Any] = {
                    "method": body.get("method", "POST" if "json" in body else "GET"),
                    "url": url,
                    "headers": render_value(integration.get("headers", {}) | body.get("headers", {}), scope),
                }
                if "json" in body:
                    req["json"] = render_value(body["json"], scope)
                request = {"request": req}
        except TemplateError as exc:
            raise _Fail(f"call {body['integration']}: {exc}") from None
        timing = {
            "timeout_s": duration_ms(integration["timeout"]) / 1000 if "timeout" in integration else 10.0,
            "retries": int(integration.get("retries", 1)),
        }
        if "request" in request:
            request["request"].update(timing)
        else:
            request.update(timing)
        self.fx.calls.append(
            {
                "call_id": call_id,
                "conversation_id": self.conversation_id,
                "name": body["integration"],
                **request,
            }
        )
        st.waiting = {"call": call_id}
        return True

    def _call_answered(self, result: dict[str, Any]) -> None:
        st = self.state
        assert st.flow is not None
        body = self.bot.flows[st.flow]["steps"][st.step]["call"]
        st.waiting = None
        self.fx.summary["call"] = {"name": body["integration"], "ok": bool(result.get("ok"))}
        if not result.get("ok"):
            if "on_error" in body:
                self._jump(body["on_error"])
                self._run()
            else:
                self.say_builtin("error")
                self._finish_flow()
            return
        answer = {"body": result.get("body"), "status": result.get("status")}
        for slot, path in (body.get("save") or {}).items():
            st.slots[slot] = _dig(answer, path)
        traits = {t: _dig(answer, path) for t, path in (body.get("save_traits") or {}).items()}
        if traits:
            self._set_traits(traits)
        st.step += 1
        self._run()

    def _step_branch(self, arms: list[dict[str, Any]]) -> bool:
        for arm in arms:
            if arm.get("else") or ("if" in arm and self._test(arm["if"])):
                self._jump(arm["goto"])
                return False
        self.state.step += 1
        return False

    def _step_set(self, body: dict[str, Any]) -> bool:
        scope = self.scope()
        try:
            if "slots" in body:
                self.state.slots.update(render_value(body["slots"], scope))
            if "traits" in body:
                self._set_traits(render_value(body["traits"], scope))
            if "stage" in body:
                stage = render(body["stage"], scope)
                self.customer.stage = stage
                self.fx.events.append({"type": "customer.stage_set", "payload": {"stage": stage}})
            for kind, template in (body.get("identities") or {}).items():
                value = render_value(template, scope)
                if value not in (None, ""):
                    self.fx.events.append(
                        {"type": "identity.linked", "payload": {"kind": kind, "value": str(value)}}
                    )
            if "tags" in body:
                tags = list(self.customer.traits.get("tags") or [])
                for tag in body["tags"]:
                    if tag not in tags:
                        tags.append(tag)
                self._set_traits({"tags": tags})
        except TemplateError as exc:
            raise _Fail(f"set: {exc}") from None
        self.state.step += 1
        return False

    def _set_traits(self, traits: dict[str, Any]) -> None:
        self.customer.traits.update(traits)
        self.fx.events.append({"type": "customer.traits_set", "payload": {"traits": traits}})

    def _step_track(self, body: dict[str, Any]) -> bool:
        try:
            props = render_value(body.get("properties") or {}, self.scope())
        except TemplateError as exc:
            raise _Fail(f"track: {exc}") from None
        self.fx.events.append(
            {"type": "track", "name": body["event"], "payload": {"event": body["event"], "properties": props}}
        )
        self.state.step += 1
        return False

    def _step_handoff(self, body: dict[str, Any]) -> bool:
        self._handoff(body.get("queue"), body.get("reason"), body.get("text"))
        return True

    def _handoff(self, queue: str | None, reason: str | None, text: Any) -> None:
        st = self.state
        self.say(
            self.bot.text(text, self._lang()) if text else self.bot.builtin_text("handoff", self._lang())
        )
        st.flow, st.step, st.form_field, st.waiting, st.stack = None, 0, 0, None, []
        self.status = STATUS_WAITING
        self.fx.status = STATUS_WAITING
        self.fx.queue = queue or self.bot.settings.get("handoff_queue") or "default"
        self.fx.reason = (reason or "requested")[:500]

    def _step_wait(self, body: dict[str, Any]) -> bool:
        st = self.state
        key = f"{self.conversation_id}:wait:{self._effect_id('wait')}"
        self.fx.timers.append(
            {
                "key": key,
                "fire_at": self.now + duration_ms(body["timeout"]),
                "payload": {"kind": "wait_timeout", "conversation_id": self.conversation_id},
            }
        )
        st.waiting = {"timer": key, "event": body.get("event")}
        return True

    def _step_goto(self, target: str) -> bool:
        self._jump(target)
        return False

    def _step_end(self, _body: Any) -> bool:
        st = self.state
        st.step = len(self.bot.flows[st.flow]["steps"]) if st.flow else 0
        return False

    # -- timers, business events, operators ------------------------------------------------------

    def _timer(self, data: dict[str, Any]) -> None:
        st = self.state
        kind = data.get("kind")
        if kind == "wait_timeout":
            if not (st.waiting and st.waiting.get("timer") == data.get("key")):
                self.fx.summary["ignored"] = "stale_timer"
                return
            assert st.flow is not None
            body = self.bot.flows[st.flow]["steps"][st.step]["wait"]
            st.waiting = None
            self.fx.summary["wait"] = "timeout"
            if "on_timeout" in body:
                self._jump(body["on_timeout"])
            else:
                st.step += 1
            self._run()
        elif kind == "deferred_flow":
            self._proactive(str(data["flow"]), data.get("event") or {})

    def _business_event(self, inp: Input) -> None:
        st = self.state
        if st.waiting and st.waiting.get("event") == inp.name and st.flow is not None:
            self.fx.cancel_timers.append(st.waiting["timer"])
            st.waiting = None
            st.event = {"name": inp.name, **inp.data}
            self.fx.summary["wait"] = "event"
            st.step += 1
            self._run()
            return
        flow = inp.data.get("_flow")
        if flow:
            self._proactive(
                str(flow), {"name": inp.name, **{k: v for k, v in inp.data.items() if k != "_flow"}}
            )

    def _proactive(self, flow: str, event: dict[str, Any]) -> None:
        """Start an event-triggered flow. With a person on the conversation the bot keeps quiet."""
        if self.status in (STATUS_WAITING, STATUS_HUMAN):
            self.fx.summary["skipped"] = "with_operator"
            return
        self.state.event = event
        self.fx.summary["proactive"] = flow
        self._start_flow(flow, interrupt=True)

    def match_trigger(self, name: str, data: dict[str, Any]) -> Any:
        """The first event trigger of ``name`` whose condition holds now (or None)."""
        saved = self.state.event
        self.state.event = {"name": name, **data}
        try:
            for trigger in self.bot.event_triggers.get(name, []):
                if trigger.condition is None or trigger.condition.evaluate(self.scope(), self._functions()):
                    return trigger
            return None
        finally:
            self.state.event = saved

    def _operator_reply(self, inp: Input) -> None:
        self.status = STATUS_HUMAN
        self.fx.status = STATUS_HUMAN
        buttons = tuple(Button.from_json(b) for b in inp.data.get("buttons") or ())
        self.fx.messages.append((OutboundMessage(str(inp.text or ""), buttons), "operator"))

    def _handback(self, inp: Input) -> None:
        st = self.state
        self.status = STATUS_BOT
        self.fx.status = STATUS_BOT
        st.misses = 0
        self._reset_flow()
        flow = inp.data.get("flow")
        if flow:
            self._start_flow(str(flow), interrupt=False)

    def _opt_out(self) -> None:
        self.fx.consent_off = True
        self.fx.summary["opt_out"] = True
        self.say_builtin("opted_out")

    # -- helpers ---------------------------------------------------------------------------------

    def say(self, template: str, buttons: list[Button] | None = None) -> None:
        text = self._render(template)
        self.fx.messages.append((OutboundMessage(text, tuple(buttons or ())), "bot"))

    def say_builtin(self, key: str) -> None:
        self.say(self.bot.builtin_text(key, self._lang()))

    def _render(self, template: str) -> str:
        try:
            return render(template, self.scope())
        except TemplateError as exc:
            log.warning("template_failed", bot=self.bot.name, error=str(exc))
            self.fx.summary.setdefault("template_errors", []).append(str(exc)[:200])
            return self.bot.builtin_text("error", self._lang())

    def _test(self, condition: str) -> bool:
        cond = self.bot.condition(condition)
        return bool(cond.evaluate(self.scope(), self._functions()))

    def _functions(self) -> dict[str, Any]:
        events = self.customer.events

        def count_events(name: str, days: int | float = 36500) -> int:
            since = self.now - int(days * 86_400_000)
            return sum(1 for e in events if e.get("name") == name and int(e.get("at_ms", 0)) >= since)

        def last_event(name: str) -> dict[str, Any] | None:
            for e in events:
                if e.get("name") == name:
                    return e
            return None

        return {"count_events": count_events, "last_event": last_event}

    def scope(self) -> dict[str, Any]:
        c = self.customer
        tz = self._timezone()
        local = datetime.fromtimestamp(self.now / 1000, tz=UTC).astimezone(tz)
        context = dict(c.context) | {
            "channel": self.channel,
            "language": self._lang(),
            "local_time": local.strftime("%H:%M"),
            "local_hour": local.hour,
            "weekday": local.isoweekday(),
            "timezone": str(tz),
        }
        return {
            "customer_id": c.id,
            "profile": {"traits": c.traits, "stage": c.stage, "consents": c.consents, "context": context},
            "traits": c.traits,
            "slots": self.state.slots,
            "context": context,
            "consents": c.consents,
            "preferences": c.preferences,
            "stage": c.stage,
            "event": self.state.event,
            "events": c.events,
            "intent": self.intent or {},
            "now": local.isoformat(),
        }

    def _lang(self) -> str:
        return self.state.language or self.bot.default_language

    def _language(self) -> str:
        c = self.customer
        for candidate in (c.preferences.get("language"), c.context.get("locale")):
            if isinstance(candidate, str) and candidate[:2].lower() in self.bot.languages:
                return candidate[:2].lower()
        return self.bot.default_language

    def _timezone(self) -> zoneinfo.ZoneInfo:
        for candidate in (self.customer.preferences.get("timezone"), self.customer.context.get("timezone")):
            if isinstance(candidate, str):
                try:
                    return zoneinfo.ZoneInfo(candidate)
                except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                    continue
        return zoneinfo.ZoneInfo("UTC")

    def _effect_id(self, kind: str) -> str:
        """Deterministic per conversation and input, so reprocessing a batch repeats the same ids."""
        self.state.serial += 1
        assert self.input is not None
        return derived_id(kind, self.now, f"{self.input.id}:{self.state.serial}")


class _Fail(Exception):
    """A turn cannot go on (a template in a call failed, a goto loop): safe text, flow ends."""


_CYRILLIC = re.compile("[а-яё]")
_LATIN = re.compile("[a-z]")


def _script_language(text: str) -> str | None:
    """``ru`` for Cyrillic text, ``en`` for Latin text, None for digits, commands and the like
    (letters counted in the first 200 characters, by regex: a loop per character cost more)."""
    if text.startswith("/"):
        return None
    head = text[:200].lower()
    cyrillic, latin = len(_CYRILLIC.findall(head)), len(_LATIN.findall(head))
    if cyrillic + latin < 2:
        return None
    return "ru" if cyrillic >= latin else "en"


def _dig(data: Any, path: str) -> Any:
    """``body.items.0.id`` → the value, or None when any part is missing."""
    for part in path.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data
