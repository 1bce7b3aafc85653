"""Builds application-metric ingest (store, StatsD listener, OTLP receiver) into a sidecar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.metrics.mapping import Mapper
from sidecar.metrics.otlp import OtlpCollector, OtlpReceiver
from sidecar.metrics.statsd import StatsdCollector, StatsdIngest, StatsdListener
from sidecar.metrics.store import IngestCollector, IngestStats, Store, StoreCollector

if TYPE_CHECKING:
    from sidecar.app import Sidecar


@dataclass
class Ingest:
    """The parts of application-metric ingest, for tests and other parts to reach."""

    store: Store
    stats: IngestStats
    statsd: StatsdListener | None
    otlp: OtlpReceiver | None


def build_ingest(sidecar: Sidecar) -> Ingest:
    """Create the store and the enabled inputs, and register them with the sidecar.

    The store's text goes to ``/metrics`` as a text source (cached label text; far cheaper than
    prometheus_client collectors); its own metrics and the inputs' go to the registry.
    """
    from sidecar.app import Listener

    config = sidecar.config.ingest
    store = Store(
        ttl=config.store.ttl,
        max_series=config.store.max_series,
        max_series_per_family=config.store.max_series_per_family,
    )
    stats = IngestStats()
    sidecar.registry.register(StoreCollector(store))
    sidecar.registry.register(IngestCollector(stats))
    sidecar.exposition.add_text_source(store.render, store.families)

    statsd = None
    if config.statsd.enabled:
        ingest = StatsdIngest(
            store, stats, Mapper(config.statsd.mappings), config.statsd.timer_buckets
        )
        statsd = StatsdListener(config.statsd, ingest)
        sidecar.components.append(statsd)
        sidecar.registry.register(StatsdCollector(statsd))

    otlp = None
    if config.otlp.enabled:
        otlp = OtlpReceiver(config.otlp, store, stats)
        sidecar.registry.register(OtlpCollector(otlp))
        # No landing-page link: the receiver is on its own listener, not a path of this one.
        sidecar.extra_listeners.append(Listener("otlp", config.otlp.listen, otlp.app))
    return Ingest(store, stats, statsd, otlp)
