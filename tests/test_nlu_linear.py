"""The default engine on the Demo Motors set (English and Russian), its confidences and edge cases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mayak.nlu import Engine, Example, LinearEngine, NotTrainedError, Parse, build_engine
from mayak.nlu.linear import normalise

DATA = Path(__file__).parent / "data" / "nlu" / "demo_motors.yaml"
GIBBERISH = [
    "asdkjh qwe zxcmnb",
    "blorp flim flam",
    "xyzzy",
    "ыщвла фывщш ждлоы",
    "qqqq wwww eeee",
    "???",
    "",
]


def load_demo() -> dict[str, Any]:
    with DATA.open(encoding="utf-8") as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    return data


def examples(data: dict[str, Any], lang: str, split: str) -> list[Example]:
    return [Example(text, intent) for intent, texts in data[lang][split].items() for text in texts]


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    return load_demo()


@pytest.fixture(scope="module")
def engines(demo: dict[str, Any]) -> dict[str, LinearEngine]:
    out = {}
    for lang in ("en", "ru"):
        engine = LinearEngine()
        engine.train(examples(demo, lang, "train"))
        out[lang] = engine
    both = LinearEngine()
    both.train(examples(demo, "en", "train") + examples(demo, "ru", "train"))
    out["both"] = both
    return out


def accuracy(engine: Engine, test: list[Example]) -> float:
    right = 0
    for ex in test:
        best = engine.parse(ex.text).intent
        right += best is not None and best.name == ex.intent
    return right / len(test)


def test_dataset_is_well_formed(demo: dict[str, Any]) -> None:
    for lang in ("en", "ru"):
        train, test = demo[lang]["train"], demo[lang]["test"]
        assert set(train) == set(test) and len(train) == 10
        assert all(len(texts) >= 10 for texts in train.values())
        assert all(len(texts) >= 5 for texts in test.values())
        seen = {normalise(t) for texts in train.values() for t in texts}
        assert not seen & {normalise(t) for texts in test.values() for t in texts}, "test leaks into train"


@pytest.mark.parametrize("lang", ["en", "ru"])
def test_accuracy_on_held_out_sentences(
    engines: dict[str, LinearEngine], demo: dict[str, Any], lang: str
) -> None:
    assert accuracy(engines[lang], examples(demo, lang, "test")) >= 0.9


def test_one_bilingual_engine_understands_both_languages(
    engines: dict[str, LinearEngine], demo: dict[str, Any]
) -> None:
    for lang in ("en", "ru"):
        assert accuracy(engines["both"], examples(demo, lang, "test")) >= 0.9


def test_demo_bot_trains_well_under_a_second(demo: dict[str, Any]) -> None:
    both = examples(demo, "en", "train") + examples(demo, "ru", "train")  # 20 intents' worth of examples
    LinearEngine().train(both[:20])  # imports scikit-learn outside the timing
    t0 = time.perf_counter()
    LinearEngine().train(both)
    assert time.perf_counter() - t0 < 0.8


def test_confidences_are_probabilities_best_first(engines: dict[str, LinearEngine]) -> None:
    engine = engines["en"]
    parse = engine.parse("is my car ready to pick up?")
    assert parse.intent is not None and parse.intent.name == "car_status"
    confs = [i.confidence for i in parse.intents]
    assert confs == sorted(confs, reverse=True)
    assert all(0.0 <= c <= 1.0 for c in confs)
    assert sum(engine.probabilities("is my car ready to pick up?").values()) <= 1.0 + 1e-9
    assert len(parse.intents) == 10  # ranking_length


def test_clear_requests_are_confident(engines: dict[str, LinearEngine]) -> None:
    for lang, text in (("en", "thank you very much"), ("ru", "соедините меня с оператором")):
        best = engines[lang].parse(text).intent
        assert best is not None and best.confidence >= 0.7, (text, best)


@pytest.mark.parametrize("lang", ["en", "ru", "both"])
def test_gibberish_gets_low_confidence(engines: dict[str, LinearEngine], lang: str) -> None:
    for text in GIBBERISH:
        best = engines[lang].parse(text).intent
        assert best is not None and best.confidence < 0.5, (text, best)


def test_calibration_in_aggregate(engines: dict[str, LinearEngine], demo: dict[str, Any]) -> None:
    """Mean confidence on held-out sentences is close to the accuracy (not 0.99 on everything)."""
    test = examples(demo, "en", "test") + examples(demo, "ru", "test")
    confs = []
    for ex in test:
        best = engines["both"].parse(ex.text).intent
        assert best is not None
        confs.append(best.confidence)
    mean_conf = sum(confs) / len(confs)
    assert abs(mean_conf - accuracy(engines["both"], test)) < 0.15


def test_normalisation() -> None:
    assert normalise("  Ещё   РАЗ, пожалуйста!! ") == "еще раз пожалуйста"
    assert normalise("Order #4512") == "order 0000"
    assert normalise("ＡＢＣ") == "abc"  # NFKC: full-width letters


def test_yo_and_case_do_not_matter(engines: dict[str, LinearEngine]) -> None:
    a = engines["ru"].parse("ВЫ ПРОДАЁТЕ ОСАГО?")
    b = engines["ru"].parse("вы продаете осаго")
    assert a.intent == b.intent


def test_entities_come_with_the_parse(engines: dict[str, LinearEngine]) -> None:
    parse = engines["ru"].parse("запишите на ТО, мой email ivan@example.com")
    assert parse.intent is not None and parse.intent.name == "book_service"
    assert [(e.type, e.value) for e in parse.entities] == [("email", "ivan@example.com")]
    quiet = LinearEngine(entities=False)
    quiet.train([Example("a b", "x"), Example("c d", "y")])
    assert quiet.parse("ivan@example.com").entities == []


def test_parse_to_dict(engines: dict[str, LinearEngine]) -> None:
    d = engines["en"].parse("hello, call me at +1 415 555 2671").to_dict()
    assert d["intent"]["name"] == "greeting"
    assert d["entities"] == [
        {"type": "phone", "value": "+14155552671", "text": "+1 415 555 2671", "start": 18, "end": 33}
    ]


def test_empty_training_set_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no examples"):
        LinearEngine().train([])
    with pytest.raises(ValueError, match="no examples"):
        LinearEngine().train([Example("  ", "x"), Example("text", "")])


def test_parse_before_train() -> None:
    with pytest.raises(NotTrainedError):
        LinearEngine().parse("hello")


def test_single_intent_reflects_similarity() -> None:
    engine = LinearEngine()
    engine.train(
        [Example("book a service appointment", "book_service"), Example("service my car", "book_service")]
    )
    close = engine.parse("I want to book a service")
    far = engine.parse("zzz qqq")
    assert close.intent is not None and close.intent.name == "book_service"
    assert far.intent is not None and far.intent.name == "book_service"
    assert close.intent.confidence > 0.5 > far.intent.confidence
    same = engine.parse("Book a service appointment!").intent
    assert same is not None and same.confidence == pytest.approx(1.0)


def test_two_intents_and_singletons() -> None:
    engine = LinearEngine()
    engine.train(
        [
            Example("yes", "affirm"),
            Example("yes please", "affirm"),
            Example("sure", "affirm"),
            Example("no", "deny"),
            Example("no thanks", "deny"),
            Example("nope", "deny"),
            Example("maybe later", "unsure"),  # a single example: cannot be held out
        ]
    )
    assert engine.intents == ("affirm", "deny", "unsure")
    best = engine.parse("yes please").intent
    assert best is not None and best.name == "affirm"
    best = engine.parse("no thanks").intent
    assert best is not None and best.name == "deny"


def test_retraining_replaces_the_model() -> None:
    engine = LinearEngine()
    engine.train([Example("hello", "greet"), Example("bye", "goodbye")])
    engine.train([Example("price", "prices"), Example("open", "hours")])
    assert engine.intents == ("hours", "prices")


def test_ranking_length_zero_lists_all(demo: dict[str, Any]) -> None:
    engine = LinearEngine(ranking_length=0)
    engine.train(examples(demo, "en", "train") + examples(demo, "ru", "train"))
    assert len(engine.parse("hi").intents) == 10
    short = LinearEngine(ranking_length=3)
    short.train(examples(demo, "en", "train"))
    assert len(short.parse("hi").intents) == 3


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        LinearEngine(char_ngrams=(3, 2))
    with pytest.raises(ValueError):
        LinearEngine(c=0)


def test_engine_protocol_and_default_factory() -> None:
    engine = build_engine(None)
    assert isinstance(engine, LinearEngine) and isinstance(engine, Engine)
    assert engine.name == "linear"


def test_single_parse_is_fast(engines: dict[str, LinearEngine]) -> None:
    """A loose bound that holds on a busy CI machine; bench/nlu_banking77.py has the real figure."""
    engine = engines["both"]
    texts = ["когда моя машина будет готова", "what time do you open tomorrow", "hi", "сколько стоит каско"]
    for t in texts * 10:
        engine.parse(t)
    samples = []
    for t in texts * 100:
        t0 = time.perf_counter()
        parse = engine.parse(t)
        samples.append(time.perf_counter() - t0)
        assert isinstance(parse, Parse)
    samples.sort()
    assert samples[len(samples) // 2] < 0.002


def test_the_word_cache_gives_the_vectors_of_whole_text_counting() -> None:
    import math
    from collections import Counter

    import numpy as np

    from mayak.nlu.linear import _Featuriser

    f = _Featuriser((2, 5), (1, 2))
    f.fit(["book a service visit", "where is my car", "car service price"])

    def reference(text: str) -> tuple[list[int], list[float]]:
        # n-grams of the whole text at once, as the featuriser did before it cached words
        words = text.split()
        counts: dict[int, int] = {}

        def tally(grams: list[str], vocab: dict[str, int]) -> float:
            """Known n-grams into ``counts``; the squared weight of the unknown ones."""
            unknown = 0.0
            for g, n in Counter(grams).items():
                j = vocab.get(g)
                if j is None:
                    unknown += (1.0 + math.log(n)) ** 2
                else:
                    counts[j] = n
            return unknown

        unknown = tally(f._char_grams(words), f.char_vocab)
        unknown_word = tally(f._word_grams(words), f.word_vocab)
        w = f.unseen_idf**2
        # TF-IDF, each block (char, word) L2-normalised with its unknown n-grams in the norm
        weights = {j: (1.0 + math.log(n)) * float(f.idf[j]) for j, n in counts.items()}
        norms = {
            True: math.sqrt(sum(v * v for j, v in weights.items() if j < f.n_char) + unknown * w) or 1.0,
            False: math.sqrt(sum(v * v for j, v in weights.items() if j >= f.n_char) + unknown_word * w)
            or 1.0,
        }
        idx = list(weights)
        return idx, [weights[j] / norms[j < f.n_char] for j in idx]

    # repeated words, and an unknown n-gram ("zq") in two different words
    for text in ["car car service", "zqx zqy book", "book a service visit", "qqq", ""]:
        for _ in range(2):  # the second time from the cache
            idx, vals = f.vector(text)
            ref_idx, ref_vals = reference(text)
            order = np.argsort(idx)
            ref_order = np.argsort(ref_idx)
            assert np.asarray(idx)[order].tolist() == np.asarray(ref_idx)[ref_order].tolist()
            assert np.allclose(np.asarray(vals)[order], np.asarray(ref_vals)[ref_order])


def test_top_is_the_parses_best_intent(engines: dict[str, LinearEngine], demo: dict[str, Any]) -> None:
    """``top`` (what a bot turn asks for) answers exactly what ``parse(text).intent`` does: for
    held-out sentences, gibberish, text the engine has never seen a character of, and a model with a
    single intent."""
    texts = (
        [e.text for lang in ("en", "ru") for e in examples(demo, lang, "test")] + GIBBERISH + ["@@@ ###", "ж"]
    )
    for engine in engines.values():
        for text in texts:
            best = engine.parse(text).intent
            top = engine.top(text)
            assert best is not None
            assert (top.name, top.confidence) == (best.name, pytest.approx(best.confidence, abs=1e-12)), text
    single = LinearEngine()
    single.train(
        [Example("book a service appointment", "book_service"), Example("service my car", "book_service")]
    )
    for text in ("I want to book a service", "zzz qqq", "!!!"):
        best = single.parse(text).intent
        assert best is not None and (single.top(text).name, single.top(text).confidence) == (
            best.name,
            best.confidence,
        )
