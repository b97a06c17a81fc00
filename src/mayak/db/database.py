"""The storage port's engine: one object that hands out read and write connections.

SQLite allows one writer at a time, so every write transaction in this process goes through one
asyncio lock (the ingest writer batches many requests into each one: group commit). PostgreSQL
gets a connection pool and real concurrency; cross-process ordering there relies on advisory locks
(see ``mayak.pipeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy import create_engine, event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from mayak.db.checkpoint import Checkpointer
from mayak.db.schema import metadata
from mayak.errors import NotFound, StorageError

T = TypeVar("T")
log = structlog.get_logger("mayak.db")
AFTER_COMMIT = "mayak.after_commit"  # key in a connection's info: callbacks of the open write()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def normalise_url(url: str) -> str:
    """Accept the plain forms people type (``postgresql://``, ``sqlite:///``) and pick the async driver."""
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url


class Database:
    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "NORMAL",
        sqlite_cache_mb: int = 16,
        sqlite_mmap_mb: int = 128,
        pool_size: int = 10,
        inline_writes: bool = True,
    ):
        self.url = normalise_url(url)
        self._workspace_numbers: dict[str, int] = {}  # they never change
        self.dialect = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        self.memory = self.dialect == "sqlite" and (":memory:" in self.url or self.url.endswith("///"))
        kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
        self.checkpointer: Checkpointer | None = None
        if self.dialect == "sqlite":
            if self.memory:
                kwargs["poolclass"] = StaticPool
            else:
                path = self.url.split("///", 1)[1].split("?")[0]
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                # The file's log is checkpointed by a thread of its own, not inside commits.
                self.checkpointer = Checkpointer(path)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if not self.memory:
                # Few connections, each with a bounded page cache: memory stays flat at any size.
                kwargs["pool_size"] = 4
                kwargs["max_overflow"] = 0
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            sync = (
                sqlite_synchronous if sqlite_synchronous in ("OFF", "NORMAL", "FULL", "EXTRA") else "NORMAL"
            )

            @event.listens_for(self.engine.sync_engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                if not self.memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={sync}")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute(f"PRAGMA cache_size=-{int(sqlite_cache_mb) * 1024}")  # per connection
                cur.execute("PRAGMA temp_store=MEMORY")
                # Checkpoints run in the Checkpointer's thread (mayak.db.checkpoint), not in commits.
                cur.execute("PRAGMA wal_autocheckpoint=0")
                cur.execute(f"PRAGMA mmap_size={int(sqlite_mmap_mb) * 1048576}")  # file mapped for reads
                cur.close()
                # Transactions are begun by us (below), not by the driver's implicit BEGIN before the
                # first write: a write transaction must hold the lock from its first read on.
                dbapi_conn.isolation_level = None

            @event.listens_for(self.engine.sync_engine, "begin")
            def _on_begin(conn: Any) -> None:
                # IMMEDIATE takes the write lock at once, so a read-then-write (dedup check, cursor,
                # seq reservation) is never interleaved with another process writing the same file.
                immediate = conn.get_execution_options().get("sqlite_immediate", False)
                driver = conn.connection.driver_connection
                if isinstance(driver, InlineSqlite) and driver._conn is not None:
                    # inline writes: straight to sqlite3 (the full execute path costs more)
                    statement = "BEGIN IMMEDIATE" if immediate else "BEGIN"
                    try:
                        driver._conn.execute(statement)
                    except sqlite3.Error as exc:  # "database is locked": as the general path raises it
                        raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc
                    return
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        # Point reads on a SQLite file run inline on a plain sqlite3 connection: a lookup takes tens
        # of microseconds, far less than handing it to a driver thread and back (see run_read).
        self.sync_engine: Engine | None = None
        if self.dialect == "sqlite" and not self.memory:
            self.sync_engine = create_engine(
                self.url.replace("sqlite+aiosqlite://", "sqlite://"),
                json_serializer=_json_dumps,
                json_deserializer=orjson.loads,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=2,
                max_overflow=0,
            )
            event.listen(self.sync_engine, "connect", _on_connect)

            event.listen(self.sync_engine, "begin", _on_begin)

        # SQLite: one writer at a time in this process; in-memory: one connection for everything.
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None

        # Write transactions on a SQLite file run their statements inline on the event loop: they
        # hold the single write lock anyway, a statement takes tens of microseconds, and handing
        # each one to the driver's thread and back (four hops a statement: cursor, execute, fetch,
        # close) cost more than the SQL itself (see docs/benchmarks.md).
        self.write_engine: AsyncEngine = self.engine
        if self.checkpointer is not None and inline_writes:
            path = self.checkpointer.path

            async def _inline_connect() -> Any:
                return InlineSqlite(sqlite3.connect(path, check_same_thread=False, timeout=30))

            self.write_engine = create_async_engine(
                self.url,
                async_creator=_inline_connect,
                json_serializer=_json_dumps,
                json_deserializer=orjson.loads,
                pool_size=2,
                max_overflow=0,
            )
            event.listen(self.write_engine.sync_engine, "connect", _on_connect)
            event.listen(self.write_engine.sync_engine, "begin", _on_begin)
        # Inline writes keep one connection checked out for good: every write transaction holds the
        # process's write lock, so they take turns on it. Checking a connection out of the pool and
        # back in (a greenlet hop each way, a reset, a shielded close task) cost more than the
        # BEGIN and COMMIT themselves.
        self._held: AsyncConnection | None = None

    # -- connections -------------------------------------------------------------------------

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction, committed on normal exit, rolled back on error.

        Callbacks registered with ``after_commit`` run once the transaction has committed (and the
        write lock is released); a rollback drops them.
        """
        callbacks: list[Callable[[], None]] = []
        if self.checkpointer is not None:
            self.checkpointer.start()  # once; a no-op after
            callbacks.append(self.checkpointer.poke)
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
                if self.checkpointer is not None and self.checkpointer.restart_due:
                    # let the log be copied whole, so this transaction starts it from the beginning
                    await self.checkpointer.settle()
            conn = await stack.enter_async_context(self._begin())
            conn.info[AFTER_COMMIT] = callbacks
            try:
                yield conn
            finally:
                conn.info.pop(AFTER_COMMIT, None)
        for callback in callbacks:  # reached only when the commit succeeded
            try:
                callback()
            except Exception:
                log.exception("after_commit_callback_failed")

    @staticmethod
    def offload_commit(conn: AsyncConnection) -> None:
        """Hand the commit of ``conn``'s open ``write()`` transaction to the committer's thread even
        when it is small (SQLite inline writes; elsewhere nothing changes).

        For a caller under load (the ingest writer, when its duty cycle says the event loop is busy):
        the hand-over adds about half a millisecond to this transaction but takes its commit (a few
        hundred microseconds of writing to the log for even a small one) off the event loop, which
        the waiting requests need (see ``InlineSqlite.commit``)."""
        driver = inline_driver(conn)
        if driver is not None:
            driver.offload_next = True

    @staticmethod
    def after_commit(conn: AsyncConnection, callback: Callable[[], None]) -> bool:
        """Run ``callback`` after the ``write()`` transaction of ``conn`` commits (never on rollback).

        Returns False, registering nothing, when ``conn`` is not inside a ``write()`` transaction;
        callers then must not depend on the callback.
        """
        callbacks = conn.info.get(AFTER_COMMIT)
        if callbacks is None:
            return False
        callbacks.append(callback)
        return True

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        if self.memory and self._write_lock is not None:
            async with self._write_lock, self._connect() as conn:
                yield conn
        else:
            async with self._connect() as conn:
                yield conn

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        try:
            if self.write_engine is not self.engine:  # inline writes; the caller holds the write lock
                async with self._held_transaction() as conn:
                    yield conn
                return
            async with self.write_engine.connect() as conn:
                if self.dialect == "sqlite":
                    await conn.execution_options(sqlite_immediate=True)
                async with conn.begin():
                    yield conn
        except DBAPIError as exc:
            raise StorageError("storage_unavailable", f"database error: {exc.orig!s}"[:500]) from exc

    @asynccontextmanager
    async def _held_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on the held inline write connection (opened on first use). After a driver
        error other than a broken constraint the connection is given up, so the next write opens a
        fresh one (a constraint error leaves it as good as before the transaction)."""
        conn = self._held
        if conn is None:
            conn = await self.write_engine.connect()
            await conn.execution_options(sqlite_immediate=True)
            self._held = conn
        try:
            async with conn.begin():
                yield conn
        except DBAPIError as exc:
            if not isinstance(exc, IntegrityError):
                await self._drop_held()
            raise

    async def _drop_held(self) -> None:
        conn, self._held = self._held, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.connect() as conn:
                yield conn
        except DBAPIError as exc:
            raise StorageError("storage_unavailable", f"database error: {exc.orig!s}"[:500]) from exc

    # -- dialect helpers ---------------------------------------------------------------------

    def insert(self, table: sa.Table) -> Any:
        """A dialect insert, so callers can use ``on_conflict_do_nothing`` / ``do_update``."""
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    async def lock_workspace(self, conn: AsyncConnection, workspace_id: str, purpose: str) -> None:
        """Serialise writers of one workspace across processes (PostgreSQL advisory lock, held to commit).

        On SQLite the process-wide write lock already serialises every writer.
        """
        if self.dialect == "postgresql":
            await pg_call(
                conn, "execute", "SELECT pg_advisory_xact_lock($1)", (_lock_key(workspace_id, purpose),)
            )

    async def try_lock_workspace(self, conn: AsyncConnection, workspace_id: str, purpose: str) -> bool:
        """Like ``lock_workspace`` but gives up at once when another transaction holds the lock."""
        if self.dialect != "postgresql":
            return True
        rows = await pg_call(
            conn, "fetch", "SELECT pg_try_advisory_xact_lock($1)", (_lock_key(workspace_id, purpose),)
        )
        return bool(rows[0][0])

    async def workspace_number(self, conn: AsyncConnection, workspace_id: str) -> int:
        """The workspace's number (``workspaces.number``), cached: it never changes."""
        number = self._workspace_numbers.get(workspace_id)
        if number is None:
            found = (
                await conn.exec_driver_sql(
                    "SELECT number FROM workspaces WHERE id = "
                    + ("$1" if self.dialect == "postgresql" else "?"),
                    (workspace_id,),
                )
            ).first()
            if found is None:
                raise NotFound("workspace")
            number = self._workspace_numbers[workspace_id] = int(found[0])
        return number

    async def create_all(self) -> None:
        """Create the schema directly (tests and the memory backend); real installs use migrations."""
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def ping(self) -> bool:
        try:
            async with self._connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
            return True
        except StorageError:
            return False

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` — a short read written against a sync Connection.

        SQLite file: inline on the event loop (a point read is cheaper than a thread hop).
        PostgreSQL / in-memory SQLite: on the async connection via ``run_sync``.
        Keep ``fn`` to a few indexed queries: inline, it blocks the loop while it runs.
        """
        if self.sync_engine is not None:
            try:
                with self.sync_engine.connect() as conn:
                    return fn(conn, *args)
            except DBAPIError as exc:
                raise StorageError("storage_unavailable", f"database error: {exc.orig!s}"[:500]) from exc
        async with self.read() as aconn:
            return await aconn.run_sync(fn, *args)

    async def dispose(self) -> None:
        if self._write_lock is not None:
            async with self._write_lock:  # a write in progress finishes first
                await self._drop_held()
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.stop)
        await self.engine.dispose()
        if self.write_engine is not self.engine:
            await self.write_engine.dispose()
        if self.sync_engine is not None:
            self.sync_engine.dispose()


def constant(value: Any) -> Any:
    """``value`` written into the statement, not sent as a parameter. PostgreSQL plans a prepared
    statement once for all parameter values (a generic plan) and then knows nothing of them: for a
    poll such as "any row with status 'pending' due by now, LIMIT 1" over a large table it chose a
    sequential scan, which reads the whole table whenever nothing is due. With the status written
    in, it uses the index (or a partial index whose condition the constant implies). Only for
    constants of the code, never for input."""
    return sa.literal(value, literal_execute=True)


@lru_cache(maxsize=4096)
def _lock_key(workspace_id: str, purpose: str) -> int:
    digest = hashlib.blake2b(f"{purpose}:{workspace_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# -- PostgreSQL, driver level -----------------------------------------------------------------------


async def pg_call(conn: AsyncConnection, method: str, sql: str, params: Sequence[Any]) -> Any:
    """Run ``sql`` with asyncpg's ``fetch`` / ``execute`` / ``executemany`` / ``copy`` (binary COPY of
    ``params = (columns, records)`` into the table named by ``sql``) on the asyncpg connection
    under SQLAlchemy's adapter, inside the adapter's transaction (begun here when none is, as the
    adapter's own cursor does): SQLAlchemy's execute path (a greenlet switch, its prepared-statement
    cache and result set-up) costs more than these statements. asyncpg caches the prepared
    statements. Errors come out as SQLAlchemy's (``IntegrityError``, ``OperationalError``…)."""
    sync = conn.sync_connection
    assert sync is not None
    adapt: Any = sync.connection.dbapi_connection
    driver = adapt._connection
    try:
        async with adapt._execute_mutex:
            if adapt._transaction is None:
                await adapt._start_transaction()
            if method == "executemany":
                return await driver.executemany(sql, params)
            if method == "copy":  # sql: the table; params: (columns, records)
                columns, records = params
                return await driver.copy_records_to_table(sql, records=records, columns=columns)
            return await getattr(driver, method)(sql, *params)
    except Exception as exc:
        closed = driver.is_closed()
        try:
            adapt._handle_exception(exc)  # raises the DB-API form of the error
        except Exception as translated:
            error = translated
        else:  # pragma: no cover - _handle_exception always raises
            error = exc
        if closed:  # a dead connection must not go back to the pool
            with contextlib.suppress(Exception):
                await conn.invalidate()
        raise DBAPIError.instance(
            sql, params, error, adapt.dbapi.Error, connection_invalidated=closed
        ) from exc


# -- inline SQLite -------------------------------------------------------------------------------
# The surface of an aiosqlite connection that SQLAlchemy's aiosqlite dialect uses, over a plain
# sqlite3 connection, with every call made at once on the calling (event loop) thread.


class _InlineCursor:
    __slots__ = ("_cur",)

    def __init__(self, cur: sqlite3.Cursor):
        self._cur = cur

    async def __aenter__(self) -> _InlineCursor:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._cur.close()

    async def execute(self, sql: str, parameters: Any = None) -> _InlineCursor:
        if parameters is None:
            self._cur.execute(sql)
        else:
            self._cur.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Any) -> _InlineCursor:
        self._cur.executemany(sql, parameters)
        return self

    async def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    async def fetchone(self) -> Any:
        return self._cur.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cur.fetchmany() if size is None else self._cur.fetchmany(size)

    async def close(self) -> None:
        self._cur.close()

    @property
    def description(self) -> Any:
        return self._cur.description

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cur.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cur.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cur.arraysize = value


class _InlineTx:
    """aiosqlite's request queue, as SQLAlchemy's isolation-level setter uses it: run at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:
            future.set_exception(exc)


# Rows a transaction must have changed for its COMMIT to go to the committer's thread (a one-turn
# web-chat transaction changes about ten; an ingestion group, thousands).
OFFLOAD_COMMIT_CHANGES = 48


@lru_cache(maxsize=1)
def _committer() -> ThreadPoolExecutor:
    """The one thread that runs inline SQLite commits (one write transaction at a time anyway)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mayak-sqlite-commit")


def inline_driver(conn: AsyncConnection) -> InlineSqlite | None:
    """The driver connection of an inline SQLite write connection (see ``Database.write``), else None."""
    sync = conn.sync_connection
    if sync is None:
        return None
    driver = sync.connection.driver_connection
    return driver if isinstance(driver, InlineSqlite) else None


class InlineSqlite:
    def __init__(self, conn: sqlite3.Connection):
        self._conn: sqlite3.Connection | None = conn
        self._tx = _InlineTx()
        self._committed_changes = conn.total_changes  # rows changed up to the last commit
        # Set for the open transaction by a busy writer (``Database.offload_commit``): its commit
        # goes to the committer's thread whatever its size.
        self.offload_next = False

    @property
    def _connection(self) -> sqlite3.Connection | None:
        return self._conn

    @property
    def isolation_level(self) -> str | None:
        return self._live().isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self._live().isolation_level = value  # type: ignore[assignment]

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError("Connection closed")
        return self._conn

    def cursor(self) -> _InlineCursor:
        return _InlineCursor(self._live().cursor())

    async def execute(self, sql: str, parameters: Any = None) -> _InlineCursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        # COMMIT writes the transaction's pages to the log: the driver lets go of the GIL while it
        # does, so a large one runs on the committer's thread and the event loop gets on with other
        # sockets meanwhile. The caller holds the write lock: nothing else touches this connection
        # until the commit is done. A small one commits here: handing it over and back costs about
        # half a millisecond on this project's machines (waking a thread on the other core), more
        # than writing a few pages, and every turn of a lightly loaded chat would wait for that.
        # Under load (``offload_next``, set by a busy ingest writer) a small one goes too: its
        # ~0.2 ms of writing is then the event loop's to spend on the waiting requests (web chat at
        # 2,000 msgs/s: 24 µs less main-thread time a turn on average).
        conn = self._live()
        offload, self.offload_next = self.offload_next, False
        if not conn.in_transaction:
            return
        changes = conn.total_changes
        if offload or changes - self._committed_changes >= OFFLOAD_COMMIT_CHANGES:
            await asyncio.get_running_loop().run_in_executor(_committer(), conn.commit)
        else:
            conn.commit()
        self._committed_changes = changes

    async def rollback(self) -> None:
        conn = self._live()
        self.offload_next = False
        conn.rollback()
        self._committed_changes = conn.total_changes

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._live().create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
