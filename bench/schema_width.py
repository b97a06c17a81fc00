"""What the width of the workspace key costs SQLite's hot writes (a synthetic experiment).

Builds two SQLite files shaped like Mayak's event log and dedup keys (the same columns and indexes
that ingestion writes for every event), one with the workspace id as stored today (a 29-character
text id in every row and index entry) and one with a small integer in its place. Each is filled
with ``--rows`` events and dedup keys for 100,000 customers; then groups of ``--group`` events
are written the way the ingest writer does (``executemany`` into both tables, one transaction per
group). Prints, for each layout: the statements' time per event (the writer's thread), the
COMMIT's time per event (the committer's thread), write-ahead-log frames per event and the file's
size. The layouts run alternately, ``--rounds`` times.

    python bench/schema_width.py --rows 1000000 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import time
import uuid

TEXT_WS = "ws_01JABCDEFGHJKMNPQRSTVWXYZ0"
CUSTOMERS = [f"cus_01J{i:023d}" for i in range(100_000)]
PAYLOAD = "x" * 330  # about the size of a benchmark event's JSON


class Layout:
    def __init__(self, integer_ws: bool, directory: str):
        self.ws: str | int = 1 if integer_ws else TEXT_WS
        ws_type = "integer" if integer_ws else "varchar(40)"
        self.path = os.path.join(directory, f"{'int' if integer_ws else 'text'}.db")
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        c = self.conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA cache_size=-16384")  # Mayak's default, 16 MiB
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute(
            f"CREATE TABLE events (seq INTEGER PRIMARY KEY, id VARCHAR(40), workspace_id {ws_type}, "
            "customer_id VARCHAR(40), payload TEXT)"
        )
        c.execute("CREATE INDEX ix_events_ws_seq ON events (workspace_id, seq)")
        c.execute("CREATE INDEX ix_events_customer ON events (workspace_id, customer_id, seq)")
        c.execute(
            f"CREATE TABLE dedup_keys (workspace_id {ws_type}, key VARCHAR(300), seen_at INTEGER, "
            "PRIMARY KEY (workspace_id, key))"
        )
        c.execute("CREATE INDEX ix_dedup_seen ON dedup_keys (seen_at)")
        self.seq = 0

    def group(self, n: int) -> tuple[float, float]:
        """Write one group of ``n`` events; returns (statements, commit) seconds."""
        rows = [
            (self.seq + i + 1, "evt_" + uuid.uuid4().hex[:26], self.ws, random.choice(CUSTOMERS), PAYLOAD)
            for i in range(n)
        ]
        keys = [(self.ws, str(uuid.uuid4()), 1) for _ in range(n)]
        self.seq += n
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        c.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", rows)
        c.executemany("INSERT INTO dedup_keys VALUES (?, ?, ?)", keys)
        written = time.perf_counter()
        c.execute("COMMIT")
        return written - started, time.perf_counter() - written

    def fill(self, rows: int) -> None:
        for _ in range(rows // 1000):
            self.group(1000)
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def measure(self, groups: int, size: int) -> str:
        statements = commit = 0.0
        for _ in range(groups):
            s, c = self.group(size)
            statements += s
            commit += c
        frames = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        events = groups * size
        megabytes = os.path.getsize(self.path) / 1e6
        return (
            f"statements {statements / events * 1e6:5.2f} µs/event, commit {commit / events * 1e6:5.2f} "
            f"µs/event, {frames / events:.2f} log frames/event, file {megabytes:,.0f} MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="events (and keys) written first")
    parser.add_argument("--group", type=int, default=850, help="events per transaction while measuring")
    parser.add_argument("--groups", type=int, default=100, help="transactions measured per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    random.seed(1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as directory:
        layouts = {
            "text workspace id": Layout(False, directory),
            "integer workspace id": Layout(True, directory),
        }
        for layout in layouts.values():
            layout.fill(args.rows)
        for round_ in range(args.rounds):
            for name, layout in layouts.items():
                print(f"round {round_ + 1}, {name:>20}: {layout.measure(args.groups, args.group)}")


if __name__ == "__main__":
    main()
