"""A published bot version made ready to run: flows indexed, triggers mapped, NLU trained.

Built once per (bot, version) and process, and cached: versions are immutable, so the cache never
needs invalidating, only bounding.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import orjson

from mayak.bots.loader import ACTIONS, CONDITION_FUNCTIONS, CONDITION_ROOTS

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayak.conditions import Condition
    from mayak.nlu import IntentScore, Parse

DEFAULT_THRESHOLD = 0.45
DEFAULT_FALLBACK_AFTER = 2
DEFAULT_RATE = (8, 10_000)  # messages, per ms
DEFAULT_OPT_OUT = ("stop", "unsubscribe", "стоп", "отписаться", "отписка", "отписать")
DEFAULT_TEXTS: dict[str, dict[str, str]] = {
    "not_understood": {
        "en": "Sorry, I did not understand that. Could you put it another way?",
        "ru": "Извините, я не понял. Можете сказать иначе?",
    },
    "retry": {"en": "That does not look right.", "ru": "Кажется, это не подходит."},
    "handoff": {
        "en": "I am passing you to a colleague, who will answer here shortly.",
        "ru": "Передаю вас коллеге, он ответит здесь в ближайшее время.",
    },
    "error": {
        "en": "Sorry, something went wrong on our side. Please try again a little later.",
        "ru": "Извините, у нас что-то пошло не так. Попробуйте, пожалуйста, чуть позже.",
    },
    "opted_out": {
        "en": "You will not receive marketing messages here any more. Service messages about your "
        "orders and visits will still reach you.",
        "ru": "Вы больше не будете получать здесь рекламные сообщения. Сервисные сообщения о ваших "
        "заказах и визитах продолжат приходить.",
    },
    "slow_down": {
        "en": "You are sending messages faster than I can read them; I will answer in a moment.",
        "ru": "Вы пишете быстрее, чем я успеваю читать; отвечу через мгновение.",
    },
}
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(text: str) -> int:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def action_of(step: dict[str, Any]) -> str:
    for action in ACTIONS:
        if action in step:
            return action
    raise ValueError("a step without an action")


@dataclass(slots=True)
class EventTrigger:
    flow: str
    name: str
    condition: Condition | None
    purpose: str


@dataclass
class CompiledBot:
    bot_id: str
    version: int
    definition: dict[str, Any]
    flows: dict[str, dict[str, Any]] = field(default_factory=dict)
    step_ids: dict[str, dict[str, int]] = field(default_factory=dict)
    intent_flows: dict[str, str] = field(default_factory=dict)
    command_flows: dict[str, str] = field(default_factory=dict)
    payload_flows: dict[str, str] = field(default_factory=dict)
    event_triggers: dict[str, list[EventTrigger]] = field(default_factory=dict)
    waited_events: frozenset[str] = frozenset()
    conditions: dict[str, Condition] = field(default_factory=dict)
    uses_history: bool = False
    nlu: Any = None

    @property
    def settings(self) -> dict[str, Any]:
        bot: dict[str, Any] = self.definition["bot"]
        return bot

    @property
    def name(self) -> str:
        return str(self.settings["name"])

    # Read on every turn; a published version never changes (see ``mayak.bots.store``), so each is
    # worked out once per compiled version.
    @cached_property
    def languages(self) -> list[str]:
        return list(self.settings.get("languages") or [self.default_language])

    @cached_property
    def default_language(self) -> str:
        return str(self.settings.get("default_language") or (self.settings.get("languages") or ["en"])[0])

    @cached_property
    def threshold(self) -> float:
        return float((self.settings.get("nlu") or {}).get("threshold", DEFAULT_THRESHOLD))

    @cached_property
    def fallback_after(self) -> int:
        return int(self.settings.get("fallback_after", DEFAULT_FALLBACK_AFTER))

    @cached_property
    def rate_limit(self) -> tuple[int, int]:
        rl = self.settings.get("rate_limit") or {}
        per = duration_ms(rl["per"]) if "per" in rl else DEFAULT_RATE[1]
        return int(rl.get("messages", DEFAULT_RATE[0])), per

    @cached_property
    def opt_out_words(self) -> frozenset[str]:
        return frozenset(w.casefold() for w in (*DEFAULT_OPT_OUT, *self.settings.get("opt_out_words", ())))

    def condition(self, text: str) -> Condition:
        cond = self.conditions.get(text)
        if cond is None:
            from mayak.conditions import parse

            cond = self.conditions[text] = parse(text, roots=CONDITION_ROOTS, functions=CONDITION_FUNCTIONS)
        return cond

    @property
    def slow_nlu(self) -> bool:
        """The NLU engine calls out (an LLM) or runs a large model: ask it before appending."""
        return bool(getattr(self.nlu, "slow", False))

    def understand(self, text: str) -> Parse | None:
        if self.nlu is None or not text.strip():
            return None
        result: Parse = self.nlu.parse(text[:1000])
        return result

    def top_intent(self, text: str) -> IntentScore | None:
        """``understand(text).intent``, through the engine's cheaper ``top`` where it has one."""
        if self.nlu is None or not text.strip():
            return None
        top: Callable[[str], IntentScore] | None = getattr(self.nlu, "top", None)
        if top is not None:
            return top(text[:1000])
        parsed: Parse = self.nlu.parse(text[:1000])
        return parsed.intent

    def text(self, ref: Any, language: str) -> str:
        """The template for a text reference (``@key``, inline text, or per-language mapping)."""
        if isinstance(ref, str) and ref.startswith("@") and " " not in ref:
            key = ref[1:]
            ref = self.definition["texts"].get(key) or DEFAULT_TEXTS.get(key) or ""
        if isinstance(ref, dict):
            return str(ref.get(language) or ref.get(self.default_language) or next(iter(ref.values()), ""))
        return str(ref)

    def builtin_text(self, key: str, language: str) -> str:
        """A bot's own text for ``key`` if it defines one, else Mayak's default."""
        return self.text(self.definition["texts"].get(key) or DEFAULT_TEXTS[key], language)


def has_slow_nlu(definition: dict[str, Any]) -> bool:
    """What ``compile_bot(…).slow_nlu`` will say, read from the definition without training: the
    bot has intent examples and its engine spec is a slow one (an LLM, sentence embeddings)."""
    from mayak.nlu import is_slow_spec

    has_examples = any(
        any(body["examples"].values()) if isinstance(body["examples"], dict) else body["examples"]
        for body in definition.get("intents", {}).values()
    )
    return has_examples and is_slow_spec((definition["bot"].get("nlu") or {}).get("engine"))


def compile_bot(
    bot_id: str, version: int, definition: dict[str, Any], *, region: str | None = None
) -> CompiledBot:
    """``region``: the workspace's default phone region, the NLU engine's default for phone entities."""
    from mayak.nlu import Example, build_engine

    bot = CompiledBot(bot_id, version, definition)
    bot.flows = definition["flows"]
    waited: set[str] = set()
    for name, flow in bot.flows.items():
        bot.step_ids[name] = {s["id"]: i for i, s in enumerate(flow["steps"]) if "id" in s}
        trigger = flow.get("trigger") or {}
        for intent in trigger.get("intents", []):
            bot.intent_flows.setdefault(intent, name)
        for command in trigger.get("commands", []):
            bot.command_flows.setdefault(command, name)
        for payload in trigger.get("payloads", []):
            bot.payload_flows.setdefault(payload, name)
        for ev in trigger.get("events", []):
            cond = bot.condition(ev["condition"]) if ev.get("condition") else None
            bot.event_triggers.setdefault(ev["name"], []).append(
                EventTrigger(name, ev["name"], cond, ev.get("purpose", "service"))
            )
        for step in flow["steps"]:
            if "wait" in step and step["wait"].get("event"):
                waited.add(step["wait"]["event"])
    bot.waited_events = frozenset(waited)
    text = orjson.dumps(definition["flows"]).decode() + orjson.dumps(definition.get("texts", {})).decode()
    bot.uses_history = "events" in text or "last_event" in text or "count_events" in text
    examples: list[Example] = []
    for intent, body in definition.get("intents", {}).items():
        phrases = body["examples"]
        if isinstance(phrases, dict):
            for lang_phrases in phrases.values():
                examples.extend(Example(p, intent) for p in lang_phrases)
        else:
            examples.extend(Example(p, intent) for p in phrases)
    if examples:
        spec = (bot.settings.get("nlu") or {}).get("engine")
        if spec is None or spec == "linear":
            # The engine's own entity pass is not needed: asks extract what they validate themselves.
            spec = {"engine": "linear", "entities": False}
        engine = build_engine(spec, region=region)
        engine.train(examples)
        bot.nlu = engine
    return bot


def definition_digest(definition: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(definition, option=orjson.OPT_SORT_KEYS)).hexdigest()


class BotCache:
    """Compiled versions by (bot id, version), bounded; thread-safe so tests and CLI can share it."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict[tuple[str, int], CompiledBot] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, bot_id: str, version: int) -> CompiledBot | None:
        with self._lock:
            bot = self._items.get((bot_id, version))
            if bot is not None:
                self._items.move_to_end((bot_id, version))
            return bot

    def put(self, bot: CompiledBot) -> None:
        with self._lock:
            self._items[(bot.bot_id, bot.version)] = bot
            while len(self._items) > self.size:
                self._items.popitem(last=False)
