"""Several engines as one: train them all, parse with all, keep the most confident answer.

Rule: every engine parses the utterance; each answer's *score* is the engine's weight times the
confidence of its best intent (0 when it has none). The answer with the highest score wins (ties go
to the engine listed first) and its intent ranking is returned **unchanged**: weights only choose,
they never rescale a confidence, so the result is still one engine's calibrated probability.
Entities are merged from all engines: those of the winning engine first, then every other engine's
in list order, skipping any that overlaps an entity already kept (or, for an entity without a
position, repeats one's type and value).

An engine that raises while parsing is skipped (and logged); if every engine raises, the first error
is raised.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from .base import Engine, Entity, Example, Parse

log = structlog.get_logger("mayak.nlu")


class EnsembleEngine:
    """Trains and runs ``engines``; the best ``weight × confidence`` answer wins (see the module)."""

    name = "ensemble"

    def __init__(self, engines: Sequence[Engine], weights: Sequence[float] | None = None) -> None:
        if not engines:
            raise ValueError("an ensemble needs at least one engine")
        if weights is None:
            weights = [1.0] * len(engines)
        if len(weights) != len(engines):
            raise ValueError(f"{len(weights)} weights for {len(engines)} engines")
        if any(w < 0 for w in weights):
            raise ValueError("ensemble weights must not be negative")
        self.engines = list(engines)
        self.weights = [float(w) for w in weights]

    @property
    def slow(self) -> bool:
        """Slow when any of its engines is."""
        return any(getattr(engine, "slow", False) for engine in self.engines)

    def train(self, examples: Sequence[Example]) -> None:
        for engine in self.engines:
            engine.train(examples)

    def parse(self, text: str) -> Parse:
        answers: list[tuple[int, Parse]] = []
        first_error: Exception | None = None
        for i, engine in enumerate(self.engines):
            try:
                answers.append((i, engine.parse(text)))
            except Exception as exc:
                log.warning("nlu.ensemble_engine_failed", engine=engine.name, error=repr(exc))
                first_error = first_error or exc
        if not answers:
            assert first_error is not None
            raise first_error
        best_i, best = max(answers, key=lambda a: (self._score(a[0], a[1]), -a[0]))
        others = [p for i, p in answers if i != best_i]
        return Parse(text=text, intents=list(best.intents), entities=merge_entities([best, *others]))

    def _score(self, index: int, parse: Parse) -> float:
        best = parse.intent
        return self.weights[index] * best.confidence if best else 0.0


def merge_entities(parses: Sequence[Parse]) -> list[Entity]:
    """Entities of all ``parses`` in order, without overlaps or repeats, sorted by position."""
    kept: list[Entity] = []
    for parse in parses:
        for e in parse.entities:
            if e.start < 0:
                if any(k.type == e.type and k.value == e.value for k in kept):
                    continue
            elif any(k.start >= 0 and e.start < k.end and k.start < e.end for k in kept):
                continue
            kept.append(e)
    return sorted(kept, key=lambda e: (e.start < 0, e.start, e.end))
