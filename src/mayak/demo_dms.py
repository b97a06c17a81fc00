"""A small dealer management system (DMS) for the Demo Motors quick start, mounted at ``/demo/dms``.

Only ``mayak demo --serve`` mounts it (``MAYAK_DEMO=1``). It plays the business system underneath the
bot: it takes service bookings from the bot's ``call`` steps (bearer token = the workspace secret
``dms_token``), answers order status, and when a work order is completed it reports ``Service
Completed`` to Mayak through a signed generic webhook, exactly as a real DMS would; the bot then
tells the customer their car is ready.

State is in memory: the demo's DMS forgets its bookings on restart (Mayak remembers the
conversations, of course).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import structlog
from fastapi import APIRouter, HTTPException, Request

from mayak.delivery import webhooks

log = structlog.get_logger("mayak.demo_dms")


@dataclass
class Order:
    id: str
    booking_id: str
    customer_id: str
    customer_ref: str
    car_model: str
    date: str
    time: str
    status: str = "booked"
    total: int = 0


@dataclass
class Dms:
    token: str
    hook_url: str = ""
    hook_secret: str = ""
    orders: dict[str, Order] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # Mayak customer id -> DMS customer number
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1001))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def check(self, request: Request) -> None:
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), self.token.encode()):
            raise HTTPException(401, "bad DMS token")

    async def report_completion(self, order: Order) -> None:
        """Tell Mayak, signed with the hook's secret (Standard Webhooks)."""
        body = orjson.dumps(
            {
                "type": "service.completed",
                "customer_ref": order.customer_ref,
                "order_id": order.id,
                "car_model": order.car_model,
                "total": order.total,
            }
        )
        msg_id = f"dms-{order.id}-completed"
        headers = webhooks.headers(self.hook_secret, msg_id, body) | {"content-type": "application/json"}
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(self.hook_url, content=body, headers=headers)
        log.info("dms_reported_completion", order=order.id, status=r.status_code)


def router(dms: Dms) -> APIRouter:
    api = APIRouter(prefix="/demo/dms", tags=["demo DMS"], include_in_schema=False)

    @api.post("/bookings", status_code=201)
    async def book(request: Request) -> dict[str, Any]:
        dms.check(request)
        data = orjson.loads(await request.body() or b"{}")
        customer_id = str(data.get("customer_id") or "")
        if not customer_id or not data.get("date"):
            raise HTTPException(422, "customer_id and date are required")
        ref = dms.refs.setdefault(customer_id, f"DMS-{len(dms.refs) + 1:05d}")
        n = next(dms.counter)
        order = Order(
            id=f"WO-{n}",
            booking_id=f"B-{n}",
            customer_id=customer_id,
            customer_ref=ref,
            car_model=str(data.get("car") or "car"),
            date=str(data["date"]),
            time=str(data.get("time") or ""),
            total=1_250_000,
        )
        dms.orders[order.id] = order
        return {"id": order.booking_id, "order_id": order.id, "customer_ref": ref, "status": order.status}

    @api.get("/orders")
    async def order_status(request: Request, customer_id: str = "") -> dict[str, Any]:
        dms.check(request)
        mine = [o for o in dms.orders.values() if o.customer_id == customer_id]
        if not mine:
            return {}
        order = mine[-1]
        return {"id": order.id, "status": order.status, "car_model": order.car_model, "date": order.date}

    @api.get("/orders/all")
    async def all_orders() -> list[dict[str, Any]]:
        return [o.__dict__ | {} for o in dms.orders.values()]

    @api.post("/orders/{order_id}/complete")
    async def complete(order_id: str) -> dict[str, Any]:
        """What a service advisor's "done" button would do. Open for the demo page."""
        order = dms.orders.get(order_id)
        if order is None:
            raise HTTPException(404, "no such order")
        order.status = "ready for pickup"
        task = asyncio.create_task(dms.report_completion(order))
        dms.tasks.add(task)
        task.add_done_callback(dms.tasks.discard)
        return {"id": order.id, "status": order.status}

    return api
