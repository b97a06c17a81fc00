"""Message templates: Jinja2 in its sandbox, compiled once per bot version.

The sandbox refuses attribute access to Python internals, so a bot author (or a value that ends up in
a template) cannot reach outside the data the engine passes in: ``profile``, ``traits``, ``slots``,
``context``, ``event``, ``events`` (the customer's recent events), ``stage``, ``consents``,
``preferences``. Missing values render as empty text rather than failing. A template that fails at
render time (a bad filter argument, say) does not stop the conversation: the caller sends a safe
fallback text and logs the error.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT = 8192
# ``{{secret:NAME}}`` is not Jinja: it passes through rendering untouched and is replaced by the
# integration's secret only when the request is sent (so no secret is ever stored in the outbox).
_SECRET = re.compile(r"\{\{secret:([A-Za-z0-9_.-]{1,100})\}\}")
_SECRET_MARK = re.compile("\x00([A-Za-z0-9_.-]{1,100})\x00")


class TemplateError(Exception):
    pass


class _Undefined(jinja2.ChainableUndefined):
    """Missing values are empty, and missing values of missing values too (``traits.car.model``)."""


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=_Undefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["money"] = _money
    return env


def _money(value: Any, currency: str = "") -> str:
    """``{{ 1234550 | money('RUB') }}`` → ``12 345.50 RUB`` (integer minor units in)."""
    if isinstance(value, jinja2.Undefined) or value is None:
        return ""
    try:
        minor = int(value)
    except (TypeError, ValueError):
        return str(value)
    major, cents = divmod(abs(minor), 100)
    sign = "-" if minor < 0 else ""
    text = f"{sign}{major:,}".replace(",", " ")
    text += f".{cents:02d}" if cents else ""
    return f"{text} {currency}".strip()


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def _protect(text: str) -> str:
    return _SECRET.sub(lambda m: f"\x00{m.group(1)}\x00", text) if "{{secret:" in text else text


def _restore(text: str) -> str:
    return _SECRET_MARK.sub(lambda m: "{{secret:" + m.group(1) + "}}", text) if "\x00" in text else text


def check_template(text: str) -> None:
    """Raise TemplateError when ``text`` does not compile."""
    text = _protect(text)
    if not is_template(text):
        return
    try:
        environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.message} (template line {exc.lineno})") from None


@lru_cache(maxsize=8192)
def compile_template(text: str) -> jinja2.Template:
    return environment().from_string(text)


def render(text: str, scope: dict[str, Any]) -> str:
    """Render ``text`` (plain text passes through); raises TemplateError on any failure."""
    text = _protect(text)
    if not is_template(text):
        return _restore(text)
    try:
        out = _restore(compile_template(text).render(scope))
    except jinja2.TemplateError as exc:
        raise TemplateError(str(exc)) from None
    except Exception as exc:  # a filter raising on odd data: never crash the turn
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    return out[:MAX_OUTPUT]


def render_value(value: Any, scope: dict[str, Any]) -> Any:
    """Render every string inside a JSON-like value (call bodies, track properties, set values).

    A string that is exactly one ``{{ expression }}`` keeps the expression's type (a number stays a
    number), so ``{"mileage": "{{ slots.mileage }}"}`` sends a number when the slot is one.
    """
    if isinstance(value, str):
        stripped = _protect(value.strip())
        if stripped.startswith("{{") and stripped.endswith("}}") and stripped.count("{{") == 1:
            try:
                expr = environment().compile_expression(stripped[2:-2].strip(), undefined_to_none=True)
                result = expr(**scope)
            except Exception as exc:
                raise TemplateError(f"{type(exc).__name__}: {exc}") from None
            return None if isinstance(result, jinja2.Undefined) else result
        return render(value, scope)
    if isinstance(value, dict):
        return {k: render_value(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, scope) for v in value]
    return value
