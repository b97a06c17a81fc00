"""The NLU engine port: what every engine takes (examples) and gives back (a parse).

An engine learns intents from labelled example utterances and, for one customer message, returns the
intents it recognises, best first, each with a *calibrated* confidence (a probability in [0, 1], so a
bot can apply a threshold such as 0.5 for "not understood"), and the entities found in the text.
``parse`` is synchronous and meant to be fast and CPU-bound; an engine that calls the network (the LLM
engine) never raises from it and falls back instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled training utterance."""

    text: str
    intent: str


@dataclass(frozen=True, slots=True)
class IntentScore:
    """An intent and the probability that the utterance expresses it."""

    name: str
    confidence: float


@dataclass(frozen=True, slots=True)
class Entity:
    """A piece of structured information found in an utterance.

    ``start``/``end`` are character offsets into the parsed text (``text[start:end] == entity.text``);
    an entity whose position is unknown (an LLM slot whose value is not quoted verbatim) has
    ``start == end == -1``.
    """

    type: str
    value: Any
    text: str
    start: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "value": self.value,
            "text": self.text,
            "start": self.start,
            "end": self.end,
        }


@dataclass(frozen=True, slots=True)
class Parse:
    """What an engine understood from one utterance: intents best first, and entities."""

    text: str
    intents: list[IntentScore] = field(default_factory=list)
    entities: list[Entity] = field(default_factory=list)

    @property
    def intent(self) -> IntentScore | None:
        """The best intent, or None when the engine recognised none."""
        return self.intents[0] if self.intents else None

    def to_dict(self) -> dict[str, Any]:
        best = self.intent
        return {
            "text": self.text,
            "intent": {"name": best.name, "confidence": best.confidence} if best else None,
            "intents": [{"name": i.name, "confidence": i.confidence} for i in self.intents],
            "entities": [e.to_dict() for e in self.entities],
        }


@runtime_checkable
class Engine(Protocol):
    """An intent engine. ``train`` replaces whatever the engine learnt before."""

    name: str
    # Engines whose ``parse`` may take long (a network call, a large model) say ``slow = True``; the
    # bot router then asks them before a message is appended, never inside the pipeline's
    # transaction. Absent means False.

    def train(self, examples: Sequence[Example]) -> None: ...

    def parse(self, text: str) -> Parse: ...


class NotTrainedError(RuntimeError):
    """``parse`` was called before ``train``."""


def check_examples(examples: Sequence[Example]) -> list[Example]:
    """The examples with blank texts or intents dropped; ValueError when nothing is left."""
    kept = [e for e in examples if e.text.strip() and e.intent.strip()]
    if not kept:
        raise ValueError("cannot train an NLU engine on no examples (every text and intent was empty)")
    return kept
