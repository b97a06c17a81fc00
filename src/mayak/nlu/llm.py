"""An intent engine backed by any OpenAI-compatible ``/v1/chat/completions`` endpoint.

``train`` only remembers the intents and a few examples of each (no network). ``parse`` sends one
chat completion: a system prompt listing the intents (name, optional description, up to
``examples_per_intent`` examples) and the customer's message, asking for strict JSON

    {"intent": "<one of the names>" | null, "confidence": 0..1, "slots": {"<name>": <value>, ...}}

through ``response_format`` (a JSON schema by default; ``"json_object"`` or ``"none"`` for servers
without schema support). The answer is validated here whatever the server promised: an unknown intent
name, a confidence outside [0, 1], a non-object, or text that is not JSON count as a failure.

On a timeout, a transport or HTTP error, or an invalid answer, ``parse`` returns the fallback engine's
parse (trained together with this one unless ``train_fallback=False``), or an empty Parse when there
is none; it never raises. ``last_error`` tells why the last call fell back (None when it did not).

The confidence is the model's own estimate, not a calibrated probability; put the engine in an
:class:`~mayak.nlu.ensemble.EnsembleEngine` with a weight below 1 to let a calibrated engine win
unless the model is sure. ``parse`` is synchronous and blocks for the HTTP round trip: call it from a
worker thread in async code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx
import orjson
import structlog

from .base import Engine, Entity, Example, IntentScore, Parse, check_examples
from .ensemble import merge_entities
from .entities import extract_entities

log = structlog.get_logger("mayak.nlu")

ResponseFormat = Literal["json_schema", "json_object", "none"]
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class InvalidAnswerError(ValueError):
    """The model's answer is not the JSON object asked for."""


class LlmEngine:
    """Intent classification and slot filling by a chat-completion model (see the module)."""

    name = "llm"
    slow = True  # a network call: asked outside the pipeline's transaction (see nlu.base.Engine)

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 10.0,
        fallback: Engine | None = None,
        train_fallback: bool = True,
        examples_per_intent: int = 3,
        intent_descriptions: Mapping[str, str] | None = None,
        slots: Sequence[str] = (),
        response_format: ResponseFormat = "json_schema",
        temperature: float = 0.0,
        max_tokens: int = 256,
        entities: bool = True,
        tz: str | None = None,
        region: str | None = None,
        headers: Mapping[str, str] | None = None,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not base_url:
            raise ValueError("base_url is required (e.g. https://api.openai.com/v1)")
        if not model:
            raise ValueError("model is required")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if response_format not in ("json_schema", "json_object", "none"):
            raise ValueError(f"unknown response_format {response_format!r}")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.timeout = float(timeout)
        self.fallback = fallback
        self.train_fallback = train_fallback
        self.examples_per_intent = max(0, int(examples_per_intent))
        self.intent_descriptions = dict(intent_descriptions or {})
        self.slots = tuple(slots)
        self.response_format: ResponseFormat = response_format
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.entities = entities
        self.tz = tz
        self.region = region
        request_headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            request_headers["Authorization"] = f"Bearer {api_key}"
        self._headers = request_headers
        self._owns_client = client is None
        self._client = client or httpx.Client(transport=transport, timeout=self.timeout)
        self._examples: dict[str, list[str]] = {}
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> LlmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- engine ----------------------------------------------------------------------------------

    @property
    def intents(self) -> tuple[str, ...]:
        names = dict.fromkeys([*self._examples, *self.intent_descriptions])
        return tuple(names)

    def train(self, examples: Sequence[Example]) -> None:
        kept = check_examples(examples)
        by_intent: dict[str, list[str]] = {}
        for e in kept:
            texts = by_intent.setdefault(e.intent, [])
            if e.text not in texts:
                texts.append(e.text)
        self._examples = by_intent
        if self.fallback is not None and self.train_fallback:
            self.fallback.train(kept)

    def parse(self, text: str) -> Parse:
        try:
            if not self.intents:
                raise InvalidAnswerError("no intents: train the engine first")
            answer = self._ask(text)
            parse = self._to_parse(text, answer)
        except Exception as exc:  # never raise to the bot: fall back
            self.last_error = _describe(exc)
            log.warning("nlu.llm_fallback", url=self.url, model=self.model, reason=self.last_error)
            return self._fallback(text)
        self.last_error = None
        return parse

    # -- internals -------------------------------------------------------------------------------

    def _fallback(self, text: str) -> Parse:
        if self.fallback is None:
            return Parse(text=text)
        try:
            return self.fallback.parse(text)
        except Exception as exc:
            log.warning("nlu.llm_fallback_failed", engine=self.fallback.name, error=repr(exc))
            return Parse(text=text)

    def system_prompt(self) -> str:
        lines = [
            "You classify one message that a customer sent to a company's chat bot.",
            "Choose the single intent below that the message expresses, or null if none fits.",
            "Intents:",
        ]
        for name in self.intents:
            description = self.intent_descriptions.get(name)
            lines.append(f"- {name}" + (f": {description}" if description else ""))
            for example in self._examples.get(name, [])[: self.examples_per_intent]:
                lines.append(f"    example: {orjson.dumps(example).decode()}")
        if self.slots:
            lines.append(
                "Slots to fill from the message when present (copy the words as written): "
                + ", ".join(self.slots)
                + "."
            )
        else:
            lines.append(
                "Slots: name/value pairs of details in the message (dates, models, numbers), if any."
            )
        lines.append(
            'Answer with a JSON object only: {"intent": <intent name or null>, '
            '"confidence": <number from 0 to 1: how sure you are>, "slots": {<slot name>: <value>}}.'
        )
        return "\n".join(lines)

    def _schema(self) -> dict[str, Any]:
        slot_schema: dict[str, Any]
        if self.slots:
            slot_schema = {
                "type": "object",
                "properties": {s: {"type": ["string", "null"]} for s in self.slots},
                "required": list(self.slots),
                "additionalProperties": False,
            }
        else:
            slot_schema = {"type": "object"}
        return {
            "type": "object",
            "properties": {
                "intent": {"anyOf": [{"type": "string", "enum": list(self.intents)}, {"type": "null"}]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "slots": slot_schema,
            },
            "required": ["intent", "confidence", "slots"],
            "additionalProperties": False,
        }

    def request_body(self, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_prompt()},
                {"role": "user", "content": text},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                # strict mode needs every object closed, which free-form slots are not
                "json_schema": {"name": "nlu_parse", "schema": self._schema(), "strict": bool(self.slots)},
            }
        elif self.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        return body

    def _ask(self, text: str) -> dict[str, Any]:
        response = self._client.post(
            self.url,
            content=orjson.dumps(self.request_body(text)),
            headers={**self._headers, "Content-Type": "application/json"},
            timeout=self.timeout,
        )
        response.raise_for_status()
        envelope = orjson.loads(response.content)
        try:
            content = envelope["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise InvalidAnswerError("no choices[0].message.content in the response") from exc
        if not isinstance(content, str):
            raise InvalidAnswerError("message content is not text")
        fenced = _FENCE.match(content)
        answer = orjson.loads(fenced.group(1) if fenced else content)
        if not isinstance(answer, dict):
            raise InvalidAnswerError("the answer is not a JSON object")
        return answer

    def _to_parse(self, text: str, answer: dict[str, Any]) -> Parse:
        intent = answer.get("intent")
        if intent is not None and (not isinstance(intent, str) or intent not in self.intents):
            raise InvalidAnswerError(f"unknown intent {intent!r}")
        confidence = answer.get("confidence")
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, int | float)
            or not math.isfinite(confidence)
            or not 0.0 <= confidence <= 1.0
        ):
            raise InvalidAnswerError(f"confidence {confidence!r} is not a number in [0, 1]")
        slots = answer.get("slots", {})
        if slots is None:
            slots = {}
        if not isinstance(slots, dict):
            raise InvalidAnswerError("slots is not an object")
        intents = [IntentScore(intent, float(confidence))] if intent is not None else []
        rule_based = extract_entities(text, tz=self.tz, region=self.region) if self.entities else []
        slot_entities = self._slot_entities(text, slots)
        entities = merge_entities([Parse(text, entities=rule_based), Parse(text, entities=slot_entities)])
        return Parse(text=text, intents=intents, entities=entities)

    def _slot_entities(self, text: str, slots: dict[str, Any]) -> list[Entity]:
        out = []
        folded = text.casefold()
        for name, value in slots.items():
            if not isinstance(name, str) or value is None or value == "" or value == []:
                continue
            if self.slots and name not in self.slots:
                continue
            shown = value if isinstance(value, str) else orjson.dumps(value).decode()
            at = folded.find(shown.casefold()) if len(folded) == len(text) else -1
            if at >= 0:
                out.append(Entity(name, value, text[at : at + len(shown)], at, at + len(shown)))
            else:
                out.append(Entity(name, value, shown, -1, -1))
        return out


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout: {type(exc).__name__}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"http status {exc.response.status_code}"
    if isinstance(exc, httpx.HTTPError):
        return f"transport error: {type(exc).__name__}: {exc}"
    if isinstance(exc, orjson.JSONDecodeError):
        return f"invalid JSON: {exc}"
    if isinstance(exc, InvalidAnswerError):
        return f"invalid answer: {exc}"
    return f"error: {type(exc).__name__}: {exc}"
