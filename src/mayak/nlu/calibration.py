"""Calibrated confidences for linear intent scorers (shared by the linear and embedding engines).

A scorer gives every intent a real-valued score (an SVM margin, a cosine similarity). Two things are
fitted on *out-of-fold* scores (each example scored by a model that did not see it):

* a softmax temperature, so that the distribution over intents matches how often the scorer is right;
* a logistic (Platt) curve of the best intent's raw score, fitted to "was that answer right". This
  caps the best intent's confidence: a text unlike anything in training scores low for every intent,
  and the softmax alone would still hand it 1/N or more. When the cap applies, all intents are scaled
  down by the same factor; what is left of the probability means "none of these".

The Platt curve also sees the scores of generated gibberish (random words from the training
letters, a tenth as many as there are examples, at least 20), labelled "wrong": out-of-fold scores
alone only say how often the scorer is right on messages like the training data, so with a small bot
they would let gibberish through. Both fits are maximum a posteriori with a weak prior around values
measured on BANKING77 and the Demo Motors set, so a bot with a handful of examples per intent still
gets sane numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize, minimize_scalar

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

PRIOR_TEMPERATURE = 0.16
PRIOR_PLATT = (3.5, 1.8)
PRIOR_STRENGTH = 2.0
CALIBRATION_SAMPLES = 2000  # stop scoring folds once this many examples have an out-of-fold score


@dataclass(frozen=True, slots=True)
class Calibration:
    """Softmax temperature and the Platt curve ``sigmoid(a * top_score + b)`` that caps the best intent."""

    temperature: float = PRIOR_TEMPERATURE
    platt_a: float = PRIOR_PLATT[0]
    platt_b: float = PRIOR_PLATT[1]

    def probabilities(self, scores: FloatArray) -> FloatArray:
        """Calibrated probabilities for one row of scores (they may sum to less than 1)."""
        probs = softmax(scores, self.temperature)
        best = int(scores.argmax())
        cap = self._cap(float(scores[best]))
        if cap < probs[best]:
            probs = probs * (cap / probs[best])
        return probs

    def best(self, scores: FloatArray) -> tuple[int, float]:
        """The best intent's index and its calibrated probability: ``probabilities(scores)`` at the
        argmax, without building the other intents' (a bot turn needs only this one)."""
        best = int(scores.argmax())
        top = float(scores[best])
        # the softmax at the best intent: 1 / sum(exp((s_i - s_best) / T)), the same number
        spread = np.exp((scores - top) / self.temperature)
        prob = 1.0 / float(spread.sum())
        return best, min(prob, self._cap(top))

    def _cap(self, top: float) -> float:
        """The Platt curve at the best intent's score: the most its probability may be."""
        return 0.5 * (1.0 + math.tanh(0.5 * (self.platt_a * top + self.platt_b)))


def softmax(scores: FloatArray, temperature: float) -> FloatArray:
    z = scores / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=-1, keepdims=True)
    return out


def sigmoid(x: FloatArray | float) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64))))


def fit_calibration(
    scores: FloatArray, labels: IntArray, noise_scores: FloatArray | None = None
) -> Calibration:
    """Fit a :class:`Calibration` to out-of-fold ``scores`` (n, intents) and true ``labels`` (n,).

    ``noise_scores`` are scores of gibberish (see :func:`gibberish`): no answer to them is right, so
    they teach the Platt curve where "unlike anything in training" lies."""
    n = len(labels)
    if n == 0:
        return Calibration()
    rows = np.arange(n)
    prior_log_t = math.log(PRIOR_TEMPERATURE)

    def temperature_loss(log_t: float) -> float:
        p = softmax(scores, math.exp(log_t))[rows, labels]
        nll = -float(np.log(np.maximum(p, 1e-12)).sum())
        return nll + PRIOR_STRENGTH * (log_t - prior_log_t) ** 2

    res_t = minimize_scalar(temperature_loss, bounds=(math.log(0.005), math.log(10.0)), method="bounded")
    temperature = math.exp(float(res_t.x))

    top = scores.max(axis=1)
    correct = (scores.argmax(axis=1) == labels).astype(np.float64)
    if noise_scores is not None and len(noise_scores):
        top = np.concatenate([top, noise_scores.max(axis=1)])
        correct = np.concatenate([correct, np.zeros(len(noise_scores))])
    a0, b0 = PRIOR_PLATT

    def platt_loss(params: FloatArray) -> tuple[float, FloatArray]:
        a, b = float(params[0]), float(params[1])
        z = a * top + b
        nll = float((np.logaddexp(0.0, z) - correct * z).sum())  # log(1 + e^z) - y z, stably
        nll += PRIOR_STRENGTH * ((a - a0) ** 2 + (b - b0) ** 2)
        r = sigmoid(z) - correct
        grad = np.array(
            [
                float((r * top).sum()) + 2 * PRIOR_STRENGTH * (a - a0),
                float(r.sum()) + 2 * PRIOR_STRENGTH * (b - b0),
            ]
        )
        return nll, grad

    res_p = minimize(platt_loss, np.array([a0, b0]), jac=True, method="L-BFGS-B")
    a, b = float(res_p.x[0]), float(res_p.x[1])
    if a <= 0:  # a higher score must never mean a lower confidence
        a, b = a0, b0
    return Calibration(temperature, a, b)


def fit_svm(x: Any, y: IntArray, n_classes: int, c: float, seed: int) -> tuple[FloatArray, FloatArray]:
    """One-vs-rest linear SVM on ``x`` (sparse or dense): weights (features, n_classes) and biases.

    Columns follow class indices; classes absent from ``y`` get zero weights and a very low bias.
    """
    from sklearn.svm import LinearSVC

    present = np.unique(y)
    weights = np.zeros((x.shape[1], n_classes))
    bias = np.full(n_classes, -10.0)
    clf = LinearSVC(C=c, random_state=seed, dual="auto", max_iter=2000)
    clf.fit(x, y)
    coef = np.asarray(clf.coef_, dtype=np.float64)
    intercept = np.asarray(clf.intercept_, dtype=np.float64)
    if len(present) == 2:  # binary: one hyperplane, the positive side is the second class
        weights[:, present[1]] = coef[0]
        weights[:, present[0]] = -coef[0]
        bias[present[1]] = intercept[0]
        bias[present[0]] = -intercept[0]
    else:
        weights[:, present] = coef.T
        bias[present] = intercept
    return weights, bias


def stratified_folds(y: IntArray, k: int, seed: int) -> IntArray:
    """A fold number per example, every class spread over the folds in a shuffled order."""
    rng = random.Random(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    for cls in np.unique(y):
        members = [int(i) for i in np.flatnonzero(y == cls)]
        rng.shuffle(members)
        start = rng.randrange(k)
        for r, i in enumerate(members):
            fold[i] = (start + r) % k
    return fold


Scorer = Callable[[Any, IntArray], Callable[[Any], FloatArray]]
"""Trains on (x, y) and returns a function scoring rows of x as (rows, n_classes)."""


def cross_validated_calibration(
    x: Any, y: IntArray, n_classes: int, scorer: Scorer, seed: int = 0, noise: Any = None
) -> Calibration:
    """Score folds of (x, y) with models trained on the other folds, then fit the calibration.

    5 folds (4 above ``CALIBRATION_SAMPLES`` examples), scored until ``CALIBRATION_SAMPLES`` examples
    have an out-of-fold score: every example of a small bot, a single fold of a large data set. Rows of
    ``noise`` (featurised gibberish) are shared out among the folds and scored by the same models.
    """
    k = 5 if len(y) <= CALIBRATION_SAMPLES else 4
    fold = stratified_folds(y, k, seed)
    scores: list[FloatArray] = []
    labels: list[IntArray] = []
    noise_scores: list[FloatArray] = []
    for f in range(k):
        if sum(len(lab) for lab in labels) >= CALIBRATION_SAMPLES:
            break
        held = fold == f
        train_y = y[~held]
        if not held.any() or len(np.unique(train_y)) < 2:
            continue
        score = scorer(x[~held], train_y)
        held_y = y[held]
        known = np.isin(held_y, train_y)  # an intent with one example cannot be scored when held out
        scores.append(score(x[held])[known])
        labels.append(held_y[known])
        if noise is not None and noise.shape[0] > f:
            noise_scores.append(score(noise[f::k]))
    if not scores:
        return Calibration()
    return fit_calibration(
        np.concatenate(scores),
        np.concatenate(labels),
        np.concatenate(noise_scores) if noise_scores else None,
    )


def gibberish(texts: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """``count`` strings of random "words" drawn from the letters of ``texts`` (by frequency).

    They share single letters and some letter pairs with the training data but hardly any longer
    n-gram or word: what a message that the bot cannot understand looks like to a linear model."""
    letters = [ch for t in texts for ch in t if ch.isalpha()]
    if not letters:
        letters = list("abcdefghijklmnopqrstuvwxyz")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(rng.randint(1, 4))]
        out.append(" ".join(words))
    return out


def gibberish_count(n_examples: int) -> int:
    """How much gibberish to calibrate with: a tenth of the examples, at least 20."""
    return max(20, n_examples // 10)


def svm_scorer(c: float, n_classes: int, seed: int) -> Scorer:
    def train(x: Any, y: IntArray) -> Callable[[Any], FloatArray]:
        w, b = fit_svm(x, y, n_classes, c, seed)
        return lambda rows: np.asarray(rows @ w) + b

    return train
