"""Main-thread time per web-chat bot turn, in process: a profiling aid for the bot and write path.

Runs Mayak in this process on a fresh SQLite file with the `bench/bots/showroom` bot on a web-chat
channel (see ``turn_statements.py``), gives each of N visitors a first message, then times rounds in
which every visitor sends one more message, ``--group`` messages handed to the ingest writer at once
(so they share one transaction, as concurrent messages do under load). No sockets: the WebSocket
side of a turn (``bench/webchat.py``) is not in these figures. Group 1 shows what a transaction
costs on its own; a larger group shows the cost per turn that remains when transactions are shared.

    python bench/turn_cost.py --group 1 --group 20
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from mayak import runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))

from turn_statements import showroom
from webchat import TEXTS


async def measure(visitors: int, rounds: int, groups: list[int]) -> dict[int, tuple[float, float]]:
    room = await showroom()
    try:
        for start in range(0, visitors, 50):
            await asyncio.gather(*(room.say(v, "hello", f"warm-{v}") for v in range(start, start + 50)))
        await room.mayak.drain()
        runtime.tune_for_server()  # as `mayak serve` runs
        serial = 0
        results: dict[int, tuple[float, float]] = {}
        for group in groups:
            wall, cpu, turns = time.perf_counter(), time.process_time(), 0
            for r in range(rounds):
                for start in range(0, visitors - group + 1, group):
                    said = []
                    for v in range(start, start + group):
                        serial += 1
                        said.append(room.say(v, TEXTS[(v + r) % len(TEXTS)], f"turn-{serial}"))
                    await asyncio.gather(*said)
                    turns += group
            await room.mayak.drain()
            results[group] = (
                (time.perf_counter() - wall) / turns * 1e6,
                (time.process_time() - cpu) / turns * 1e6,
            )
        return results
    finally:
        await room.mayak.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group", type=int, action="append", help="messages per transaction (repeatable)")
    args = parser.parse_args()
    groups = args.group or [1, 20]
    for group, (wall, cpu) in asyncio.run(measure(args.visitors, args.rounds, groups)).items():
        print(f"group {group:4d}: {wall:7.0f} µs a turn (wall), {cpu:7.0f} µs CPU")


if __name__ == "__main__":
    main()
