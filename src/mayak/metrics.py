"""Prometheus metrics, one registry per process (exposed at ``/metrics``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_accepted = Counter("mayak_events_accepted", "Events accepted into the log", registry=r)
        self.events_rejected = Counter(
            "mayak_events_rejected", "Events refused at ingestion", ["code"], registry=r
        )
        self.events_deduplicated = Counter(
            "mayak_events_deduplicated", "Events dropped as duplicates of an earlier messageId", registry=r
        )
        self.events_processed = Counter(
            "mayak_events_processed", "Events processed by the pipeline", registry=r
        )
        self.events_suppressed = Counter(
            "mayak_events_suppressed", "Events dropped because their person was erased", registry=r
        )
        self.pipeline_lag = Gauge(
            "mayak_pipeline_lag_events", "Events in the log not yet processed", registry=r
        )
        self.outbox_depth = Gauge("mayak_outbox_depth", "Outbox rows not yet delivered or dead", registry=r)
        self.outbox_delivered = Counter(
            "mayak_outbox_delivered", "Outbox rows delivered", ["kind"], registry=r
        )
        self.outbox_failed = Counter(
            "mayak_outbox_attempts_failed", "Failed delivery attempts", ["kind"], registry=r
        )
        self.outbox_dead = Counter("mayak_outbox_dead", "Outbox rows dead-lettered", ["kind"], registry=r)
        self.timers_fired = Counter("mayak_timers_fired", "Durable timers fired", registry=r)
        self.merges = Counter("mayak_customers_merged", "Customer merges", registry=r)
        self.conflicts = Counter("mayak_identity_conflicts", "Identity conflicts recorded", registry=r)
        self.commit_seconds = Histogram(
            "mayak_ingest_commit_seconds",
            "Ingest writer: from a group's last statement until its transaction has committed",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.request_seconds = Histogram(
            "mayak_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

    def watch_push_bus(self, bus: Any) -> None:
        """Expose the push bus's frame counters (``mayak.bus.PushBus``) as
        ``mayak_push_frames_total{bus, outcome}``: published, received, own (our publications coming
        back, ignored) and dropped (at most once: the next connection's history shows the message)."""
        self.registry.register(_PushBusCollector(bus))


class _PushBusCollector(Collector):
    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "mayak_push_frames", "Web-chat frames on the push bus, by outcome", labels=["bus", "outcome"]
        )
        for outcome in ("published", "received", "own", "dropped"):
            family.add_metric([self.bus.name, outcome], float(getattr(self.bus, outcome)))
        yield family
