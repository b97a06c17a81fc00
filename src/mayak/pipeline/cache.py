"""What the pipeline last wrote of identities and profiles, kept in memory (SQLite only).

On SQLite one process writes, and the pipeline's batches spend a fifth of an ingested event's time
looking up identity rows and profile rows they themselves wrote a moment earlier. This cache keeps
those rows as committed, so a batch queries only what it misses:

- identities: (workspace, kind, value) -> customer id;
- profiles: (workspace, customer id) -> the row in ``PROFILE_COLUMNS`` order, JSON as text.

It stays exact by three rules:

- **Only committed rows.** A batch stages what it read and wrote and applies it after its
  transaction commits (``Database.after_commit``); a rollback drops the staged rows. A profile it
  writes is dropped from the cache at once, so a later batch of the same transaction reads the
  uncommitted row from the database, not the committed one from here.
- **Other writers empty it.** ``PRAGMA data_version`` on the write connection changes when another
  connection (another process) commits; the cache is emptied then, and when the write connection
  is a new one. Code in this process that
  changes identities or customers other than through ``ProfileBatch`` (erasure, replay) calls
  ``clear``.
- **Bounded.** Each map holds at most its limit; past it the oldest entries go (profiles by last
  write, identities by first).

A merged-away profile is cached with its ``merged_into``, and an identity may still name it: the
batch follows the merge as it does for rows read from the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_PROFILES = 100_000
MAX_IDENTITIES = 250_000

IdentityKey = tuple[str, str, str]  # workspace, kind, value


class ProfileCache:
    def __init__(self, max_profiles: int = MAX_PROFILES, max_identities: int = MAX_IDENTITIES):
        self.max_profiles = max_profiles
        self.max_identities = max_identities
        self.identities: dict[IdentityKey, str] = {}
        self.profiles: dict[tuple[str, str], tuple[Any, ...]] = {}
        # The connection the cache was last checked on, and its data_version then.
        self.connection: object | None = None
        self.version: int | None = None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_profiles > 0 and self.max_identities > 0

    def check(self, connection: object, version: int) -> None:
        """Empty the cache if another connection committed since the last check on ``connection``
        (or if the last check was on another connection: versions of two connections differ)."""
        if version != self.version or connection is not self.connection:
            self.clear()
            self.connection, self.version = connection, version

    def clear(self) -> None:
        self.identities.clear()
        self.profiles.clear()

    def forget_profiles(self, workspace_id: str, ids: Iterable[str]) -> None:
        """Drop rows about to be rewritten in an open transaction."""
        for cid in ids:
            self.profiles.pop((workspace_id, cid), None)

    def store(
        self,
        workspace_id: str,
        identities: Iterable[tuple[tuple[str, str], str]],
        profiles: Iterable[tuple[Any, ...]],
    ) -> None:
        """Remember committed rows, then trim to the limits. A profile row written in the
        transaction was dropped when it was written (``forget_profiles``), so it comes back as the
        newest entry; an identity keeps its place."""
        ids, rows = self.identities, self.profiles
        for key, cid in identities:
            ids[(workspace_id, *key)] = cid
        for row in profiles:
            rows[(workspace_id, row[0])] = row
        _trim(ids, self.max_identities)
        _trim(rows, self.max_profiles)


def _trim(entries: dict[Any, Any], limit: int) -> None:
    excess = len(entries) - limit
    if excess > 0:
        for key in [key for key, _ in zip(entries, range(excess), strict=False)]:
            del entries[key]
