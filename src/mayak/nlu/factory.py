"""Build an engine from a bot's configuration (a YAML/JSON value).

Accepted specs::

    None | "linear"                      -> LinearEngine()
    {"engine": "linear", "c": 1.0, "char_ngrams": [2, 5], ...}
    "embeddings" | {"engine": "embeddings", "model_path": "/models/minilm", "classifier": "svm"}
    {"engine": "llm", "base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
     "api_key_env": "OPENAI_API_KEY", "timeout": 5, "fallback": "linear"}
    {"engine": "ensemble", "engines": [<spec>, <spec>], "weights": [1.0, 0.8]}
    [<spec>, <spec>]                     -> an ensemble with equal weights

``tz`` and ``region`` given to :func:`build_engine` are defaults for entity extraction in every engine
built (a spec's own ``tz``/``region`` wins). An LLM engine falls back to a linear engine unless its
spec says ``fallback: null`` (or names another spec); its API key comes from ``api_key`` or, better,
from the environment variable named by ``api_key_env``. Unknown engines or options raise ValueError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .base import Engine
from .embeddings import EmbeddingEngine
from .ensemble import EnsembleEngine
from .linear import LinearEngine
from .llm import LlmEngine

EngineSpec = str | Mapping[str, Any] | list[Any] | None

_COMMON = {"entities", "tz", "region"}
_OPTIONS: dict[str, set[str]] = {
    "linear": _COMMON | {"char_ngrams", "word_ngrams", "c", "ranking_length", "seed"},
    "embeddings": _COMMON
    | {"model_path", "classifier", "c", "device", "batch_size", "ranking_length", "seed"},
    "llm": _COMMON
    | {
        "base_url",
        "model",
        "api_key",
        "api_key_env",
        "timeout",
        "fallback",
        "train_fallback",
        "examples_per_intent",
        "intent_descriptions",
        "slots",
        "response_format",
        "temperature",
        "max_tokens",
        "headers",
    },
    "ensemble": {"engines", "weights"},
}


def build_engine(spec: EngineSpec = None, *, tz: str | None = None, region: str | None = None) -> Engine:
    """An untrained engine for ``spec`` (see the module); ValueError for a spec that makes no sense."""
    if spec is None:
        spec = {"engine": "linear"}
    elif isinstance(spec, str):
        spec = {"engine": spec}
    elif isinstance(spec, list):
        spec = {"engine": "ensemble", "engines": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"an engine spec is a name, a mapping or a list, not {type(spec).__name__}")
    options = dict(spec)
    kind = options.pop("engine", None) or options.pop("type", None) or "linear"
    if kind not in _OPTIONS:
        raise ValueError(f"unknown NLU engine {kind!r} (one of: {', '.join(sorted(_OPTIONS))})")
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"unknown option(s) for the {kind} engine: {', '.join(sorted(unknown))}")
    if kind != "ensemble":
        options.setdefault("tz", tz)
        options.setdefault("region", region)
    try:
        if kind == "linear":
            for key in ("char_ngrams", "word_ngrams"):
                if key in options:
                    options[key] = _pair(key, options[key])
            return LinearEngine(**options)
        if kind == "embeddings":
            return EmbeddingEngine(**options)
        if kind == "llm":
            return _llm(options, tz, region)
        return _ensemble(options, tz, region)
    except TypeError as exc:  # a wrongly typed option
        raise ValueError(f"bad {kind} engine spec: {exc}") from exc


def is_slow_spec(spec: EngineSpec) -> bool:
    """Whether the engine ``spec`` describes calls out or runs a large model (``Engine.slow``),
    decided from the spec alone, without building or training anything."""
    if isinstance(spec, str):
        return spec in ("llm", "embeddings")
    if isinstance(spec, list):
        return any(is_slow_spec(s) for s in spec)
    if not isinstance(spec, Mapping):
        return False
    kind = spec.get("engine") or spec.get("type") or "linear"
    if kind == "ensemble":
        engines = spec.get("engines")
        return isinstance(engines, list) and any(is_slow_spec(s) for s in engines)
    return kind in ("llm", "embeddings")


def _pair(key: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{key} must be two integers, like [2, 5]")
    return int(value[0]), int(value[1])


def _llm(options: dict[str, Any], tz: str | None, region: str | None) -> LlmEngine:
    for required in ("base_url", "model"):
        if not options.get(required):
            raise ValueError(f"the llm engine needs {required!r}")
    key_env = options.pop("api_key_env", None)
    if key_env and not options.get("api_key"):
        options["api_key"] = os.environ.get(str(key_env)) or None
    fallback_spec = options.pop("fallback", "linear")
    fallback = None if fallback_spec is None else build_engine(fallback_spec, tz=tz, region=region)
    return LlmEngine(fallback=fallback, **options)


def _ensemble(options: dict[str, Any], tz: str | None, region: str | None) -> EnsembleEngine:
    specs = options.get("engines")
    if not isinstance(specs, list) or not specs:
        raise ValueError("the ensemble engine needs a non-empty list of engines")
    weights = options.get("weights")
    if weights is not None and (
        not isinstance(weights, list) or not all(isinstance(w, int | float) for w in weights)
    ):
        raise ValueError("ensemble weights must be a list of numbers")
    return EnsembleEngine([build_engine(s, tz=tz, region=region) for s in specs], weights)
