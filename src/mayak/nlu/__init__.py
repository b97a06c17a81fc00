"""Understanding customer messages for bots: intents with calibrated confidences, and entities.

``build_engine(spec)`` makes the engine a bot's configuration names (``LinearEngine`` by default);
``engine.train(examples)`` then ``engine.parse(text)`` gives a :class:`Parse`. See ``docs/nlu.md``.
"""

from .base import Engine, Entity, Example, IntentScore, NotTrainedError, Parse
from .embeddings import EmbeddingEngine
from .ensemble import EnsembleEngine
from .entities import extract_entities
from .factory import EngineSpec, build_engine, is_slow_spec
from .linear import LinearEngine
from .llm import LlmEngine

__all__ = [
    "EmbeddingEngine",
    "Engine",
    "EngineSpec",
    "EnsembleEngine",
    "Entity",
    "Example",
    "IntentScore",
    "LinearEngine",
    "LlmEngine",
    "NotTrainedError",
    "Parse",
    "build_engine",
    "extract_entities",
    "is_slow_spec",
]
