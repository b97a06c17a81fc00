"""The ingestion write path alone: ``bench/ingest_http.py``'s events, without HTTP.

A profiling aid that answers "how fast could ingestion be if the HTTP side cost nothing". It builds
the same workload as ``ingest_http.py`` (same events, customers, batches and order), checks every
event with the same code as ``POST /v1/batch`` (``normalise_event``) *before* the clock starts, then
runs Mayak in this process on a fresh database and hands the batches to the ingest writer from
``--submitters`` coroutines, as that many concurrent requests would. The clock runs from the first
batch until the pipeline is drained (every event processed into profiles).

It prints events/s and the main thread's CPU time per event. ``--statements`` also times every SQL
statement the writer runs (through ``FastSql``) and prints the cost per event of each kind, which is
how the write path's time splits between SQL and Python.

    python bench/writer_only.py --events 400000
    python bench/writer_only.py --events 400000 --statements
    python bench/writer_only.py --backend postgres --events 300000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, machine_info, write_json
from ingest_http import PG_URL, Workload, recreate_postgres

from mayak import runtime
from mayak.config import Settings
from mayak.db import fastsql
from mayak.db.migrate import upgrade_async
from mayak.eventlog import NewEvent
from mayak.ingest.segment import normalise_event
from mayak.platform import Mayak
from mayak.timeutil import now_ms, parse_rfc3339_ms


class StatementClock:
    """Times every ``FastSql`` call by statement (its first 80 characters)."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        """Wrap each ``FastSql`` call; ``key`` names the statement, ``count`` its rows."""
        cls = fastsql.FastSql
        stats = self.stats

        def text(args: Any) -> str:
            return str(args[0])[:80]

        def rows_in(args: Any, _out: Any) -> int:
            return len(args[-1])

        wrapped: dict[str, tuple[Any, Any]] = {
            "fetch": (text, lambda _args, out: len(out)),
            "run_many": (text, rows_in),
            "run": (text, lambda _args, _out: 1),
            "run_columns": (text, rows_in),
            "copy": (lambda args: f"COPY {args[0]}", rows_in),
        }
        self._saved = {name: getattr(cls, name) for name in wrapped}

        def timed(real: Any, key: Any, count: Any) -> Any:
            async def call(sql_: Any, conn: Any, *args: Any) -> Any:
                t = time.perf_counter()
                out = await real(sql_, conn, *args)
                _add(stats[key(args)], time.perf_counter() - t, count(args, out))
                return out

            return call

        for name, (key, count) in wrapped.items():
            setattr(cls, name, timed(self._saved[name], key, count))

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(fastsql.FastSql, name, fn)

    def report(self, events: int) -> list[dict[str, Any]]:
        rows = sorted(self.stats.items(), key=lambda kv: -kv[1][1])
        return [
            {"statement": sql, "calls": int(v[0]), "rows": int(v[2]), "us_per_event": v[1] / events * 1e6}
            for sql, v in rows
        ]


def _add(entry: list[float], seconds: float, rows: int) -> None:
    entry[0] += 1
    entry[1] += seconds
    entry[2] += rows


def checked_batches(work: Workload, ws_id: str, settings: Settings) -> list[list[NewEvent]]:
    """Every batch as ``POST /v1/batch`` would hand it to the writer (same checks, same fields)."""
    batches: list[list[NewEvent]] = []
    for body in work.bodies():
        parsed = orjson.loads(body)
        received, sent = now_ms(), parse_rfc3339_ms(parsed["sentAt"])
        batches.append(
            [
                normalise_event(
                    item,
                    workspace_id=ws_id,
                    received_at=received,
                    batch_sent_at=sent,
                    forced_type=None,
                    actor="bench",
                    max_event_bytes=settings.max_event_bytes,
                    max_depth=settings.max_json_depth,
                )
                for item in parsed["batch"]
            ]
        )
    return batches


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    await upgrade_async(url)
    settings = Settings(database_url=url, secret_key="bench-" + "k" * 32, log_level="warning")
    mayak = Mayak(settings)
    await mayak.start()
    try:
        ws = await mayak.workspaces.create_workspace("bench")
        work = Workload.build(args.events, args.seed)
        t = time.perf_counter()
        batches = checked_batches(work, str(ws["id"]), settings)
        took = time.perf_counter() - t
        print(f"checked {work.events:,} events in {len(batches):,} batches in {took:.1f} s")
        clock = StatementClock()
        if args.statements:
            clock.install()
        runtime.tune_for_server()  # as `mayak serve` runs
        queue = list(reversed(batches))

        async def submitter() -> None:
            while queue:
                await mayak.writer.submit(queue.pop())

        commits_before = _commit_totals(mayak)
        wall, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        await asyncio.gather(*(submitter() for _ in range(args.submitters)))
        await mayak.drain(timeout=3600)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        main_cpu = time.thread_time() - main_cpu
        commits, commit_s = (a - b for a, b in zip(_commit_totals(mayak), commits_before, strict=True))
        clock.uninstall()
    finally:
        await mayak.stop()
    return {
        "events": work.events,
        "seconds": wall,
        "events_per_s": work.events / wall,
        "process_cpu_s": cpu,
        "main_thread_cpu_s": main_cpu,
        "main_thread_us_per_event": main_cpu / work.events * 1e6,
        "groups": commits,
        "commit_wait_us_per_event": commit_s / work.events * 1e6,
        "statements": clock.report(work.events) if args.statements else [],
    }


def _commit_totals(mayak: Mayak) -> tuple[float, float]:
    """Groups committed so far and the seconds the writer waited for their commits
    (``mayak_ingest_commit_seconds``: from a group's last statement until it had committed)."""
    count = total = 0.0
    for metric in mayak.metrics.commit_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mayak-writer-", dir=args.tmpdir) as tmp:
        if args.backend == "postgres":
            url = await recreate_postgres(args.pg_url)
        else:
            url = f"sqlite+aiosqlite:///{tmp}/mayak.db"
        result = await run(args, url)
    return {"benchmark": "writer_only", "machine": machine_info(), "backend": args.backend, **result}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--events", type=int, default=400_000, help="total events (N/10 customers)")
    parser.add_argument("--submitters", type=int, default=16, help="concurrent submitting coroutines")
    parser.add_argument("--statements", action="store_true", help="time each SQL statement kind")
    parser.add_argument(
        "--pg-url",
        default=PG_URL,
        help="PostgreSQL database to DROP and recreate for the run",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tmpdir", default=None, help="where the SQLite file goes")
    parser.add_argument("--json-out", default=str(OUT_DIR / "writer_only.json"), help="'' to skip")
    args = parser.parse_args()
    import uvloop  # the loop `mayak serve` runs on

    result = uvloop.run(amain(args))
    print(
        f"\n== writer only ({result['backend']}): {result['events']:,} events, {args.submitters} submitters\n"
        f"  fully processed     {result['events_per_s']:10,.0f} events/s   ({result['seconds']:.2f} s)\n"
        f"  main thread CPU     {result['main_thread_us_per_event']:10.1f} µs/event "
        f"(process CPU {result['process_cpu_s']:.1f} s)\n"
        f"  commit wait         {result['commit_wait_us_per_event']:10.1f} µs/event "
        f"({result['groups']:,.0f} groups, {result['events'] / max(result['groups'], 1):,.0f} events a group)"
    )
    if result["statements"]:
        total = sum(s["us_per_event"] for s in result["statements"])
        print(f"  SQL (timed calls)   {total:10.1f} µs/event; by statement:")
        for s in result["statements"][:12]:
            cost, calls, rows = s["us_per_event"], s["calls"], s["rows"]
            print(f"    {cost:6.1f} µs  calls {calls:6,}  rows {rows:9,}  {s['statement']}")
    write_json(args.json_out or None, result)


if __name__ == "__main__":
    main()
