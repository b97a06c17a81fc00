"""Integration plugins: Python code for business systems that a plain HTTP call cannot reach.

A plugin is any object (or a class instantiable without arguments) with a ``name`` and::

    async def call(self, action: str, args: dict, context: PluginContext) -> dict

Installed packages publish plugins under the entry point group ``mayak.integrations`` (the entry
point's name is the plugin's name); they are imported lazily, on the first call that names them.
``PluginRegistry.register`` adds one directly (tests, embedding). The call executor gives plugins
the same timeout and retries as HTTP calls and turns their errors into ``plugin_error:<code>``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog

log = structlog.get_logger("mayak.integrations")

ENTRY_POINT_GROUP = "mayak.integrations"


class PluginError(Exception):
    """Raised by a plugin to fail a call with ``plugin_error:<code>``.

    ``retryable=True`` asks for the call's retries (like a 5xx); by default the error is final.
    """

    def __init__(self, code: str, message: str = "", *, retryable: bool = False):
        super().__init__(message or code)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin knows about the call it serves."""

    workspace_id: str
    customer_id: str | None
    conversation_id: str | None = None
    call_id: str | None = None
    _secrets: Callable[[str], Awaitable[str]] | None = field(default=None, repr=False)

    async def secret(self, name: str) -> str:
        """The workspace's integration secret ``name``; a missing one fails the call with
        ``missing_secret:NAME``."""
        if self._secrets is None:
            raise PluginError("no_secrets", "this context gives no access to secrets")
        return await self._secrets(name)


@runtime_checkable
class Plugin(Protocol):
    name: str

    async def call(self, action: str, args: dict[str, Any], context: PluginContext) -> dict[str, Any]: ...


class PluginRegistry:
    """Plugins by name: registered ones first, then entry points, loaded on first use."""

    def __init__(self, group: str = ENTRY_POINT_GROUP):
        self.group = group
        self._plugins: dict[str, Plugin] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None
        self._failed: dict[str, str] = {}

    def register(self, plugin: Any, name: str | None = None) -> Plugin:
        """Add a plugin object (or a class, instantiated without arguments); returns the object."""
        obj = _instantiate(plugin)
        key = name or obj.name
        self._plugins[key] = obj
        self._failed.pop(key, None)
        return obj

    def get(self, name: str) -> Plugin:
        """The plugin ``name``; raises ``PluginError`` ``unknown_plugin`` or ``load_failed``."""
        plugin = self._plugins.get(name)
        if plugin is not None:
            return plugin
        if name in self._failed:
            raise PluginError("load_failed", self._failed[name])
        entry = self._discover().get(name)
        if entry is None:
            raise PluginError("unknown_plugin", f"no plugin named {name!r} is registered or installed")
        try:
            plugin = _instantiate(entry.load())
        except Exception as exc:
            message = f"loading entry point {entry.value!r} failed: {type(exc).__name__}: {exc}"[:500]
            log.warning("plugin_load_failed", plugin=name, error=message)
            self._failed[name] = message
            raise PluginError("load_failed", message) from exc
        if plugin.name != name:
            log.warning("plugin_name_mismatch", entry_point=name, plugin_name=plugin.name)
        self._plugins[name] = plugin
        return plugin

    def names(self) -> list[str]:
        """Every plugin that can be called: registered and installed (not necessarily loaded)."""
        return sorted(set(self._plugins) | set(self._discover()))

    def _discover(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._entry_points is None:
            found: dict[str, importlib.metadata.EntryPoint] = {}
            try:
                for entry in importlib.metadata.entry_points(group=self.group):
                    found.setdefault(entry.name, entry)
            except Exception:
                log.exception("plugin_discovery_failed", group=self.group)
            self._entry_points = found
        return self._entry_points


def _instantiate(plugin: Any) -> Plugin:
    obj: Any = plugin() if inspect.isclass(plugin) else plugin
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{obj!r} is not a plugin: it needs a non-empty str attribute 'name'")
    if not inspect.iscoroutinefunction(getattr(obj, "call", None)):
        raise TypeError(f"{obj!r} is not a plugin: it needs 'async def call(self, action, args, context)'")
    if not isinstance(obj, Plugin):
        raise TypeError(f"{obj!r} is not a plugin")
    return obj
