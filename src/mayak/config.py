"""Configuration from environment variables (all prefixed ``MAYAK_``); see docs/configuration.md."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite+aiosqlite:///./data/mayak.db"
    secret_key: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8000
    dedup_window_days: int = 7
    max_event_bytes: int = 32 * 1024
    max_request_bytes: int = 500 * 1024
    max_json_depth: int = 32
    sqlite_synchronous: str = "NORMAL"
    sqlite_cache_mb: int = 16
    sqlite_mmap_mb: int = 128
    pipeline_batch_size: int = 2000
    inline_pipeline: bool = True
    outbox_max_attempts: int = 8
    outbox_base_delay_ms: int = 1000
    webhook_timeout_s: float = 10.0
    bus_url: str = ""  # "" = PostgreSQL LISTEN/NOTIFY on PostgreSQL, else in-process; nats://… ; local
    log_level: str = "info"

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            database_url=env.get("MAYAK_DATABASE_URL", cls.database_url),
            secret_key=env.get("MAYAK_SECRET_KEY") or None,
            public_url=env.get("MAYAK_PUBLIC_URL", cls.public_url),
            host=env.get("MAYAK_HOST", cls.host),
            port=_env_int("MAYAK_PORT", cls.port),
            dedup_window_days=_env_int("MAYAK_DEDUP_WINDOW_DAYS", cls.dedup_window_days),
            max_event_bytes=_env_int("MAYAK_MAX_EVENT_BYTES", cls.max_event_bytes),
            max_request_bytes=_env_int("MAYAK_MAX_REQUEST_BYTES", cls.max_request_bytes),
            sqlite_synchronous=env.get("MAYAK_SQLITE_SYNCHRONOUS", cls.sqlite_synchronous).upper(),
            sqlite_cache_mb=_env_int("MAYAK_SQLITE_CACHE_MB", cls.sqlite_cache_mb),
            sqlite_mmap_mb=_env_int("MAYAK_SQLITE_MMAP_MB", cls.sqlite_mmap_mb),
            pipeline_batch_size=_env_int("MAYAK_PIPELINE_BATCH_SIZE", cls.pipeline_batch_size),
            inline_pipeline=env.get("MAYAK_INLINE_PIPELINE", "1") not in ("0", "false", "no"),
            outbox_max_attempts=_env_int("MAYAK_OUTBOX_MAX_ATTEMPTS", cls.outbox_max_attempts),
            outbox_base_delay_ms=_env_int("MAYAK_OUTBOX_BASE_DELAY_MS", cls.outbox_base_delay_ms),
            webhook_timeout_s=float(env.get("MAYAK_WEBHOOK_TIMEOUT_S") or cls.webhook_timeout_s),
            bus_url=env.get("MAYAK_BUS_URL", cls.bus_url).strip(),
            log_level=env.get("MAYAK_LOG_LEVEL", cls.log_level),
        )

    def sqlite_path(self) -> Path | None:
        prefix = "sqlite+aiosqlite:///"
        if self.database_url.startswith(prefix):
            rest = self.database_url[len(prefix) :].split("?")[0]
            return None if rest in ("", ":memory:") else Path(rest)
        return None
