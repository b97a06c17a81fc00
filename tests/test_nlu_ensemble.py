"""EnsembleEngine's rule, entity merging, and build_engine specs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from mayak.nlu import (
    EmbeddingEngine,
    Engine,
    EnsembleEngine,
    Entity,
    Example,
    IntentScore,
    LinearEngine,
    LlmEngine,
    Parse,
    build_engine,
)

DATA = Path(__file__).parent / "data" / "nlu" / "demo_motors.yaml"


class Fixed:
    """An engine that always gives the same answer."""

    def __init__(self, name: str, intents: list[IntentScore], entities: Sequence[Entity] = ()) -> None:
        self.name = name
        self.intents = intents
        self.entities = list(entities)
        self.trained: list[Example] = []

    def train(self, examples: Sequence[Example]) -> None:
        self.trained = list(examples)

    def parse(self, text: str) -> Parse:
        return Parse(text=text, intents=list(self.intents), entities=list(self.entities))


class Broken:
    name = "broken"

    def train(self, examples: Sequence[Example]) -> None:
        pass

    def parse(self, text: str) -> Parse:
        raise RuntimeError("boom")


def test_the_most_confident_answer_wins_unchanged() -> None:
    a = Fixed("a", [IntentScore("prices", 0.6), IntentScore("greeting", 0.1)])
    b = Fixed("b", [IntentScore("thanks", 0.8)])
    ensemble = EnsembleEngine([a, b])
    assert isinstance(ensemble, Engine)
    assert ensemble.parse("x").intents == [IntentScore("thanks", 0.8)]
    # weights choose, they do not rescale: 0.5 * 0.8 < 0.6, so a wins with its own confidences
    weighted = EnsembleEngine([a, b], weights=[1.0, 0.5])
    assert weighted.parse("x").intents == [IntentScore("prices", 0.6), IntentScore("greeting", 0.1)]


def test_ties_go_to_the_first_engine_and_empty_answers_lose() -> None:
    a = Fixed("a", [IntentScore("prices", 0.7)])
    b = Fixed("b", [IntentScore("thanks", 0.7)])
    empty = Fixed("empty", [])
    assert EnsembleEngine([a, b]).parse("x").intents[0].name == "prices"
    assert EnsembleEngine([empty, b]).parse("x").intents[0].name == "thanks"
    assert EnsembleEngine([empty]).parse("x").intent is None


def test_training_reaches_every_engine() -> None:
    a, b = Fixed("a", []), Fixed("b", [])
    examples = [Example("hi", "greeting")]
    EnsembleEngine([a, b]).train(examples)
    assert a.trained == examples and b.trained == examples


def test_entities_are_merged_without_overlaps() -> None:
    date = Entity("date", "2026-03-12", "tomorrow", 10, 18)
    number = Entity("number", 10, "10", 22, 24)
    slot_overlapping = Entity("day", "tomorrow", "tomorrow", 10, 18)
    car = Entity("car_model", "Camry", "Camry", 30, 35)
    spanless = Entity("budget", "cheap", "cheap", -1, -1)
    a = Fixed("a", [IntentScore("book_service", 0.9)], [date, number])
    b = Fixed("b", [IntentScore("book_service", 0.5)], [slot_overlapping, car, spanless, spanless])
    merged = EnsembleEngine([b, a]).parse("x").entities  # a wins: its entities come first
    assert merged == [date, number, car, spanless]


def test_a_failing_engine_is_skipped() -> None:
    good = Fixed("good", [IntentScore("prices", 0.4)])
    assert EnsembleEngine([Broken(), good]).parse("x").intents == [IntentScore("prices", 0.4)]
    with pytest.raises(RuntimeError, match="boom"):
        EnsembleEngine([Broken()]).parse("x")


def test_bad_ensembles() -> None:
    with pytest.raises(ValueError):
        EnsembleEngine([])
    with pytest.raises(ValueError):
        EnsembleEngine([Fixed("a", [])], weights=[1.0, 2.0])
    with pytest.raises(ValueError):
        EnsembleEngine([Fixed("a", [])], weights=[-1.0])


def test_two_real_engines_on_demo_motors() -> None:
    with DATA.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    train = [Example(t, i) for lang in ("en", "ru") for i, ts in data[lang]["train"].items() for t in ts]
    test = [Example(t, i) for lang in ("en", "ru") for i, ts in data[lang]["test"].items() for t in ts]
    ensemble = build_engine(["linear", {"engine": "linear", "char_ngrams": [1, 4], "word_ngrams": [1, 1]}])
    assert isinstance(ensemble, EnsembleEngine)
    ensemble.train(train)
    right = 0
    for ex in test:
        best = ensemble.parse(ex.text).intent
        right += best is not None and best.name == ex.intent
    assert right / len(test) >= 0.9


# -- build_engine ----------------------------------------------------------------------------


def test_specs() -> None:
    assert isinstance(build_engine(None), LinearEngine)
    assert isinstance(build_engine("linear"), LinearEngine)
    linear = build_engine({"engine": "linear", "c": 0.5, "char_ngrams": [2, 4], "ranking_length": 5})
    assert isinstance(linear, LinearEngine)
    assert (linear.c, linear.char_ngrams, linear.ranking_length) == (0.5, (2, 4), 5)
    ens = build_engine(
        {"engine": "ensemble", "engines": ["linear", {"engine": "linear"}], "weights": [1, 0.9]}
    )
    assert isinstance(ens, EnsembleEngine) and ens.weights == [1.0, 0.9]
    emb = build_engine({"engine": "embeddings", "model_path": "/nonexistent/model", "classifier": "centroid"})
    assert isinstance(emb, EmbeddingEngine) and emb.model_path == "/nonexistent/model"  # loads lazily
    assert isinstance(build_engine("embeddings"), EmbeddingEngine)


def test_entity_defaults_reach_every_engine() -> None:
    ens = build_engine(
        ["linear", {"engine": "linear", "tz": "Asia/Yekaterinburg"}], tz="Europe/Moscow", region="RU"
    )
    assert isinstance(ens, EnsembleEngine)
    first, second = ens.engines
    assert isinstance(first, LinearEngine) and isinstance(second, LinearEngine)
    assert (first.tz, first.region) == ("Europe/Moscow", "RU")
    assert (second.tz, second.region) == ("Asia/Yekaterinburg", "RU")
    llm = build_engine({"engine": "llm", "base_url": "http://x/v1", "model": "m"}, tz="Europe/Moscow")
    assert isinstance(llm, LlmEngine) and isinstance(llm.fallback, LinearEngine)
    assert llm.tz == llm.fallback.tz == "Europe/Moscow"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("spacy", "unknown NLU engine"),
        ({"engine": "linear", "colour": "blue"}, "unknown option"),
        ({"engine": "linear", "char_ngrams": [2]}, "two integers"),
        ({"engine": "linear", "c": -1}, "positive"),
        ("ensemble", "non-empty list"),
        ({"engine": "ensemble", "engines": []}, "non-empty list"),
        ({"engine": "ensemble", "engines": ["linear"], "weights": "heavy"}, "list of numbers"),
        ("llm", "base_url"),
        ({"engine": "embeddings", "classifier": "knn"}, "classifier"),
        (42, "a name, a mapping or a list"),
    ],
)
def test_bad_specs(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_engine(spec)  # type: ignore[arg-type]


def test_a_bot_turn_gets_the_same_intent_from_engines_with_and_without_top() -> None:
    """A turn asks ``CompiledBot.top_intent``: the linear engine answers through its cheaper ``top``,
    an engine without one (the ensemble) through ``parse``; both say what ``understand`` says."""
    from pathlib import Path

    from mayak.bots.compiled import CompiledBot, compile_bot
    from mayak.bots.loader import load_folder

    demo = load_folder(Path(__file__).parents[1] / "src" / "mayak" / "bots" / "examples" / "demo_motors")
    definition = demo.definition
    ensemble = {
        **definition,
        "bot": {**definition["bot"], "nlu": {"engine": ["linear", "linear"]}},
    }
    bots: list[CompiledBot] = [compile_bot("b", 1, definition), compile_bot("b", 2, ensemble)]
    assert hasattr(bots[0].nlu, "top") and not hasattr(bots[1].nlu, "top")
    for bot in bots:
        for text in ("I want to book a service", "where is my car", "когда будет готова машина", "qqq zzz"):
            parsed = bot.understand(text)
            top = bot.top_intent(text)
            assert parsed is not None and parsed.intent is not None and top is not None
            assert (top.name, top.confidence) == (parsed.intent.name, pytest.approx(parsed.intent.confidence))
        assert bot.top_intent("   ") is None
