"""Outward delivery: the outbox, durable timers, and event destinations (signed webhooks)."""
