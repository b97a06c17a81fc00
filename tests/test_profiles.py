"""One profile per person: identity resolution, merges, conflicts, last-write-wins traits, context."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from mayak.platform import Mayak
from tests.conftest import admin, write_auth

pytestmark = [pytest.mark.contract, pytest.mark.both_modes]


async def send(client: httpx.AsyncClient, ws: dict[str, Any], *events: dict[str, Any]) -> None:
    r = await client.post("/v1/batch", json={"batch": list(events)}, auth=write_auth(ws))
    assert r.status_code == 200, r.text
    assert not r.json()["errors"], r.json()


async def by_identity(client: httpx.AsyncClient, ws: dict[str, Any], identity: str) -> dict[str, Any]:
    r = await client.get("/v1/customers", params={"identity": identity}, headers=admin(ws))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_anonymous_visitor_becomes_identified_in_place(client, mayak: Mayak, ws) -> None:
    await send(client, ws, {"type": "page", "anonymousId": "a1", "name": "Home"})
    await mayak.drain()
    anon = await by_identity(client, ws, "anonymous_id:a1")
    assert anon["identified"] is False
    await send(
        client, ws, {"type": "identify", "anonymousId": "a1", "userId": "u1", "traits": {"name": "Ann"}}
    )
    await mayak.drain()
    known = await by_identity(client, ws, "user_id:u1")
    assert known["id"] == anon["id"]
    assert known["identified"] is True
    assert {i["kind"] for i in known["identities"]} == {"anonymous_id", "user_id"}


async def test_anonymous_profile_merges_into_identified_person_by_email(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        {"type": "identify", "userId": "u1", "traits": {"email": "ann@example.com", "plan": "pro"}},
    )
    await mayak.drain()
    await send(
        client,
        ws,
        {"type": "track", "anonymousId": "a9", "event": "Viewed Car"},
        {"type": "identify", "anonymousId": "a9", "traits": {"email": "ANN@example.com ", "city": "Leeds"}},
    )
    await mayak.drain()
    person = await by_identity(client, ws, "user_id:u1")
    anon_view = await by_identity(client, ws, "anonymous_id:a9")
    assert anon_view["id"] == person["id"]
    assert person["traits"] == {"email": "ANN@example.com ", "plan": "pro", "city": "Leeds"}
    assert len(person["merged_ids"]) == 1
    merged_id = person["merged_ids"][0]
    # A merged-away id keeps resolving to the survivor.
    r = await client.get(f"/v1/customers/{merged_id}", headers=admin(ws))
    assert r.status_code == 200 and r.json()["id"] == person["id"]
    # No event lost: the anonymous track moved to the survivor, and the merge is in the log.
    r = await client.get(f"/v1/customers/{person['id']}/events", params={"limit": 50}, headers=admin(ws))
    items = r.json()["items"]
    assert {(e["type"], e["name"]) for e in items} >= {("track", "Viewed Car"), ("identify", None)}
    merges = [e for e in items if e["type"] == "customer.merged"]
    assert merges and merges[0]["payload"]["merged_id"] == merged_id


async def test_two_identified_people_are_never_merged(client, mayak: Mayak, ws) -> None:
    await send(client, ws, {"type": "identify", "userId": "u1", "traits": {"email": "shared@example.com"}})
    await mayak.drain()
    await send(
        client,
        ws,
        {"type": "identify", "userId": "u2", "traits": {"email": "shared@example.com", "name": "Bo"}},
    )
    await mayak.drain()
    one = await by_identity(client, ws, "user_id:u1")
    two = await by_identity(client, ws, "user_id:u2")
    assert one["id"] != two["id"]
    assert ("email", "shared@example.com") in {(i["kind"], i["value"]) for i in one["identities"]}
    assert "email" not in {i["kind"] for i in two["identities"]}
    assert two["traits"]["name"] == "Bo"  # the event went to the profile its userId names
    r = await client.get(
        f"/v1/customers/{two['id']}/events", params={"type": "identity.conflict"}, headers=admin(ws)
    )
    conflicts = r.json()["items"]
    assert len(conflicts) == 1
    assert conflicts[0]["payload"]["held_by"] == one["id"]


async def test_alias_links_previous_anonymous_id(client, mayak: Mayak, ws) -> None:
    await send(client, ws, {"type": "track", "anonymousId": "old-anon", "event": "Brochure Downloaded"})
    await send(client, ws, {"type": "identify", "userId": "u7"})
    await mayak.drain()
    await send(client, ws, {"type": "alias", "previousId": "old-anon", "userId": "u7"})
    await mayak.drain()
    person = await by_identity(client, ws, "user_id:u7")
    assert (await by_identity(client, ws, "anonymous_id:old-anon"))["id"] == person["id"]


async def test_late_older_event_does_not_overwrite_newer_trait(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        {
            "type": "identify",
            "userId": "u1",
            "timestamp": "2026-01-02T00:00:00Z",
            "traits": {"plan": "gold", "city": "Leeds"},
        },
    )
    await mayak.drain()
    await send(
        client,
        ws,
        {
            "type": "identify",
            "userId": "u1",
            "timestamp": "2026-01-01T00:00:00Z",
            "traits": {"plan": "silver", "age": 40},
        },
    )
    await mayak.drain()
    person = await by_identity(client, ws, "user_id:u1")
    assert person["traits"] == {"plan": "gold", "city": "Leeds", "age": 40}
    assert person["first_seen"] == "2026-01-01T00:00:00.000Z"
    assert person["last_seen"] == "2026-01-02T00:00:00.000Z"


async def test_same_time_ties_break_by_log_order(client, mayak: Mayak, ws) -> None:
    ts = "2026-03-01T10:00:00Z"
    await send(
        client,
        ws,
        {"type": "identify", "userId": "u1", "timestamp": ts, "traits": {"plan": "a"}},
        {"type": "identify", "userId": "u1", "timestamp": ts, "traits": {"plan": "b"}},
    )
    await mayak.drain()
    assert (await by_identity(client, ws, "user_id:u1"))["traits"]["plan"] == "b"


async def test_phone_normalised_with_workspace_region(client, mayak: Mayak, ws) -> None:
    await send(client, ws, {"type": "identify", "userId": "u1", "traits": {"phone": "07700 900123"}})
    await mayak.drain()
    person = await by_identity(client, ws, "phone:+447700900123")
    assert person["context"]["channels"] == ["sms"]
    assert (await by_identity(client, ws, "phone:07700900123"))["id"] == person["id"]


async def test_external_ids_become_identities(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        {
            "type": "track",
            "userId": "u1",
            "event": "Chat Started",
            "context": {
                "externalIds": [{"id": "123456", "type": "telegram"}, {"id": "CRM-9", "type": "crm_id"}]
            },
        },
    )
    await mayak.drain()
    person = await by_identity(client, ws, "telegram:123456")
    assert (await by_identity(client, ws, "crm_id:CRM-9"))["id"] == person["id"]
    assert "telegram" in person["context"]["channels"]


async def test_context_is_derived(client, mayak: Mayak, ws) -> None:
    ctx = {
        "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148",
        "timezone": "Europe/London",
        "locale": "en-GB",
        "location": {"city": "Leeds", "country": "GB"},
    }
    await send(client, ws, {"type": "page", "userId": "u1", "name": "Home", "context": ctx})
    await send(client, ws, {"type": "group", "userId": "u1", "groupId": "fleet-42"})
    await mayak.drain()
    c = (await by_identity(client, ws, "user_id:u1"))["context"]
    assert c["device_type"] == "smartphone"
    assert c["timezone"] == "Europe/London" and c["locale"] == "en-GB"
    assert c["location"] == {"city": "Leeds", "country": "GB"}
    assert c["groups"] == ["fleet-42"]
    assert "web" in c["channels"]


async def test_feature_phone_user_agent(client, mayak: Mayak, ws) -> None:
    ua = "Mozilla/5.0 (Mobile; Nokia 8110 4G; rv:48.0) Gecko/48.0 Firefox/48.0 KAIOS/2.5"
    await send(client, ws, {"type": "page", "userId": "u1", "context": {"userAgent": ua}})
    await mayak.drain()
    assert (await by_identity(client, ws, "user_id:u1"))["context"]["device_type"] == "feature_phone"


async def test_consents_and_preferences_by_trait_convention(client, mayak: Mayak, ws) -> None:
    await send(
        client,
        ws,
        {
            "type": "identify",
            "userId": "u1",
            "timestamp": "2026-02-01T00:00:00Z",
            "traits": {
                "consents": {"email": {"marketing": True, "service": True}},
                "preferences": {"language": "ru", "quiet_hours": {"start": "22:00", "end": "08:00"}},
            },
        },
    )
    await mayak.drain()
    person = await by_identity(client, ws, "user_id:u1")
    assert "consents" not in person["traits"]
    entry = person["consents"]["email"]["marketing"]
    assert entry["granted"] is True and entry["at"] == "2026-02-01T00:00:00.000Z"
    assert entry["source"] == f"event:{ws['write_key_id']}"
    assert person["preferences"] == {"language": "ru", "quiet_hours": {"start": "22:00", "end": "08:00"}}


async def test_bad_consent_convention_is_rejected_with_path(client, ws) -> None:
    r = await client.post(
        "/v1/identify",
        auth=write_auth(ws),
        json={"userId": "u1", "traits": {"consents": {"email": {"ads": True}}}},
    )
    assert r.status_code == 400
    assert r.json()["param"] == "$.traits.consents.email.ads"


def test_a_profile_read_back_from_its_row_is_the_profile_that_was_written() -> None:
    """``Profile.from_tuple`` sets the slots itself (not through ``__init__``): every slot must come
    back as a profile built from the same values has it."""
    from mayak.pipeline.profile import Profile

    written = Profile(
        "cus_a",
        111,
        identified=True,
        text=['{"plan":"pro"}', '{"traits":{"plan":[1,2]}}', '{"locale":"en-GB"}', "{}", '{"lang":"en"}'],
        stage="lead",
        stage_at=5,
        first_seen=6,
        last_seen=7,
        merged_into="cus_b",
        key=9,
    )
    read = Profile.from_tuple(written.to_tuple(now=999))
    for slot in Profile.__slots__:
        assert getattr(read, slot) == getattr(written, slot), slot
    assert read.observed_only()  # as read: nothing decoded, nothing changed
    assert read.traits == {"plan": "pro"}
