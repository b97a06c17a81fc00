from __future__ import annotations

from typing import Any

import httpx
import pytest

from mayak.platform import Mayak
from tests.conftest import admin, write_auth

pytestmark = pytest.mark.contract


async def test_identify_then_lookup(client: httpx.AsyncClient, mayak: Mayak, ws: dict[str, Any]) -> None:
    r = await client.post(
        "/v1/identify",
        json={"userId": "u1", "traits": {"email": " Ann@Example.com ", "name": "Ann"}},
        auth=write_auth(ws),
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    await mayak.drain()
    r = await client.get("/v1/customers", params={"identity": "email:ann@example.com"}, headers=admin(ws))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["traits"]["name"] == "Ann"
    kinds = {(i["kind"], i["value"]) for i in body["identities"]}
    assert kinds == {("user_id", "u1"), ("email", "ann@example.com")}
