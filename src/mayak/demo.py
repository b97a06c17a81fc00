"""The Demo Motors workspace: an auto dealer with a few hundred synthetic customers and their history.

Customers browse models anonymously, some identify, book test drives, buy a car, come in for
scheduled service, and get insurance and trade-in offers. Everything is generated as Segment events
and goes through the same pipeline as real traffic; journey stages are set through the admin path.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from mayak.errors import EventRejected
from mayak.eventlog import NewEvent
from mayak.ingest.segment import normalise_event
from mayak.timeutil import ms_to_rfc3339, now_ms

WORKSPACE_NAME = "Demo Motors"
MODELS = [
    ("Aurora", 2_850_000),
    ("Borealis", 3_490_000),
    ("Comet", 1_990_000),
    ("Drift", 4_750_000),
    ("Estuary", 2_390_000),
]
CITIES = [("London", "GB"), ("Manchester", "GB"), ("Leeds", "GB"), ("Bristol", "GB"), ("Glasgow", "GB")]
FIRST = [
    "Anna",
    "Boris",
    "Clara",
    "Dmitri",
    "Elena",
    "Felix",
    "Galina",
    "Harry",
    "Irina",
    "James",
    "Katya",
    "Liam",
    "Maria",
    "Nikolai",
    "Olga",
    "Peter",
    "Rosa",
    "Sergei",
    "Tanya",
    "Victor",
]
LAST = ["Ivanova", "Smith", "Petrov", "Jones", "Sokolova", "Brown", "Volkov", "Taylor", "Orlova", "Wilson"]
AGENTS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/124.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Mobile; Nokia 8110 4G; rv:48.0) Gecko/48.0 Firefox/48.0 KAIOS/2.5",
]
DAY = 86_400_000


def _event(kind: str, ts: int, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "messageId": str(uuid.uuid4()), "timestamp": ms_to_rfc3339(ts), **fields}


def customer_story(rng: random.Random, index: int, now: int) -> tuple[list[dict[str, Any]], str]:
    """One customer's events, oldest first, and the journey stage they end in."""
    anon = f"anon-{uuid.UUID(int=rng.getrandbits(128))}"
    user_id = f"dm-{10000 + index}"
    first, last = rng.choice(FIRST), rng.choice(LAST)
    city, country = rng.choice(CITIES)
    ua = rng.choice(AGENTS)
    ctx = {
        "userAgent": ua,
        "locale": rng.choice(["en-GB", "ru-RU"]),
        "timezone": "Europe/London",
        "location": {"city": city, "country": country},
        "library": {"name": "analytics.js", "version": "2.0"},
    }
    t = now - rng.randint(30, 720) * DAY
    model, price = rng.choice(MODELS)
    events = [
        _event(
            "page",
            t,
            anonymousId=anon,
            name="Model " + model,
            properties={"path": f"/models/{model.lower()}"},
            context=ctx,
        ),
        _event(
            "track",
            t + 60_000,
            anonymousId=anon,
            event="Brochure Downloaded",
            properties={"model": model},
            context=ctx,
        ),
    ]
    stage = "prospect"
    if rng.random() < 0.25:  # stays an anonymous visitor
        return events, stage
    t += rng.randint(1, 20) * DAY
    traits = {
        "name": f"{first} {last}",
        "first_name": first,
        "email": f"{first}.{last}{index}@example.com".lower(),
        "phone": f"07700 9{index:05d}",
        "city": city,
        "consents": {"email": {"service": True, "marketing": rng.random() < 0.6}},
    }
    events.append(_event("identify", t, userId=user_id, anonymousId=anon, traits=traits, context=ctx))
    events.append(
        _event(
            "track",
            t + 3_600_000,
            userId=user_id,
            event="Test Drive Booked",
            properties={"model": model, "showroom": city},
        )
    )
    if rng.random() < 0.4:
        return events, stage
    t += rng.randint(3, 30) * DAY
    vin = f"DM{index:07d}{rng.randint(100, 999)}"
    events.append(
        _event(
            "track",
            t,
            userId=user_id,
            event="Car Purchased",
            properties={
                "model": model,
                "vin": vin,
                "price": price,
                "currency": "GBP",
                "financed": rng.random() < 0.5,
            },
        )
    )
    stage = "buyer"
    if rng.random() < 0.5:
        events.append(
            _event(
                "track",
                t + DAY,
                userId=user_id,
                event="Insurance Quote Requested",
                properties={"vin": vin, "premium": rng.randint(40_000, 120_000), "currency": "GBP"},
            )
        )
    visits = 0
    while t + 180 * DAY < now and rng.random() < 0.7:
        t += rng.randint(150, 200) * DAY
        visits += 1
        events.append(
            _event(
                "track",
                t - 14 * DAY,
                userId=user_id,
                event="Service Booked",
                properties={"vin": vin, "kind": "scheduled", "mileage": visits * 10_000},
            )
        )
        events.append(
            _event(
                "track",
                t,
                userId=user_id,
                event="Service Completed",
                properties={"vin": vin, "invoice_total": rng.randint(15_000, 60_000), "currency": "GBP"},
            )
        )
        stage = "in_service"
    if visits >= 2:
        stage = "loyal"
        events.append(
            _event(
                "track",
                min(t + 30 * DAY, now),
                userId=user_id,
                event="Trade-In Valued",
                properties={"vin": vin, "offer": int(price * 0.55), "currency": "GBP"},
            )
        )
    return events, stage


def generate(workspace_id: str, count: int = 300, seed: int = 7) -> tuple[list[NewEvent], dict[str, str]]:
    """Every demo event as log entries, and the journey stage of each identified user id."""
    rng = random.Random(seed)
    now = now_ms()
    out: list[NewEvent] = []
    stages: dict[str, str] = {}
    for index in range(count):
        story, stage = customer_story(rng, index, now)
        for raw in story:
            try:
                out.append(
                    normalise_event(
                        raw,
                        workspace_id=workspace_id,
                        received_at=now,
                        batch_sent_at=None,
                        forced_type=None,
                        actor="demo",
                        max_event_bytes=32 * 1024,
                        max_depth=32,
                    )
                )
            except EventRejected as exc:  # the generator's own bug: fail loudly
                raise AssertionError(f"demo event rejected: {exc.code} {exc.param}") from exc
        user_ids = [e.get("userId") for e in story if e.get("userId")]
        if user_ids:
            stages[str(user_ids[0])] = stage
    return out, stages
