"""What the width of the workspace and customer keys costs SQLite's hot writes (a synthetic experiment).

Builds SQLite files shaped like the tables ingestion reads and writes for every event (events and
their two indexes, dedup keys, identities, customers: the same keys and indexes as Mayak's before
schema revision 0006, fewer columns), in up to five layouts: 1 the workspace and customer ids as
text (29 and 30 characters, in every row and index entry); 2 a small integer for the workspace;
3 integers for both (customers keyed by their row id); 4 text workspace ids and integer customer
keys (close to revision 0006); 5 text ids with the dedup keys and identities ``WITHOUT ROWID``.
Each holds 100,000 customers with two identities each and is filled with ``--rows`` events and
dedup keys; then groups of ``--group`` events are written the way the ingest writer does, one
transaction per group: the dedup keys, each event's customer resolved (user id looked up, row read)
and updated, the events. Prints, for each layout: the statements' time per event (the writer's
thread), the COMMIT's time per event (the committer's thread), write-ahead-log frames per event and
the file's size. The layouts run alternately, ``--rounds`` times; ``--layouts 1,4`` picks some.

    python bench/schema_width.py --rows 1000000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable

TEXT_WS = "ws_01JABCDEFGHJKMNPQRSTVWXYZ0"
CUSTOMERS = [f"cus_01J{i:023d}" for i in range(100_000)]
PAYLOAD = "x" * 330  # about the size of a benchmark event's JSON
TRAITS = "t" * 400  # about the size of a benchmark customer's JSON columns together


class Layout:
    def __init__(
        self, integer_ws: bool, directory: str, integer_customers: bool = False, without_rowid: bool = False
    ):
        self.ws: str | int = 1 if integer_ws else TEXT_WS
        ws_type = "integer" if integer_ws else "varchar(40)"
        # integer customer keys: the customers table keyed by its rowid, events and identities
        # pointing at it by number
        self.customers: list[str] | list[int] = (
            list(range(1, len(CUSTOMERS) + 1)) if integer_customers else CUSTOMERS
        )
        cid_type = "INTEGER" if integer_customers else "VARCHAR(40)"
        name = (
            ("int" if integer_ws else "text")
            + ("-intcust" if integer_customers else "")
            + ("-norowid" if without_rowid else "")
        )
        # without_rowid: the small composite-keyed tables stored in their primary key's B-tree
        clustered = " WITHOUT ROWID" if without_rowid else ""
        self.path = os.path.join(directory, f"{name}.db")
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        c = self.conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA cache_size=-16384")  # Mayak's default, 16 MiB
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute(
            f"CREATE TABLE events (seq INTEGER PRIMARY KEY, id VARCHAR(40), workspace_id {ws_type}, "
            f"customer_id {cid_type}, payload TEXT)"
        )
        c.execute("CREATE INDEX ix_events_ws_seq ON events (workspace_id, seq)")
        c.execute("CREATE INDEX ix_events_customer ON events (workspace_id, customer_id, seq)")
        c.execute(
            f"CREATE TABLE dedup_keys (workspace_id {ws_type}, key VARCHAR(300), seen_at INTEGER, "
            f"PRIMARY KEY (workspace_id, key)){clustered}"
        )
        c.execute("CREATE INDEX ix_dedup_seen ON dedup_keys (seen_at)")
        c.execute(
            f"CREATE TABLE customers (id {cid_type} PRIMARY KEY, workspace_id {ws_type}, traits TEXT, "
            "last_seen INTEGER)"
        )
        c.execute("CREATE INDEX ix_customers_ws_id ON customers (workspace_id, id)")
        c.execute(
            f"CREATE TABLE identities (workspace_id {ws_type}, kind VARCHAR(40), value VARCHAR(300), "
            f"customer_id {cid_type}, PRIMARY KEY (workspace_id, kind, value)){clustered}"
        )
        c.execute("CREATE INDEX ix_identities_customer ON identities (workspace_id, customer_id)")
        c.execute("BEGIN")
        c.executemany(
            "INSERT INTO customers VALUES (?, ?, ?, 0)", [(cid, self.ws, TRAITS) for cid in self.customers]
        )
        c.executemany(
            "INSERT INTO identities VALUES (?, ?, ?, ?)",
            [
                (self.ws, kind, f"{kind}-{i}", cid)
                for i, cid in enumerate(CUSTOMERS)
                for kind in ("user_id", "email")
            ],
        )
        c.execute("COMMIT")
        self.seq = 0

    def group(self, n: int, profiles: bool = True) -> tuple[float, float]:
        """Write one group of ``n`` events; returns (statements, commit) seconds. With ``profiles``
        each event's customer is also resolved and updated as the pipeline does: its user id looked
        up, its row read, then written back."""
        picked = [random.randrange(len(CUSTOMERS)) for _ in range(n)]
        rows = [
            (self.seq + i + 1, "evt_" + uuid.uuid4().hex[:26], self.ws, self.customers[k], PAYLOAD)
            for i, k in enumerate(picked)
        ]
        keys = [(self.ws, str(uuid.uuid4()), 1) for _ in range(n)]
        self.seq += n
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        c.executemany("INSERT INTO dedup_keys VALUES (?, ?, ?)", keys)
        if profiles:
            users = json.dumps([f"user_id-{k}" for k in picked])
            found = c.execute(
                "SELECT value, customer_id FROM identities WHERE workspace_id = ? AND kind = 'user_id' "
                "AND value IN (SELECT value FROM json_each(?))",
                (self.ws, users),
            ).fetchall()
            ids = json.dumps(sorted({cid for _, cid in found}))
            read = c.execute(
                "SELECT id, traits FROM customers WHERE workspace_id = ? "
                "AND id IN (SELECT value FROM json_each(?))",
                (self.ws, ids),
            ).fetchall()
            c.executemany(
                "UPDATE customers SET traits = ?, last_seen = ? WHERE id = ?",
                [(traits, self.seq, cid) for cid, traits in read],
            )
        c.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", rows)
        written = time.perf_counter()
        c.execute("COMMIT")
        return written - started, time.perf_counter() - written

    def fill(self, rows: int) -> None:
        for _ in range(rows // 1000):
            self.group(1000, profiles=False)
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
    parser.add_argument(
        "--layouts", default="", help="comma-separated numbers of the layouts to run (1-5; default all)"
    )
    args = parser.parse_args()
    random.seed(1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as directory:
        makers: dict[str, Callable[[], Layout]] = {
            "text workspace id": lambda: Layout(False, directory),
            "integer workspace id": lambda: Layout(True, directory),
            "and customer keys": lambda: Layout(True, directory, integer_customers=True),
            "text ws, customer keys": lambda: Layout(False, directory, integer_customers=True),
            "text, without rowid": lambda: Layout(False, directory, without_rowid=True),
        }
        names = list(makers)
        chosen = [names[int(n) - 1] for n in args.layouts.split(",")] if args.layouts else names
        layouts = {name: makers[name]() for name in chosen}
        for layout in layouts.values():
            layout.fill(args.rows)
        for round_ in range(args.rounds):
            for name, layout in layouts.items():
                print(f"round {round_ + 1}, {name:>20}: {layout.measure(args.groups, args.group)}")


if __name__ == "__main__":
    main()
