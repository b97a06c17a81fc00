"""The one error a condition raises: a stable code, a message for people, and where in the text."""

from __future__ import annotations

import re

from mayak.errors import InvalidRequest

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def line_and_column(source: str, position: int) -> tuple[int, int]:
    """1-based line and column of a 0-based character offset into ``source``."""
    line, start = 1, 0
    for match in _LINE_BREAK.finditer(source, 0, position):
        line, start = line + 1, match.end()
    return line, position - start + 1


class ConditionError(InvalidRequest):
    """A condition is not valid (or, at evaluation, needs a function the caller did not pass).

    ``code`` is stable (see ``docs/conditions.md``); ``position`` is the 0-based character offset into
    the condition's text where the problem is, or None when it is the text as a whole; ``line`` and
    ``column`` are the same place, 1-based, for people. ``param`` stays None here: whoever validates a
    document full of conditions (a bot flow, a segment) sets it to the JSON path of the condition.
    """

    def __init__(
        self,
        code: str,
        message: str,
        position: int | None = None,
        *,
        source: str | None = None,
        param: str | None = None,
    ):
        self.position = position
        self.line: int | None = None
        self.column: int | None = None
        if position is not None:
            if source is not None:
                self.line, self.column = line_and_column(source, position)
                multiline = _LINE_BREAK.search(source) is not None
                where = f"line {self.line}, column {self.column}" if multiline else f"column {self.column}"
            else:
                self.column = position + 1
                where = f"column {self.column}"
            message = f"{message} (at {where})"
        super().__init__(code, message, param)
