"""A customer profile in memory and the pure rules that change it.

Last write wins per field by (event time, log sequence), so a late, older event never overwrites a
newer value, and two events with the same time are ordered by the log. Merging two profiles keeps,
field by field, whichever side was written later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mayak.db.fastsql import dump_json, load_json
from mayak.pipeline import context as ctx
from mayak.timeutil import ms_to_rfc3339

RESERVED_TRAITS = ("consents", "preferences")
PROFILE_COLUMNS = (
    "id, merged_into, identified, traits, trait_times, context, consents, preferences, stage, stage_at, "
    "first_seen, last_seen, created_at, updated_at"
)
JSON_POSITIONS = (3, 4, 5, 6, 7)  # 0-based positions of JSON columns in PROFILE_COLUMNS
MAX_GROUPS = 50
Stamp = list[int]  # [event ms, seq]


@dataclass(slots=True)
class Profile:
    id: str
    created_at: int
    identified: bool = False
    traits: dict[str, Any] = field(default_factory=dict)
    times: dict[str, dict[str, Stamp]] = field(default_factory=dict)  # namespace -> field -> stamp
    context: dict[str, Any] = field(default_factory=dict)
    consents: dict[str, dict[str, Any]] = field(default_factory=dict)
    preferences: dict[str, Any] = field(default_factory=dict)
    stage: str | None = None
    stage_at: int | None = None
    first_seen: int | None = None
    last_seen: int | None = None
    merged_into: str | None = None
    new: bool = False
    dirty: bool = False

    # -- last write wins ---------------------------------------------------------------------

    def _newer(self, namespace: str, key: str, stamp: Stamp) -> bool:
        ns = self.times.get(namespace)
        if ns is None:
            ns = self.times[namespace] = {}
        old = ns.get(key)
        if old is not None and (old[0], old[1]) > (stamp[0], stamp[1]):
            return False
        ns[key] = stamp
        return True

    def set_traits(self, traits: dict[str, Any], stamp: Stamp, source: str) -> None:
        for key, value in traits.items():
            if key in RESERVED_TRAITS:
                if key == "consents" and isinstance(value, dict):
                    self.set_consents(value, stamp, source)
                elif key == "preferences" and isinstance(value, dict):
                    self.set_preferences(value, stamp)
                continue
            if self._newer("traits", key, stamp):
                self.traits[key] = value
                self.dirty = True

    def set_consents(self, consents: dict[str, dict[str, bool]], stamp: Stamp, source: str) -> None:
        for channel, purposes in consents.items():
            for purpose, granted in purposes.items():
                if self._newer("consents", f"{channel}.{purpose}", stamp):
                    self.consents.setdefault(channel, {})[purpose] = {
                        "granted": bool(granted),
                        "source": source,
                        "at": ms_to_rfc3339(stamp[0]),
                    }
                    self.dirty = True

    def set_preferences(self, prefs: dict[str, Any], stamp: Stamp) -> None:
        for key, value in prefs.items():
            if self._newer("preferences", key, stamp):
                self.preferences[key] = value
                self.dirty = True

    def set_stage(self, stage: str, at: int, stamp: Stamp) -> None:
        if self._newer("stage", "stage", stamp):
            self.stage = stage
            self.stage_at = at
            self.dirty = True

    def observe(self, ts: int, event_context: dict[str, Any] | None, stamp: Stamp) -> None:
        """Seen at ``ts``: first/last seen and what the event's context tells about the person."""
        if self.first_seen is None or ts < self.first_seen:
            self.first_seen = ts
            self.dirty = True
        if self.last_seen is None or ts > self.last_seen:
            self.last_seen = ts
            self.dirty = True
        if event_context:
            derived = ctx.derive(event_context)
            for key, value in derived.items():
                if self._newer("context", key, stamp):
                    self.context[key] = value
                    self.dirty = True
            for hint in ctx.channel_hints(event_context):
                hints = self.context.setdefault("channel_hints", [])
                if hint not in hints:
                    hints.append(hint)
                    self.dirty = True

    def join_group(self, group_id: str) -> None:
        groups = self.context.setdefault("groups", [])
        if group_id not in groups:
            groups.append(group_id)
            del groups[:-MAX_GROUPS]
            self.dirty = True

    # -- merge -------------------------------------------------------------------------------

    def absorb(self, other: Profile) -> None:
        """Fold ``other`` (the merged-away profile) into this one, field by field by time."""
        for key, value in other.traits.items():
            stamp = other.times.get("traits", {}).get(key, [0, 0])
            if self._newer("traits", key, stamp):
                self.traits[key] = value
        for channel, purposes in other.consents.items():
            for purpose, entry in purposes.items():
                stamp = other.times.get("consents", {}).get(f"{channel}.{purpose}", [0, 0])
                if self._newer("consents", f"{channel}.{purpose}", stamp):
                    self.consents.setdefault(channel, {})[purpose] = entry
        for key, value in other.preferences.items():
            stamp = other.times.get("preferences", {}).get(key, [0, 0])
            if self._newer("preferences", key, stamp):
                self.preferences[key] = value
        for key, value in other.context.items():
            if key in ("groups", "channel_hints"):
                merged = list(self.context.get(key, []))
                merged += [v for v in value if v not in merged]
                self.context[key] = merged[-MAX_GROUPS:]
                continue
            stamp = other.times.get("context", {}).get(key, [0, 0])
            if self._newer("context", key, stamp):
                self.context[key] = value
        if other.stage is not None:
            stamp = other.times.get("stage", {}).get("stage", [0, 0])
            if self.stage is None or self._newer("stage", "stage", stamp):
                self.stage, self.stage_at = other.stage, other.stage_at
        for seen in (other.first_seen, other.last_seen):
            if seen is not None:
                self.first_seen = seen if self.first_seen is None else min(self.first_seen, seen)
                self.last_seen = seen if self.last_seen is None else max(self.last_seen, seen)
        self.identified = self.identified or other.identified
        self.created_at = min(self.created_at, other.created_at)
        self.dirty = True

    # -- storage -----------------------------------------------------------------------------

    @classmethod
    def from_row(cls, row: Any) -> Profile:
        return cls(
            id=row.id,
            created_at=row.created_at,
            identified=bool(row.identified),
            traits=row.traits,
            times=row.trait_times,
            context=row.context,
            consents=row.consents,
            preferences=row.preferences,
            stage=row.stage,
            stage_at=row.stage_at,
            first_seen=row.first_seen,
            last_seen=row.last_seen,
            merged_into=row.merged_into,
        )

    @classmethod
    def from_tuple(cls, row: Any) -> Profile:
        """From a driver-level row in PROFILE_COLUMNS order."""
        return cls(
            id=row[0],
            merged_into=row[1],
            identified=bool(row[2]),
            traits=load_json(row[3]),
            times=load_json(row[4]),
            context=load_json(row[5]),
            consents=load_json(row[6]),
            preferences=load_json(row[7]),
            stage=row[8],
            stage_at=row[9],
            first_seen=row[10],
            last_seen=row[11],
            created_at=row[12],
        )

    def to_tuple(self, now: int) -> tuple[Any, ...]:
        """Driver-level values in PROFILE_COLUMNS order (JSON columns as text)."""
        return (
            self.id,
            self.merged_into,
            self.identified,
            dump_json(self.traits),
            dump_json(self.times),
            dump_json(self.context),
            dump_json(self.consents),
            dump_json(self.preferences),
            self.stage,
            self.stage_at,
            self.first_seen,
            self.last_seen,
            self.created_at,
            now,
        )

    def to_row(self, workspace_id: str, now: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "workspace_id": workspace_id,
            "merged_into": self.merged_into,
            "identified": self.identified,
            "traits": self.traits,
            "trait_times": self.times,
            "context": self.context,
            "consents": self.consents,
            "preferences": self.preferences,
            "stage": self.stage,
            "stage_at": self.stage_at,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "created_at": self.created_at,
            "updated_at": now,
        }
