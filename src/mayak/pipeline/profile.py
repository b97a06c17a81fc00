"""A customer profile in memory and the pure rules that change it.

Last write wins per field by (event time, log sequence), so a late, older event never overwrites a
newer value, and two events with the same time are ordered by the log. Merging two profiles keeps,
field by field, whichever side was written later.
"""

from __future__ import annotations

from typing import Any

from mayak.db.fastsql import dump_json, load_json
from mayak.pipeline import context as ctx
from mayak.timeutil import ms_to_rfc3339

RESERVED_TRAITS = ("consents", "preferences")
PROFILE_COLUMNS = (
    "key, id, merged_into, identified, traits, trait_times, context, consents, preferences, stage, stage_at, "
    "first_seen, last_seen, created_at, updated_at"
)
JSON_POSITIONS = (4, 5, 6, 7, 8)  # 0-based positions of JSON columns in PROFILE_COLUMNS
# PostgreSQL: the column types of PROFILE_COLUMNS (for column-array writes) and the columns with
# JSON read as text (asyncpg would otherwise decode every JSONB value at once).
PROFILE_TYPES = (
    "bigint", "text", "text", "boolean", "jsonb", "jsonb", "jsonb", "jsonb", "jsonb", "text", "bigint",
    "bigint", "bigint", "bigint", "bigint",
)  # fmt: skip
PROFILE_TEXT_COLUMNS = ", ".join(
    f"{name}::text" if i in JSON_POSITIONS else name for i, name in enumerate(PROFILE_COLUMNS.split(", "))
)
# What observing an event changes (Profile.observed_only): an update of a profile only an event's
# context and time touched writes these, not the whole row.
OBSERVED_COLUMNS = ("context", "first_seen", "last_seen", "updated_at")
MAX_GROUPS = 50
CONTEXT_STAMP = "_stamp"  # [event ms, seq] of the newest event whose context was applied
Stamp = list[int]  # [event ms, seq]


class Profile:
    """One customer's state. JSON columns are decoded only when a rule touches them, and written back
    as the stored text when nothing touched them: most events (a ``track`` from a known customer)
    only move ``last_seen`` and maybe the context, so most of a profile is never decoded."""

    __slots__ = (
        "_json",
        "_text",
        "created_at",
        "dirty",
        "first_seen",
        "id",
        "identified",
        "key",
        "last_seen",
        "merged_into",
        "new",
        "stage",
        "stage_at",
        "stored_identified",
        "stored_merged_into",
        "stored_stage",
    )

    def __init__(
        self,
        id: str,
        created_at: int,
        *,
        identified: bool = False,
        text: list[Any] | None = None,
        stage: str | None = None,
        stage_at: int | None = None,
        first_seen: int | None = None,
        last_seen: int | None = None,
        merged_into: str | None = None,
        new: bool = False,
        dirty: bool = False,
        key: int = 0,
    ):
        self.id = id
        self.key = key  # the customer's number (customers.key); 0 until a new profile is given one
        self.created_at = created_at
        self.identified = identified
        # Stored text of traits, times, context, consents, preferences (None once decoded).
        self._text: list[Any] = text if text is not None else [None] * 5
        self._json: list[Any] = [None] * 5 if text is not None else [{}, {}, {}, {}, {}]
        self.stage = stage
        self.stage_at = stage_at
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.merged_into = merged_into
        self.stored_merged_into = merged_into  # as read: an update sets the column only if it moved
        self.stored_identified = identified
        self.stored_stage = stage
        self.new = new
        self.dirty = dirty

    def _field(self, index: int) -> Any:
        value = self._json[index]
        if value is None:
            value = self._json[index] = load_json(self._text[index])
        return value

    @property
    def traits(self) -> dict[str, Any]:
        value: dict[str, Any] = self._field(0)
        return value

    @property
    def times(self) -> dict[str, dict[str, Stamp]]:
        """namespace (traits, consents, preferences, stage) -> field -> [event ms, seq]"""
        value: dict[str, dict[str, Stamp]] = self._field(1)
        return value

    @property
    def context(self) -> dict[str, Any]:
        value: dict[str, Any] = self._field(2)
        return value

    @property
    def consents(self) -> dict[str, dict[str, Any]]:
        value: dict[str, dict[str, Any]] = self._field(3)
        return value

    @property
    def preferences(self) -> dict[str, Any]:
        value: dict[str, Any] = self._field(4)
        return value

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
            self._observe_context(ctx.derive(event_context), ctx.channel_hints(event_context), stamp)

    def _observe_context(self, derived: dict[str, Any], hints: list[str], stamp: Stamp) -> None:
        """Context fields come from the newest event that carried them; an older event only fills gaps."""
        if not derived and not hints:
            return
        context = self.context
        current = context.get(CONTEXT_STAMP)
        newest = current is None or (stamp[0], stamp[1]) >= (current[0], current[1])
        changed = False
        for key, value in derived.items():
            if (newest or key not in context) and context.get(key) != value:
                context[key] = value
                changed = True
        if hints:
            known = context.setdefault("channel_hints", [])
            for hint in hints:
                if hint not in known:
                    known.append(hint)
                    changed = True
        if newest and current != stamp:
            context[CONTEXT_STAMP] = stamp
            changed = True
        if changed:
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
        theirs = other.context
        their_stamp = theirs.get(CONTEXT_STAMP)
        for key in ("groups", "channel_hints"):
            if key in theirs:
                merged = list(self.context.get(key, []))
                merged += [v for v in theirs[key] if v not in merged]
                self.context[key] = merged[-MAX_GROUPS:]
        derived = {k: v for k, v in theirs.items() if k not in ("groups", "channel_hints", CONTEXT_STAMP)}
        if derived:
            self._observe_context(derived, [], their_stamp or [0, 0])
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
    def from_tuple(cls, row: Any) -> Profile:
        """From a driver-level row in PROFILE_COLUMNS order; JSON stays text until used. Sets the
        slots directly (one profile an ingested event: 0.31 against 0.73 µs through ``__init__``'s
        keyword arguments)."""
        p = cls.__new__(cls)
        p.key, p.id, p.created_at = row[0], row[1], row[13]
        p.identified = p.stored_identified = bool(row[3])
        p._text = [row[4], row[5], row[6], row[7], row[8]]
        p._json = [None] * 5
        p.stage = p.stored_stage = row[9]
        p.stage_at, p.first_seen, p.last_seen = row[10], row[11], row[12]
        p.merged_into = p.stored_merged_into = row[2]
        p.new = p.dirty = False
        return p

    def observed_only(self) -> bool:
        """Only what observing an event changes (context, first and last seen) can differ from the
        stored row: traits, their times, consents and preferences were never decoded (so never
        changed), and identity, stage and merge target are as read. Most events leave a profile so."""
        j = self._json
        return (
            j[0] is None
            and j[1] is None
            and j[3] is None
            and j[4] is None
            and self.identified == self.stored_identified
            and self.stage == self.stored_stage
            and self.merged_into == self.stored_merged_into
        )

    def observed_tuple(self, now: int) -> tuple[Any, ...]:
        """Driver-level values of OBSERVED_COLUMNS, then the number (for ``observed_only`` rows)."""
        context = self._json[2]
        text = dump_json(context) if context is not None else _as_text(self._text[2])
        return (text, self.first_seen, self.last_seen, now, self.key)

    def to_tuple(self, now: int, *, untouched_as_null: bool = False) -> tuple[Any, ...]:
        """Driver-level values in PROFILE_COLUMNS order (JSON columns as text). A JSON column that no
        rule decoded is its stored text, or None with ``untouched_as_null`` (an update keeps it)."""
        if untouched_as_null:
            texts = [None if value is None else dump_json(value) for value in self._json]
        else:
            texts = [
                dump_json(value) if value is not None else _as_text(self._text[i])
                for i, value in enumerate(self._json)
            ]
        return (
            self.key,
            self.id,
            self.merged_into,
            self.identified,
            *texts,
            self.stage,
            self.stage_at,
            self.first_seen,
            self.last_seen,
            self.created_at,
            now,
        )


def _as_text(value: Any) -> str:
    """Stored JSON back to text (asyncpg hands JSONB over already decoded)."""
    return value if isinstance(value, str) else dump_json(value)
