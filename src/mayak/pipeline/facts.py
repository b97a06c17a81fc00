"""What the pipeline reads from an event on its own, worked out before the event reaches the writer.

The ingest writer's group is the serial part of ingestion: while it runs, nothing else is appended.
Reading an event's identities (e-mail and phone normalised) and what its context says about the
person depends on the event alone (and the workspace's phone region), so ``IngestWriter.submit``
works it out in the request that brought the event, before queueing it, and the group only uses
the result. Events read back from the log have none, and the pipeline works it out then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mayak.eventlog import RESOLVED_SOURCES, SEGMENT_TYPES, NewEvent
from mayak.pipeline import context as ctx
from mayak.pipeline.identity import Key, event_keys


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much
class EventFacts:
    region: str  # the phone region the identities were read with
    user: Key | None
    anon: Key | None
    others: tuple[Key, ...]
    derived: dict[str, Any] | None  # context.derive of the event's context; None without one
    hints: list[str]  # context.channel_hints


def event_facts(payload: dict[str, Any], region: str) -> EventFacts:
    user, anon, others = event_keys(payload, region)
    context = payload.get("context")
    if isinstance(context, dict) and context:
        derived: dict[str, Any] | None = ctx.derive(context)
        hints = ctx.channel_hints(context)
    else:
        derived, hints = None, []
    return EventFacts(region, user, anon, tuple(others), derived, hints)


def add_facts(batch: list[NewEvent], region: str) -> None:
    """Work out the facts of the events the pipeline resolves by their identities (where not
    worked out already)."""
    for ev in batch:
        if ev.facts is None and ev.type in SEGMENT_TYPES and ev.source in RESOLVED_SOURCES:
            ev.facts = event_facts(ev.payload, region)
