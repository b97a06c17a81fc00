"""Create workspaces, issue and revoke API keys, store signing secrets.

API keys carry 256 bits of randomness, so they are stored as SHA-256 digests (a slow password hash
would add nothing against guessing and cost every request). The plaintext is shown once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database
from mayak.db.schema import api_keys, signing_secrets, workspaces
from mayak.errors import AuthenticationError, InvalidRequest, NotFound
from mayak.ids import new_id
from mayak.timeutil import now_ms
from mayak.workspaces.secrets_box import SecretBox

KeyKind = Literal["write", "secret"]
KEY_PREFIX: dict[str, str] = {"write": "wk", "secret": "sk"}
SETTINGS_TTL_S = 5.0
DEFAULT_STAGES = ["prospect", "buyer", "in_service", "loyal"]


def default_settings() -> dict[str, Any]:
    return {
        "default_region": "US",
        "journey_stages": list(DEFAULT_STAGES),
        "allowed_origins": ["*"],
    }


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    workspace_id: str
    kind: str


@dataclass(frozen=True)
class IssuedKey:
    id: str
    kind: str
    plaintext: str


class WorkspaceService:
    def __init__(self, db: Database, box: SecretBox):
        self.db = db
        self.box = box
        # key hash -> ApiKey (or None for revoked); bounded, invalidated on revoke in this process.
        self._key_cache: dict[str, ApiKey | None] = {}
        # workspace id -> (expires at, settings): read on hot paths (origin checks, phone region).
        self._settings_cache: dict[str, tuple[float, dict[str, Any]]] = {}

    async def create_workspace(self, name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        name = name.strip()
        if not name or len(name) > 200:
            raise InvalidRequest("invalid_name", "workspace name must be 1-200 characters", "$.name")
        ws_id = new_id("ws")
        merged = default_settings() | (settings or {})
        validate_settings(merged)
        now = now_ms()
        async with self.db.write() as conn:
            # numbered one after another (on PostgreSQL creations queue on a lock for it)
            await self.db.lock_workspace(conn, "*", "create")
            number = sa.select(sa.func.coalesce(sa.func.max(workspaces.c.number), 0) + 1).scalar_subquery()
            await conn.execute(
                workspaces.insert().values(
                    id=ws_id, name=name, settings=merged, created_at=now, number=number
                )
            )
            write = await self._issue(conn, ws_id, "write")
            secret = await self._issue(conn, ws_id, "secret")
            await self.store_secret(conn, ws_id, "user_tokens", "whsec_" + secrets.token_urlsafe(32))
        return {
            "id": ws_id,
            "name": name,
            "write_key": write.plaintext,
            "write_key_id": write.id,
            "secret_key": secret.plaintext,
            "secret_key_id": secret.id,
        }

    async def get_workspace(self, ws_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            row = (await conn.execute(sa.select(workspaces).where(workspaces.c.id == ws_id))).first()
        if row is None:
            raise NotFound("workspace")
        return {str(k): v for k, v in row._mapping.items()}

    async def default_region(self, ws_id: str) -> str:
        """The workspace's default phone region (how national numbers are read), "US" when unset."""
        return str((await self.settings(ws_id)).get("default_region") or "US")

    async def settings(self, ws_id: str) -> dict[str, Any]:
        """A workspace's settings, cached for a few seconds (other processes' changes show within that)."""
        cached = self._settings_cache.get(ws_id)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        value = dict((await self.get_workspace(ws_id))["settings"])
        if len(self._settings_cache) > 10_000:
            self._settings_cache.clear()
        self._settings_cache[ws_id] = (time.monotonic() + SETTINGS_TTL_S, value)
        return value

    async def update_settings(self, ws_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        ws = await self.get_workspace(ws_id)
        merged = ws["settings"] | changes
        validate_settings(merged)
        async with self.db.write() as conn:
            await conn.execute(workspaces.update().where(workspaces.c.id == ws_id).values(settings=merged))
        self._settings_cache.pop(ws_id, None)
        return dict(merged)

    async def create_key(self, ws_id: str, kind: str) -> IssuedKey:
        if kind not in KEY_PREFIX:
            raise InvalidRequest("invalid_key_kind", "kind must be 'write' or 'secret'", "$.kind")
        await self.get_workspace(ws_id)
        async with self.db.write() as conn:
            return await self._issue(conn, ws_id, kind)

    async def revoke_key(self, key_id: str) -> None:
        async with self.db.write() as conn:
            res = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now_ms())
            )
            if res.rowcount == 0:
                exists = (await conn.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id))).first()
                if exists is None:
                    raise NotFound("key")
        self._key_cache.clear()

    async def list_keys(self, ws_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(
                    api_keys.c.id,
                    api_keys.c.kind,
                    api_keys.c.prefix,
                    api_keys.c.created_at,
                    api_keys.c.revoked_at,
                )
                .where(api_keys.c.workspace_id == ws_id)
                .order_by(api_keys.c.id)
            )
            return [{str(k): v for k, v in r._mapping.items()} for r in rows]

    async def authenticate(self, plaintext: str) -> ApiKey:
        """Resolve a presented key; raises AuthenticationError for unknown or revoked keys."""
        digest = hash_key(plaintext)
        if digest in self._key_cache:
            key = self._key_cache[digest]
        else:
            async with self.db.read() as conn:
                row = (
                    await conn.execute(
                        sa.select(
                            api_keys.c.id, api_keys.c.workspace_id, api_keys.c.kind, api_keys.c.revoked_at
                        ).where(api_keys.c.hash == digest)
                    )
                ).first()
            if row is None:
                raise AuthenticationError("invalid_key", "the API key is not known")
            key = None if row.revoked_at is not None else ApiKey(row.id, row.workspace_id, row.kind)
            if len(self._key_cache) > 10_000:
                self._key_cache.clear()
            self._key_cache[digest] = key
        if key is None:
            raise AuthenticationError("revoked_key", "the API key has been revoked")
        return key

    async def signing_secret(self, ws_id: str, purpose: str) -> str:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(signing_secrets.c.ciphertext)
                    .where(signing_secrets.c.workspace_id == ws_id, signing_secrets.c.purpose == purpose)
                    .order_by(signing_secrets.c.id.desc())
                )
            ).first()
        if row is None:
            raise NotFound("signing secret")
        return self.box.decrypt(row.ciphertext)

    async def _issue(self, conn: AsyncConnection, ws_id: str, kind: str) -> IssuedKey:
        prefix = KEY_PREFIX[kind]
        plaintext = f"{prefix}_{secrets.token_urlsafe(32)}"
        key_id = new_id("key")
        await conn.execute(
            api_keys.insert().values(
                id=key_id,
                workspace_id=ws_id,
                kind=kind,
                prefix=plaintext[:10],
                hash=hash_key(plaintext),
                created_at=now_ms(),
            )
        )
        return IssuedKey(key_id, kind, plaintext)

    async def store_secret(self, conn: AsyncConnection, ws_id: str, purpose: str, secret: str) -> str:
        sid = new_id("sec")
        await conn.execute(
            signing_secrets.insert().values(
                id=sid,
                workspace_id=ws_id,
                purpose=purpose,
                ciphertext=self.box.encrypt(secret),
                created_at=now_ms(),
            )
        )
        return sid

    async def read_secret(self, secret_id: str) -> str:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(signing_secrets.c.ciphertext).where(signing_secrets.c.id == secret_id)
                )
            ).first()
        if row is None:
            raise NotFound("signing secret")
        return self.box.decrypt(row.ciphertext)


def validate_settings(settings: dict[str, Any]) -> None:
    import phonenumbers

    region = settings.get("default_region")
    if not isinstance(region, str) or region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidRequest(
            "invalid_region", "default_region must be an ISO 3166 region code", "$.default_region"
        )
    stages = settings.get("journey_stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) and s for s in stages):
        raise InvalidRequest(
            "invalid_stages", "journey_stages must be a non-empty list of names", "$.journey_stages"
        )
    origins = settings.get("allowed_origins")
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise InvalidRequest(
            "invalid_origins", "allowed_origins must be a list of strings", "$.allowed_origins"
        )
