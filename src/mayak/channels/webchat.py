"""The webchat channel adapter (being built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mayak.platform import Mayak


def install(mayak: Mayak) -> None:
    """Register the adapter with ``mayak.channels`` (and anything else it needs)."""
