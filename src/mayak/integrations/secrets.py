"""Integration secrets: credentials that bot ``call`` steps reference as ``{{secret:NAME}}``.

Why placeholders: a flow definition and the outbox payload it writes are readable by admins and
kept in backups; the credential itself is stored only encrypted (``signing_secrets``, purpose
``integration:NAME``) and put into the request at send time, in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from mayak.db.database import Database
from mayak.db.schema import signing_secrets
from mayak.errors import InvalidRequest, NotFound
from mayak.timeutil import ms_to_rfc3339
from mayak.workspaces.service import WorkspaceService

PURPOSE_PREFIX = "integration:"
# signing_secrets.purpose is VARCHAR(40): 12 for the prefix leaves 28 for the name.
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,27}"
_NAME_RE = re.compile(NAME_PATTERN)
PLACEHOLDER_RE = re.compile(r"\{\{secret:(" + NAME_PATTERN + r")\}\}")
MAX_VALUE_CHARS = 8192
MAX_SECRETS = 200
Records = list[dict[str, Any]]  # inside the class, ``list`` names the method


class MissingSecret(Exception):
    """A referenced secret does not exist; the call fails with ``missing_secret:NAME``."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidRequest(
            "invalid_secret_name",
            "a secret name is 1-28 characters: letters, digits, '_', '.' or '-' (not starting with . or -)",
            "$.name",
        )
    return name


def placeholders(value: Any, found: set[str] | None = None) -> set[str]:
    """Names of every ``{{secret:NAME}}`` in the strings (and keys) of a JSON-like value."""
    out = set() if found is None else found
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "{{secret:" in item:
                out.update(PLACEHOLDER_RE.findall(item))
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def substitute(value: Any, values: dict[str, str]) -> Any:
    """A copy of ``value`` with every placeholder replaced; every name must be in ``values``."""
    if isinstance(value, str):
        if "{{secret:" not in value:
            return value
        return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], value)
    if isinstance(value, dict):
        return {substitute(k, values): substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, values) for v in value]
    return value


class IntegrationSecrets:
    def __init__(self, db: Database, workspaces: WorkspaceService):
        self.db = db
        self.workspaces = workspaces

    async def put(self, ws_id: str, name: str, value: Any) -> dict[str, Any]:
        """Store (or replace) a secret; the newest value wins and older ones are removed."""
        name = validate_name(name)
        if not isinstance(value, str) or not value or len(value) > MAX_VALUE_CHARS:
            raise InvalidRequest(
                "invalid_secret_value", f"value must be a string of 1-{MAX_VALUE_CHARS} characters", "$.value"
            )
        s = signing_secrets.c
        purpose = PURPOSE_PREFIX + name
        async with self.db.write() as conn:
            count = (
                await conn.execute(
                    sa.select(sa.func.count(sa.distinct(s.purpose))).where(
                        s.workspace_id == ws_id, s.purpose.like(PURPOSE_PREFIX + "%"), s.purpose != purpose
                    )
                )
            ).scalar_one()
            if count >= MAX_SECRETS:
                raise InvalidRequest(
                    "too_many_secrets", f"a workspace can have at most {MAX_SECRETS} integration secrets"
                )
            secret_id = await self.workspaces.store_secret(conn, ws_id, purpose, value)
            await conn.execute(
                signing_secrets.delete().where(
                    s.workspace_id == ws_id, s.purpose == purpose, s.id != secret_id
                )
            )
            created = (await conn.execute(sa.select(s.created_at).where(s.id == secret_id))).scalar_one()
        return {"name": name, "created_at": ms_to_rfc3339(created)}

    async def list(self, ws_id: str) -> Records:
        """Names and creation times, never values."""
        s = signing_secrets.c
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(s.purpose, sa.func.max(s.created_at).label("created_at"))
                .where(s.workspace_id == ws_id, s.purpose.like(PURPOSE_PREFIX + "%"))
                .group_by(s.purpose)
                .order_by(s.purpose)
            )
            return [
                {"name": r.purpose[len(PURPOSE_PREFIX) :], "created_at": ms_to_rfc3339(r.created_at)}
                for r in rows
            ]

    async def delete(self, ws_id: str, name: str) -> dict[str, Any]:
        name = validate_name(name)
        s = signing_secrets.c
        async with self.db.write() as conn:
            result = await conn.execute(
                signing_secrets.delete().where(s.workspace_id == ws_id, s.purpose == PURPOSE_PREFIX + name)
            )
        if not result.rowcount:
            raise NotFound("secret", "$.name")
        return {"name": name, "deleted": True}

    async def resolve(self, ws_id: str, names: Iterable[str]) -> dict[str, str]:
        """The plaintext of each named secret (newest wins); raises ``MissingSecret`` for the first
        name (in sorted order) that does not exist."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        s = signing_secrets.c
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(s.purpose, s.ciphertext)
                .where(s.workspace_id == ws_id, s.purpose.in_([PURPOSE_PREFIX + n for n in wanted]))
                .order_by(s.created_at, s.id)
            )
            found = {r.purpose[len(PURPOSE_PREFIX) :]: r.ciphertext for r in rows}  # newest last wins
        for name in wanted:
            if name not in found:
                raise MissingSecret(name)
        return {name: self.workspaces.box.decrypt(found[name]) for name in wanted}
