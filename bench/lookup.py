"""Profile lookup by identity at scale: ``GET /v1/customers?identity=email:…`` with a secret key.

Setup (not timed): a workspace is created with ``mayak workspace create bench --json`` in a fresh
SQLite file; M customers (default 1,000,000) are then bulk-inserted straight into its ``customers``
and ``identities`` tables with ``sqlite3`` ``executemany``, in key order. Each customer has five
traits (name, email, plan, city, age, with matching ``trait_times``), empty context, consents and
preferences, and two identities: ``email`` (customerNNNNNNNN@example.com) and ``user_id``.

Measured: ``mayak serve`` in its own process answers K lookups (default 20,000) of e-mails drawn
uniformly at random (seeded) from the M, sent from ``--connections`` keep-alive connections in a
closed loop (each sends its next request when the previous answer is in), after ``--warmup``
unmeasured lookups. Latency is taken in this process, from writing the request to having read the
whole response, so it includes loopback and the client's own CPU (it shares the machine's cores with
the server). Every response must be a 200; every 50th is parsed and its customer id checked.
Target: p99 <= 5 ms. ``--analyze`` runs SQLite's ANALYZE after loading (the server never does), to
show how much the query planner's statistics matter.

    python bench/lookup.py --customers 20000 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
    self_cpu_seconds,
    write_json,
)

TARGET_P99_MS = 5.0
CHECK_EVERY = 50
PLANS = ("free", "basic", "pro", "enterprise")
CITIES = ("London", "Manchester", "Leeds", "Glasgow", "Bristol", "Cardiff", "Belfast", "Liverpool")
FIRST = ("Ann", "Boris", "Chloe", "Dmitri", "Eva", "Farid", "Grace", "Hugo", "Irina", "Jon")
LAST = ("Smith", "Ivanova", "Jones", "Petrov", "Taylor", "Brown", "Novak", "Wilson")
CUSTOMER_COLUMNS = (
    "key",
    "id",
    "workspace_id",
    "merged_into",
    "identified",
    "traits",
    "trait_times",
    "context",
    "consents",
    "preferences",
    "stage",
    "stage_at",
    "first_seen",
    "last_seen",
    "created_at",
    "updated_at",
)
IDENTITY_COLUMNS = ("workspace_id", "kind", "value", "customer_key", "created_at")


def email_of(i: int) -> str:
    return f"customer{i:08d}@example.com"


def customer_ids(count: int) -> list[str]:
    """Valid ``cus_`` ids (ULID layout), sorted, so inserts append to the primary key's b-tree."""
    from mayak.ids import new_ids

    ids: list[str] = []
    for start in range(0, count, 100_000):
        ids.extend(new_ids("cus", min(100_000, count - start)))
    ids.sort()
    return ids


def populate(db_path: Path, ws_id: str, ids: list[str], analyze: bool = False) -> dict[str, Any]:
    """Bulk-insert customers and their identities; returns row counts and seconds."""
    started = time.perf_counter()
    now = int(time.time() * 1000)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # loading only; the server opens it with its own settings
    conn.execute("PRAGMA cache_size=-262144")
    empty = "{}"

    def customer_rows() -> Any:
        for i, cid in enumerate(ids):
            created = now - 86_400_000 + i % 86_400_000
            stamp = [created, 0]
            traits = {
                "name": f"{FIRST[i % len(FIRST)]} {LAST[(i // 10) % len(LAST)]}",
                "email": email_of(i),
                "plan": PLANS[i % len(PLANS)],
                "city": CITIES[i % len(CITIES)],
                "age": 18 + i % 60,
            }
            times = {"traits": dict.fromkeys(traits, stamp)}
            yield (
                i + 1,  # the customer's number: identities point at it
                cid,
                ws_id,
                None,
                1,
                orjson.dumps(traits).decode(),
                orjson.dumps(times).decode(),
                empty,
                empty,
                empty,
                None,
                None,
                created,
                created + i % 3_600_000,
                created,
                created,
            )

    def identity_rows(kind: str) -> Any:
        for i in range(len(ids)):
            value = email_of(i) if kind == "email" else f"user-{i:08d}"
            yield (ws_id, kind, value, i + 1, now)

    def insert(table: str, columns: tuple[str, ...], rows: Any) -> None:
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        conn.execute("BEGIN")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")

    insert("customers", CUSTOMER_COLUMNS, customer_rows())
    insert("identities", IDENTITY_COLUMNS, identity_rows("email"))
    insert("identities", IDENTITY_COLUMNS, identity_rows("user_id"))
    if analyze:
        conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {
        "customers": conn.execute("SELECT count(*) FROM customers").fetchone()[0],
        "identities": conn.execute("SELECT count(*) FROM identities").fetchone()[0],
    }
    conn.close()
    return {**counts, "seconds": time.perf_counter() - started, "db_mib": db_path.stat().st_size / 1048576}


class Driver:
    def __init__(self, requests: list[bytes], expected: list[str]):
        self.requests = requests
        self.expected = expected
        self.next_index = 0
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.checked = 0
        self.deadline: float | None = None  # perf_counter time after which no new request starts

    async def worker(self, client: HttpClient, record: bool) -> None:
        while self.next_index < len(self.requests):
            if self.deadline is not None and time.perf_counter() > self.deadline:
                return
            i = self.next_index
            self.next_index += 1
            started = time.perf_counter()
            resp = await client.request(self.requests[i])
            elapsed = time.perf_counter() - started
            if record:
                self.latencies.append(elapsed)
            if resp.status != 200:
                self.failures.append(f"request {i}: HTTP {resp.status} {resp.body[:300]!r}")
            elif i % CHECK_EVERY == 0:
                self.checked += 1
                got = orjson.loads(resp.body).get("id")
                if got != self.expected[i]:
                    self.failures.append(f"request {i}: customer {got}, expected {self.expected[i]}")


def build_requests(sample: list[int], secret_key: str) -> list[bytes]:
    return [
        (
            f"GET /v1/customers?identity=email:{quote(email_of(i), safe='')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {secret_key}\r\n\r\n"
        ).encode()
        for i in sample
    ]


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="mayak-bench-lookup-", dir=args.tmpdir) as tmp_name:
        tmp = Path(tmp_name)
        db_path = tmp / "mayak.db"
        url = f"sqlite:///{db_path}"
        keys = create_workspace(url, "bench")
        ids = customer_ids(args.customers)
        loaded = populate(db_path, keys["id"], ids, analyze=args.analyze)
        print(
            f"populated {loaded['customers']:,} customers and {loaded['identities']:,} identities in "
            f"{loaded['seconds']:.1f} s ({loaded['db_mib']:.0f} MiB database)",
            flush=True,
        )

        warm_sample = [rng.randrange(args.customers) for _ in range(args.warmup)]
        sample = [rng.randrange(args.customers) for _ in range(args.requests)]
        warm = Driver(build_requests(warm_sample, keys["secret_key"]), [ids[i] for i in warm_sample])
        measured = Driver(build_requests(sample, keys["secret_key"]), [ids[i] for i in sample])

        server = Server(url, tmp / "server.log")
        server.start()
        try:
            await server.wait_ready()
            clients = [await HttpClient.connect("127.0.0.1", server.port) for _ in range(args.connections)]
            warm.deadline = time.perf_counter() + min(60.0, args.max_seconds)
            await asyncio.gather(*(warm.worker(c, record=False) for c in clients))
            cpu0, own0 = server.cpu_seconds() or 0.0, self_cpu_seconds()
            print(
                f"server pid {server.pid}; {warm.next_index:,} warm-up lookups done; "
                f"measuring {args.requests:,} over {args.connections} connections",
                flush=True,
            )
            started = time.perf_counter()
            measured.deadline = started + args.max_seconds
            await asyncio.gather(*(measured.worker(c, record=True) for c in clients))
            elapsed = time.perf_counter() - started
            server_cpu = (server.cpu_seconds() or 0.0) - cpu0
            own_cpu = self_cpu_seconds() - own0
            peak_rss, rss = server.peak_rss_mib(), server.rss_mib()
            for c in clients:
                await c.close()
        finally:
            server.stop()

    failures = warm.failures + measured.failures
    done = len(measured.latencies)
    stopped_early = done < args.requests
    lat = latency_summary_ms(measured.latencies)
    result = {
        "benchmark": "lookup",
        "machine": machine_info(),
        "backend": "sqlite",
        "customers": args.customers,
        "identities": loaded["identities"],
        "populate_seconds": loaded["seconds"],
        "db_mib": loaded["db_mib"],
        "analyzed": args.analyze,
        "requests": args.requests,
        "warmup": args.warmup,
        "connections": args.connections,
        "seconds": elapsed,
        "completed": done,
        "stopped_early": stopped_early,
        "requests_per_s": done / elapsed,
        "latency_ms": lat,
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": lat["p99"] <= TARGET_P99_MS and not failures,
        "failures": len(failures),
        "responses_checked": warm.checked + measured.checked,
        "server_peak_rss_mib": peak_rss,
        "server_rss_end_mib": rss,
        "server_cpu_s": server_cpu,
        "loadgen_cpu_s": own_cpu,
    }
    print(
        f"\n== lookup by email: {args.customers:,} customers, {args.requests:,} requests, "
        f"{args.connections} connections (closed loop){', after ANALYZE' if args.analyze else ''}"
    )
    print(f"  throughput     {result['requests_per_s']:,.0f} requests/s ({done:,} in {elapsed:.2f} s)")
    if stopped_early:
        print(
            f"  STOPPED EARLY  --max-seconds {args.max_seconds:g} reached after {done:,} of {args.requests:,}"
        )
    print(
        f"  latency ms     p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
        f"p99.9 {lat['p99_9']:.2f}  max {lat['max']:.2f}  (mean {lat['mean']:.2f})"
    )
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(f"  target         p99 <= {TARGET_P99_MS} ms: {verdict}")
    print(
        f"  server         peak RSS {peak_rss:.0f} MiB (end {rss:.0f} MiB), CPU {server_cpu:.1f} s; "
        f"load generator CPU {own_cpu:.1f} s"
    )
    print(
        f"  checks         {len(failures)} failures, {result['responses_checked']} response bodies verified"
    )
    if failures:
        print(f"  first failure  {failures[0]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers to load (M)")
    parser.add_argument("--requests", type=int, default=20_000, help="measured lookups (K)")
    parser.add_argument("--warmup", type=int, default=1_000, help="unmeasured lookups first")
    parser.add_argument("--connections", type=int, default=4, help="concurrent keep-alive connections")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900,
        help="stop starting new measured lookups after this long and report what was done",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="run ANALYZE after loading (the server itself never does; off by default)",
    )
    parser.add_argument("--json-out", default=str(OUT_DIR / "lookup.json"), help="'' to skip")
    parser.add_argument(
        "--tmpdir", default=None, help="where the temporary database goes (default: the system's temp folder)"
    )
    args = parser.parse_args()
    result = run_async(amain(args))
    write_json(args.json_out, result)
    if result["failures"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
