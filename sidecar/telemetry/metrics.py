"""Periodic OTLP push of every metric family ``/metrics`` shows.

How one export works, on a worker thread so the event loop never waits for it:

1. ``families()`` is read once into a :class:`~sidecar.telemetry.snapshot.Snapshot`.
2. Counters and gauges go through the SDK: one observable counter or gauge per family,
   created the first time the family is seen, whose callback returns the snapshot's samples
   as observations. The SDK's aggregation gives them their OTLP shape, start times, and delta
   temporality when configured. Nothing is recorded on a hot path: the callbacks run only here.
3. Histograms cannot go that way: the SDK has no observable histogram, and a synchronous one
   would have to replay every observation. :class:`SnapshotReader`, a pull ``MetricReader``,
   receives the SDK's collection, and this module adds the snapshot's histograms to it as SDK
   ``Histogram`` metrics with ``HistogramDataPoint``s (explicit bounds from ``le``, per-bucket
   counts, count and sum; min and max left unset because Prometheus does not keep them).
4. The merged ``MetricsData`` goes to the SDK's OTLP/HTTP exporter, which encodes it and
   retries 429/502/503/504 (honouring ``Retry-After``) and connection errors within the
   configured timeout. A failed export is counted and dropped: the next one carries the same
   cumulative totals, so nothing queues up while the collector is away.

Exports never overlap: the loop waits for one to finish before scheduling the next, so at
most one snapshot is alive at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    ExemplarReservoir,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Metric as DataMetric
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.core import Metric

from sidecar import __version__
from sidecar.fields import format_duration
from sidecar.telemetry import sdk
from sidecar.telemetry.config import TelemetryConfig
from sidecar.telemetry.snapshot import COUNTER, HistogramFamily, Snapshot, take_snapshot
from sidecar.telemetry.stats import ExportStats

logger = logging.getLogger(__name__)

# The instrument name syntax of the OpenTelemetry metrics API; Prometheus also allows ':'.
_INSTRUMENT_NAME = re.compile(r"^[A-Za-z][-_./A-Za-z0-9]{0,254}$")
# The SDK folds attribute sets beyond 2,000 per instrument into one overflow point. /metrics
# shows every series, and the parts that create series cap them upstream (the application
# store's series limit), so the export must not apply a second, different cap.
_NO_CARDINALITY_LIMIT = 2**31 - 1


class MetricsPush:
    """A component that exports ``families()`` to ``<endpoint>/v1/metrics`` every interval.

    ``exporter`` defaults to the OTLP/HTTP exporter the configuration describes; the benchmark
    passes its own to measure the cost without a network.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        families: Callable[[], Iterable[Metric]],
        stats: ExportStats,
        exporter: MetricExporter | None = None,
    ) -> None:
        self._config = config
        self._families = families
        self._stats = stats
        self._session = sdk.ExportSession()
        self._exporter = exporter or sdk.build_metric_exporter(config, self._session)
        self._delta = config.metrics.temporality == "delta"
        temporality: dict[type, AggregationTemporality] = {
            ObservableCounter: AggregationTemporality.DELTA
            if self._delta
            else AggregationTemporality.CUMULATIVE
        }
        self._reader = SnapshotReader(temporality)
        self._resource = sdk.build_resource(config)
        self._provider = MeterProvider(
            resource=self._resource,
            metric_readers=[self._reader],
            shutdown_on_exit=False,
            # Exemplars need a measurement in a span's context; observations at export time
            # never have one. Without reservoirs, each collection is about a third cheaper.
            exemplar_filter=AlwaysOffExemplarFilter(),
            views=[View(instrument_name="*", exemplar_reservoir_factory=_no_exemplars)],
        )
        self._meter = self._provider.get_meter(sdk.SCOPE_NAME, __version__)
        self._observations: dict[tuple[str, str], list[Observation]] = {}
        self._instruments: dict[tuple[str, str], object] = {}
        self._skipped_names: set[str] = set()
        # Start of the cumulative histograms; in delta mode, each key's previous export.
        self._start_ns = time.time_ns()
        self._previous: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Any, int]] = {}
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.exports = 0
        """Finished exports, successful or not (for tests and the benchmark)."""

    @property
    def url(self) -> str:
        """Where metrics are sent."""
        return sdk.signal_url(self._config, "metrics")

    async def start(self) -> None:
        logger.info(
            "exporting metrics over OTLP/HTTP to %s every %s",
            self.url,
            format_duration(self._config.metrics.interval),
        )
        self._task = asyncio.create_task(self._loop(), name="otel-metrics-export")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # An export in flight keeps its worker thread until its timeout; shutting the
        # exporter down makes its retry wait return at once.
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._exporter.shutdown(timeout_millis=1000)
        self._provider.shutdown(timeout_millis=1000)

    async def _loop(self) -> None:
        interval = self._config.metrics.interval
        next_export = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(next_export - time.monotonic(), 0.0))
            try:
                await self.export()
            except Exception:
                logger.exception("metrics export failed unexpectedly; trying again next interval")
            # A slow export skips the ticks it overran instead of queueing them.
            next_export += interval * max(1, int((time.monotonic() - next_export) // interval) + 1)

    async def export(self) -> bool:
        """Export one snapshot now; return whether the receiver accepted it."""
        async with self._lock:
            return await asyncio.to_thread(self.export_sync)

    def export_sync(self) -> bool:
        """Export one snapshot on the calling thread (never call it on the event loop)."""
        with self._thread_lock:
            started = time.perf_counter()
            data = self.collect()
            result = self._exporter.export(data, timeout_millis=self._config.timeout * 1000)
            succeeded = result is MetricExportResult.SUCCESS
            elapsed = time.perf_counter() - started
            self.exports += 1
        self._stats.record("metrics", succeeded, elapsed)
        self._report(succeeded, elapsed)
        return succeeded

    def _report(self, succeeded: bool, elapsed: float) -> None:
        if succeeded and self._failing:
            logger.info("metrics export to %s works again", self.url)
        elif not succeeded:
            logger.warning(
                "metrics export to %s failed after %.1fs: %s; the data of this interval is "
                "dropped and the next export in %s carries the totals",
                self.url,
                elapsed,
                self._session.last_outcome,
                format_duration(self._config.metrics.interval),
            )
        self._failing = not succeeded

    def collect(self) -> MetricsData:
        """Read the families once and return them in the SDK's data model, ready to export."""
        snapshot = take_snapshot(self._families())
        self._observe(snapshot)
        collected = self._reader.take()
        now_ns = time.time_ns()
        histograms = [self._histogram(family, now_ns) for family in snapshot.histograms]
        # The callbacks have run: the observations need not outlive this collection.
        self._observations = {}
        return self._merge(collected, histograms)

    def _observe(self, snapshot: Snapshot) -> None:
        observations: dict[tuple[str, str], list[Observation]] = {}
        for key, series in snapshot.numbers.items():
            if key not in self._instruments and not self._create_instrument(
                key, series.description, series.unit
            ):
                continue
            observations[key] = [Observation(value, labels) for value, labels in series.points]
        self._observations = observations

    def _create_instrument(self, key: tuple[str, str], description: str, unit: str) -> bool:
        kind, name = key
        if not _INSTRUMENT_NAME.match(name):
            if name not in self._skipped_names:
                self._skipped_names.add(name)
                logger.warning(
                    "metric %s is not exported over OTLP: its name is not a valid "
                    "OpenTelemetry instrument name",
                    name,
                )
            return False

        def callback(options: CallbackOptions, key: tuple[str, str] = key) -> Sequence[Observation]:
            return self._observations.get(key, ())

        create = (
            self._meter.create_observable_counter
            if kind == COUNTER
            else self._meter.create_observable_gauge
        )
        self._instruments[key] = create(name, [callback], unit=unit, description=description)
        return True

    def _histogram(self, family: HistogramFamily, now_ns: int) -> DataMetric:
        points = []
        for series in family.series:
            counts: Sequence[int] = series.counts
            count, total, start_ns = series.count, series.sum, self._start_ns
            if self._delta:
                key = (family.name, tuple(series.attributes.items()))
                previous = self._previous.get(key)
                self._previous[key] = ((series.counts, series.count, series.sum), now_ns)
                if previous is not None:
                    (old_counts, old_count, old_sum), start_ns = previous
                    # A total below the previous one means the series restarted (OTLP data
                    # model, "resets"): report it whole from the previous export.
                    if count >= old_count and len(old_counts) == len(counts):
                        counts = [new - old for new, old in zip(counts, old_counts, strict=True)]
                        count, total = count - old_count, total - old_sum
            points.append(
                HistogramDataPoint(
                    attributes=series.attributes,
                    start_time_unix_nano=start_ns,
                    time_unix_nano=now_ns,
                    count=count,
                    sum=total,
                    bucket_counts=counts,
                    explicit_bounds=series.bounds,
                    # Prometheus keeps neither; None leaves the optional fields unset.
                    min=None,  # type: ignore[arg-type]
                    max=None,  # type: ignore[arg-type]
                )
            )
        temporality = (
            AggregationTemporality.DELTA if self._delta else AggregationTemporality.CUMULATIVE
        )
        return DataMetric(
            name=family.name,
            description=family.description,
            unit=family.unit,
            data=Histogram(data_points=points, aggregation_temporality=temporality),
        )

    def _merge(self, collected: MetricsData | None, histograms: list[DataMetric]) -> MetricsData:
        metrics: list[DataMetric] = []
        if collected is not None:
            for resource_metrics in collected.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    metrics.extend(scope_metrics.metrics)
        metrics.extend(histograms)
        scope = ScopeMetrics(
            scope=InstrumentationScope(sdk.SCOPE_NAME, __version__),
            metrics=metrics,
            schema_url="",
        )
        return MetricsData(
            resource_metrics=[
                ResourceMetrics(resource=self._resource, scope_metrics=[scope], schema_url="")
            ]
        )


class _NoExemplars(ExemplarReservoir):
    """A reservoir that keeps nothing: observable instruments never have exemplars here."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    def offer(self, value: float, time_unix_nano: int, attributes: Any, context: Any) -> None:
        return None

    def collect(self, point_attributes: Any) -> list[Any]:
        return []


def _no_exemplars(aggregation_type: type) -> type[_NoExemplars]:
    return _NoExemplars


class SnapshotReader(MetricReader):
    """A pull reader: ``take()`` runs the observable callbacks and returns the collection."""

    def __init__(self, temporality: dict[type, Any]) -> None:
        super().__init__(
            preferred_temporality=temporality,
            cardinality_limits={
                ObservableCounter: _NO_CARDINALITY_LIMIT,
                ObservableGauge: _NO_CARDINALITY_LIMIT,
            },
        )
        self._received: MetricsData | None = None

    def take(self) -> MetricsData | None:
        """Collect now; None when no instrument exists yet."""
        self._received = None
        self.collect()
        received, self._received = self._received, None
        return received

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self._received = metrics_data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._received = None
