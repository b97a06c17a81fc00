"""Process-level tuning for the long-running server and worker processes.

Python's cyclic garbage collector walks every tracked object in its oldest generation on a full
collection. A server holds a few hundred thousand long-lived objects (modules, the SQL layer, compiled
bots and their NLU vocabularies); under load, full collections of those took 20-290 ms each and were
the main source of turn-latency spikes. The server freezes what exists after start-up and after a bot
version is compiled (the collector then leaves those objects alone) and collects the young generation
less often. Library use and tests keep Python's defaults: frozen objects are never freed.

The server also shortens the interpreter's thread switch interval. SQLite commits and checkpoints run
in threads of their own, and each of them needs the GIL for a moment to start and to finish its
call; the event loop, busy with requests, holds it. A waiting thread asks for the GIL only after the
switch interval (5 ms by default), so every offloaded commit of a busy ingest writer started about
4.5 ms late, and the writer waited for it. At 0.1 ms the commit starts 0.5 ms after it is handed
over (1,000,000 events over HTTP: commit wait 15 -> 12 ms a group, main thread 85 -> 91 % busy).
"""

from __future__ import annotations

import gc
import sys

GEN0_THRESHOLD = 20_000
# Seconds a thread waits for the GIL before asking the holder to let go (Python's default: 0.005).
SWITCH_INTERVAL_S = 0.0001
_server = False


def tune_for_server() -> None:
    global _server
    _server = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 20, 20)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def settle_long_lived() -> None:
    """Something large and long-lived was just built (a compiled bot): keep the collector off it."""
    if _server:
        gc.freeze()
