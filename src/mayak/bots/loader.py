"""Read a bot folder (YAML files), validate it, and report every problem as ``file:line: reason``.

Validation has two layers: the published JSON Schema (``bot.schema.json``) checks each file's shape;
then the cross-file rules check what a schema cannot: names defined twice, a ``goto`` to a step that
does not exist, a text or intent or integration that is referenced but not defined, conditions that
do not parse, templates with syntax errors, regular expressions that do not compile.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from mayak.bots.templates import TemplateError, check_template

SECTIONS = ("bot", "intents", "texts", "integrations", "flows")
ACTIONS = ("say", "ask", "form", "call", "branch", "set", "track", "handoff", "wait", "goto", "end")
MAX_FILES = 200
MAX_FILE_BYTES = 1_000_000
CONDITION_ROOTS = frozenset(
    {"slots", "traits", "consents", "context", "stage", "event", "profile", "preferences", "intent", "now"}
)
CONDITION_FUNCTIONS = frozenset({"count_events", "last_event"})

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class BotIssue:
    file: str
    line: int
    message: str
    path: str = "$"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} (at {self.path})"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "message": self.message, "path": self.path}


@dataclass(slots=True)
class LoadedBot:
    """A bot as read from files: the definition (what gets published) and its conversation tests."""

    definition: dict[str, Any]
    tests: list[dict[str, Any]] = field(default_factory=list)
    issues: list[BotIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def name(self) -> str:
        return str(self.definition.get("bot", {}).get("name", ""))


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    text = resources.files("mayak.bots").joinpath("bot.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


def load_folder(path: str | Path) -> LoadedBot:
    """Read every ``*.yaml``/``*.yml`` under ``path`` (a folder, or one file)."""
    root = Path(path)
    if root.is_file():
        files = {root.name: root.read_text("utf-8")}
    elif root.is_dir():
        found = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if len(found) > MAX_FILES:
            return LoadedBot({}, issues=[BotIssue(str(root), 0, f"more than {MAX_FILES} YAML files")])
        files = {}
        for p in found:
            if p.stat().st_size > MAX_FILE_BYTES:
                return LoadedBot({}, issues=[BotIssue(str(p), 0, "file larger than 1 MB")])
            files[str(p.relative_to(root))] = p.read_text("utf-8")
    else:
        return LoadedBot({}, issues=[BotIssue(str(root), 0, "no such file or folder")])
    return load_texts(files)


def load_texts(files: dict[str, str]) -> LoadedBot:
    """Validate a bot given as ``{file name: YAML text}`` (what the CLI reads and the API receives)."""
    issues: list[BotIssue] = []
    definition: dict[str, Any] = {}
    tests: list[dict[str, Any]] = []
    where: dict[tuple[str, str], tuple[str, dict[Path_, int]]] = {}  # (section, name) -> (file, lines)
    if not files:
        return LoadedBot({}, issues=[BotIssue("-", 0, "the bot has no YAML files")])
    for fname, text in sorted(files.items()):
        try:
            data, lines = _parse_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            issues.append(BotIssue(fname, line, f"not valid YAML: {getattr(exc, 'problem', exc)}"))
            continue
        if data is None:
            continue
        file_issues = [
            BotIssue(fname, _line_of(lines, _err_path(err)), _schema_message(err), _jpath(err))
            for err in sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        ]
        if file_issues:
            issues.extend(file_issues)
            continue
        for section in SECTIONS:
            if section not in data:
                continue
            if section == "bot":
                if "bot" in definition:
                    issues.append(BotIssue(fname, lines.get(("bot",), 1), "a second `bot` section", "$.bot"))
                    continue
                definition["bot"] = data["bot"]
                where[("bot", "")] = (fname, lines)
                continue
            for name, body in data[section].items():
                target = definition.setdefault(section, {})
                if name in target:
                    first = where[(section, name)][0]
                    issues.append(
                        BotIssue(
                            fname,
                            lines.get((section, name), 1),
                            f"{section[:-1]} `{name}` is already defined in {first}",
                            f"$.{section}.{name}",
                        )
                    )
                    continue
                target[name] = body
                where[(section, name)] = (fname, lines)
        for i, test in enumerate(data.get("tests") or []):
            tests.append(test | {"_file": fname, "_line": lines.get(("tests", i), 1)})
    if not issues:
        issues.extend(_check(definition, where))
    for section in SECTIONS[1:]:
        definition.setdefault(section, {})
    return LoadedBot(definition, tests, issues)


# -- YAML with line numbers ---------------------------------------------------------------------


def _parse_yaml(text: str) -> tuple[Any, dict[Path_, int]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        data = loader.construct_document(node)
    finally:
        loader.dispose()
    lines: dict[Path_, int] = {}
    _walk(node, (), lines, loader)
    return data, lines


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int], loader: yaml.SafeLoader) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _walk(value_node, (*path, key), lines, loader)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines, loader)


def _line_of(lines: dict[Path_, int], path: Path_) -> int:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get((), 1)


def _unknown_fields(err: Any) -> list[str]:
    if err.validator != "additionalProperties" or not isinstance(err.instance, dict):
        return []
    known = set(err.schema.get("properties", {}))
    return sorted(str(k) for k in err.instance if k not in known)


def _err_path(err: Any) -> Path_:
    """Where the problem is; for an unknown field, the field itself (its own line)."""
    path: Path_ = tuple(err.absolute_path)
    extra = _unknown_fields(err)
    return (*path, extra[0]) if extra else path


def _jpath(err: Any) -> str:
    out = "$"
    for part in _err_path(err):
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _schema_message(err: Any) -> str:
    if err.validator == "additionalProperties":
        extra = _unknown_fields(err)
        if extra:
            return f"unknown field `{extra[0]}`"
    if err.validator in ("oneOf", "anyOf"):
        return f"{err.instance!r:.60} is not a valid value here"
    return str(err.message)


# -- cross-file rules ----------------------------------------------------------------------------


class _Checker:
    def __init__(
        self, definition: dict[str, Any], where: dict[tuple[str, str], tuple[str, dict[Path_, int]]]
    ):
        self.d = definition
        self.where = where
        self.issues: list[BotIssue] = []

    def issue(self, section: str, name: str, rel: Path_, message: str) -> None:
        fname, lines = self.where.get((section, name), ("-", {}))
        path: Path_ = (section, name, *rel) if section != "bot" else ("bot", *rel)
        jpath = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
        self.issues.append(BotIssue(fname, _line_of(lines, path), message, jpath))


def _check(d: dict[str, Any], where: dict[tuple[str, str], tuple[str, dict[Path_, int]]]) -> list[BotIssue]:
    c = _Checker(d, where)
    if "bot" not in d:
        return [BotIssue("-", 0, "no `bot` section (name, languages…) in any file")]
    flows: dict[str, Any] = d.get("flows", {})
    if not flows:
        c.issue("bot", "", (), "the bot has no flows")
    bot = d["bot"]
    for key in ("start_flow", "fallback_flow"):
        if key in bot and bot[key] not in flows:
            c.issue("bot", "", (key,), f"flow `{bot[key]}` is not defined")
    languages = bot.get("languages") or [bot.get("default_language", "en")]
    if bot.get("default_language") and bot["default_language"] not in languages:
        c.issue("bot", "", ("default_language",), "default_language is not in languages")
    for name, text in d.get("texts", {}).items():
        _check_localised(c, "texts", name, (), text)
    for name, flow in flows.items():
        _check_flow(c, name, flow)
    return c.issues


def _check_flow(c: _Checker, name: str, flow: dict[str, Any]) -> None:
    trigger = flow.get("trigger") or {}
    for i, intent in enumerate(trigger.get("intents", [])):
        if intent not in c.d.get("intents", {}):
            c.issue("flows", name, ("trigger", "intents", i), f"intent `{intent}` is not defined")
    for i, ev in enumerate(trigger.get("events", [])):
        if "condition" in ev:
            _check_condition(c, name, ("trigger", "events", i, "condition"), ev["condition"])
    ids: dict[str, int] = {}
    for i, step in enumerate(flow["steps"]):
        if "id" in step:
            if step["id"] in ids:
                c.issue("flows", name, ("steps", i, "id"), f"step id `{step['id']}` is used twice")
            ids[step["id"]] = i
    for i, step in enumerate(flow["steps"]):
        actions = [a for a in ACTIONS if a in step]
        if len(actions) != 1:
            what = "no action" if not actions else "several actions (" + ", ".join(actions) + ")"
            c.issue(
                "flows", name, ("steps", i), f"a step needs exactly one of {', '.join(ACTIONS)}; found {what}"
            )
            continue
        _check_step(c, name, ids, ("steps", i), actions[0], step[actions[0]])


def _check_step(c: _Checker, flow: str, ids: dict[str, int], at: Path_, action: str, body: Any) -> None:
    def target(value: str, rel: Path_) -> None:
        if value.startswith("flow:"):
            if value[5:] not in c.d.get("flows", {}):
                c.issue("flows", flow, (*at, action, *rel), f"flow `{value[5:]}` is not defined")
        elif value not in ids:
            c.issue("flows", flow, (*at, action, *rel), f"no step with id `{value}` in flow `{flow}`")

    if action == "say":
        text = body["text"] if isinstance(body, dict) and "text" in body else body
        _check_localised(c, "flows", flow, (*at, "say"), text)
        for j, b in enumerate(body.get("buttons", []) if isinstance(body, dict) else []):
            _check_localised(c, "flows", flow, (*at, "say", "buttons", j, "title"), b["title"])
    elif action in ("ask", "form"):
        fields = body["fields"] if action == "form" else [body]
        for j, ask in enumerate(fields):
            rel: Path_ = (*at, action, "fields", j) if action == "form" else (*at, action)
            _check_ask(c, flow, rel, ask)
            if "on_fail" in ask:
                target(ask["on_fail"], (("fields", j, "on_fail") if action == "form" else ("on_fail",)))
    elif action == "call":
        integration = c.d.get("integrations", {}).get(body["integration"])
        if integration is None:
            c.issue(
                "flows",
                flow,
                (*at, "call", "integration"),
                f"integration `{body['integration']}` is not defined",
            )
        elif "plugin" not in integration and "base_url" not in integration:
            c.issue("integrations", body["integration"], (), "an integration needs base_url or plugin")
        if "on_error" in body:
            target(body["on_error"], ("on_error",))
        for key in ("path",):
            if key in body:
                _check_template(c, "flows", flow, (*at, "call", key), body[key])
    elif action == "branch":
        for j, arm in enumerate(body):
            if "if" in arm:
                _check_condition(c, flow, (*at, "branch", j, "if"), arm["if"])
            elif not arm.get("else"):
                c.issue("flows", flow, (*at, "branch", j), "a branch arm needs `if` or `else: true`")
            target(arm["goto"], (j, "goto"))
    elif action == "goto":
        target(body, ())
    elif action == "wait" and "on_timeout" in body:
        target(body["on_timeout"], ("on_timeout",))
    elif action == "handoff" and "text" in body:
        _check_localised(c, "flows", flow, (*at, "handoff", "text"), body["text"])


def _check_ask(c: _Checker, flow: str, at: Path_, ask: dict[str, Any]) -> None:
    kind = ask.get("type", "choice" if "choices" in ask else "text")
    if kind == "choice" and not ask.get("choices"):
        c.issue("flows", flow, at, "an ask of type choice needs choices")
    if kind == "regex":
        if "pattern" not in ask:
            c.issue("flows", flow, at, "an ask of type regex needs a pattern")
        else:
            try:
                re.compile(ask["pattern"])
            except re.error as exc:
                c.issue("flows", flow, (*at, "pattern"), f"the pattern does not compile: {exc}")
    _check_localised(c, "flows", flow, (*at, "text"), ask["text"])
    if "retry" in ask:
        _check_localised(c, "flows", flow, (*at, "retry"), ask["retry"])
    if "skip_if" in ask:
        _check_condition(c, flow, (*at, "skip_if"), ask["skip_if"])


def _check_localised(c: _Checker, section: str, name: str, at: Path_, value: Any) -> None:
    if isinstance(value, str):
        if value.startswith("@") and " " not in value:
            if value[1:] not in c.d.get("texts", {}):
                c.issue(section, name, at, f"text `{value[1:]}` is not defined")
            return
        _check_template(c, section, name, at, value)
    elif isinstance(value, dict):
        for lang, text in value.items():
            _check_template(c, section, name, (*at, lang), text)


def _check_template(c: _Checker, section: str, name: str, at: Path_, text: str) -> None:
    try:
        check_template(text)
    except TemplateError as exc:
        c.issue(section, name, at, f"template error: {exc}")


def _check_condition(c: _Checker, flow: str, at: Path_, text: str) -> None:
    from mayak.conditions import ConditionError, parse

    try:
        parse(text, roots=CONDITION_ROOTS, functions=CONDITION_FUNCTIONS)
    except ConditionError as exc:
        c.issue("flows", flow, at, f"condition: {exc}")
