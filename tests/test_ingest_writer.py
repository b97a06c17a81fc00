"""The group-committing writer: a 2xx means committed, and one request cannot fail its neighbours."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from mayak.db.schema import events
from mayak.eventlog import APPEND_LOCK, AppendResult, NewEvent
from mayak.ingest import writer as writer_module
from mayak.platform import Mayak
from mayak.timeutil import now_ms


def event(ws_id: str, user: str, message_id: str | None = None) -> NewEvent:
    now = now_ms()
    return NewEvent(
        workspace_id=ws_id,
        type="track",
        name="E",
        timestamp=now,
        received_at=now,
        payload={"type": "track", "userId": user, "event": "E"},
        dedup_key=f"mid:{message_id}" if message_id else None,
    )


async def stored_users(mayak: Mayak, ws_id: str) -> list[str]:
    async with mayak.db.read() as conn:
        rows = await conn.execute(
            sa.select(events.c.payload).where(events.c.workspace_id == ws_id).order_by(events.c.seq)
        )
        return [orjson.loads(r[0])["userId"] for r in rows]


async def test_concurrent_requests_share_commits(mayak: Mayak, ws: dict[str, Any], monkeypatch: Any) -> None:
    calls: list[int] = []
    real = writer_module.deduplicate

    async def counting(
        db: Any, conn: Any, batch: Sequence[NewEvent], **kw: Any
    ) -> tuple[AppendResult, list[NewEvent]]:
        calls.append(len(batch))
        return await real(db, conn, batch, **kw)

    monkeypatch.setattr(writer_module, "deduplicate", counting)
    results = await asyncio.gather(*(mayak.writer.submit([event(ws["id"], f"u{i}")]) for i in range(50)))
    assert [r.accepted for r in results] == [1] * 50
    assert sum(calls) == 50 and len(calls) < 50, calls
    assert len(await stored_users(mayak, ws["id"])) == 50


async def test_one_failing_request_does_not_fail_its_group(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    real = writer_module.deduplicate
    calls: list[int] = []

    async def fragile(
        db: Any, conn: Any, batch: Sequence[NewEvent], **kw: Any
    ) -> tuple[AppendResult, list[NewEvent]]:
        calls.append(len(batch))
        result = await real(db, conn, batch, **kw)  # writes first, so the rollback really has to undo it
        if any(ev.payload["userId"] == "poison" for ev in batch):
            raise RuntimeError("the database refused a value")
        return result

    monkeypatch.setattr(writer_module, "deduplicate", fragile)
    good = [event(ws["id"], f"good{i}", f"m{i}") for i in range(3)]
    outcomes = await asyncio.gather(
        mayak.writer.submit(good[:2]),
        mayak.writer.submit([event(ws["id"], "poison", "m-poison")]),
        mayak.writer.submit(good[2:]),
        return_exceptions=True,
    )
    assert calls[0] == 4, "the three requests were meant to share one commit"
    assert isinstance(outcomes[0], AppendResult) and outcomes[0].accepted == 2
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[2], AppendResult) and outcomes[2].accepted == 1
    assert sorted(await stored_users(mayak, ws["id"])) == ["good0", "good1", "good2"]
    # the failed request's messageId was rolled back too: a retry is not taken for a duplicate
    monkeypatch.setattr(writer_module, "deduplicate", real)
    retry = await mayak.writer.submit([event(ws["id"], "poison", "m-poison")])
    assert (retry.accepted, retry.duplicates) == (1, 0)


@pytest.mark.parametrize("n", [1, 3])
async def test_failure_reaches_every_waiter(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any, n: int
) -> None:
    async def broken(
        db: Any, conn: Any, batch: Sequence[NewEvent], **kw: Any
    ) -> tuple[AppendResult, list[NewEvent]]:
        raise RuntimeError("database down")

    monkeypatch.setattr(writer_module, "deduplicate", broken)
    outcomes = await asyncio.gather(
        *(mayak.writer.submit([event(ws["id"], f"u{i}")]) for i in range(n)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    await asyncio.wait_for(mayak.writer.flush(), 5)  # the writer is idle again, not wedged
    assert await stored_users(mayak, ws["id"]) == []


async def test_after_storing_for_a_lagging_lane_the_next_group_waits_for_it(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    """A group whose workspace's lane was behind is stored for the lane; the next group first waits
    (a bounded time) for the lane to catch up, so that it is processed inline again."""
    pipeline = mayak.pipeline
    monkeypatch.setattr(writer_module, "LANE_CATCH_UP_S", 5.0)
    real_caught_up, real_batch = pipeline._caught_up, pipeline._process_batch
    behind = [True]
    release = asyncio.Event()
    inline: list[bool] = []

    async def caught_up(conn: Any, ws_id: str) -> bool:
        if behind[0]:
            behind[0] = False
            return False  # as if the lane held the workspace at that moment
        ok = await real_caught_up(conn, ws_id)
        inline.append(ok)
        return ok

    async def slow_lane(ws_id: str) -> int:
        await release.wait()
        return await real_batch(ws_id)

    monkeypatch.setattr(pipeline, "_caught_up", caught_up)
    monkeypatch.setattr(pipeline, "_process_batch", slow_lane)
    stop = asyncio.Event()
    lane = asyncio.create_task(pipeline.run_forever(stop))
    try:
        first = await mayak.writer.submit([event(ws["id"], "u1")])
        assert first.accepted == 1 and mayak.writer._lane_owed
        second = asyncio.create_task(mayak.writer.submit([event(ws["id"], "u2")]))
        await asyncio.sleep(0.2)
        assert not second.done()  # waiting for the lane, not appending behind it
        release.set()
        assert (await asyncio.wait_for(second, 5)).accepted == 1
        assert inline == [True]  # the lane had caught up: the second group went inline
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(lane, 5)
    assert await stored_users(mayak, ws["id"]) == ["u1", "u2"]


async def test_a_lane_that_does_not_catch_up_holds_the_writer_only_briefly(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    pipeline = mayak.pipeline
    monkeypatch.setattr(writer_module, "LANE_CATCH_UP_S", 0.2)
    behind = [True]
    real_caught_up = pipeline._caught_up

    async def caught_up(conn: Any, ws_id: str) -> bool:
        if behind[0]:
            behind[0] = False
            return False
        return await real_caught_up(conn, ws_id)

    async def stuck(ws_id: str) -> int:
        await asyncio.sleep(3600)
        return 0

    monkeypatch.setattr(pipeline, "_caught_up", caught_up)
    monkeypatch.setattr(pipeline, "_process_batch", stuck)
    stop = asyncio.Event()
    lane = asyncio.create_task(pipeline.run_forever(stop))
    try:
        await mayak.writer.submit([event(ws["id"], "u1")])
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await mayak.writer.submit([event(ws["id"], "u2")])).accepted == 1
        assert 0.15 <= loop.time() - started < 2.0
    finally:
        lane.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lane


async def test_a_lane_position_is_known_before_statistics_are_refreshed(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    """``Pipeline.advanced`` records the new position before it runs an ANALYZE (which takes a
    while on large tables): meanwhile the lane's idle check must not see processed events as work."""
    pipeline = mayak.pipeline
    seen: list[int] = []

    async def refresh() -> None:
        seen.append(pipeline._positions.get(ws["id"], 0))

    monkeypatch.setattr(pipeline, "_refresh_statistics", refresh)
    monkeypatch.setattr(pipeline, "_next_analyze", 0)
    await pipeline.advanced(ws["id"], 41)
    await pipeline.close()
    assert seen == [41]


async def test_the_writer_does_not_wait_for_a_statistics_refresh(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    """The refresh (an ANALYZE, a second or two on large PostgreSQL tables) runs in the background,
    one at a time; the writer, which calls ``advanced`` after every commit, goes on meanwhile."""
    pipeline = mayak.pipeline
    release = asyncio.Event()
    runs = 0

    async def refresh() -> None:
        nonlocal runs
        runs += 1
        await release.wait()

    monkeypatch.setattr(pipeline, "_refresh_statistics", refresh)
    monkeypatch.setattr(pipeline, "_next_analyze", 0)
    await asyncio.wait_for(pipeline.advanced(ws["id"], 1), 1.0)  # returns while the refresh runs
    monkeypatch.setattr(pipeline, "_next_analyze", 0)
    assert (await mayak.writer.submit([event(ws["id"], "u9")])).accepted == 1
    await asyncio.wait_for(pipeline.advanced(ws["id"], 2), 1.0)
    await asyncio.sleep(0)
    assert runs == 1  # the second one was not started while the first ran
    release.set()
    await pipeline.close()
    assert runs == 1


@pytest.mark.contract
async def test_a_group_held_up_holds_up_the_next_and_the_log_keeps_their_order(
    mayak: Mayak, ws: dict[str, Any]
) -> None:
    """The first group waits for a key's row another transaction holds; the second, formed after
    it, must come after it in the log (a customer's next message after the one before it). A
    writer that lets a later group overtake (e.g. two transactions in flight, each settling its
    keys before queueing for the append lock) fails here."""
    if mayak.db.dialect != "postgresql":
        pytest.skip("SQLite has one writer: another connection cannot hold a row while the writer runs")
    ws_id = ws["id"]
    async with mayak.db.engine.connect() as other:
        blocker = await other.begin()
        await other.execute(
            sa.text(
                "INSERT INTO dedup_keys (workspace_number, key, seen_at) "
                "SELECT number, 'mid:first', :t FROM workspaces WHERE id = :w"
            ),
            {"w": ws_id, "t": now_ms()},
        )
        first = asyncio.create_task(mayak.writer.submit([event(ws_id, "first", "first")]))
        await asyncio.sleep(0.3)  # the first group waits for the blocker's row
        second = asyncio.create_task(mayak.writer.submit([event(ws_id, "second", "second")]))
        await asyncio.sleep(0.3)
        assert not first.done() and not second.done()
        await blocker.rollback()
    assert (await first).accepted == 1 and (await second).accepted == 1
    assert await stored_users(mayak, ws_id) == ["first", "second"]


async def test_under_load_a_small_group_waits_a_moment_to_fill(mayak: Mayak, ws: dict[str, Any]) -> None:
    """A group less than half the size of the last one waits (at most ``linger_s``) for more,
    on both backends: a few web-chat turns per transaction paid its fixed costs for little."""
    writer = mayak.writer
    expected = (
        writer_module.GROUP_LINGER_S
        if mayak.db.dialect == "postgresql"
        else writer_module.SQLITE_GROUP_LINGER_S
    )
    assert writer.linger_s == expected > 0
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[AppendResult] = loop.create_future()
    saved = writer._queue, writer._last_group
    try:
        writer._last_group = 10
        writer._queue = [([event(ws["id"], "a")], pending)]  # 1 of the last 10: wait for more
        started = loop.time()
        await writer._fill()
        assert loop.time() - started >= writer.linger_s * 0.9
        writer._queue = [([event(ws["id"], f"u{i}") for i in range(5)], pending)]  # half: go at once
        started = loop.time()
        await writer._fill()
        assert loop.time() - started < writer.linger_s
        writer._last_group = 1  # light load: a single event goes at once too
        writer._queue = [([event(ws["id"], "b")], pending)]
        started = loop.time()
        await writer._fill()
        assert loop.time() - started < writer.linger_s
    finally:
        writer._queue, writer._last_group = saved


async def test_a_groups_answers_wait_until_the_next_group_holds_its_append_lock(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    """PostgreSQL: when the next group is ready, a committed group's requests are answered once
    that group holds its append lock, so the requests woken by the answers do not delay the
    lock's round trip. Forced on here so both backends run the mechanism."""
    writer = mayak.writer
    assert writer.hold_answers == (mayak.db.dialect == "postgresql")
    writer.hold_answers = True
    ws_id = ws["id"]
    order: list[str] = []
    real_lock = mayak.db.lock_workspace
    first_locked, go_on = asyncio.Event(), asyncio.Event()

    async def lock(conn: Any, workspace_id: str, purpose: str) -> None:
        await real_lock(conn, workspace_id, purpose)
        if purpose == APPEND_LOCK:
            order.append("lock")
            if order.count("lock") == 1:
                first_locked.set()
                await go_on.wait()  # the first group waits here until the second request is queued

    monkeypatch.setattr(mayak.db, "lock_workspace", lock)

    async def submit(name: str) -> AppendResult:
        result = await writer.submit([event(ws_id, f"{name}{i}") for i in range(2)])
        order.append(f"answer {name}")
        return result

    first = asyncio.create_task(submit("a"))
    await first_locked.wait()
    second = asyncio.create_task(submit("b"))
    await asyncio.sleep(0.01)  # queued: as many events as the group before, so it is held for
    go_on.set()
    assert (await first).accepted == 2 and (await second).accepted == 2
    assert order == ["lock", "lock", "answer a", "answer b"]
    assert await stored_users(mayak, ws_id) == ["a0", "a1", "b0", "b1"]


async def test_held_answers_still_go_out_when_the_next_group_fails(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    writer = mayak.writer
    writer.hold_answers = True
    ws_id = ws["id"]
    real_lock = mayak.db.lock_workspace
    locks = 0
    first_locked, go_on = asyncio.Event(), asyncio.Event()

    async def lock(conn: Any, workspace_id: str, purpose: str) -> None:
        nonlocal locks
        if purpose == APPEND_LOCK:
            locks += 1
            if locks == 2:
                raise RuntimeError("the second group fails before it holds the lock")
        await real_lock(conn, workspace_id, purpose)
        if purpose == APPEND_LOCK and locks == 1:
            first_locked.set()
            await go_on.wait()

    monkeypatch.setattr(mayak.db, "lock_workspace", lock)
    first = asyncio.create_task(writer.submit([event(ws_id, "a0"), event(ws_id, "a1")]))
    await first_locked.wait()
    second = asyncio.create_task(writer.submit([event(ws_id, "b0"), event(ws_id, "b1")]))
    await asyncio.sleep(0.01)
    go_on.set()
    assert (await asyncio.wait_for(first, 5)).accepted == 2  # committed: answered despite the failure
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(second, 5)
    assert await stored_users(mayak, ws_id) == ["a0", "a1"]


async def test_held_answers_do_not_wait_for_a_lagging_lane(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    """A group stored for a lane that is behind makes the next group wait for the lane (up to a
    second): its own answers go out at once, not after that wait."""
    writer, pipeline = mayak.writer, mayak.pipeline
    writer.hold_answers = True
    monkeypatch.setattr(writer_module, "LANE_CATCH_UP_S", 5.0)
    ws_id = ws["id"]
    real_caught_up, real_batch = pipeline._caught_up, pipeline._process_batch
    real_lock = mayak.db.lock_workspace
    behind = [True]
    first_locked, go_on, release_lane = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def caught_up(conn: Any, workspace_id: str) -> bool:
        if behind[0]:
            behind[0] = False
            return False  # the first group is stored for the lane
        return await real_caught_up(conn, workspace_id)

    async def slow_lane(workspace_id: str) -> int:
        await release_lane.wait()
        return await real_batch(workspace_id)

    async def lock(conn: Any, workspace_id: str, purpose: str) -> None:
        await real_lock(conn, workspace_id, purpose)
        if purpose == APPEND_LOCK and not first_locked.is_set():
            first_locked.set()
            await go_on.wait()

    monkeypatch.setattr(pipeline, "_caught_up", caught_up)
    monkeypatch.setattr(pipeline, "_process_batch", slow_lane)
    monkeypatch.setattr(mayak.db, "lock_workspace", lock)
    stop = asyncio.Event()
    lane = asyncio.create_task(pipeline.run_forever(stop))
    try:
        first = asyncio.create_task(writer.submit([event(ws_id, "u1")]))
        await first_locked.wait()
        second = asyncio.create_task(writer.submit([event(ws_id, "u2")]))
        await asyncio.sleep(0.01)
        go_on.set()
        assert (await asyncio.wait_for(first, 1)).accepted == 1  # while the writer waits for the lane
        assert not second.done()
        release_lane.set()
        assert (await asyncio.wait_for(second, 5)).accepted == 1
    finally:
        go_on.set()
        release_lane.set()
        stop.set()
        await asyncio.wait_for(lane, 5)
    assert await stored_users(mayak, ws_id) == ["u1", "u2"]


def test_the_writers_duty_cycle_tells_a_busy_loop_from_a_quiet_one(mayak: Mayak) -> None:
    """Groups built back to back (3 ms of work, 0.5 ms between them) make the writer busy within a
    few groups; groups far apart (1 ms of work every 100 ms) never do, and a quiet spell after a
    busy one brings it back down."""
    writer = mayak.writer
    at, busy = 1000.0, []
    for _ in range(8):
        busy.append(writer._busy(at, at + 0.003))
        at += 0.0035
    assert busy[0] is False and busy[-1] is True
    quiet = []
    for _ in range(12):
        at += 0.1
        quiet.append(writer._busy(at, at + 0.001))
        at += 0.001
    assert quiet[-1] is False
    fresh = writer_module.IngestWriter(mayak.db, mayak.writer.notifier, mayak.writer.metrics)
    at = 5000.0
    assert not any(fresh._busy(at + i, at + i + 0.001) for i in range(20))


@pytest.mark.contract
async def test_a_busy_writer_hands_even_a_small_commit_to_the_committer(
    mayak: Mayak, ws: dict[str, Any], monkeypatch: Any
) -> None:
    """Under load the group's commit is offloaded whatever its size (``Database.offload_commit``,
    a no-op on PostgreSQL); when the writer is quiet it is not."""
    offloaded: list[object] = []
    real = mayak.db.offload_commit

    def recording(conn: Any) -> None:
        offloaded.append(conn)
        real(conn)

    monkeypatch.setattr(mayak.db, "offload_commit", recording)
    writer = mayak.writer
    loop = asyncio.get_running_loop()
    writer._duty, writer._group_end = 0.0, loop.time() - 10
    assert (await writer.submit([event(ws["id"], "quiet")])).accepted == 1
    assert offloaded == []
    writer._duty, writer._group_end = 1.0, loop.time()
    assert (await writer.submit([event(ws["id"], "busy")])).accepted == 1
    assert len(offloaded) == 1
    assert await stored_users(mayak, ws["id"]) == ["quiet", "busy"]


def identify(ws_id: str, user: str, traits: dict[str, Any] | None = None) -> NewEvent:
    now = now_ms()
    return NewEvent(
        workspace_id=ws_id,
        type="identify",
        name=None,
        timestamp=now,
        received_at=now,
        payload={"type": "identify", "userId": user, "traits": traits or {}},
    )


async def profile_of(mayak: Mayak, ws_id: str, identity: str) -> dict[str, Any]:
    """The profile that holds ``identity`` (``kind:value``; a bare value is a user id)."""
    return await mayak.customers.find_by_identity(
        ws_id, identity if ":" in identity else f"user_id:{identity}"
    )


@pytest.mark.contract
async def test_an_event_for_a_merged_away_customer_reaches_the_survivor(
    mayak: Mayak, ws: dict[str, Any]
) -> None:
    """An event that names a customer merged away since (an admin change, say) goes to the
    survivor, whose profile the batch reads through the merged one's."""
    ws_id = ws["id"]
    now = now_ms()
    anon = NewEvent(
        workspace_id=ws_id,
        type="track",
        name="Viewed",
        timestamp=now,
        received_at=now,
        payload={"type": "track", "anonymousId": "a1", "event": "Viewed"},
    )
    await mayak.writer.submit([anon])
    await mayak.drain()
    loser = (await profile_of(mayak, ws_id, "anonymous_id:a1"))["id"]
    linked = identify(ws_id, "ann", {"plan": "basic"})
    linked.payload["anonymousId"] = "a1"
    await mayak.writer.submit([identify(ws_id, "ann", {"plan": "basic"})])
    await mayak.drain()
    await mayak.writer.submit([linked])  # a1 (anonymous) merges into ann
    await mayak.drain()
    survivor = await profile_of(mayak, ws_id, "ann")
    assert survivor["id"] != loser and loser in survivor["merged_ids"]
    change = NewEvent(
        workspace_id=ws_id,
        type="customer.traits_set",
        name=None,
        timestamp=now_ms(),
        received_at=now_ms(),
        source="admin",
        actor="test",
        customer_id=loser,
        payload={"traits": {"city": "Leeds"}},
    )
    await mayak.writer.submit([change])
    await mayak.drain()
    assert (await profile_of(mayak, ws_id, "ann"))["traits"] == {"plan": "basic", "city": "Leeds"}
