"""The flow language: every problem in a bot folder is reported as file:line: reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mayak.bots.loader import load_folder, load_texts, schema
from mayak.bots.testing import run_tests
from mayak.cli import app

DEMO = Path(__file__).parent.parent / "src" / "mayak" / "bots" / "examples" / "demo_motors"

MINIMAL = """\
bot:
  name: tiny
flows:
  hello:
    trigger: {commands: [/start]}
    steps:
      - say: Hello
"""


def issues(files: dict[str, str]) -> list[str]:
    return [str(i) for i in load_texts(files).issues]


def test_demo_bot_is_valid() -> None:
    loaded = load_folder(DEMO)
    assert loaded.ok, [str(i) for i in loaded.issues]
    assert loaded.name == "demo_motors"
    assert len(loaded.tests) >= 10


def test_demo_bot_conversation_tests_pass() -> None:
    results = run_tests(load_folder(DEMO))
    failed = [(r.name, r.failures) for r in results if not r.passed]
    assert not failed


def test_schema_is_published_json_schema() -> None:
    assert schema()["$schema"].startswith("https://json-schema.org/")


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - sayy: hi\n"},
            "bot.yaml:5: unknown field",
        ),
        ({"bot.yaml": "bot:\n  name: x\n  colour: red\nflows: {}\n"}, "bot.yaml:3: unknown field"),
        ({"bot.yaml": "bot: {name: Bad Name}\n"}, "bot.yaml:1:"),
        ({"bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps: [{say: hi, end: true}]\n"}, "exactly one of"),
        (
            {"bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - goto: nowhere\n"},
            "bot.yaml:5: no step with id `nowhere`",
        ),
        (
            {
                "bot.yaml": "bot: {name: x}\nflows:\n  a:\n    trigger: {intents: [buy]}\n    steps: [{say: hi}]\n"  # noqa: E501
            },
            "intent `buy` is not defined",
        ),
        (
            {"bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - say: '@nope'\n"},
            "text `nope` is not defined",
        ),
        (
            {"bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - say: 'Hi {{ name'\n"},
            "bot.yaml:5: template error",
        ),
        (
            {
                "bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - branch: [{if: 'slots.a ==', goto: b}]\n"  # noqa: E501
            },
            "bot.yaml:5: condition",
        ),
        (
            {
                "bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - ask: {slot: s, text: q, type: regex, pattern: '(('}\n"  # noqa: E501
            },
            "does not compile",
        ),
        (
            {"bot.yaml": "bot: {name: x}\nflows:\n  a:\n    steps:\n      - call: {integration: crm}\n"},
            "integration `crm`",
        ),
        ({"bot.yaml": "bot: {name: x\n"}, "bot.yaml:2: not valid YAML"),
        (
            {"a.yaml": MINIMAL, "b.yaml": "flows:\n  hello:\n    steps: [{say: x}]\n"},
            "b.yaml:2: flow `hello` is already",
        ),
        ({"flows.yaml": "flows:\n  a:\n    steps: [{say: x}]\n"}, "no `bot` section"),
        (
            {"bot.yaml": "bot: {name: x, start_flow: nope}\nflows:\n  a:\n    steps: [{say: x}]\n"},
            "flow `nope`",
        ),
    ],
)
def test_invalid_bots_say_where_and_why(files: dict[str, str], expected: str) -> None:
    found = issues(files)
    assert found, "expected the bot to be refused"
    assert any(expected in line for line in found), found


def test_minimal_bot_is_valid() -> None:
    assert issues({"bot.yaml": MINIMAL}) == []


def test_cli_validate_and_test(tmp_path: Any) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["bot", "validate", str(DEMO)])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bot.yaml").write_text("bot: {name: x}\nflows:\n  a:\n    steps:\n      - goto: nowhere\n")
    refused = runner.invoke(app, ["bot", "validate", str(bad)])
    assert refused.exit_code == 1
    assert "bot.yaml:5: no step with id `nowhere`" in refused.output
    tested = runner.invoke(app, ["bot", "test", str(DEMO)])
    assert tested.exit_code == 0, tested.output


def test_cli_test_reports_a_failing_conversation(tmp_path: Any) -> None:
    folder = tmp_path / "bot"
    folder.mkdir()
    (folder / "bot.yaml").write_text(MINIMAL)
    (folder / "tests.yaml").write_text(
        "tests:\n  - name: wrong\n    steps:\n      - user: /start\n      - bot: Goodbye\n"
    )
    result = CliRunner().invoke(app, ["bot", "test", str(folder)])
    assert result.exit_code == 1
    assert "expected 'Goodbye', the bot said 'Hello'" in result.output
