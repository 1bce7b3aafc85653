"""Runs named metric sources at scrape time, timing each and containing its failures.

The pattern is node_exporter's: every source gets ``sidecar_scrape_collector_duration_seconds``
and ``sidecar_scrape_collector_success``; an exception in one source is logged, counted in
``sidecar_collector_errors_total`` and leaves the rest of the scrape intact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

Source = Callable[[], Iterable[Metric]]


class SourceCollector(Collector):
    """A prometheus_client collector over a fixed set of named sources."""

    def __init__(self, sources: Mapping[str, Source]) -> None:
        self._sources = dict(sources)
        self._errors = dict.fromkeys(self._sources, 0)
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        duration = GaugeMetricFamily(
            "sidecar_scrape_collector_duration_seconds",
            "Seconds each collector took during this scrape.",
            labels=["collector"],
        )
        success = GaugeMetricFamily(
            "sidecar_scrape_collector_success",
            "1 if the collector succeeded during this scrape, 0 if it failed.",
            labels=["collector"],
        )
        for name, source in self._sources.items():
            started = time.perf_counter()
            try:
                families = list(source())
            except Exception:
                logger.exception(
                    "collector %s failed; its metrics are missing from this scrape", name
                )
                with self._lock:
                    self._errors[name] += 1
                families = []
                ok = 0
            else:
                ok = 1
            yield from families
            duration.add_metric([name], time.perf_counter() - started)
            success.add_metric([name], ok)

        errors = CounterMetricFamily(
            "sidecar_collector_errors",
            "Scrapes in which the collector raised an error.",
            labels=["collector"],
        )
        with self._lock:
            for name, count in self._errors.items():
                errors.add_metric([name], count)
        yield duration
        yield success
        yield errors
