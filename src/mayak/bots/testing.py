"""Conversation tests written in YAML, run against the same engine the pipeline runs.

A test is a list of steps, each one of:

``user: TEXT``            the customer writes
``click: TITLE|PAYLOAD``  the customer presses a button the bot offered
``event: {name, properties}``  a business system reports an event (proactive flows, waits)
``bot: TEXT``             the bot's next message contains TEXT (case-insensitive), or matches
                          ``/REGEX/``; ``buttons: [titles]`` on the same step checks its buttons
``no_reply: true``        the bot said nothing (more)
``slot: {name: value}``   the conversation's slots hold these values
``call: NAME``            the bot called integration NAME; ``respond: {status, body}`` (or
                          ``respond: {error: timeout}``) is the answer the test gives it
``status: waiting_human`` the conversation's status (``bot``, ``waiting_human``, ``human``)

The clock starts at 2026-01-15 10:00 UTC and moves one minute per step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mayak.bots.compiled import CompiledBot, compile_bot
from mayak.bots.engine import STATUS_BOT, Customer, Effects, Input, State, Turn
from mayak.bots.loader import LoadedBot
from mayak.channels.base import OutboundMessage

START_MS = 1_768_471_200_000  # 2026-01-15T10:00:00Z


@dataclass
class TestResult:
    name: str
    file: str
    line: int
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


class _Session:
    def __init__(self, bot: CompiledBot, test: dict[str, Any]):
        profile = test.get("profile") or {}
        prefs = dict(profile.get("preferences") or {})
        if test.get("language"):
            prefs["language"] = test["language"]
        self.bot = bot
        self.customer = Customer(
            "cus_test",
            dict(profile.get("traits") or {}),
            dict(profile.get("consents") or {}),
            prefs,
            dict(profile.get("context") or {}),
            profile.get("stage"),
        )
        self.state = State()
        self.status = STATUS_BOT
        self.channel = test.get("channel", "webchat")
        self.now = START_MS
        self.serial = 0
        self.inbox: list[OutboundMessage] = []
        self.last: OutboundMessage | None = None
        self.offered: list[Any] = []
        self.calls: list[dict[str, Any]] = []

    def feed(self, inp: Input) -> Effects:
        turn = Turn(self.bot, self.state, self.customer, self.status, self.channel, "conv_test")
        fx = turn.run(inp)
        self.status = turn.status
        self.inbox.extend(m for m, _ in fx.messages)
        for m, _ in fx.messages:
            if m.buttons:
                self.offered = list(m.buttons)
        self.calls.extend(fx.calls)
        return fx

    def next_input(self, kind: str, **kw: Any) -> Input:
        self.serial += 1
        self.now += 60_000
        self.inbox.clear()
        return Input(kind, self.now, f"evt_test{self.serial}", **kw)


def run_tests(loaded: LoadedBot, bot: CompiledBot | None = None) -> list[TestResult]:
    """Run every test of a loaded (valid) bot."""
    compiled = bot or compile_bot("bot_test", 1, loaded.definition)
    return [run_test(compiled, test) for test in loaded.tests]


def run_test(bot: CompiledBot, test: dict[str, Any]) -> TestResult:
    result = TestResult(str(test.get("name")), str(test.get("_file", "-")), int(test.get("_line", 0)))
    s = _Session(bot, test)
    for index, step in enumerate(test["steps"], 1):
        where = f"step {index}"
        try:
            _step(s, step, where, result)
        except _Stop:
            break
    return result


class _Stop(Exception):
    pass


def _fail(result: TestResult, message: str) -> None:
    result.failures.append(message)
    raise _Stop


def _step(s: _Session, step: dict[str, Any], where: str, result: TestResult) -> None:
    if "user" in step:
        s.feed(s.next_input("message", text=str(step["user"])))
    elif "click" in step:
        wanted = str(step["click"])
        folded = wanted.casefold()
        button = next(
            (b for b in s.offered if wanted in (b.title, b.payload) or folded == b.title.casefold()), None
        )
        if button is None:
            offered = ", ".join(b.title for b in s.offered) or "none"
            _fail(result, f"{where}: no button {wanted!r} was offered (offered: {offered})")
        else:
            s.feed(s.next_input("button", payload=button.payload, title=button.title))
    elif "event" in step:
        ev = step["event"]
        name, props = str(ev.get("name")), dict(ev.get("properties") or {})
        inp = s.next_input("event", name=name, data=props)
        probe = Turn(s.bot, State(slots=dict(s.state.slots)), s.customer)
        probe.now = inp.at
        trigger = probe.match_trigger(name, props)
        waiting = s.state.waiting and s.state.waiting.get("event") == name
        if trigger is None and not waiting:
            return  # nothing reacts to it, which the next `no_reply` step can check
        if trigger is not None and not waiting:
            inp.data["_flow"] = trigger.flow
        s.feed(inp)
    if "call" in step:
        _call(s, step, where, result)
    if "bot" in step:
        if not s.inbox:
            _fail(result, f"{where}: expected the bot to say {step['bot']!r}, it said nothing")
        said = s.inbox.pop(0)
        s.last = said
        if not _matches(str(step["bot"]), said.text):
            _fail(result, f"{where}: expected {step['bot']!r}, the bot said {said.text!r}")
    if "buttons" in step:
        titles = [b.title for b in (s.last.buttons if s.last else ())]
        if titles != [str(t) for t in step["buttons"]]:
            _fail(result, f"{where}: expected buttons {step['buttons']}, got {titles}")
    if step.get("no_reply") and s.inbox:
        _fail(result, f"{where}: expected no reply, the bot said {s.inbox[0].text!r}")
    if "slot" in step:
        for name, value in step["slot"].items():
            if s.state.slots.get(name) != value:
                _fail(result, f"{where}: slot {name} is {s.state.slots.get(name)!r}, expected {value!r}")
    if "status" in step and s.status != step["status"]:
        _fail(result, f"{where}: status is {s.status}, expected {step['status']}")


def _call(s: _Session, step: dict[str, Any], where: str, result: TestResult) -> None:
    wanted = str(step["call"])
    call = next((c for c in s.calls if c.get("name") == wanted), None)
    if call is None:
        made = ", ".join(c.get("name", "?") for c in s.calls) or "none"
        _fail(result, f"{where}: expected a call to {wanted!r}; calls made: {made}")
        return
    s.calls.remove(call)
    respond = step.get("respond") or {"status": 200, "body": {}}
    status = respond.get("status")
    ok = respond.get("error") is None and isinstance(status, int) and 200 <= status < 300
    data = {
        "call_id": call["call_id"],
        "ok": ok,
        "status": status,
        "body": respond.get("body"),
        "error": respond.get("error") or (None if ok else f"http_{status}"),
    }
    s.feed(s.next_input("result", data=data))


def _matches(expected: str, text: str) -> bool:
    if len(expected) > 2 and expected.startswith("/") and expected.endswith("/"):
        return re.search(expected[1:-1], text, re.IGNORECASE | re.DOTALL) is not None
    return expected.casefold() in text.casefold()
