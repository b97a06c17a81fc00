"""Shared pieces of the benchmarks: ports, the server subprocess, /proc readings, a raw HTTP/1.1 client.

Nothing here imports the server's code at module level beyond the standard library, so the load
generator stays light: it writes pre-built request bytes on a few keep-alive connections and reads
``Content-Length`` (or chunked) responses, with no HTTP library in the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
BENCH_SECRET_KEY = "mayak-bench-master-key"  # MAYAK_SECRET_KEY for every benchmark server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mayak_command() -> list[str]:
    """The ``mayak`` console script of this interpreter's environment (or ``python -m mayak.cli``)."""
    script = Path(sys.executable).with_name("mayak")
    if script.exists():
        return [str(script)]
    found = shutil.which("mayak")
    return [found] if found else [sys.executable, "-m", "mayak.cli"]


def mayak_env(database_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "MAYAK_DATABASE_URL": database_url,
            "MAYAK_SECRET_KEY": BENCH_SECRET_KEY,
            "MAYAK_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def create_workspace(database_url: str, name: str = "bench") -> dict[str, str]:
    """``mayak workspace create NAME --json`` against ``database_url`` (runs the migrations too)."""
    proc = subprocess.run(
        [*mayak_command(), "workspace", "create", name, "--json"],
        env=mayak_env(database_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mayak workspace create failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    data: dict[str, str] = json.loads(proc.stdout)
    return data


# -- /proc ------------------------------------------------------------------------------------


def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM = peak RSS, VmRSS = current RSS), in KiB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def proc_cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU seconds the process (or one of its threads: ``thread`` is its id, the
    process id for the main thread) has used so far (/proc/PID/stat, /proc/PID/task/TID/stat)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path) as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- the server -------------------------------------------------------------------------------


class Server:
    """``mayak serve --port P`` as a child process, its output kept in a log file."""

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        split_worker: bool = False,
    ):
        self.split_worker = split_worker
        self.worker: subprocess.Popen[bytes] | None = None
        self.database_url = database_url
        self.port = port or free_port()
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        serve = [*mayak_command(), "serve", "--port", str(self.port)]
        env = mayak_env(self.database_url, **self.extra_env)
        if self.split_worker:  # API in one process, the profile pipeline in another
            serve.append("--no-workers")
            env["MAYAK_INLINE_PIPELINE"] = "0"
        self.proc = subprocess.Popen(serve, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        if self.split_worker:
            self.worker = subprocess.Popen(
                [*mayak_command(), "worker"], env=env, stdout=self._log, stderr=subprocess.STDOUT
            )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | str = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client = await HttpClient.connect("127.0.0.1", self.port)
                try:
                    resp = await client.request(b"GET /readyz HTTP/1.1\r\nHost: bench\r\n\r\n")
                finally:
                    await client.close()
                if resp.status == 200:
                    return
                last = f"/readyz answered {resp.status}"
            except OSError as exc:
                last = exc
            await asyncio.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def peak_rss_mib(self) -> float | None:
        kib = proc_status_kib(self.pid, "VmHWM")
        return None if kib is None else kib / 1024

    def rss_mib(self) -> float | None:
        kib = proc_status_kib(self.pid, "VmRSS")
        return None if kib is None else kib / 1024

    def main_thread_cpu_seconds(self) -> float | None:
        """CPU seconds of the server's main thread (the event loop: HTTP, the ingest writer, bot
        turns). Its busy share is what a CPU-bound run saturates first, and it varies less from
        run to run than latency percentiles do: the figure to compare two versions by."""
        return proc_cpu_seconds(self.pid, self.pid)

    def cpu_seconds(self) -> float | None:
        total = proc_cpu_seconds(self.pid)
        if self.worker is not None and total is not None:
            total += proc_cpu_seconds(self.worker.pid) or 0.0
        return total

    def stop(self, timeout: float = 20.0) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGINT)
            try:
                self.worker.wait(timeout)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"


# -- a raw HTTP/1.1 keep-alive client ---------------------------------------------------------


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class HttpClient:
    """One keep-alive connection; ``request`` writes ready-made bytes and reads one whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> HttpClient:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, *parts: bytes) -> HttpResponse:
        """Send ``parts`` (for example a pre-built head and body) and read the whole response."""
        self.writer.writelines(parts)
        await self.writer.drain()
        return await self.read_response()

    async def read_response(self) -> HttpResponse:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers expected
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = b""
        return HttpResponse(status, headers, body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def build_request(
    method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def scrape_metrics(client: HttpClient) -> dict[str, float]:
    """Unlabelled samples of /metrics (name -> value)."""
    resp = await client.request(build_request("GET", "/metrics"))
    if resp.status != 200:
        raise RuntimeError(f"/metrics answered {resp.status}: {resp.body[:200]!r}")
    values: dict[str, float] = {}
    for line in resp.body.decode().splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (it comes with ``uvicorn[standard]``)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- figures ----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def latency_summary_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(s * 1000 for s in seconds)
    return {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "p99_9": percentile(ordered, 99.9),
        "max": ordered[-1] if ordered else float("nan"),
        "mean": sum(ordered) / len(ordered) if ordered else float("nan"),
    }


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    print(f"wrote {target}")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info
