"""The built-in default engine: TF-IDF character and word n-grams and a linear SVM, calibrated.

Text is normalised (Unicode NFKC, lower case, ``ё`` → ``е``, every digit → ``0``, punctuation → space),
then described by two L2-normalised TF-IDF blocks (sublinear term frequency, smoothed IDF): character
n-grams inside word boundaries (2–5 by default: robust to typos and Russian inflection) and word uni-
and bigrams. A one-vs-rest linear SVM (scikit-learn's ``LinearSVC``) is trained on them.

Confidences are calibrated as :mod:`mayak.nlu.calibration` describes: a softmax temperature and a
cap on the best intent, both fitted to out-of-fold SVM scores, so gibberish gets a low confidence.

Parsing does not go through scikit-learn: the fitted vocabulary and weights are kept as a dict and a
NumPy matrix, and one utterance is featurised and scored directly (tens of microseconds).

With a single intent there is nothing to separate: that intent is always returned, with the highest
cosine similarity between the utterance and a training example as its confidence.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from scipy import sparse

from .base import Entity, Example, IntentScore, NotTrainedError, Parse, check_examples
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

_DIGIT = re.compile(r"\d")
WORD_CACHE_SIZE = 20_000  # words whose character n-grams are kept (emptied when full)
_NON_WORD = re.compile(r"[^\w\s]|_")


def normalise(text: str) -> str:
    """NFKC, lower case, ``ё`` → ``е``, digits → ``0``, punctuation → space, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().replace("ё", "е")
    text = _DIGIT.sub("0", text)
    return " ".join(_NON_WORD.sub(" ", text).split())


class _Featuriser:
    """Two TF-IDF blocks over a fitted vocabulary: char n-grams within words, then word n-grams."""

    def __init__(self, char_ngrams: tuple[int, int], word_ngrams: tuple[int, int]) -> None:
        self.char_lo, self.char_hi = char_ngrams
        self.word_lo, self.word_hi = word_ngrams
        self.char_vocab: dict[str, int] = {}
        self.word_vocab: dict[str, int] = {}  # indices continue after the char block
        self.idf: FloatArray = np.zeros(0)
        self.unseen_idf = 1.0
        self.n_char = 0
        self.n_features = 0
        self._words: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}

    def _char_grams(self, words: list[str]) -> list[str]:
        lo, hi = self.char_lo, self.char_hi
        return [
            p[i : i + n]
            for p in [f" {w} " for w in words]
            for n in range(lo, min(hi, len(p)) + 1)
            for i in range(len(p) - n + 1)
        ]

    def _word_grams(self, words: list[str]) -> list[str]:
        return [
            " ".join(words[i : i + n])
            for n in range(self.word_lo, self.word_hi + 1)
            for i in range(len(words) - n + 1)
        ]

    def fit(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """Learn vocabulary and IDF from normalised texts; return their feature matrix."""
        char_df: Counter[str] = Counter()
        word_df: Counter[str] = Counter()
        per_text: list[tuple[Counter[str], Counter[str]]] = []
        for t in texts:
            words = t.split()
            chars, grams = Counter(self._char_grams(words)), Counter(self._word_grams(words))
            char_df.update(chars.keys())
            word_df.update(grams.keys())
            per_text.append((chars, grams))
        self._words.clear()  # a new vocabulary
        self.char_vocab = {g: i for i, g in enumerate(sorted(char_df))}
        self.n_char = len(self.char_vocab)
        self.word_vocab = {g: self.n_char + i for i, g in enumerate(sorted(word_df))}
        self.n_features = self.n_char + len(self.word_vocab)
        df = np.empty(self.n_features)
        for g, i in self.char_vocab.items():
            df[i] = char_df[g]
        for g, i in self.word_vocab.items():
            df[i] = word_df[g]
        self.idf = np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0
        self.unseen_idf = math.log((1.0 + len(texts)) / 2.0) + 1.0  # as if seen in one text
        rows = []
        for chars, grams in per_text:
            cv, wv = self.char_vocab, self.word_vocab
            rows.append(
                self._weigh({cv[g]: n for g, n in chars.items()}, {wv[g]: n for g, n in grams.items()})
            )
        return self._stack(rows)

    def vector(self, text: str) -> tuple[IntArray, FloatArray]:
        """Feature indices and values of one normalised text (each block L2-normalised).

        N-grams outside the vocabulary have no feature, but they count in each block's norm with the
        weight of an n-gram seen once: a text that shares one n-gram with the training data gets a
        short vector (a low score), not that n-gram at full length. This is also how held-out texts
        look to the fold models that calibrate the confidences."""
        words = text.split()
        log = math.log
        known: list[tuple[int, ...]] = []
        unknown: list[str] = []
        cache = self._words
        for word in words:
            grams = cache.get(word)
            if grams is None:
                grams = self._word_grams_of(word)
            known.append(grams[0])
            unknown.extend(grams[1])
        counts: dict[int, int] = Counter(chain.from_iterable(known))  # counted in C
        # an n-gram unknown in two words counts twice, as it would over the whole text
        unknown_char = sum((1.0 + log(n)) ** 2 for n in Counter(unknown).values()) if unknown else 0.0
        unknown_word = 0.0
        wv = self.word_vocab
        word_counts: dict[int, int] = {}
        for g, n in Counter(self._word_grams(words)).items():
            feature = wv.get(g)
            if feature is None:
                unknown_word += (1.0 + log(n)) ** 2
            else:
                word_counts[feature] = n
        w = self.unseen_idf * self.unseen_idf
        return self._weigh(counts, word_counts, unknown_char * w, unknown_word * w)

    def _weigh(
        self,
        chars: dict[int, int],
        grams: dict[int, int],
        extra_char_sq: float = 0.0,
        extra_word_sq: float = 0.0,
    ) -> tuple[IntArray, FloatArray]:
        """Feature indices and TF-IDF values of one text from its counts of known char n-grams and
        word n-grams, each block L2-normalised; ``extra_*_sq`` add unknown n-grams to a block's norm."""
        n_char, n = len(chars), len(chars) + len(grams)
        if not n:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        idx = np.fromiter(chain(chars, grams), dtype=np.int64, count=n)
        vals = np.fromiter(chain(chars.values(), grams.values()), dtype=np.float64, count=n)
        np.log(vals, out=vals)
        vals += 1.0
        vals *= self.idf[idx]
        head, tail = vals[:n_char], vals[n_char:]
        head /= math.sqrt(float(head @ head) + extra_char_sq) or 1.0
        tail /= math.sqrt(float(tail @ tail) + extra_word_sq) or 1.0
        return idx, vals

    def _word_grams_of(self, word: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """One word's character n-grams: the feature indices of the known ones and the unknown ones,
        each occurrence once. Cached: words repeat from message to message, their n-grams do not
        change once the vocabulary is fitted."""
        cv = self.char_vocab
        known: list[int] = []
        unseen: list[str] = []
        for g in self._char_grams([word]):
            j = cv.get(g)
            if j is None:
                unseen.append(g)
            else:
                known.append(j)
        entry = (tuple(known), tuple(unseen))
        if len(self._words) >= WORD_CACHE_SIZE:
            self._words.clear()
        self._words[word] = entry
        return entry

    def forget_words(self) -> None:
        """Empty the word cache (after training: it holds the calibration's gibberish)."""
        self._words.clear()

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        return self._stack([self.vector(t) for t in texts])

    def _stack(self, rows: list[tuple[IntArray, FloatArray]]) -> sparse.csr_matrix:
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(idx) for idx, _ in rows], out=indptr[1:])
        if rows:
            indices = np.concatenate([idx for idx, _ in rows])
            data = np.concatenate([vals for _, vals in rows])
        else:
            indices, data = np.zeros(0, dtype=np.int64), np.zeros(0)
        return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), self.n_features))


@dataclass(frozen=True, slots=True)
class _Model:
    featuriser: _Featuriser
    intents: tuple[str, ...]
    weights: FloatArray | None  # (n_features, n_intents); None with a single intent
    bias: FloatArray | None
    calibration: Calibration | None
    examples: sparse.csr_matrix | None  # single intent: unit-norm training vectors


class LinearEngine:
    """Character and word n-gram TF-IDF with a calibrated linear SVM (the default engine).

    ``c`` is the SVM's regularisation constant; ``ranking_length`` caps how many intents a parse lists
    (0: all); ``entities`` turns rule-based entity extraction on in ``parse`` (with ``tz`` and
    ``region`` passed to :func:`~mayak.nlu.entities.extract_entities`).
    """

    name = "linear"

    def __init__(
        self,
        *,
        char_ngrams: tuple[int, int] = (2, 5),
        word_ngrams: tuple[int, int] = (1, 2),
        c: float = 1.0,
        ranking_length: int = 10,
        entities: bool = True,
        tz: str | None = None,
        region: str | None = None,
        seed: int = 0,
    ) -> None:
        if not (1 <= char_ngrams[0] <= char_ngrams[1]) or not (1 <= word_ngrams[0] <= word_ngrams[1]):
            raise ValueError("n-gram ranges must be (lo, hi) with 1 <= lo <= hi")
        if c <= 0:
            raise ValueError("c must be positive")
        self.char_ngrams = (int(char_ngrams[0]), int(char_ngrams[1]))
        self.word_ngrams = (int(word_ngrams[0]), int(word_ngrams[1]))
        self.c = float(c)
        self.ranking_length = int(ranking_length)
        self.entities = entities
        self.tz = tz
        self.region = region
        self.seed = seed
        self._model: _Model | None = None

    @property
    def intents(self) -> tuple[str, ...]:
        """The intents learnt by the last ``train`` (sorted), empty before."""
        return self._model.intents if self._model else ()

    def train(self, examples: Sequence[Example]) -> None:
        kept = check_examples(examples)
        texts = [normalise(e.text) for e in kept]
        intents = tuple(sorted({e.intent for e in kept}))
        featuriser = _Featuriser(self.char_ngrams, self.word_ngrams)
        x = featuriser.fit(texts)
        if len(intents) == 1:
            unit = sparse.csr_matrix(x * (1.0 / math.sqrt(2.0)))
            self._model = _Model(featuriser, intents, None, None, None, unit)
            return
        index = {name: i for i, name in enumerate(intents)}
        y = np.fromiter((index[e.intent] for e in kept), dtype=np.int64, count=len(kept))
        noise = featuriser.transform(gibberish(texts, gibberish_count(len(texts)), self.seed))
        calibration = cross_validated_calibration(
            x, y, len(intents), svm_scorer(self.c, len(intents), self.seed), self.seed, noise
        )
        featuriser.forget_words()
        weights, bias = fit_svm(x, y, len(intents), self.c, self.seed)
        self._model = _Model(featuriser, intents, np.ascontiguousarray(weights), bias, calibration, None)

    def probabilities(self, text: str) -> dict[str, float]:
        """Calibrated probability of every intent (they may sum to less than 1: "none of these")."""
        model = self._require_model()
        return dict(zip(model.intents, self._probs(model, normalise(text)).tolist(), strict=True))

    def _require_model(self) -> _Model:
        if self._model is None:
            raise NotTrainedError("LinearEngine.parse called before train")
        return self._model

    def _probs(self, model: _Model, norm: str) -> FloatArray:
        if model.calibration is None:  # one intent: its similarity to the closest training example
            idx, vals = model.featuriser.vector(norm)
            if model.examples is None or len(idx) == 0:
                return np.zeros(1)
            v = sparse.csr_matrix(
                (vals / math.sqrt(2.0), idx, np.array([0, len(idx)])), shape=(1, model.featuriser.n_features)
            )
            sim = float((model.examples @ v.T).max())
            return np.array([min(1.0, max(0.0, sim))])
        scores = self._scores(model, norm)
        if scores is None:  # nothing the engine has ever seen: no evidence for any intent
            return np.zeros(len(model.intents))
        return model.calibration.probabilities(scores)

    @staticmethod
    def _scores(model: _Model, norm: str) -> FloatArray | None:
        """The SVM's score of every intent; None when the text has no n-gram the engine knows (or
        the model has one intent, and no SVM)."""
        if model.weights is None or model.bias is None:
            return None
        idx, vals = model.featuriser.vector(norm)
        if len(idx) == 0:
            return None
        scores: FloatArray = vals @ model.weights[idx] + model.bias
        return scores

    def top(self, text: str) -> IntentScore:
        """``parse(text).intent`` alone: the best intent and its confidence, without ranking the
        others or extracting entities (what a bot turn asks for, once per message)."""
        model = self._require_model()
        norm = normalise(text)
        if model.calibration is None:
            return IntentScore(model.intents[0], float(self._probs(model, norm)[0]))
        scores = self._scores(model, norm)
        if scores is None:  # as parse: every intent at 0, the first one ranked first
            return IntentScore(model.intents[0], 0.0)
        best, confidence = model.calibration.best(scores)
        return IntentScore(model.intents[best], confidence)

    def parse(self, text: str) -> Parse:
        model = self._require_model()
        probs = self._probs(model, normalise(text))
        n = len(probs)
        limit = n if self.ranking_length <= 0 else min(n, self.ranking_length)
        order = np.argsort(-probs, kind="stable")[:limit] if n > 1 else np.zeros(1, dtype=np.int64)
        intents = [IntentScore(model.intents[i], float(probs[i])) for i in order.tolist()]
        entities: list[Entity] = (
            extract_entities(text, tz=self.tz, region=self.region) if self.entities else []
        )
        return Parse(text=text, intents=intents, entities=entities)
