"""Web chat under load: N concurrent WebSocket conversations at a fixed total message rate.

The server is ``mayak serve`` in its own process on a fresh SQLite file (or an already running
server given with ``--url`` plus its keys); this process is the load generator. It creates a web-chat
channel (and, once ``mayak.bots`` exists, publishes a benchmark bot on it: ``publish_benchmark_bot``),
opens ``--conversations`` sockets (default 1,000), each a new visitor saying ``hello``, then offers
``--rate`` messages per second in total for ``--duration`` seconds.

Open loop: every message's send time is fixed before the clock starts (message i at t0 + i/rate, to
conversation i mod N), and its latency runs from that *scheduled* time, so a server that falls behind
shows up as latency instead of silently lowering the offered rate. A turn ends at the bot's reply
frame when a bot answers on the channel, else at the ``ack`` (the message is committed to the log);
the output says which. A message refused with ``rate_limited`` is resent after ``retry_after_ms``,
as the widget does, and its latency keeps running.

    python bench/webchat.py --rate 200 --duration 20                 # 1,000 conversations, ack only
    python bench/webchat.py --conversations 100 --rate 50 --duration 5
    python bench/webchat.py --url http://127.0.0.1:8000 --write-key wk_… --secret-key sk_…

Prints the figures as text, then one JSON line; also writes ``bench/out/webchat.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    OUT_DIR,
    HttpClient,
    Server,
    build_request,
    create_workspace,
    latency_summary_ms,
    machine_info,
    run_async,
    self_cpu_seconds,
    write_json,
)

BOT_DIR = Path(__file__).parent / "bots" / "showroom"
RATE_PER_S = 5.0  # the web chat's sustained per-connection limit (mayak.channels.webchat.RATE_PER_S)
SLOW_TURN_S = 0.025  # the p99 target for a turn
TEXTS = (
    "Hi, is the Aurora available for a test drive?",
    "What does a service cost?",
    "Can I change my booking to Friday?",
    "Do you take trade-ins?",
    "Thanks!",
)


# -- setup ------------------------------------------------------------------------------------


async def http_json(host: str, port: int, method: str, path: str, key: str, body: Any = None) -> Any:
    client = await HttpClient.connect(host, port)
    try:
        payload = orjson.dumps(body) if body is not None else b""
        headers = {"Authorization": f"Bearer {key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        resp = await client.request(build_request(method, path, headers, payload))
    finally:
        await client.close()
    if resp.status >= 300:
        raise RuntimeError(f"{method} {path} answered {resp.status}: {resp.body[:300]!r}")
    return orjson.loads(resp.body) if resp.body else None


async def create_channel(host: str, port: int, secret_key: str) -> str:
    channel = await http_json(
        host,
        port,
        "POST",
        "/v1/channels",
        secret_key,
        {"type": "webchat", "name": "bench chat", "config": {"title": "Bench", "allowed_origins": ["*"]}},
    )
    return str(channel["id"])


async def publish_benchmark_bot(host: str, port: int, secret_key: str, channel_id: str) -> str | None:
    """Publish a bot that answers every inbound message with exactly one message, and attach it to
    ``channel_id``; returns its id, or None when this Mayak has no bots yet (turns end at the ack).

    HOOK for the bot engine: when ``mayak.bots`` exists, create the bot through the admin API
    (``POST /v1/bots`` with a one-step flow that replies to any text, publish a version), then
    ``PATCH /v1/channels/{channel_id} {"bot_id": …}`` and return the bot id. The reply must be one
    message (no split, no second message), since replies are matched to messages in order per
    conversation.
    """
    if importlib.util.find_spec("mayak.bots") is None:
        return None
    files = {p.name: p.read_text("utf-8") for p in BOT_DIR.glob("*.yaml")}
    bot = await http_json(host, port, "POST", "/v1/bots", secret_key, {"files": files})
    await http_json(host, port, "PATCH", f"/v1/channels/{channel_id}", secret_key, {"bot_id": bot["id"]})
    return str(bot["id"])


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Conversation:
    index: int
    sock: ClientConnection
    visitor: str
    scheduled: dict[str, float] = field(default_factory=dict)  # client id -> scheduled send time
    frames: dict[str, bytes] = field(default_factory=dict)  # client id -> frame (for resends)
    ack_scheduled: dict[str, float] = field(default_factory=dict)  # client id -> scheduled, until acked
    awaiting_reply: list[str] = field(default_factory=list)  # client ids in send order


@dataclass
class Results:
    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    replies: int = 0
    rate_limited: int = 0
    errors: list[str] = field(default_factory=list)
    ack_latency: list[float] = field(default_factory=list)
    turn_latency: list[float] = field(default_factory=list)
    turn_at: list[float] = field(default_factory=list)  # when each turn_latency was taken
    first_ack: float = 0.0
    last_ack: float = 0.0
    last_reply: float = 0.0
    closed: int = 0


async def open_conversation(url: str, write_key: str, index: int) -> Conversation:
    sock = await connect(url, max_size=None, open_timeout=60, compression=None)
    visitor = str(uuid.uuid4())
    await sock.send(orjson.dumps({"type": "hello", "visitor_id": visitor, "write_key": write_key}).decode())
    welcome = orjson.loads(await sock.recv())
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"conversation {index}: expected welcome, got {welcome}")
    return Conversation(index, sock, visitor)


async def reader(conv: Conversation, res: Results, with_bot: bool, done: asyncio.Event) -> None:
    clock = time.perf_counter
    try:
        async for raw in conv.sock:
            now = clock()
            frame = orjson.loads(raw)
            kind = frame.get("type")
            if kind == "ack":
                cid = frame["client_id"]
                sched = conv.ack_scheduled.pop(cid, None)
                if sched is None:
                    continue
                res.acked += 1
                res.duplicates += bool(frame.get("duplicate"))
                res.ack_latency.append(now - sched)
                res.first_ack = res.first_ack or now
                res.last_ack = now
                conv.frames.pop(cid, None)
                if not with_bot:
                    conv.scheduled.pop(cid, None)
            elif kind == "message" and with_bot:
                if conv.awaiting_reply:
                    cid = conv.awaiting_reply.pop(0)
                    res.turn_latency.append(now - conv.scheduled.pop(cid))
                    res.turn_at.append(now)
                    res.replies += 1
                    res.last_reply = now
            elif kind == "error":
                cid = frame.get("client_id")
                if frame.get("code") == "rate_limited" and cid in conv.frames:
                    res.rate_limited += 1
                    delay = frame.get("retry_after_ms", 1000) / 1000
                    asyncio.get_running_loop().call_later(delay, _resend, conv, cid)
                else:
                    res.errors.append(str(frame)[:300])
    except ConnectionClosed:
        if not done.is_set():
            res.closed += 1


_RESENDS: set[asyncio.Task[None]] = set()


def _resend(conv: Conversation, cid: str) -> None:
    frame = conv.frames.get(cid)
    if frame is not None:
        task = asyncio.create_task(conv.sock.send(frame.decode()))
        _RESENDS.add(task)
        task.add_done_callback(_RESENDS.discard)


async def run_load(
    url: str,
    write_key: str,
    args: argparse.Namespace,
    with_bot: bool,
    on_connected: Callable[[], None] | None = None,
) -> tuple[Results, dict[str, float]]:
    """Open the conversations, then offer the load; ``on_connected`` is called in between."""
    n = args.conversations
    started = time.perf_counter()
    convs: list[Conversation] = []
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def opener(i: int) -> None:
        async with gate:
            convs.append(await open_conversation(url, write_key, i))

    await asyncio.gather(*(opener(i) for i in range(n)))
    convs.sort(key=lambda c: c.index)
    connect_s = time.perf_counter() - started
    print(f"opened {n:,} conversations in {connect_s:.2f} s", flush=True)
    if on_connected is not None:
        on_connected()

    res = Results()
    done = asyncio.Event()
    readers = [asyncio.create_task(reader(c, res, with_bot, done)) for c in convs]
    total = int(args.rate * args.duration)
    frames = []
    for i in range(total):
        conv = convs[i % n]
        cid = f"b{i}"
        frames.append(
            (
                conv,
                cid,
                orjson.dumps({"type": "message", "text": TEXTS[i % len(TEXTS)], "client_id": cid}),
            )
        )
    t0 = time.perf_counter() + 0.5
    interval = 1.0 / args.rate
    lag_max = 0.0
    for i, (conv, cid, frame) in enumerate(frames):
        at = t0 + i * interval
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag_max = max(lag_max, -delay)
        conv.scheduled[cid] = at
        conv.ack_scheduled[cid] = at
        conv.frames[cid] = frame
        if with_bot:
            conv.awaiting_reply.append(cid)
        await conv.sock.send(frame.decode())
        res.sent += 1
    send_end = time.perf_counter()
    deadline = send_end + args.settle
    while time.perf_counter() < deadline:
        outstanding = sum(len(c.scheduled) for c in convs)
        if outstanding == 0:
            break
        await asyncio.sleep(0.05)
    done.set()
    for c in convs:
        await c.sock.close()
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    timing = {
        "connect_s": connect_s,
        "t0": t0,
        "send_s": send_end - t0,
        "scheduler_max_lag_ms": lag_max * 1000,
        "unanswered": float(sum(len(c.scheduled) for c in convs)),
    }
    return res, timing


# -- main -------------------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        print(f"warning: open-file limit {want} may be too low for {needed} sockets", flush=True)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit(args.conversations * 2 + 256)
    server: Server | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if args.url:
            parts = urlsplit(args.url)
            host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
            if not (args.write_key and args.secret_key):
                raise SystemExit("--url needs --write-key and --secret-key of a workspace on that server")
            keys = {"write_key": args.write_key, "secret_key": args.secret_key}
            ws_scheme = "wss" if parts.scheme == "https" else "ws"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="mayak-bench-webchat-", dir=args.tmpdir)
            db_path = Path(tmp.name) / "mayak.db"
            database_url = f"sqlite:///{db_path}"
            keys = create_workspace(database_url, "bench")
            server = Server(database_url, Path(tmp.name) / "server.log")
            server.start()
            await server.wait_ready()
            host, port, ws_scheme = "127.0.0.1", server.port, "ws"
        channel_id = await create_channel(host, port, keys["secret_key"])
        bot_id = await publish_benchmark_bot(host, port, keys["secret_key"], channel_id)
        with_bot = bot_id is not None
        measure = "bot reply frame" if with_bot else "ack (no bot configured: message committed to the log)"
        print(
            f"server {host}:{port}"
            + (f" (pid {server.pid}, SQLite)" if server else "")
            + f"; channel {channel_id}; "
            f"{args.conversations:,} conversations, {args.rate:g} msgs/s offered for {args.duration:g} s; "
            f"turn latency measured to the {measure}",
            flush=True,
        )
        if args.rate / args.conversations > RATE_PER_S:
            print(
                f"note: more than {RATE_PER_S:g} msgs/s per conversation exceeds the per-connection limit; "
                "expect rate_limited resends",
                flush=True,
            )
        url = f"{ws_scheme}://{host}:{port}/v1/webchat/{channel_id}/ws"
        cpu0 = server.cpu_seconds() if server else None
        own0 = self_cpu_seconds()
        main0: list[float] = []  # the main thread's CPU once the conversations are open

        def connected() -> None:
            if server is not None:
                main0.append(server.main_thread_cpu_seconds() or 0.0)

        res, timing = await run_load(url, keys["write_key"], args, with_bot, connected)
        server_cpu = (server.cpu_seconds() or 0.0) - (cpu0 or 0.0) if server else None
        main_cpu = (server.main_thread_cpu_seconds() or 0.0) - main0[0] if server and main0 else None
        own_cpu = self_cpu_seconds() - own0
        peak_rss = server.peak_rss_mib() if server else None
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()

    window = (res.last_reply if with_bot else res.last_ack) - timing["t0"]
    answered = res.replies if with_bot else res.acked
    turn = res.turn_latency if with_bot else res.ack_latency
    result: dict[str, Any] = {
        "benchmark": "webchat",
        "machine": machine_info(),
        "backend": "sqlite" if server else "external",
        "conversations": args.conversations,
        "offered_msgs_per_s": args.rate,
        "duration_s": args.duration,
        "turn_measured_to": "bot_reply" if with_bot else "ack",
        "bot_id": bot_id,
        "sent": res.sent,
        "acked": res.acked,
        "duplicates": res.duplicates,
        "replies": res.replies,
        "rate_limited_resends": res.rate_limited,
        "unanswered": int(timing["unanswered"]),
        "errors": len(res.errors),
        "closed_early": res.closed,
        "sustained_inbound_msgs_per_s": res.acked / window if window > 0 else 0.0,
        "sustained_turns_per_s": answered / window if window > 0 else 0.0,
        "turn_latency_ms": latency_summary_ms(turn),
        "ack_latency_ms": latency_summary_ms(res.ack_latency),
        "connect_s": timing["connect_s"],
        "scheduler_max_lag_ms": timing["scheduler_max_lag_ms"],
        "server_cpu_s": server_cpu,
        "server_main_thread_cpu_s": main_cpu,
        # the main thread's CPU per message taken, from the last conversation opened to the end
        "server_main_thread_us_per_msg": main_cpu / res.acked * 1e6 if main_cpu and res.acked else None,
        "server_peak_rss_mib": peak_rss,
        "loadgen_cpu_s": own_cpu,
    }
    if with_bot and res.turn_at:
        # the slowest turn answered in each second of the run: shows stalls (checkpoints, GC…)
        worst: dict[int, float] = {}
        slow: dict[int, int] = {}  # turns over the 25 ms target, per second: where the p99 comes from
        for at, latency in zip(res.turn_at, res.turn_latency, strict=True):
            second = int(at - timing["t0"])
            worst[second] = max(worst.get(second, 0.0), latency * 1000)
            slow[second] = slow.get(second, 0) + (latency > SLOW_TURN_S)
        result["turn_max_ms_by_second"] = [round(worst.get(i, 0.0), 1) for i in range(max(worst) + 1)]
        result["turns_over_25ms_by_second"] = [slow.get(i, 0) for i in range(max(worst) + 1)]
    lat = result["turn_latency_ms"]
    print(f"\n== web chat: {args.conversations:,} conversations, turn = {result['turn_measured_to']}")
    print(f"  offered                 {args.rate:>10,.1f} msgs/s for {args.duration:g} s ({res.sent:,} sent)")
    print(
        f"  sustained inbound       {result['sustained_inbound_msgs_per_s']:>10,.1f} msgs/s "
        f"(acked {res.acked:,})"
    )
    if with_bot:
        print(
            f"  sustained turns         {result['sustained_turns_per_s']:>10,.1f} replies/s ({res.replies:,})"
        )
    print(
        f"  turn latency ms         p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  "
        f"max {lat['max']:.1f}"
    )
    print(
        f"  rate-limited resends {res.rate_limited:,}, unanswered {result['unanswered']:,}, "
        f"errors {len(res.errors):,}, closed early {res.closed:,}; connect {timing['connect_s']:.2f} s; "
        f"scheduler max lag {timing['scheduler_max_lag_ms']:.1f} ms"
    )
    if "turn_max_ms_by_second" in result:
        print(
            "  slowest turn per second (ms): " + " ".join(f"{v:.0f}" for v in result["turn_max_ms_by_second"])
        )
        print(
            "  turns over 25 ms per second: " + " ".join(str(v) for v in result["turns_over_25ms_by_second"])
        )
    if server_cpu is not None:
        print(
            f"  server CPU {server_cpu:.1f} s, peak RSS {peak_rss or 0:.0f} MiB; "
            f"load generator CPU {own_cpu:.1f} s"
        )
    if result["server_main_thread_us_per_msg"] is not None:
        print(
            f"  server main thread {main_cpu or 0:.1f} s, "
            f"{result['server_main_thread_us_per_msg']:.0f} µs a message taken"
        )
    if res.errors:
        print(f"  first error: {res.errors[0]}")
    print(json.dumps(result, separators=(",", ":")))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=1000, help="concurrent sockets (visitors)")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second offered in total")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of sending")
    parser.add_argument("--settle", type=float, default=30.0, help="max seconds to wait for the last answers")
    parser.add_argument("--connect-concurrency", type=int, default=100, help="sockets being opened at once")
    parser.add_argument("--url", default=None, help="an already running server (http://host:port)")
    parser.add_argument("--write-key", default=None, help="with --url: the workspace's write key")
    parser.add_argument("--secret-key", default=None, help="with --url: the workspace's secret key")
    parser.add_argument("--tmpdir", default=None, help="where the SQLite file goes (default: system temp)")
    parser.add_argument("--json-out", default=str(OUT_DIR / "webchat.json"), help="'' to skip")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.conversations <= 0:
        parser.error("--rate, --duration and --conversations must be positive")
    result = run_async(amain(args))
    write_json(args.json_out, result)
    if result["errors"] or result["unanswered"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
