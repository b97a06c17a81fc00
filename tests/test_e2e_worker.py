"""API and pipeline as separate processes: ``mayak serve --no-workers`` accepts events with inline
processing off, a ``mayak worker`` process builds the profiles, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.test_e2e_durability import Proc, free_port, mayak_command

pytestmark = pytest.mark.slow


def test_worker_process_builds_profiles(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MAYAK_DATABASE_URL": f"sqlite:///{tmp_path}/split.db",
        "MAYAK_SECRET_KEY": "split-test",
        "MAYAK_PORT": str(port),
        "MAYAK_INLINE_PIPELINE": "0",
        "MAYAK_LOG_LEVEL": "warning",
    }
    created = subprocess.run(
        [*mayak_command(), "workspace", "create", "Split", "--json"], env=env, capture_output=True, check=True
    )
    ws = json.loads(created.stdout)
    url = f"http://127.0.0.1:{port}"
    api = Proc(env, tmp_path / "api.log", ("serve", "--no-workers"))
    worker = None
    try:
        api.wait_ready(url)
        batch = [{"type": "identify", "userId": f"u{i}", "traits": {"plan": "pro"}} for i in range(50)]
        r = httpx.post(f"{url}/v1/batch", json={"batch": batch}, auth=(ws["write_key"], ""))
        assert r.status_code == 200 and r.json()["accepted"] == 50
        admin = {"Authorization": f"Bearer {ws['secret_key']}"}
        time.sleep(0.5)  # no worker yet: nothing may be processed
        early = httpx.get(f"{url}/v1/customers", params={"identity": "user_id:u1"}, headers=admin)
        assert early.status_code == 404
        worker = subprocess.Popen([*mayak_command(), "worker"], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = httpx.get(f"{url}/v1/customers", params={"identity": "user_id:u49"}, headers=admin)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200 and r.json()["traits"] == {"plan": "pro"}
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        for proc in (worker, api.p):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)
