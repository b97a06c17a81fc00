"""One micro-batch of a workspace's log, resolved to customers in memory and written back in bulk.

Identity resolution follows DESIGN.md: ids come from the unique (workspace, kind, value) identity
rows, looked up for the whole batch in one query; events are walked in log order; a collision merges
two profiles only when at most one of them is identified (has a ``user_id``), otherwise the identity
stays with its owner, the event goes to the profile its ``userId`` names and an ``identity.conflict``
event is recorded. Every write happens at the end, in the caller's transaction.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import Database
from mayak.db.fastsql import FastSql
from mayak.db.schema import CUSTOMER_TABLES, KEYED_TABLES, customers
from mayak.eventlog import RESOLVED_SOURCES, SEGMENT_TYPES, LoggedEvent, NewEvent, reserve_numbers
from mayak.ids import derived_id
from mayak.pipeline.identity import ANONYMOUS_ID, USER_ID, Key, event_keys, suppression_hash
from mayak.pipeline.profile import (
    JSON_POSITIONS,
    OBSERVED_COLUMNS,
    PROFILE_COLUMNS,
    PROFILE_TEXT_COLUMNS,
    PROFILE_TYPES,
    Profile,
)

IDENTITY_LINKED = "identity.linked"
ADMIN_TYPES = frozenset(
    {"customer.traits_set", "customer.consents_set", "customer.preferences_set", "customer.stage_set"}
)
_CHUNK = 400
# The profiles of the batch whose consumers (the routers) are running, as written: a consumer in the
# same transaction reads a customer from here instead of querying it again. None outside.
HELD_PROFILES: ContextVar[dict[str, Profile] | None] = ContextVar("mayak_held_profiles", default=None)


@dataclass(slots=True)
class _Item:
    event: LoggedEvent
    user: Key | None = None
    anon: Key | None = None
    others: tuple[Key, ...] = ()
    owner: str | None = None
    dropped: bool = False


class ProfileBatch:
    def __init__(self, db: Database, conn: AsyncConnection, workspace_id: str, region: str, now: int):
        self.db = db
        self.sql = FastSql(db.dialect)
        self.conn = conn
        self.ws = workspace_id
        self.region = region
        self.now = now
        self.idmap: dict[Key, str] = {}
        self.new_keys: dict[Key, str] = {}
        self.profiles: dict[str, Profile] = {}
        self.parent: dict[str, str] = {}
        self.merges: list[tuple[str, str]] = []
        self.derived: list[NewEvent] = []
        self.conflicts = 0

    # -- resolution helpers ------------------------------------------------------------------

    def find(self, cid: str) -> str:
        root = cid
        while root in self.parent:
            root = self.parent[root]
        while cid != root:  # path compression
            nxt = self.parent[cid]
            self.parent[cid] = root
            cid = nxt
        return root

    def lookup(self, key: Key) -> str | None:
        cid = self.idmap.get(key)
        return None if cid is None else self.find(cid)

    def assign(self, key: Key, cid: str) -> None:
        self.idmap[key] = cid
        self.new_keys[key] = cid

    def create(self, cause: LoggedEvent) -> str:
        # Derived from the event that created it, so a replay of the log gives the same id.
        cid = derived_id("cus", cause.received_at, cause.id)
        self.profiles[cid] = Profile(id=cid, created_at=cause.received_at, new=True, dirty=True)
        return cid

    def merge(self, a: str, b: str, cause: LoggedEvent) -> str:
        pa, pb = self.profiles[a], self.profiles[b]
        if pa.identified != pb.identified:
            survivor, loser = (pa, pb) if pa.identified else (pb, pa)
        else:
            survivor, loser = (pa, pb) if (pa.created_at, pa.id) <= (pb.created_at, pb.id) else (pb, pa)
        survivor.absorb(loser)
        loser.merged_into = survivor.id
        loser.dirty = True
        self.parent[loser.id] = survivor.id
        self.merges.append((loser.id, survivor.id))
        self.derived.append(
            NewEvent(
                workspace_id=self.ws,
                type="customer.merged",
                name=None,
                timestamp=self.now,
                received_at=self.now,
                source="pipeline",
                customer_id=survivor.id,
                dedup_key=f"merge:{loser.id}",
                payload={"survivor_id": survivor.id, "merged_id": loser.id, "cause_event_id": cause.id},
            )
        )
        return survivor.id

    def conflict(self, key: Key, owner: str, holder: str, cause: LoggedEvent) -> None:
        self.conflicts += 1
        self.derived.append(
            NewEvent(
                workspace_id=self.ws,
                type="identity.conflict",
                name=None,
                timestamp=self.now,
                received_at=self.now,
                source="pipeline",
                customer_id=owner,
                dedup_key=f"conflict:{cause.id}:{key[0]}:{key[1]}"[:300],
                payload={
                    "kind": key[0],
                    "value": key[1],
                    "held_by": holder,
                    "event_customer_id": owner,
                    "cause_event_id": cause.id,
                },
            )
        )

    # -- loading -----------------------------------------------------------------------------

    async def load(self, logged: list[LoggedEvent], check_suppressions: bool) -> list[_Item]:
        items: list[_Item] = []
        keys: set[Key] = set()
        targets: set[str] = set()
        for ev in logged:
            item = _Item(ev)
            if ev.type in SEGMENT_TYPES and ev.source in RESOLVED_SOURCES:
                user, anon, others = event_keys(ev.payload, self.region)
                item.user, item.anon, item.others = user, anon, tuple(others)
                for key in (user, anon, *others):
                    if key is None:
                        continue
                    if key[0] == "previous_id":
                        keys.add((USER_ID, key[1]))
                        keys.add((ANONYMOUS_ID, key[1]))
                    else:
                        keys.add(key)
            elif ev.customer_id:
                targets.add(ev.customer_id)
                if ev.type == IDENTITY_LINKED:
                    kind, value = ev.payload.get("kind"), ev.payload.get("value")
                    if isinstance(kind, str) and isinstance(value, str):
                        item.others = ((kind, value),)
                        keys.add((kind, value))
            items.append(item)
        if check_suppressions and keys:
            await self._apply_suppressions(items, keys)
        by_kind: dict[str, list[str]] = {}
        owners: dict[Key, int] = {}  # identity -> its customer's number
        for kind, value in keys:
            by_kind.setdefault(kind, []).append(value)
        sql = self.sql
        if not sql.pg:
            for kind, values in by_kind.items():
                found = await sql.fetch(self.conn, SQLITE_IDENTITIES, (sql.list_param(values), self.ws, kind))
                for found_value, number in found:
                    owners[(kind, found_value)] = number
        elif by_kind:
            # one round trip for every kind (each part the same index scan as on its own)
            kinds = list(by_kind)
            query = " UNION ALL ".join(
                f"SELECT {i}, value, customer_key FROM identities WHERE workspace_id = $1"
                f" AND kind = ${2 * i + 2} AND value {sql.in_list(2 * i + 3)}"
                for i in range(len(kinds))
            )
            params: list[Any] = [self.ws]
            for kind in kinds:
                params += [kind, sql.list_param(by_kind[kind])]
            for part, found_value, number in await sql.fetch(self.conn, query, params):
                owners[(kinds[part], found_value)] = number
        by_key = await self._load_profiles(set(owners.values()), targets)
        for key, number in owners.items():
            profile = by_key.get(number)
            if profile is not None:
                self.idmap[key] = profile.id
        return items

    async def _apply_suppressions(self, items: list[_Item], keys: set[Key]) -> None:
        hashes = {key: suppression_hash(self.ws, key) for key in keys}
        sql = self.sql
        rows = await sql.fetch(
            self.conn,
            f"SELECT hash FROM suppressions WHERE workspace_id = {sql.p(1)} AND hash {sql.in_list(2)}",
            (self.ws, sql.list_param(list(set(hashes.values())))),
        )
        found = {r[0] for r in rows}
        if not found:
            return
        for item in items:
            for key in (item.user, item.anon, *item.others):
                if key is None:
                    continue
                candidates = [(USER_ID, key[1]), (ANONYMOUS_ID, key[1])] if key[0] == "previous_id" else [key]
                if any(hashes.get(k) in found for k in candidates):
                    item.dropped = True
                    break

    async def _load_profiles(self, numbers: set[int], ids: set[str]) -> dict[int, Profile]:
        """Load the profiles with these numbers (found through identities: one search of the
        table by its row id) and public ids (named by events), and the survivors they were merged
        into; returns the profiles by number."""
        sql = self.sql
        # JSON columns come back as text on both dialects (decoded lazily, only where a rule reads them)
        columns = PROFILE_TEXT_COLUMNS if sql.pg else PROFILE_COLUMNS
        select = f"SELECT {columns} FROM customers WHERE workspace_id = {sql.p(1)} AND"
        by_key: dict[int, Profile] = {}
        rows: list[Any] = []
        if numbers:
            listed = sql.list_param(list(numbers))
            if sql.pg:
                by_number = f"{select} key {sql.in_list(2, 'bigint')}"
                rows = await sql.fetch(self.conn, by_number, (self.ws, listed))
            else:
                rows = await sql.fetch(self.conn, SQLITE_PROFILES_BY_KEY, (listed, self.ws))
        pending = {cid for cid in ids if cid not in self.profiles}
        while rows or pending:
            if pending:
                rows += await sql.fetch(
                    self.conn, f"{select} id {sql.in_list(2)}", (self.ws, sql.list_param(list(pending)))
                )
            pending = set()
            for row in rows:
                profile = self.profiles.get(row[1]) or Profile.from_tuple(row)
                self.profiles[profile.id] = by_key[profile.key] = profile
                if profile.merged_into:
                    self.parent[profile.id] = profile.merged_into
                    if profile.merged_into not in self.profiles:
                        pending.add(profile.merged_into)
            rows = []
        return by_key

    # -- processing --------------------------------------------------------------------------

    def process(self, items: list[_Item]) -> None:
        for item in items:
            if item.dropped:
                continue
            ev = item.event
            if ev.type in SEGMENT_TYPES and ev.source in RESOLVED_SOURCES:
                item.owner = self._resolve(item)
                self._apply_segment(item.owner, ev)
            elif ev.customer_id:
                if ev.customer_id not in self.profiles:
                    item.dropped = ev.source != "pipeline"  # erased or unknown target
                    item.owner = None if item.dropped else ev.customer_id
                    continue
                item.owner = self.find(ev.customer_id)
                if ev.type in ADMIN_TYPES:
                    self._apply_admin(item.owner, ev)
                elif ev.type == IDENTITY_LINKED and item.others:
                    item.owner = self._link(item.owner, item.others[0], ev)

    def _resolve(self, item: _Item) -> str:
        ev = item.event
        owner: str | None = None
        rest: list[Key] = list(item.others)
        if item.user is not None:
            owner = self.lookup(item.user)
            if owner is None:
                anon_owner = self.lookup(item.anon) if item.anon else None
                if anon_owner is not None and not self.profiles[anon_owner].identified:
                    owner = anon_owner
                else:
                    owner = self.create(ev)
                self.assign(item.user, owner)
                self.profiles[owner].identified = True
                self.profiles[owner].dirty = True
            if item.anon is not None:
                rest.insert(0, item.anon)
        else:
            # An anonymous event, or a channel event that carries only its channel identity.
            first = item.anon if item.anon is not None else rest.pop(0)
            owner = self.lookup(first)
            if owner is None:
                owner = self.create(ev)
                self.assign(first, owner)
        for key in rest:
            if key[0] == "previous_id":  # alias: the earlier id is a user id if we know one, else anonymous
                as_user = (USER_ID, key[1])
                key = as_user if self.lookup(as_user) is not None else (ANONYMOUS_ID, key[1])
            holder = self.lookup(key)
            if holder is None:
                self.assign(key, owner)
            elif holder != owner:
                if self.profiles[owner].identified and self.profiles[holder].identified:
                    self.conflict(key, owner, holder, ev)
                else:
                    owner = self.merge(owner, holder, ev)
        return owner

    def _link(self, owner: str, key: Key, ev: LoggedEvent) -> str:
        """Give ``key`` to ``owner`` (a deep link proved the address belongs to them)."""
        holder = self.lookup(key)
        if holder is None:
            self.assign(key, owner)
        elif holder != owner:
            if self.profiles[owner].identified and self.profiles[holder].identified:
                self.conflict(key, owner, holder, ev)
            else:
                owner = self.merge(owner, holder, ev)
        return owner

    def _apply_segment(self, cid: str, ev: LoggedEvent) -> None:
        profile = self.profiles[cid]
        stamp = [ev.timestamp, ev.seq]
        context = ev.payload.get("context")
        profile.observe(ev.timestamp, context if isinstance(context, dict) else None, stamp)
        if ev.type == "identify":
            traits = ev.payload.get("traits")
            if isinstance(traits, dict) and traits:
                profile.set_traits(traits, stamp, f"event:{ev.actor or ev.source}")
        elif ev.type == "group":
            profile.join_group(str(ev.payload.get("groupId")))

    def _apply_admin(self, cid: str, ev: LoggedEvent) -> None:
        profile = self.profiles[cid]
        stamp = [ev.timestamp, ev.seq]
        source = f"admin:{ev.actor}"
        body = ev.payload
        if ev.type == "customer.traits_set":
            profile.set_traits(body.get("traits") or {}, stamp, source)
        elif ev.type == "customer.consents_set":
            profile.set_consents(body.get("consents") or {}, stamp, source)
        elif ev.type == "customer.preferences_set":
            profile.set_preferences(body.get("preferences") or {}, stamp)
        elif ev.type == "customer.stage_set":
            profile.set_stage(str(body["stage"]), ev.timestamp, stamp)

    # -- writing -----------------------------------------------------------------------------

    async def number_new(self) -> None:
        """Give the batch's new profiles their numbers (before ``attribute``: events and identities
        point at customers by number)."""
        new = [profile for profile in self.profiles.values() if profile.new and not profile.key]
        if new:
            numbers = await reserve_numbers(self.db, self.conn, "customers", "key", len(new))
            for profile, number in zip(new, numbers, strict=True):
                profile.key = number

    async def write_state(self) -> None:
        """Write what resolution changed: merges (moving the losers' rows), identities, profiles."""
        conn, ws = self.conn, self.ws
        for loser, _ in self.merges:
            survivor = self.find(loser)
            if self.profiles[loser].new:
                continue
            before, after = self.profiles[loser].key, self.profiles[survivor].key
            for table in KEYED_TABLES:
                await conn.execute(
                    table.update()
                    .where(table.c.workspace_id == ws, table.c.customer_key == before)
                    .values(customer_key=after)
                )
            for table in CUSTOMER_TABLES:
                await conn.execute(
                    table.update()
                    .where(table.c.workspace_id == ws, table.c.customer_id == loser)
                    .values(customer_id=survivor)
                )
            await conn.execute(
                customers.update()
                .where(customers.c.workspace_id == ws, customers.c.merged_into == loser)
                .values(merged_into=survivor)
            )
        sql = self.sql
        if self.new_keys:
            insert = "INSERT INTO identities (workspace_id, kind, value, customer_key, created_at)"
            profiles = self.profiles
            identities = [
                (ws, k, v, profiles[self.find(cid)].key, self.now) for (k, v), cid in self.new_keys.items()
            ]
            if sql.pg:
                await sql.run_columns(
                    conn, f"{insert} {sql.unnest(('text', 'text', 'text', 'bigint', 'bigint'))}", identities
                )
            else:
                await sql.run_many(conn, f"{insert} VALUES ({sql.values(5)})", identities)
        if sql.pg:
            await self._write_profiles_pg()
            return
        # SQLite rewrites an index whenever an UPDATE sets one of its columns, even to the same
        # value, so merged_into (indexed) is set only on the rows whose merge target moved.
        new_rows: list[tuple[Any, ...]] = []
        moved_rows: list[tuple[Any, ...]] = []
        changed_rows: list[tuple[Any, ...]] = []
        observed_rows: list[tuple[Any, ...]] = []  # the narrow update (binds and writes less)
        for profile in self.profiles.values():
            if profile.merged_into and profile.id in self.parent:
                profile.merged_into = self.find(profile.id)
            if profile.new:
                new_rows.append((ws, *profile.to_tuple(self.now)))
            elif profile.dirty and profile.observed_only():
                observed_rows.append(profile.observed_tuple(self.now))
            elif profile.dirty:
                values = profile.to_tuple(self.now)
                # by number (the row id: one B-tree search); the public id never changes
                if profile.merged_into != profile.stored_merged_into:
                    moved_rows.append((*values[2:], values[0]))
                else:
                    changed_rows.append((*values[3:], values[0]))
        if new_rows:
            await sql.run_many(
                conn,
                f"INSERT INTO customers (workspace_id, {PROFILE_COLUMNS}) VALUES "
                f"({sql.values(len(new_rows[0]), [i + 1 for i in JSON_POSITIONS])})",
                new_rows,
            )
        names = PROFILE_COLUMNS.split(", ")
        for rows, columns in (
            (moved_rows, names[2:]),
            (changed_rows, names[3:]),
            (observed_rows, OBSERVED_COLUMNS),
        ):
            if rows:
                assignments = ", ".join(f"{name} = ?" for name in columns)
                await sql.run_many(conn, f"UPDATE customers SET {assignments} WHERE key = ?", rows)

    async def _write_profiles_pg(self) -> None:
        """PostgreSQL: new profiles in one INSERT over column arrays, changed ones row by row; a JSON
        column no rule touched is sent as NULL and keeps its stored value (the server neither
        receives nor re-parses it)."""
        new_rows, changed_rows = [], []
        for profile in self.profiles.values():
            if profile.merged_into and profile.id in self.parent:
                profile.merged_into = self.find(profile.id)
            if profile.new:
                new_rows.append((self.ws, *profile.to_tuple(self.now)))
            elif profile.dirty:
                changed_rows.append(profile.to_tuple(self.now, untouched_as_null=True))
        sql = self.sql
        if new_rows:
            await sql.run_columns(
                self.conn,
                f"INSERT INTO customers (workspace_id, {PROFILE_COLUMNS}) "
                f"{sql.unnest(('text', *PROFILE_TYPES))}",
                new_rows,
            )
        if changed_rows:
            # One statement joining the column arrays on the primary key. Left to itself the planner
            # may hash the whole table (dead row versions included) for a large group, so nested
            # loops over the key are made its only choice for this statement.
            names = PROFILE_COLUMNS.split(", ")
            assignments = ", ".join(
                f"{name} = coalesce(u.c{i}::jsonb, c.{name})" if i in JSON_POSITIONS else f"{name} = u.c{i}"
                for i, name in enumerate(names)
                if i > 1  # not the number or the public id
            )
            rows = sql.unnest_rows(PROFILE_TYPES)
            await sql.run(self.conn, PG_JOIN_BY_KEY_ONLY)
            await sql.run_columns(
                self.conn,
                f"UPDATE customers AS c SET {assignments} FROM {rows} WHERE c.key = u.c0",
                changed_rows,
            )
            await sql.run(self.conn, PG_JOIN_DEFAULTS)

    async def store_attribution(self, updates: list[tuple[int | None, int]], dropped: list[int]) -> None:
        """For events already in the log: record their customer's number, delete the suppressed ones."""
        sql = self.sql
        if updates:
            await sql.run_many(
                self.conn, f"UPDATE events SET customer_key = {sql.p(1)} WHERE seq = {sql.p(2)}", updates
            )
        if dropped:
            await sql.run_many(
                self.conn, f"DELETE FROM events WHERE seq = {sql.p(1)}", [(seq,) for seq in dropped]
            )

    def attribute(
        self, items: list[_Item]
    ) -> tuple[list[LoggedEvent], list[tuple[int | None, int]], list[int]]:
        """Give every kept event its final customer (after ``number_new``); returns (kept events,
        changed attributions as (customer number, seq), seqs of dropped events)."""
        updates: list[tuple[int | None, int]] = []
        dropped: list[int] = []
        out: list[LoggedEvent] = []
        profiles = self.profiles
        for item in items:
            ev = item.event
            if item.dropped:
                dropped.append(ev.seq)
                continue
            number = None
            if item.owner:
                ev.customer_id = owner = self.find(item.owner)
                profile = profiles.get(owner)  # a pipeline record may name a customer since erased
                number = profile.key if profile is not None else None
            if number != ev.customer_key:
                updates.append((number, ev.seq))
                ev.customer_key = number
            out.append(ev)
        return out, updates, dropped


# SQLite: a batch's identities and profiles, one search of the table's key for each value of the list
# parameter (a JSON array), in the list's order. Written as a join that starts from the list: for
# ``IN (SELECT value FROM json_each(?))`` SQLite first builds a temporary index of the list, which
# cost more than it saved (900 values against a copy of a 1,000,000-event benchmark database, warm:
# 1.16-1.22 against 1.41-1.47 µs a value for identities, 2.20-2.28 against 2.40-2.49 for profiles;
# sorting the list first saved nothing).
SQLITE_IDENTITIES = (
    "SELECT j.value, i.customer_key FROM json_each(?) AS j CROSS JOIN identities AS i"
    " WHERE i.workspace_id = ? AND i.kind = ? AND i.value = j.value"
)
SQLITE_PROFILES_BY_KEY = (
    f"SELECT {', '.join('c.' + name for name in PROFILE_COLUMNS.split(', '))}"
    " FROM json_each(?) AS j CROSS JOIN customers AS c WHERE c.key = j.value AND c.workspace_id = ?"
)

# PostgreSQL, around a statement that joins column arrays to a large table on its key: only a
# nested loop over the key, then the session's defaults again (RESET inside a transaction).
PG_JOIN_BY_KEY_ONLY = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
PG_JOIN_DEFAULTS = "RESET enable_hashjoin; RESET enable_mergejoin"

# Events as consumers read them: the customer as its public id (the attributed customer's, else the
# one the event named), then its number. FROM events AS e.
EVENT_COLUMNS = (
    "e.seq, e.id, e.workspace_id, e.type, e.name, "
    "coalesce((SELECT c.id FROM customers AS c WHERE c.key = e.customer_key), e.customer_id), "
    "e.customer_key, e.timestamp, e.received_at, e.source, e.actor, e.payload"
)


def logged_from_tuple(row: Any) -> LoggedEvent:
    seq, evt_id, ws_id, etype, name, customer_id, key, ts, received, source, actor, payload = row
    return LoggedEvent(
        seq, evt_id, ws_id, etype, name, customer_id, ts, received, source, actor, orjson.loads(payload), key
    )
