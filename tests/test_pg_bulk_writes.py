"""The bulk write paths (column arrays, COPY, the one-statement dedup on PostgreSQL) keep behaviour:
repeats inside one batch and keys seen before, profile fields no rule touched, storage errors."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mayak.db.fastsql import FastSql
from mayak.errors import StorageError
from mayak.platform import Mayak
from mayak.timeutil import now_ms
from tests.conftest import admin, write_auth

pytestmark = [pytest.mark.contract, pytest.mark.both_modes]


async def _batch(client: Any, ws: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    r = await client.post("/v1/batch", json={"batch": events}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_repeats_in_a_batch_and_keys_seen_before(client, mayak: Mayak, ws) -> None:
    first = await _batch(client, ws, [{"type": "track", "userId": "u1", "event": "A", "messageId": "m1"}])
    assert first["accepted"] == 1
    second = await _batch(
        client,
        ws,
        [
            {"type": "track", "userId": "u1", "event": "B", "messageId": "m2"},
            {"type": "track", "userId": "u1", "event": "C", "messageId": "m1"},  # seen before
            {"type": "track", "userId": "u1", "event": "D", "messageId": "m2"},  # repeat in batch
            {"type": "track", "userId": "u1", "event": "E"},  # no messageId: never a duplicate
            {"type": "track", "userId": "u1", "event": "F", "messageId": "m3"},
        ],
    )
    assert (second["accepted"], second["duplicates"]) == (3, 2)
    await mayak.drain()
    async with mayak.db.read() as conn:
        names = [r[0] for r in await conn.execute(sa.text("SELECT name FROM events ORDER BY seq"))]
    assert names == ["A", "B", "E", "F"]


async def test_fields_no_rule_touched_are_kept(client, mayak: Mayak, ws) -> None:
    traits = {"email": "ann@example.com", "plan": "pro"}
    await _batch(client, ws, [{"type": "identify", "userId": "u1", "traits": traits, "messageId": "i1"}])
    await mayak.drain()
    # track events only move last_seen and the context: traits and consents stay as stored
    await _batch(
        client,
        ws,
        [
            {"type": "track", "userId": "u1", "event": "X", "context": {"locale": "en-GB"}},
            {"type": "track", "userId": "u1", "event": "Y"},
        ],
    )
    await mayak.drain()
    r = await client.get("/v1/customers", params={"identity": "user_id:u1"}, headers=admin(ws))
    assert r.status_code == 200, r.text
    person = r.json()
    assert person["traits"] == traits
    assert person["context"]["locale"] == "en-GB"


async def test_storage_errors_are_sqlalchemy_errors(mayak: Mayak, ws) -> None:
    """Driver-level SQL fails as the SQLAlchemy path does, so ``write()`` reports a StorageError."""
    sql = FastSql(mayak.db.dialect)
    with pytest.raises(StorageError) as caught:
        async with mayak.db.write() as conn:
            row = (await mayak.db.workspace_number(conn, ws["id"]), "k1", 1)
            insert = f"INSERT INTO dedup_keys (workspace_number, key, seen_at) VALUES ({sql.values(3)})"
            await sql.run_many(conn, insert, [row, row])
    assert isinstance(caught.value.__cause__, IntegrityError)


def _record_customer_updates(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, every UPDATE customers statement run (profile writes go through run_many)."""
    updates: list[str] = []
    run_many = FastSql.run_many

    async def recording(self: FastSql, conn: Any, sql: str, rows: Any) -> None:
        if sql.startswith("UPDATE customers "):
            updates.append(sql)
        await run_many(self, conn, sql, rows)

    monkeypatch.setattr(FastSql, "run_many", recording)
    return updates


async def test_a_profile_update_leaves_the_indexed_merge_column_alone(
    client, mayak: Mayak, ws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rewrites an index whenever an UPDATE names one of its columns, even with the same value:
    an ordinary event's profile update must not name merged_into; a merge must still move it."""
    if mayak.db.dialect != "sqlite":
        pytest.skip("SQLite's statement shape")
    await _batch(client, ws, [{"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}])
    await _batch(client, ws, [{"type": "track", "anonymousId": "a1", "event": "Viewed"}])
    await mayak.drain()
    updates = _record_customer_updates(monkeypatch)
    await _batch(client, ws, [{"type": "track", "userId": "u1", "event": "Viewed"}])
    await mayak.drain()
    assert updates and not any("merged_into" in sql for sql in updates)
    updates.clear()
    await _batch(client, ws, [{"type": "alias", "userId": "u1", "previousId": "a1"}])
    await mayak.drain()
    assert any("merged_into" in sql for sql in updates)
    r = await client.get("/v1/customers", params={"identity": "anonymous_id:a1"}, headers=admin(ws))
    assert r.status_code == 200, r.text


async def test_an_event_that_only_touches_context_and_time_updates_only_those(
    client, mayak: Mayak, ws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a profile that an event changed only by observing it (context, last seen) is written
    by the narrow UPDATE, and keeps everything else; a trait change still writes the whole row."""
    if mayak.db.dialect != "sqlite":
        pytest.skip("SQLite's statement shape")
    traits = {"plan": "pro", "email": "ann@example.com"}
    first = "2021-01-02T03:04:05.000Z"
    await _batch(client, ws, [{"type": "identify", "userId": "u1", "traits": traits, "timestamp": first}])
    await mayak.drain()
    before = (await client.get("/v1/customers", params={"identity": "user_id:u1"}, headers=admin(ws))).json()
    updates = _record_customer_updates(monkeypatch)
    later = "2022-01-02T03:04:05.000Z"
    seen = {"type": "track", "userId": "u1", "event": "Viewed", "timestamp": later}
    await _batch(client, ws, [seen | {"context": {"locale": "de-DE", "timezone": "Europe/Berlin"}}])
    await mayak.drain()
    assert updates == [
        "UPDATE customers SET context = ?, first_seen = ?, last_seen = ?, updated_at = ? WHERE key = ?"
    ]
    after = (await client.get("/v1/customers", params={"identity": "user_id:u1"}, headers=admin(ws))).json()
    assert before["first_seen"] == before["last_seen"] == first
    assert after["last_seen"] == later and after["first_seen"] == first
    assert (after["context"]["locale"], after["context"]["timezone"]) == ("de-DE", "Europe/Berlin")
    assert after["traits"] == traits and after["identified"] and after["stage"] == before["stage"]
    updates.clear()
    await _batch(client, ws, [{"type": "identify", "userId": "u1", "traits": {"plan": "max"}}])
    await mayak.drain()
    assert len(updates) == 1 and "traits = ?" in updates[0]
    after = (await client.get("/v1/customers", params={"identity": "user_id:u1"}, headers=admin(ws))).json()
    assert after["traits"] == traits | {"plan": "max"} and after["context"]["locale"] == "de-DE"


async def test_many_changed_profiles_in_one_group_each_get_their_own_values(client, mayak: Mayak, ws) -> None:
    """On PostgreSQL the changed profiles of a group are written by one UPDATE joined to column
    arrays (with only nested loops allowed for it): every row gets its own values, and the planner
    settings are the session's defaults again for the rest of the transaction."""
    people = [f"u{i}" for i in range(40)]
    await _batch(client, ws, [{"type": "identify", "userId": u, "traits": {"n": 0}} for u in people])
    await mayak.drain()
    await _batch(
        client, ws, [{"type": "identify", "userId": u, "traits": {"n": i}} for i, u in enumerate(people)]
    )
    await mayak.drain()
    for i in (0, 17, 39):
        r = await client.get("/v1/customers", params={"identity": f"user_id:u{i}"}, headers=admin(ws))
        assert r.status_code == 200, r.text
        assert r.json()["traits"] == {"n": i}
    if mayak.db.dialect == "postgresql":
        from mayak.pipeline.batch import PG_JOIN_BY_KEY_ONLY, PG_JOIN_DEFAULTS

        sql = FastSql(mayak.db.dialect)
        async with mayak.db.write() as conn:
            await sql.run(conn, PG_JOIN_BY_KEY_ONLY)
            assert (await sql.fetch(conn, "SHOW enable_hashjoin"))[0][0] == "off"
            await sql.run(conn, PG_JOIN_DEFAULTS)
            assert (await sql.fetch(conn, "SHOW enable_hashjoin"))[0][0] == "on"
            assert (await sql.fetch(conn, "SHOW enable_mergejoin"))[0][0] == "on"


async def test_the_lanes_idle_check_reads_the_index_end_not_the_table(client, mayak: Mayak, ws) -> None:
    """``Pipeline._has_work`` says whether a workspace has events past the lane's position. On
    PostgreSQL its query must not be planned as a table scan as a generic prepared statement: the
    lane polls it, and "any row past the cursor, LIMIT 1" was a sequential scan of the whole log
    whenever the lane was caught up."""
    pipeline = mayak.pipeline
    await _batch(client, ws, [{"type": "track", "userId": "u1", "event": "A"}])
    await mayak.drain()
    async with mayak.db.read() as conn:
        last = (await conn.execute(sa.text("SELECT max(seq) FROM events"))).scalar()
    asked: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("SELECT"):  # not the BEGIN of a SQLite read
            asked.append(statement)

    sa.event.listen(mayak.db.engine.sync_engine, "before_cursor_execute", record)
    try:
        pipeline._positions[ws["id"]] = int(last)
        assert await pipeline._has_work(ws["id"]) is False
        pipeline._positions[ws["id"]] = int(last) - 1
        assert await pipeline._has_work(ws["id"]) is True
    finally:
        sa.event.remove(mayak.db.engine.sync_engine, "before_cursor_execute", record)
    pipeline._positions.pop(ws["id"])
    assert await pipeline._has_work(ws["id"]) is True  # never looked: go and see
    assert asked and len(set(asked)) == 1
    if mayak.db.dialect == "postgresql":
        async with mayak.db.write() as conn:  # a log of some size, with statistics
            await conn.exec_driver_sql(
                "INSERT INTO events (id, workspace_id, type, timestamp, received_at, source, payload) "
                "SELECT 'evt_' || n, 'ws_other', 'track', n, n, 'api', '{}' FROM generate_series(1, 20000) n"
            )
        async with mayak.db.read() as conn:
            await conn.exec_driver_sql("ANALYZE events")
            await conn.exec_driver_sql(f"PREPARE idle_check AS {asked[0]}")
            await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            params = "'w'" if asked[0].count("$") == 1 else "'w', 1"
            explained = await conn.exec_driver_sql(f"EXPLAIN EXECUTE idle_check({params})")
            plan = "\n".join(r[0] for r in explained)
            await conn.exec_driver_sql("DEALLOCATE idle_check")
        assert "Seq Scan" not in plan, plan


async def test_the_outbox_and_timer_polls_use_their_indexes(mayak: Mayak, ws) -> None:
    """The outbox dispatcher and the timer worker ask "is anything due?" on every poll, over a table
    holding every message and timer ever, nearly all of them sent or fired. PostgreSQL's generic plan
    for a status *parameter* was a sequential scan (30-60 ms per poll at 300,000 rows); SQLite, with
    the statistics ``PRAGMA optimize`` gathers, scanned the outbox for an OR of the two due
    conditions (4.6 ms per poll at 33,000 rows)."""
    numbers = (
        "generate_series(1, 20000) n"
        if mayak.db.dialect == "postgresql"
        else "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 20000) "
        "SELECT n FROM s)"
    )
    async with mayak.db.write() as conn:  # history of some size, with statistics
        await conn.exec_driver_sql(
            "INSERT INTO outbox (id, workspace_id, customer_id, kind, target, payload, idempotency_key, "
            "status, attempts, next_attempt_at, created_at, updated_at) SELECT 'obx_' || n, 'ws_other', "
            f"'cus_' || (n % 1000), 'webhook', 't', '{{}}', 'k' || n, 'sent', 1, n, n, n FROM {numbers}"
        )
        await conn.exec_driver_sql(
            "INSERT INTO timers (id, workspace_id, kind, key, fire_at, payload, status, created_at) "
            f"SELECT 'tmr_' || n, 'ws_other', 'k', 'key' || n, n, '{{}}', 'fired', n FROM {numbers}"
        )
        await conn.exec_driver_sql("ANALYZE outbox")  # in the committed transaction: kept
        await conn.exec_driver_sql("ANALYZE timers")
    asked: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if "_at <= " in statement and "LIMIT" in statement:  # the two "anything due?" polls
            asked.append((statement, parameters))

    sa.event.listen(mayak.db.engine.sync_engine, "before_cursor_execute", record)
    try:
        mayak.outbox.register("webhook", lambda *a: None)  # a handler, so the dispatcher polls
        assert await mayak.outbox._claim(now_ms(), 10) == []
        assert await mayak.timers.run_once() == 0
    finally:
        sa.event.remove(mayak.db.engine.sync_engine, "before_cursor_execute", record)
    assert len(asked) == 2, asked
    for statement, _ in asked:
        assert "'pending'" in statement, statement  # a constant, not a parameter
    if mayak.db.dialect == "postgresql":
        async with mayak.db.read() as conn:
            await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            for i, (statement, parameters) in enumerate(asked):
                await conn.exec_driver_sql(f"PREPARE poll{i} AS {statement}")
                values = ", ".join(str(int(v)) for v in parameters)
                plan = "\n".join(
                    r[0] for r in await conn.exec_driver_sql(f"EXPLAIN EXECUTE poll{i}({values})")
                )
                await conn.exec_driver_sql(f"DEALLOCATE poll{i}")
                assert "Seq Scan" not in plan, plan
    else:
        async with mayak.db.read() as conn:
            for statement, parameters in asked:
                plan = "\n".join(
                    str(r[-1])
                    for r in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
                )
                assert "SCAN outbox" not in plan and "SCAN timers" not in plan, plan


async def test_identities_of_every_kind_are_looked_up_in_one_statement(
    client, mayak: Mayak, ws, monkeypatch: Any
) -> None:
    """PostgreSQL: a group's identity lookup is one round trip whatever the kinds (a round trip
    costs the writer milliseconds under load); SQLite asks kind by kind (no round trips there).
    Either way every kind resolves: an anonymous visitor identified later is one profile."""
    queries: list[str] = []
    real = FastSql.fetch

    async def fetch(self: FastSql, conn: Any, sql: str, params: Any = ()) -> list[Any]:
        if "FROM identities WHERE" in sql or "JOIN identities AS i WHERE" in sql:
            queries.append(sql)
        return await real(self, conn, sql, params)

    monkeypatch.setattr(FastSql, "fetch", fetch)
    await _batch(client, ws, [{"type": "track", "anonymousId": "anon-1", "event": "Viewed"}])
    await mayak.drain()  # processed inline or by the lane
    queries.clear()
    await _batch(
        client,
        ws,
        [
            {"type": "identify", "userId": "u-1", "anonymousId": "anon-1", "traits": {"plan": "pro"}},
            {"type": "track", "userId": "u-2", "event": "Bought"},
        ],
    )
    await mayak.drain()
    if mayak.db.dialect == "postgresql":
        assert len(queries) == 1 and "UNION ALL" in queries[0]
    else:
        assert len(queries) == 2
    found = await client.get("/v1/customers", params={"identity": "anonymous_id:anon-1"}, headers=admin(ws))
    assert found.status_code == 200
    assert found.json()["traits"] == {"plan": "pro"}
    assert {i["kind"] for i in found.json()["identities"]} >= {"user_id", "anonymous_id"}
