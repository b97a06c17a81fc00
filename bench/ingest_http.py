"""End-to-end ingestion over HTTP on loopback: Segment ``/v1/batch`` in, profiles out.

Workload (defaults): N = 1,000,000 events for N/10 customers, ten events each, in batches of 100.
Per customer: identify at slots 0, 4 and 7 (30 %), track at the other seven (70 %). Identify calls
carry five traits (name, email, plan, city, age). One customer in ten starts anonymous: its first
four events carry only an ``anonymousId`` (its slot-0 identify has five traits but no e-mail), and
its slot-4 identify carries ``userId`` *and* that ``anonymousId``, linking the two (the anonymous
profile becomes the identified one). Customers' events are interleaved: the stream is ten rounds
(slot 0 of every customer, then slot 1 …), each round in a seeded random customer order, so one
customer's ten events are spread over the whole run. Every event has a unique ``messageId``.

Every request (head and JSON body) is built before the clock starts. The server is ``mayak serve``
in its own process; this process is the load generator: ``--connections`` keep-alive connections
in a closed loop, raw HTTP/1.1 over asyncio streams. The clock runs from the first request until
the pipeline has processed every event into profiles (``/metrics``: ``mayak_pipeline_lag_events``
is 0 and ``mayak_events_processed_total`` has reached the number accepted).

In the same run, before any server starts, the same event rows (every column of ``events``) are
inserted with Python's ``sqlite3`` ``executemany`` into a fresh database with the same schema (WAL,
synchronous=NORMAL, the server's cache pragmas), once with one transaction per 100-event batch and
once with one per 10,000 events; only the inserts and commits are timed. The ratio printed is
end-to-end (fully processed) rate / raw rate.

    python bench/ingest_http.py --events 20000 --backend sqlite
    python bench/ingest_http.py --backend both --pg-url postgresql://postgres@127.0.0.1:5432/mayak_bench
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    OUT_DIR,
    HttpClient,
    Server,
    create_workspace,
    latency_summary_ms,
    machine_info,
    run_async,
    scrape_metrics,
    self_cpu_seconds,
    write_json,
)

BATCH = 100
PG_URL = "postgresql://postgres@127.0.0.1:5432/mayak_bench"  # dropped and recreated by a run
EVENTS_PER_CUSTOMER = 10
IDENTIFY_SLOTS = frozenset({0, 4, 7})
LINK_SLOT = 4  # an anonymous customer's first event with a userId
TRACK_NAMES = (
    "Product Viewed",
    "Product Added",
    "Checkout Started",
    "Order Completed",
    "Test Drive Booked",
    "Service Booked",
    "Brochure Downloaded",
)
PLANS = ("free", "basic", "pro", "enterprise")
CITIES = ("London", "Manchester", "Leeds", "Glasgow", "Bristol", "Cardiff", "Belfast", "Liverpool")
FIRST = ("Ann", "Boris", "Chloe", "Dmitri", "Eva", "Farid", "Grace", "Hugo", "Irina", "Jon")
LAST = ("Smith", "Ivanova", "Jones", "Petrov", "Taylor", "Brown", "Novak", "Wilson")
EVENT_COLUMNS = (
    "id",
    "workspace_id",
    "type",
    "name",
    "customer_id",
    "timestamp",
    "received_at",
    "source",
    "actor",
    "payload",
)


# -- the workload -----------------------------------------------------------------------------


@dataclass
class Workload:
    customers: int
    stream: list[int]  # customer * 10 + slot, in send order
    base_ms: int
    seed: int

    @property
    def events(self) -> int:
        return len(self.stream)

    @property
    def batches(self) -> int:
        return -(-len(self.stream) // BATCH)

    @classmethod
    def build(cls, events: int, seed: int) -> Workload:
        customers = max(1, events // EVENTS_PER_CUSTOMER)
        rng = random.Random(seed)
        stream: list[int] = []
        order = list(range(customers))
        for slot in range(EVENTS_PER_CUSTOMER):
            rng.shuffle(order)
            stream.extend(c * EVENTS_PER_CUSTOMER + slot for c in order)
        return cls(customers, stream, int(time.time() * 1000), seed)

    def event(self, pos: int) -> dict[str, Any]:
        code = self.stream[pos]
        cust, slot = divmod(code, EVENTS_PER_CUSTOMER)
        anonymous_start = cust % 10 == 0
        uid = f"user-{cust:08d}"
        aid = f"anon-{cust:08d}-{(cust * 2654435761) % 0xFFFFFF:06x}"
        ts_ms = self.base_ms - (len(self.stream) - pos) * 2  # older events first, 2 ms apart
        ev: dict[str, Any] = {"messageId": f"msg-{self.seed}-{cust:08d}-{slot}", "timestamp": _iso(ts_ms)}
        if anonymous_start and slot < LINK_SLOT:
            ev["anonymousId"] = aid
        else:
            ev["userId"] = uid
            if anonymous_start and slot == LINK_SLOT:
                ev["anonymousId"] = aid
        if slot in IDENTIFY_SLOTS:
            ev["type"] = "identify"
            if anonymous_start and slot < LINK_SLOT:
                ev["traits"] = {
                    "plan": "free",
                    "city": CITIES[cust % len(CITIES)],
                    "age": 18 + cust % 60,
                    "utm_source": "newsletter",
                    "referrer": "search",
                }
            else:
                ev["traits"] = {
                    "name": f"{FIRST[cust % len(FIRST)]} {LAST[(cust // 10) % len(LAST)]}",
                    "email": f"customer{cust:08d}@example.com",
                    "plan": PLANS[(cust + slot) % len(PLANS)],
                    "city": CITIES[(cust + slot) % len(CITIES)],
                    "age": 18 + cust % 60,
                }
        else:
            ev["type"] = "track"
            ev["event"] = TRACK_NAMES[(cust + slot) % len(TRACK_NAMES)]
            ev["properties"] = {
                "product_id": f"sku-{(cust * 7 + slot) % 5000:05d}",
                "price": round(5 + (cust * 31 + slot * 17) % 9500 / 10, 2),
                "currency": "GBP",
                "quantity": 1 + slot % 3,
            }
        ev["context"] = {
            "library": {"name": "analytics-python", "version": "2.3.3"},
            "locale": "en-GB",
            "timezone": "Europe/London",
            "ip": f"10.{cust % 250}.{slot}.{cust % 200 + 1}",
        }
        return ev

    def batch_events(self, index: int) -> list[dict[str, Any]]:
        start = index * BATCH
        return [self.event(pos) for pos in range(start, min(start + BATCH, len(self.stream)))]

    def bodies(self) -> list[bytes]:
        sent_at = _iso(self.base_ms)
        return [orjson.dumps({"batch": self.batch_events(i), "sentAt": sent_at}) for i in range(self.batches)]


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


# -- raw sqlite3 executemany baseline ---------------------------------------------------------


def raw_rows(work: Workload, index: int, ws_id: str) -> list[tuple[Any, ...]]:
    """The ``events`` rows the server would store for batch ``index`` (payload normalised alike)."""
    from mayak.ids import new_ids

    events = work.batch_events(index)
    received = int(time.time() * 1000)
    received_iso = _iso(received)
    rows = []
    for evt_id, ev in zip(new_ids("evt", len(events)), events, strict=True):
        ts = received - (work.base_ms - _parse_iso_ms(ev["timestamp"]))
        payload = dict(ev, originalTimestamp=ev["timestamp"], timestamp=_iso(ts), receivedAt=received_iso)
        name = ev.get("event")
        rows.append(
            (
                evt_id,
                ws_id,
                ev["type"],
                name,
                None,
                ts,
                received,
                "api",
                "key_bench",
                orjson.dumps(payload).decode(),
            )
        )
    return rows


def _parse_iso_ms(value: str) -> int:
    from mayak.timeutil import parse_rfc3339_ms

    return parse_rfc3339_ms(value)


def raw_sqlite_baseline(work: Workload, txn_events: int, directory: Path) -> dict[str, Any]:
    import sqlalchemy as sa

    from mayak.db.schema import metadata

    path = directory / f"raw-{txn_events}.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    engine.dispose()
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-65536", "temp_store=MEMORY"):
        conn.execute(f"PRAGMA {pragma}")
    sql = f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
    chunk_batches = max(1, 10_000 // BATCH)
    elapsed = 0.0
    inserted = 0
    for first in range(0, work.batches, chunk_batches):
        last = min(first + chunk_batches, work.batches)
        batches = [raw_rows(work, i, "ws_bench") for i in range(first, last)]
        if txn_events == BATCH:
            for rows in batches:
                started = time.perf_counter()
                conn.execute("BEGIN")
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
                elapsed += time.perf_counter() - started
                inserted += len(rows)
        else:
            flat = [row for rows in batches for row in rows]
            started = time.perf_counter()
            conn.execute("BEGIN")
            conn.executemany(sql, flat)
            conn.execute("COMMIT")
            elapsed += time.perf_counter() - started
            inserted += len(flat)
    count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    assert count == inserted == work.events, (count, inserted, work.events)
    return {
        "transaction_events": txn_events,
        "events": inserted,
        "seconds": elapsed,
        "events_per_s": inserted / elapsed if elapsed else float("nan"),
    }


# -- databases --------------------------------------------------------------------------------


async def recreate_postgres(pg_url: str) -> str:
    """Drop and create the database named in ``pg_url``; returns the URL to give the server."""
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    name = url.database or ""
    if not name.replace("_", "").isalnum():
        raise SystemExit(f"refusing to drop database {name!r}: use a plain name")
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


SANITY_SQL = {
    "events": "SELECT count(*) FROM events",
    "customers": "SELECT count(*) FROM customers WHERE merged_into IS NULL",
    "customers_merged_away": "SELECT count(*) FROM customers WHERE merged_into IS NOT NULL",
    "identified": "SELECT count(*) FROM customers WHERE merged_into IS NULL AND identified",
    "identities": "SELECT count(*) FROM identities",
}


async def sanity_counts(backend: str, url: str, sqlite_path: Path | None) -> dict[str, int]:
    if backend == "sqlite":
        assert sqlite_path is not None
        conn = sqlite3.connect(sqlite_path)
        try:
            return {k: int(conn.execute(q).fetchone()[0]) for k, q in SANITY_SQL.items()}
        finally:
            conn.close()
    import asyncpg

    pg = await asyncpg.connect(url)
    try:
        return {k: int(await pg.fetchval(q)) for k, q in SANITY_SQL.items()}
    finally:
        await pg.close()


# -- one end-to-end run -----------------------------------------------------------------------


@dataclass
class Sender:
    heads: list[bytes]
    bodies: list[bytes]
    next_index: int = 0
    accepted: int = 0
    duplicates: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    async def worker(self, client: HttpClient) -> None:
        while self.next_index < len(self.bodies):
            i = self.next_index
            self.next_index += 1
            started = time.perf_counter()
            resp = await client.request(self.heads[i], self.bodies[i])
            self.latencies.append(time.perf_counter() - started)
            if resp.status != 200:
                self.failures.append(f"batch {i}: HTTP {resp.status} {resp.body[:300]!r}")
                continue
            answer = orjson.loads(resp.body)
            self.accepted += answer["accepted"]
            self.duplicates += answer["duplicates"]
            if answer.get("errors"):
                self.failures.append(f"batch {i}: {answer['errors'][:2]}")


async def run_backend(
    backend: str, work: Workload, bodies: list[bytes], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    sqlite_path: Path | None = None
    if backend == "sqlite":
        sqlite_path = tmp / "sqlite" / "mayak.db"
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{sqlite_path}"
    else:
        url = await recreate_postgres(args.pg_url)
    keys = create_workspace(url, "bench")
    auth = base64.b64encode(f"{keys['write_key']}:".encode()).decode()
    heads = [
        (
            f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        for body in bodies
    ]
    server = Server(url, tmp / f"server-{backend}.log", split_worker=args.split_worker)
    server.start()
    try:
        await server.wait_ready()
        clients = [await HttpClient.connect("127.0.0.1", server.port) for _ in range(args.connections)]
        monitor = await HttpClient.connect("127.0.0.1", server.port)
        sender = Sender(heads, bodies)
        samples: list[dict[str, float]] = []
        cpu0, own0 = server.cpu_seconds() or 0.0, self_cpu_seconds()
        main0 = server.main_thread_cpu_seconds() or 0.0
        print(
            f"[{backend}] server pid {server.pid} on port {server.port}; sending {work.events:,} events "
            f"in {len(bodies):,} requests over {args.connections} connections",
            flush=True,
        )

        started = time.perf_counter()
        sending = asyncio.gather(*(sender.worker(c) for c in clients))
        sending_task = asyncio.ensure_future(sending)
        while not sending_task.done():  # coarse progress samples while requests are in flight
            await asyncio.wait({sending_task}, timeout=1.0)
            if not sending_task.done():
                m = await scrape_metrics(monitor)
                samples.append(
                    {
                        "t": time.perf_counter() - started,
                        "lag": m.get("mayak_pipeline_lag_events", -1),
                        "processed": m.get("mayak_events_processed_total", 0),
                    }
                )
        await sending_task
        http_done = time.perf_counter() - started
        http_cpu = (server.cpu_seconds() or 0.0) - cpu0

        deadline = time.monotonic() + args.timeout
        metrics: dict[str, float] = {}
        while True:
            metrics = await scrape_metrics(monitor)
            lag = metrics.get("mayak_pipeline_lag_events", -1)
            processed = metrics.get("mayak_events_processed_total", 0)
            # Split: the API process counts no processing (its worker does); the lag (read from the
            # database, so across processes) is the measure.
            if lag == 0 and (processed >= sender.accepted or args.split_worker):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"pipeline not done after {args.timeout}s: lag {lag}, processed {processed}"
                )
            await asyncio.sleep(args.poll)
        all_done = time.perf_counter() - started
        server_cpu = (server.cpu_seconds() or 0.0) - cpu0
        main_cpu = (server.main_thread_cpu_seconds() or 0.0) - main0
        own_cpu = self_cpu_seconds() - own0
        peak_rss, rss = server.peak_rss_mib(), server.rss_mib()
        for c in [*clients, monitor]:
            await c.close()
        counts = await sanity_counts(backend, url, sqlite_path)
    finally:
        server.stop()
    if sender.failures:
        print(f"[{backend}] {len(sender.failures)} failed requests; first: {sender.failures[0]}", flush=True)
    return {
        "backend": backend,
        "events": work.events,
        "customers": work.customers,
        "requests": len(bodies),
        "connections": args.connections,
        "accepted": sender.accepted,
        "duplicates": sender.duplicates,
        "failed_requests": len(sender.failures),
        "http_seconds": http_done,
        "processed_seconds": all_done,
        "accepted_events_per_s": sender.accepted / http_done,
        "processed_events_per_s": sender.accepted / all_done,
        "lag_at_http_done_s": all_done - http_done,
        "request_latency_ms": latency_summary_ms(sender.latencies),
        "server_peak_rss_mib": peak_rss,
        "server_rss_end_mib": rss,
        "server_cpu_s_during_http": http_cpu,
        "server_cpu_s_total": server_cpu,
        "server_main_thread_cpu_s": main_cpu,
        "server_main_thread_us_per_event": main_cpu / sender.accepted * 1e6 if sender.accepted else None,
        "loadgen_cpu_s": own_cpu,
        "metrics_end": {
            k: v for k, v in metrics.items() if k.startswith("mayak_") and not k.endswith("_created")
        },
        "progress_samples": samples,
        "db_counts": counts,
    }


# -- main -------------------------------------------------------------------------------------


def print_result(r: dict[str, Any], raw: dict[str, dict[str, Any]]) -> None:
    lat = r["request_latency_ms"]
    print(
        f"\n== {r['backend']}: {r['events']:,} events, {r['customers']:,} customers, "
        f"{r['requests']:,} requests x {BATCH}, {r['connections']} connections"
    )
    print(
        f"  accepted (HTTP done)   {r['accepted_events_per_s']:>12,.0f} events/s   "
        f"({r['http_seconds']:.2f} s)"
    )
    print(
        f"  fully processed        {r['processed_events_per_s']:>12,.0f} events/s   "
        f"({r['processed_seconds']:.2f} s; pipeline finished {r['lag_at_http_done_s']:.2f} s "
        "after the last response)"
    )
    print(
        f"  request latency ms     p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  "
        f"max {lat['max']:.1f}"
    )
    print(
        f"  server peak RSS        {r['server_peak_rss_mib']:.0f} MiB (end {r['server_rss_end_mib']:.0f} MiB)"
    )
    print(
        f"  server CPU             {r['server_cpu_s_total']:.1f} s ({r['server_cpu_s_during_http']:.1f} s "
        f"while sending); load generator {r['loadgen_cpu_s']:.1f} s"
    )
    if r.get("server_main_thread_us_per_event") is not None:
        busy = r["server_main_thread_cpu_s"] / r["processed_seconds"] if r["processed_seconds"] else 0.0
        print(
            f"  server main thread     {r['server_main_thread_cpu_s']:.1f} s ({busy:.0%} busy), "
            f"{r['server_main_thread_us_per_event']:.1f} µs an event"
        )
    print(
        f"  accepted {r['accepted']:,}, duplicates {r['duplicates']:,}, "
        f"failed requests {r['failed_requests']}"
    )
    print(f"  database               {r['db_counts']}")
    for key, base in raw.items():
        ratio = r["processed_events_per_s"] / base["events_per_s"]
        r.setdefault("ratio_to_raw", {})[key] = ratio
        print(
            f"  end-to-end / raw sqlite3 ({key})  {ratio:.3f}  "
            f"({r['processed_events_per_s']:,.0f} / {base['events_per_s']:,.0f} events/s)"
        )


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    t = time.perf_counter()
    work = Workload.build(args.events, args.seed)
    bodies = work.bodies()
    size = sum(len(b) for b in bodies)
    print(
        f"built {len(bodies):,} request bodies ({work.events:,} events, {work.customers:,} customers, "
        f"{size / 1e6:.1f} MB, {size / work.events:.0f} B/event) in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    result: dict[str, Any] = {
        "benchmark": "ingest_http",
        "machine": machine_info(),
        "events": work.events,
        "customers": work.customers,
        "batch": BATCH,
        "seed": args.seed,
        "raw_sqlite": {},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="mayak-bench-", dir=args.tmpdir) as tmp_name:
        tmp = Path(tmp_name)
        raw: dict[str, dict[str, Any]] = {}
        if not args.skip_raw:
            for txn in (BATCH, 10_000):
                key = f"txn_{txn}"
                raw[key] = raw_sqlite_baseline(work, txn, tmp)
                print(
                    f"raw sqlite3 executemany, one transaction per {txn:,} events: "
                    f"{raw[key]['events_per_s']:,.0f} events/s ({raw[key]['seconds']:.2f} s)",
                    flush=True,
                )
        result["raw_sqlite"] = raw
        for backend in backends:
            run = await run_backend(backend, work, bodies, args, tmp)
            print_result(run, raw)
            result["runs"].append(run)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--events", type=int, default=1_000_000, help="total events (N/10 customers)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent keep-alive connections")
    parser.add_argument(
        "--pg-url",
        default=PG_URL,
        help="PostgreSQL database to DROP and recreate for the run",
    )
    parser.add_argument("--json-out", default=str(OUT_DIR / "ingest_http.json"), help="'' to skip")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--poll", type=float, default=0.1, help="seconds between /metrics polls after sending"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="max seconds to wait for the pipeline")
    parser.add_argument("--skip-raw", action="store_true", help="skip the raw sqlite3 baseline")
    parser.add_argument(
        "--split-worker",
        action="store_true",
        help="run the API (serve --no-workers) and the pipeline (mayak worker) as two processes",
    )
    parser.add_argument(
        "--tmpdir", default=None, help="where the temporary databases go (default: the system's temp folder)"
    )
    args = parser.parse_args()
    result = run_async(amain(args))
    write_json(args.json_out, result)


if __name__ == "__main__":
    main()
