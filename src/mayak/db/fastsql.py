"""Driver-level SQL for the hot paths (event append, identity and profile batches).

SQLAlchemy Core costs a few microseconds per row in parameter and result processing; at tens of
thousands of events a second that is most of the budget. These helpers write the handful of hot
statements once per dialect and run them with ``exec_driver_sql`` and plain tuples:
SQLite takes ``?`` and JSON arrays for list parameters (``json_each``), PostgreSQL takes ``$n``
and native arrays (``= ANY($n)``). JSON columns are passed as text; ``load_json`` accepts either
text (SQLite) or the decoded value (asyncpg's codec).

On PostgreSQL the statements go straight to the asyncpg connection under SQLAlchemy's adapter (in
the adapter's transaction), and many rows are written by ONE statement: binary COPY (``copy``) or
column arrays (``INSERT … SELECT … FROM unnest($1::text[], …)``, see ``run_columns``); an
``executemany`` costs the server an executor start-up per row, several times the insert itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from mayak.db.database import inline_driver, pg_call


def load_json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


def dump_json(value: Any) -> str:
    return orjson.dumps(value).decode()


class FastSql:
    def __init__(self, dialect: str):
        self.pg = dialect == "postgresql"

    def values(self, n: int, json_positions: Sequence[int] = (), start: int = 1) -> str:
        """``?, ?, ?`` or ``$1, $2::jsonb, $3`` for n parameters (positions 0-based)."""
        if not self.pg:
            return ", ".join("?" * n)
        return ", ".join(f"${start + i}::jsonb" if i in json_positions else f"${start + i}" for i in range(n))

    def p(self, index: int) -> str:
        """The placeholder of the index-th (1-based) parameter."""
        return f"${index}" if self.pg else "?"

    def in_list(self, index: int, pg_type: str = "text") -> str:
        """``IN <list parameter>``: one parameter whatever the list's length (no statement per size)."""
        return f"= ANY(${index}::{pg_type}[])" if self.pg else "IN (SELECT value FROM json_each(?))"

    def list_param(self, values: Sequence[str] | Sequence[int]) -> Any:
        return list(values) if self.pg else dump_json(list(values))

    @staticmethod
    def unnest(types: Sequence[str], start: int = 1) -> str:
        """PostgreSQL: a SELECT of one row per array position over column-array parameters, e.g.
        ``SELECT u.c0, u.c1::jsonb FROM unnest($1::text[], $2::text[]) AS u(c0, c1)``. ``jsonb``
        columns travel as text and are cast here. Run it with ``run_columns``."""
        cols = ", ".join(f"u.c{i}::jsonb" if t == "jsonb" else f"u.c{i}" for i, t in enumerate(types))
        return f"SELECT {cols} FROM {FastSql.unnest_rows(types, start)}"

    @staticmethod
    def unnest_rows(types: Sequence[str], start: int = 1) -> str:
        """PostgreSQL: the FROM item of ``unnest``, ``unnest($1::text[], …) AS u(c0, …)``, for a
        statement that joins the column arrays itself (``jsonb`` columns are text here)."""
        arrays = ", ".join(f"${start + i}::{'text' if t == 'jsonb' else t}[]" for i, t in enumerate(types))
        names = ", ".join(f"c{i}" for i in range(len(types)))
        return f"unnest({arrays}) AS u({names})"

    # -- execution -----------------------------------------------------------------------------
    # Inside a write transaction on a SQLite file the statements go straight to the sqlite3
    # connection (the transaction's own, see ``Database``'s inline writes): SQLAlchemy's async
    # bridge (a greenlet switch, a cursor wrapper and result set-up per statement) costs several
    # times the SQL of these small statements. Elsewhere they go through ``exec_driver_sql``.

    async def fetch(self, conn: AsyncConnection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a query (tuples; asyncpg records on PostgreSQL; SQLAlchemy rows elsewhere)."""
        if self.pg:
            rows: list[Any] = await pg_call(conn, "fetch", sql, params)
            return rows
        raw = _raw(conn)
        if raw is None:
            return list((await conn.exec_driver_sql(sql, tuple(params))).all())
        try:
            return raw.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _wrap(sql, params, exc) from exc

    async def run(self, conn: AsyncConnection, sql: str, params: Sequence[Any] = ()) -> int:
        """A statement without rows; returns its row count."""
        if self.pg:
            return _pg_rowcount(await pg_call(conn, "execute", sql, params))
        raw = _raw(conn)
        if raw is None:
            return int((await conn.exec_driver_sql(sql, tuple(params))).rowcount or 0)
        try:
            return raw.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise _wrap(sql, params, exc) from exc

    async def run_many(self, conn: AsyncConnection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many parameter rows (executemany)."""
        if not rows:
            return
        if self.pg:
            await pg_call(conn, "executemany", sql, rows)
            return
        raw = _raw(conn)
        if raw is None:
            await conn.exec_driver_sql(sql, list(rows))
            return
        try:
            raw.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _wrap(sql, rows, exc) from exc

    async def run_columns(self, conn: AsyncConnection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """PostgreSQL: one statement for many rows, given as one array parameter per column (the
        statement reads them with ``unnest``, see ``unnest``); returns its row count."""
        if not rows:
            return 0
        columns = [list(column) for column in zip(*rows, strict=True)]
        return _pg_rowcount(await pg_call(conn, "execute", sql, columns))

    async def copy(
        self, conn: AsyncConnection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """PostgreSQL: rows into ``table`` by binary COPY, inside the connection's transaction."""
        if rows:
            await pg_call(conn, "copy", table, (list(columns), rows))


def _pg_rowcount(status: Any) -> int:
    """The row count in a command tag such as ``INSERT 0 5`` or ``UPDATE 3``."""
    tail = str(status).rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _raw(conn: AsyncConnection) -> sqlite3.Connection | None:
    """The sqlite3 connection of an inline SQLite write connection, else None."""
    driver = inline_driver(conn)
    return driver._conn if driver is not None else None


def _wrap(sql: str, params: Any, exc: sqlite3.Error) -> Exception:
    """The SQLAlchemy exception the general path would raise (IntegrityError, OperationalError…)."""
    return DBAPIError.instance(sql, params, exc, sqlite3.Error)
