"""Driver-level SQL for the hot paths (event append, identity and profile batches).

SQLAlchemy Core costs a few microseconds per row in parameter and result processing; at tens of
thousands of events a second that is most of the budget. These helpers write the handful of hot
statements once per dialect and run them with ``exec_driver_sql`` and plain tuples:
SQLite takes ``?`` and JSON arrays for list parameters (``json_each``), PostgreSQL takes ``$n``
and native arrays (``= ANY($n)``). JSON columns are passed as text; ``load_json`` accepts either
text (SQLite) or the decoded value (asyncpg's codec).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


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

    def in_list(self, index: int) -> str:
        """``IN <list parameter>``: one parameter whatever the list's length (no statement per size)."""
        return f"= ANY(${index}::text[])" if self.pg else "IN (SELECT value FROM json_each(?))"

    def list_param(self, values: Sequence[str]) -> Any:
        return list(values) if self.pg else dump_json(list(values))
