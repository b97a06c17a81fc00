"""SQL statements per web-chat bot turn, by kind: a profiling aid, not a timed benchmark.

Runs Mayak in this process on a fresh SQLite file with the `bench/bots/showroom` bot on a web-chat
channel, gives each of N visitors a first message (warm-up), then traces every SQLite statement while
each visitor sends one more message, one message per transaction (no group commit), and prints the
statements per turn by kind. Under load, group commit turns many of the per-transaction statements
(BEGIN/COMMIT, seq reservation, lane checks) into per-group ones; the per-turn inserts and updates
stay.

    python bench/turn_statements.py --turns 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import re
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from mayak.channels.events import inbound_event
from mayak.config import Settings
from mayak.db.database import Database
from mayak.platform import Mayak
from mayak.timeutil import now_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webchat import BOT_DIR, TEXTS


def kind_of(sql: str) -> str:
    words = re.sub(r"\s+", " ", sql).strip().split(" ")
    verb = words[0].upper()
    if verb in ("INSERT", "DELETE") and len(words) > 2:
        return f"{verb} {words[2]}"
    if verb == "UPDATE" and len(words) > 1:
        return f"UPDATE {words[1]}"
    if verb == "SELECT":
        match = re.search(r"\bFROM (\w+)", sql)
        return f"SELECT … FROM {match.group(1) if match else '?'}"
    return verb


@dataclasses.dataclass
class Showroom:
    """Mayak running in this process on a fresh SQLite file, with the showroom bot on a web-chat
    channel; ``say`` hands one visitor's message to the ingest writer (as the channel would)."""

    mayak: Mayak
    channel: Any

    async def say(self, visitor: int, text: str, key: str) -> None:
        now = now_ms()
        ev = inbound_event(
            self.channel,
            address=f"v{visitor}",
            anonymous_id=f"v{visitor}",
            text=text,
            timestamp=now,
            received_at=now,
            dedup_key=key,
        )
        await self.mayak.writer.submit([ev])


async def showroom() -> Showroom:
    folder = tempfile.mkdtemp(prefix="mayak-turns-")
    url = f"sqlite+aiosqlite:///{folder}/mayak.db"
    settings = dataclasses.replace(Settings.from_env(), database_url=url)
    db = Database(url)
    await db.create_all()
    mayak = Mayak(settings, db=db)
    await mayak.start(workers=True)
    ws = await mayak.workspaces.create_workspace("turns", {"default_region": "GB"})
    files = {p.name: p.read_text("utf-8") for p in BOT_DIR.glob("*.yaml")}
    bot = await mayak.bots.publish_files(ws["id"], files)
    created = await mayak.channels.create(ws["id"], type="webchat", name="c", config={}, bot_id=bot["id"])
    return Showroom(mayak, await mayak.channels.record(ws["id"], created["id"]))


async def measure(turns: int) -> collections.Counter[str]:
    room = await showroom()
    try:
        for i in range(turns):
            await room.say(i, "hello", f"warm-{i}")
        await room.mayak.drain()
        counts: collections.Counter[str] = collections.Counter()
        traced = [c for c in gc.get_objects() if isinstance(c, sqlite3.Connection)]
        for conn in traced:
            conn.set_trace_callback(lambda sql: counts.update([kind_of(sql)]))
        for i in range(turns):
            await room.say(i, TEXTS[i % len(TEXTS)], f"turn-{i}")
        await room.mayak.drain()
        for conn in traced:
            conn.set_trace_callback(None)
        return counts
    finally:
        await room.mayak.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    counts = asyncio.run(measure(args.turns))
    total = sum(counts.values())
    print(f"{total / args.turns:.2f} statements per turn ({args.turns} turns, one per transaction)")
    for kind, n in counts.most_common():
        print(f"{n / args.turns:7.2f}  {kind}")


if __name__ == "__main__":
    main()
