"""An event answered with 2xx survives ``kill -9``: a real ``mayak serve`` process takes a stream of
events, is SIGKILLed mid-stream, started again, and every acknowledged event is in the log and
processed into its customer's profile."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

USERS = 40


def mayak_command() -> list[str]:
    script = Path(sys.executable).with_name("mayak")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mayak.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """``mayak serve`` as a child process, its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path, args: tuple[str, ...] = ("serve",)):
        self.log = log
        self.fh = log.open("ab")
        self.p = subprocess.Popen(
            [*mayak_command(), *args], env=env, stdout=self.fh, stderr=subprocess.STDOUT
        )

    def wait_ready(self, url: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise AssertionError(f"mayak serve exited with {self.p.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"mayak serve did not become ready:\n{self.output()}")

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)
        self.fh.close()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        if not self.fh.closed:
            self.fh.close()

    def output(self) -> str:
        self.fh.flush()
        return self.log.read_text(errors="replace")[-4000:]


async def send_until_killed(url: str, write_key: str, target: int, proc: Proc) -> dict[str, str]:
    """Several concurrent senders post batches; once ``target`` events are acknowledged the server
    is SIGKILLed while requests are still in flight. Returns messageId -> userId of the acked ones."""
    acked: dict[str, str] = {}
    killed = asyncio.Event()
    counter = 0

    async def sender(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while not killed.is_set():
            batch = []
            for _ in range(10):
                counter += 1
                user = f"user-{counter % USERS}"
                mid = str(uuid.uuid4())
                if counter % 7 == 0:
                    batch.append(
                        {"type": "identify", "userId": user, "messageId": mid, "traits": {"n": counter}}
                    )
                else:
                    batch.append(
                        {
                            "type": "track",
                            "userId": user,
                            "messageId": mid,
                            "event": "Tick",
                            "properties": {"n": counter},
                        }
                    )
            try:
                r = await client.post("/v1/batch", json={"batch": batch}, auth=(write_key, ""))
            except httpx.HTTPError:
                return  # the server is gone; this batch was never acknowledged
            if r.status_code // 100 == 2:
                assert r.json()["accepted"] == len(batch), r.text
                acked.update((e["messageId"], e["userId"]) for e in batch)
                if len(acked) >= target and not killed.is_set():
                    proc.kill9()
                    killed.set()
            else:
                raise AssertionError(f"unexpected answer {r.status_code}: {r.text}")

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await asyncio.wait_for(asyncio.gather(*(sender(client) for _ in range(8))), 20)
    assert killed.is_set()
    return acked


def logged_message_ids(db_path: Path, ws_id: str) -> set[str]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT json_extract(payload, '$.messageId') FROM events"
            " WHERE workspace_id = ? AND source = 'api'",
            (ws_id,),
        ).fetchall()
    return {r[0] for r in rows}


def customer_message_ids(client: httpx.Client, headers: dict[str, str], customer_id: str) -> set[str]:
    found: set[str] = set()
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 200} | ({"cursor": cursor} if cursor else {})
        r = client.get(f"/v1/customers/{customer_id}/events", params=params, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        found.update(e["payload"]["messageId"] for e in body["items"] if e["source"] == "api")
        cursor = body.get("next_cursor")
        if not cursor:
            return found


def test_acknowledged_events_survive_kill_9(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db_path = tmp_path / "m.db"
    env = os.environ | {
        "MAYAK_DATABASE_URL": f"sqlite+aiosqlite:///{db_path}",
        "MAYAK_SECRET_KEY": "durability-test-master-key",
        "MAYAK_PORT": str(port),
        "MAYAK_HOST": "127.0.0.1",
        "MAYAK_DATA_DIR": str(tmp_path / "data"),
        "MAYAK_LOG_LEVEL": "warning",
    }
    created = subprocess.run(
        [*mayak_command(), "workspace", "create", "Durable", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    ws = json.loads(created.stdout)
    assert (
        ws["id"].startswith("ws_")
        and ws["write_key"].startswith("wk_")
        and ws["secret_key"].startswith("sk_")
    )

    first = Proc(env, tmp_path / "serve-1.log")
    try:
        first.wait_ready(url)
        acked = asyncio.run(send_until_killed(url, ws["write_key"], 1500, first))
    finally:
        first.stop()
    assert first.p.returncode == -signal.SIGKILL
    assert len(acked) >= 1500

    # the log, read straight from the file before anything restarts
    missing = set(acked) - logged_message_ids(db_path, ws["id"])
    assert not missing, f"{len(missing)} acknowledged events were lost, e.g. {sorted(missing)[:3]}"

    second = Proc(env, tmp_path / "serve-2.log")
    try:
        second.wait_ready(url)
        headers = {"Authorization": f"Bearer {ws['secret_key']}"}
        by_user: dict[str, set[str]] = defaultdict(set)
        for mid, user in acked.items():
            by_user[user].add(mid)
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 15
            pending = dict(by_user)
            while pending:
                for user in list(pending):
                    r = client.get("/v1/customers", params={"identity": f"user_id:{user}"}, headers=headers)
                    if r.status_code == 200 and pending[user] <= customer_message_ids(
                        client, headers, r.json()["id"]
                    ):
                        del pending[user]
                    else:
                        assert r.status_code in (200, 404), r.text
                if pending:
                    assert time.monotonic() < deadline, (
                        f"{len(pending)} customers not fully processed after restart:\n{second.output()}"
                    )
                    time.sleep(0.2)
            # a resend of an acknowledged event after the restart is still a duplicate
            mid, user = next(iter(acked.items()))
            r = client.post(
                "/v1/track",
                json={"userId": user, "event": "Tick", "messageId": mid},
                auth=(ws["write_key"], ""),
            )
            assert r.status_code == 200 and r.json()["duplicates"] == 1, r.text
            # and the server takes new events
            r = client.post(
                "/v1/track", json={"userId": "after-restart", "event": "E"}, auth=(ws["write_key"], "")
            )
            assert r.status_code == 200 and r.json()["accepted"] == 1
    finally:
        second.stop()
