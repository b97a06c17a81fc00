"""Process-level tuning for the long-running server and worker processes.

Python's cyclic garbage collector walks every tracked object in its oldest generation on a full
collection. A server holds a few hundred thousand long-lived objects (modules, the SQL layer, compiled
bots and their NLU vocabularies); under load, full collections of those took 20-290 ms each and were
the main source of turn-latency spikes. The server freezes what exists after start-up and after a bot
version is compiled (the collector then leaves those objects alone) and collects the young generation
less often. Library use and tests keep Python's defaults: frozen objects are never freed.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000
_server = False


def tune_for_server() -> None:
    global _server
    _server = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 20, 20)


def settle_long_lived() -> None:
    """Something large and long-lived was just built (a compiled bot): keep the collector off it."""
    if _server:
        gc.freeze()
