"""The command line, run in-process against a temporary SQLite database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from typer.testing import CliRunner

from mayak.cli import app


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MAYAK_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("MAYAK_SECRET_KEY", "cli-test-key")
    monkeypatch.setenv("MAYAK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MAYAK_LOG_LEVEL", "warning")
    yield tmp_path
    structlog.reset_defaults()  # the CLI configured logging onto the runner's (now closed) stream


def run(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_workspace_and_keys(env: Path) -> None:
    ws = json.loads(run("workspace", "create", "Acme", "--region", "GB", "--json").stdout)
    assert set(ws) == {"id", "write_key", "secret_key"}
    assert ws["write_key"].startswith("wk_") and ws["secret_key"].startswith("sk_")
    key = json.loads(run("key", "create", "--workspace", ws["id"], "--kind", "secret", "--json").stdout)
    assert key["kind"] == "secret" and key["key"].startswith("sk_")
    run("key", "revoke", key["id"])
    result = CliRunner().invoke(app, ["key", "revoke", "key_doesnotexist"])
    assert result.exit_code == 2 and "not_found" in result.output
    result = CliRunner().invoke(app, ["key", "create", "--workspace", ws["id"], "--kind", "admin"])
    assert result.exit_code == 2 and "invalid_key_kind" in result.output


def test_import_events_then_replay(env: Path) -> None:
    ws = json.loads(run("workspace", "create", "Importer", "--json").stdout)
    lines = [
        json.dumps(
            {"type": "identify", "userId": "u1", "traits": {"email": "a@example.com"}, "messageId": "m1"}
        ),
        json.dumps({"type": "track", "userId": "u1", "event": "Car Purchased", "messageId": "m2"}),
        json.dumps({"type": "track", "userId": "u1", "event": "Car Purchased", "messageId": "m2"}),
        "{not json",
        json.dumps({"type": "track", "event": "No Identity"}),
        "",
    ]
    path = env / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = run("import", "events", str(path), "--workspace", ws["id"])
    assert "accepted 2, duplicates 1, rejected 2" in result.output
    assert "line 4: invalid JSON" in result.output and "line 5: missing_identity" in result.output
    result = run("replay", "--workspace", ws["id"])
    assert "replayed 2 events" in result.output


def test_demo_is_created_once_and_prints_working_keys(env: Path) -> None:
    first = json.loads(run("demo", "--customers", "20", "--json").stdout)
    second = json.loads(run("demo", "--customers", "20", "--json").stdout)
    assert first == second
    assert first["name"] == "Demo Motors"
    assert (env / "data" / "demo-workspace.json").stat().st_mode & 0o777 == 0o600


def test_db_upgrade(env: Path) -> None:
    result = run("db", "upgrade")
    assert "head" in result.output
