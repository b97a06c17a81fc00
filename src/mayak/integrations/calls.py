"""Outbound integration calls: the executor behind bot ``call`` steps (outbox kind ``integration_call``).

Why the result is an event and the outbox row always succeeds: a bot waiting on a call must take
its error branch within seconds, not wait for an outbox retry hours later. So the handler makes the
call (with its own short retries), records the answer, whatever it is, as an ``integration.result``
event in the customer's log (dedup key ``call:<call_id>``), and reports the row delivered. Only when
that append itself fails does the outbox retry the row (the call may then be made again: at least once).

Payload contract (written by the bot engine)::

    {"call_id": str, "conversation_id": str | None, "name": str,
     "request": {"method": "GET|POST|PUT|PATCH|DELETE", "url": str, "headers": {str: str},
                 "json": any, "body": str, "timeout_s": 10, "retries": 1}}
    # or, for a plugin, instead of "request":
     "plugin": str, "action": str, "args": {...}, "timeout_s": 10, "retries": 1

``{{secret:NAME}}`` in the url, header names and values, body and JSON strings is replaced at send
time with the workspace's integration secret NAME; values of secrets used are redacted from the
recorded answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import structlog

from mayak import __version__ as _mayak_version
from mayak.delivery.http_client import OwnsHttpClient
from mayak.delivery.outbox import DeliveryOutcome, OutboxRow
from mayak.errors import StorageError
from mayak.eventlog import NewEvent
from mayak.ingest.writer import IngestWriter
from mayak.integrations.hooks import HookService
from mayak.integrations.plugins import PluginContext, PluginError, PluginRegistry
from mayak.integrations.secrets import IntegrationSecrets, MissingSecret, placeholders, substitute
from mayak.timeutil import now_ms

if TYPE_CHECKING:
    from mayak.platform import Mayak

log = structlog.get_logger("mayak.integrations")

KIND = "integration_call"
RESULT_TYPE = "integration.result"
SOURCE = "integration"
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 1
MAX_RETRIES = 5
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 2.0
MAX_BODY_BYTES = 64 * 1024
BUDGET_MARGIN_S = 2.0  # left of the outbox's attempt timeout for recording the result
MAX_MESSAGE_CHARS = 500
MAX_DEDUP_KEY_LEN = 300
REDACTED = "[redacted]"
MIN_REDACT_CHARS = 4  # shorter secret values are not searched for in answers (too many false hits)
_ABSENT: Any = object()


@dataclass(slots=True)
class CallResult:
    """The answer of one call, as recorded in the ``integration.result`` event."""

    ok: bool
    status: int | None = None
    body: Any = None
    truncated: bool = False
    error: str | None = None
    message: str | None = None
    attempts: int = 0
    retry: bool = False  # this attempt's failure is worth another attempt (not recorded)


@dataclass(slots=True)
class _HttpSpec:
    method: str
    url: str
    headers: dict[str, str]
    json: Any
    body: str | None
    timeout_s: float
    retries: int


@dataclass(slots=True)
class _PluginSpec:
    plugin: str
    action: str
    args: dict[str, Any]
    timeout_s: float
    retries: int


class _Invalid(Exception):
    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error
        self.message = message


@dataclass(slots=True)
class _Secrets:
    """Secret values used by one call, to redact from what is recorded."""

    values: set[str] = field(default_factory=set)

    def redact(self, text: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            if len(value) >= MIN_REDACT_CHARS and value in text:
                text = text.replace(value, REDACTED)
        return text


class CallExecutor(OwnsHttpClient):
    """Performs ``integration_call`` outbox rows and records each answer as an event."""

    def __init__(
        self,
        writer: IngestWriter,
        secrets: IntegrationSecrets,
        plugins: PluginRegistry,
        *,
        budget_s: float,
        client: httpx.AsyncClient | None = None,
    ):
        self.writer = writer
        self.secrets = secrets
        self.plugins = plugins
        self.budget_s = max(1.0, budget_s)
        self.backoff_base_s = BACKOFF_BASE_S
        self._client = client
        self._owns_client = client is None

    # -- the outbox handler --------------------------------------------------------------------

    async def handle(self, row: OutboxRow) -> DeliveryOutcome:
        """Make the call, append its ``integration.result`` event, report the row delivered."""
        payload = row.payload
        call_id = _text(payload.get("call_id")) or row.id
        started = time.monotonic()
        result = await self.perform(row)
        duration_ms = int((time.monotonic() - started) * 1000)
        now = now_ms()
        name = _text(payload.get("name"))
        record: dict[str, Any] = {
            "call_id": call_id,
            "conversation_id": _text(payload.get("conversation_id")),
            "name": name,
            "ok": result.ok,
            "status": result.status,
            "body": result.body,
            "truncated": result.truncated,
            "error": result.error,
            "message": result.message,
            "duration_ms": duration_ms,
            "attempts": result.attempts,
        }
        if isinstance(payload.get("plugin"), str):
            record["plugin"] = payload["plugin"]
            record["action"] = payload.get("action")
        event = NewEvent(
            workspace_id=row.workspace_id,
            type=RESULT_TYPE,
            name=name[:200] if name else None,
            timestamp=now,
            received_at=now,
            payload=record,
            source=SOURCE,
            dedup_key=_dedup_key(call_id),
            customer_id=row.customer_id,
        )
        log.info(
            "integration_call",
            call_id=call_id,
            name=name,
            ok=result.ok,
            status=result.status,
            error=result.error,
            attempts=result.attempts,
            ms=duration_ms,
        )
        try:
            await self.writer.submit([event])
        except Exception as exc:
            log.warning("integration_result_not_recorded", call_id=call_id, exc_info=True)
            return DeliveryOutcome(False, None, f"recording the result failed: {type(exc).__name__}: {exc}")
        return DeliveryOutcome(True, result.status)

    async def perform(self, row: OutboxRow) -> CallResult:
        """Validate the payload, fill in secrets, make the call with retries; never raises."""
        used = _Secrets()
        try:
            spec = _parse(row.payload)
            if isinstance(spec, _HttpSpec):
                result = await self._http(row, spec, used)
            else:
                result = await self._plugin(row, spec, used)
        except _Invalid as exc:
            result = CallResult(False, error=exc.error, message=exc.message)
        except MissingSecret as exc:
            result = CallResult(
                False, error=f"missing_secret:{exc.name}", message=f"no integration secret named {exc.name!r}"
            )
        except StorageError:
            raise  # the outbox retries the row later
        except Exception as exc:  # a bug must still give the bot its answer
            log.exception("integration_call_failed", row_id=row.id)
            result = CallResult(False, error="internal_error", message=_describe(exc))
        if result.message:
            result.message = used.redact(result.message)[:MAX_MESSAGE_CHARS]
        return result

    # -- HTTP ----------------------------------------------------------------------------------

    async def _http(self, row: OutboxRow, spec: _HttpSpec, used: _Secrets) -> CallResult:
        names = placeholders([spec.url, spec.headers, spec.body])
        if spec.json is not _ABSENT:
            placeholders(spec.json, names)
        values = await self.secrets.resolve(row.workspace_id, names)  # MissingSecret: nothing is sent
        used.values.update(values.values())
        url = substitute(spec.url, values)
        _check_url(url)
        headers = httpx.Headers({"user-agent": f"Mayak-Integrations/{_mayak_version}"})
        headers["x-mayak-call-id"] = _text(row.payload.get("call_id")) or row.id
        for name, value in substitute(spec.headers, values).items():
            if any(ch in name + value for ch in "\r\n\x00"):
                raise _Invalid("invalid_call", f"request.headers[{name!r}] contains a line break or NUL")
            headers[name] = value  # case-insensitive: the caller's user-agent replaces ours
        kwargs: dict[str, Any] = {}
        if spec.json is not _ABSENT:
            kwargs["json"] = substitute(spec.json, values)
        elif spec.body is not None:
            kwargs["content"] = substitute(spec.body, values).encode()

        async def attempt(timeout_s: float) -> CallResult:
            return await self._http_attempt(spec.method, url, headers, kwargs, timeout_s, used)

        return await self._with_retries(attempt, spec.timeout_s, spec.retries)

    async def _http_attempt(
        self,
        method: str,
        url: str,
        headers: httpx.Headers,
        kwargs: dict[str, Any],
        timeout_s: float,
        used: _Secrets,
    ) -> CallResult:
        try:
            async with asyncio.timeout(timeout_s):
                async with self.client.stream(
                    method, url, headers=headers, timeout=httpx.Timeout(timeout_s), **kwargs
                ) as resp:
                    data, truncated = await _read_capped(resp)
                    body = _decode(resp, data, truncated, used)
                    code = resp.status_code
        except (TimeoutError, httpx.TimeoutException):
            return CallResult(False, error="timeout", message=f"no answer within {timeout_s:g} s", retry=True)
        except httpx.TransportError as exc:
            return CallResult(False, error="connection_error", message=_describe(exc), retry=True)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # e.g. a header that is not ASCII
            return CallResult(False, error="request_error", message=_describe(exc))
        ok = 200 <= code < 300
        return CallResult(ok, code, body, truncated, error=None if ok else f"http_{code}", retry=code >= 500)

    # -- plugins -------------------------------------------------------------------------------

    async def _plugin(self, row: OutboxRow, spec: _PluginSpec, used: _Secrets) -> CallResult:
        try:
            plugin = self.plugins.get(spec.plugin)
        except PluginError as exc:
            return CallResult(False, error=f"plugin_error:{exc.code}", message=exc.message or None)

        async def secret(name: str) -> str:
            value = (await self.secrets.resolve(row.workspace_id, [name]))[name]
            used.values.add(value)
            return value

        context = PluginContext(
            workspace_id=row.workspace_id,
            customer_id=row.customer_id,
            conversation_id=_text(row.payload.get("conversation_id")),
            call_id=_text(row.payload.get("call_id")) or row.id,
            _secrets=secret,
        )

        async def attempt(timeout_s: float) -> CallResult:
            try:
                async with asyncio.timeout(timeout_s):
                    answer = await plugin.call(spec.action, dict(spec.args), context)
            except TimeoutError:
                return CallResult(
                    False, error="timeout", message=f"no answer within {timeout_s:g} s", retry=True
                )
            except PluginError as exc:
                code = str(exc.code)[:60] or "error"
                return CallResult(
                    False, error=f"plugin_error:{code}", message=exc.message or None, retry=exc.retryable
                )
            except MissingSecret:
                raise
            except Exception as exc:
                log.warning("plugin_call_failed", plugin=spec.plugin, action=spec.action, exc_info=True)
                return CallResult(False, error="plugin_error:unexpected", message=_describe(exc))
            return _plugin_answer(answer, used)

        return await self._with_retries(attempt, spec.timeout_s, spec.retries)

    # -- shared --------------------------------------------------------------------------------

    async def _with_retries(
        self, attempt: Callable[[float], Awaitable[CallResult]], timeout_s: float, retries: int
    ) -> CallResult:
        """Up to ``1 + retries`` attempts while the failure is retryable, with short backoff, all
        inside the call's budget (the outbox attempt timeout less a margin)."""
        deadline = time.monotonic() + self.budget_s
        result = CallResult(False, error="timeout", message="no time left for an attempt")
        for number in range(retries + 1):
            left = deadline - time.monotonic()
            if left <= 0.05:
                break
            result = await attempt(min(timeout_s, left))
            result.attempts = number + 1
            if not result.retry or number == retries:
                break
            delay = min(self.backoff_base_s * 2**number, BACKOFF_CAP_S)
            if deadline - time.monotonic() - delay <= 0.05:
                break
            await asyncio.sleep(delay)
        result.retry = False
        return result


# -- wiring ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Integrations:
    """The integration services of one ``Mayak``."""

    hooks: HookService
    secrets: IntegrationSecrets
    plugins: PluginRegistry
    calls: CallExecutor


def install(mayak: Mayak) -> Integrations:
    """Build the integration services and register the ``integration_call`` outbox handler."""
    secrets = IntegrationSecrets(mayak.db, mayak.workspaces)
    plugins = PluginRegistry()
    executor = CallExecutor(
        mayak.writer,
        secrets,
        plugins,
        budget_s=mayak.outbox.attempt_timeout_s - BUDGET_MARGIN_S,
    )
    mayak.outbox.register(KIND, executor.handle)
    return Integrations(
        hooks=HookService(mayak.db, mayak.workspaces, mayak.writer, mayak.settings),
        secrets=secrets,
        plugins=plugins,
        calls=executor,
    )


def integrations(mayak: Mayak) -> Integrations:
    """The integration services of ``mayak`` (built by the platform with ``install``)."""
    return mayak.integrations


async def close(mayak: Mayak) -> None:
    """Release what the integrations hold (the HTTP client); call on shutdown."""
    await mayak.integrations.calls.close()


# -- helpers -----------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _dedup_key(call_id: str) -> str:
    key = f"call:{call_id}"
    if len(key) > MAX_DEDUP_KEY_LEN:
        key = "call#" + hashlib.sha256(call_id.encode()).hexdigest()
    return key


def _number(raw: dict[str, Any], field_name: str, default: float, top: float, where: str) -> float:
    value = raw.get(field_name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _Invalid("invalid_call", f"{where}{field_name} must be a positive number of seconds")
    return min(float(value), top)


def _retries(raw: dict[str, Any], where: str) -> int:
    value = raw.get("retries")
    if value is None:
        return DEFAULT_RETRIES
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid("invalid_call", f"{where}retries must be a whole number ≥ 0")
    return min(value, MAX_RETRIES)


def _parse(payload: dict[str, Any]) -> _HttpSpec | _PluginSpec:
    request = payload.get("request")
    plugin = payload.get("plugin")
    if (request is None) == (plugin is None):
        raise _Invalid("invalid_call", "the payload needs exactly one of 'request' and 'plugin'")
    if plugin is not None:
        if not isinstance(plugin, str) or not plugin:
            raise _Invalid("invalid_call", "plugin must be a plugin name")
        action = payload.get("action", "")
        if not isinstance(action, str):
            raise _Invalid("invalid_call", "action must be a string")
        args = payload.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise _Invalid("invalid_call", "args must be an object")
        return _PluginSpec(
            plugin,
            action,
            args,
            _number(payload, "timeout_s", DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, ""),
            _retries(payload, ""),
        )
    if not isinstance(request, dict):
        raise _Invalid("invalid_call", "request must be an object")
    method = request.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise _Invalid("invalid_call", f"request.method must be one of {', '.join(sorted(METHODS))}")
    url = request.get("url")
    if not isinstance(url, str) or not url:
        raise _Invalid("invalid_url", "request.url must be an http or https URL")
    headers = request.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise _Invalid("invalid_call", "request.headers must be an object of strings")
    body = request.get("body")
    if body is not None and not isinstance(body, str):
        raise _Invalid("invalid_call", "request.body must be a string (use 'json' for JSON)")
    json_body = request.get("json", _ABSENT)
    if json_body is not _ABSENT and body is not None:
        raise _Invalid("invalid_call", "give request.json or request.body, not both")
    return _HttpSpec(
        method.upper(),
        url,
        dict(headers),
        json_body,
        body,
        _number(request, "timeout_s", DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, "request."),
        _retries(request, "request."),
    )


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise _Invalid("invalid_url", "request.url is not a valid URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _Invalid("invalid_url", "request.url must be an absolute http or https URL")


async def _read_capped(resp: httpx.Response) -> tuple[bytes, bool]:
    data = bytearray()
    async for chunk in resp.aiter_bytes():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            return bytes(data[:MAX_BODY_BYTES]), True
    return bytes(data), False


def _decode(resp: httpx.Response, data: bytes, truncated: bool, used: _Secrets) -> Any:
    """JSON when the answer says so and is complete, else text; secrets redacted, NULs replaced."""
    if not data:
        return None
    try:
        text = data.decode(resp.charset_encoding or "utf-8", "replace")
    except LookupError:
        text = data.decode("utf-8", "replace")
    text = used.redact(text).replace("\x00", "\ufffd")
    content_type = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not truncated and (content_type == "application/json" or content_type.endswith("+json")):
        try:
            return orjson.loads(text.replace("\\u0000", "\\ufffd"))
        except orjson.JSONDecodeError:
            pass
    return text


def _plugin_answer(answer: Any, used: _Secrets) -> CallResult:
    if not isinstance(answer, dict):
        return CallResult(
            False, error="plugin_error:invalid_result", message="a plugin's call must return a dict"
        )
    try:
        text = orjson.dumps(answer).decode()
    except TypeError as exc:
        return CallResult(False, error="plugin_error:invalid_result", message=f"not JSON-serialisable: {exc}")
    text = used.redact(text).replace("\\u0000", "\\ufffd")
    if len(text.encode()) > MAX_BODY_BYTES:
        return CallResult(
            True, body=text.encode()[:MAX_BODY_BYTES].decode("utf-8", "replace"), truncated=True
        )
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:  # a redaction broke the JSON: keep the text
        return CallResult(True, body=text)
    return CallResult(True, body=body)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
