"""The alert pipeline's metrics, registered on the sidecar's own registry."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.alerts.outbox.base import OutboxStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class OutboxGauges(Collector):
    """Depth, limit, oldest age and dead letters from the latest outbox statistics.

    The statistics need a query of the outbox, which is asynchronous; the dispatcher refreshes
    them in the background and a scrape reads the latest values.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stats = OutboxStats(0, 0.0, 0)

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "sidecar_alerts_outbox_depth",
            "Deliveries accepted and not yet delivered or dead.",
            value=self.stats.depth,
        )
        yield GaugeMetricFamily(
            "sidecar_alerts_outbox_limit",
            "Most undelivered deliveries the outbox keeps before answering 503.",
            value=self.limit,
        )
        yield GaugeMetricFamily(
            "sidecar_alerts_outbox_oldest_age_seconds",
            "Age of the oldest undelivered delivery.",
            value=self.stats.oldest_age,
        )
        yield GaugeMetricFamily(
            "sidecar_alerts_dead_letters",
            "Deliveries given up on and kept for inspection.",
            value=self.stats.dead,
        )


class AlertMetrics:
    """Counters and histograms of the receiver and the dispatcher."""

    def __init__(self, registry: CollectorRegistry, limit: int) -> None:
        self.received = Counter(
            "sidecar_alerts_received",
            "Webhook notifications received, by outcome.",
            ["receiver", "outcome"],
            registry=registry,
        )
        self.deduplicated = Counter(
            "sidecar_alerts_deduplicated",
            "Notifications acknowledged without delivery because they were seen recently.",
            ["receiver"],
            registry=registry,
        )
        self.deliveries = Counter(
            "sidecar_alerts_deliveries",
            "Delivery attempts by final result: success, retry (scheduled again) or dead.",
            ["destination", "result"],
            registry=registry,
        )
        self.attempts = Counter(
            "sidecar_alerts_delivery_attempts",
            "Delivery attempts started.",
            ["destination"],
            registry=registry,
        )
        self.latency = Histogram(
            "sidecar_alerts_delivery_latency_seconds",
            "Time from acceptance of a notification to its delivery.",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.outbox = OutboxGauges(limit)
        registry.register(self.outbox)
