"""Periodic OTLP push of every metric family ``/metrics`` shows.

How one export works, on a worker thread so the event loop never waits for it:

1. ``families()`` is read once into a :class:`~sidecar.telemetry.snapshot.Snapshot`: every
   value of one export comes from the same instant, as in one scrape.
2. :class:`~sidecar.telemetry.convert.Converter` turns it into the SDK's metric data model
   (``Sum``, ``Gauge``, ``Histogram`` with explicit buckets); no SDK instrument is involved, so
   hot paths keep recording into prometheus_client only.
3. The SDK's OTLP/HTTP exporter encodes and posts it, retrying 429/502/503/504 (honouring
   ``Retry-After``) and connection errors within the configured timeout. A failed export is
   counted and dropped: the next one carries the same cumulative totals, so nothing queues up
   while the collector is away.

Exports never overlap: the loop waits for one to finish before scheduling the next, so at
most one snapshot is alive at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable, Iterable

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData
from prometheus_client.core import Metric

from sidecar.fields import format_duration
from sidecar.telemetry import sdk
from sidecar.telemetry.config import TelemetryConfig
from sidecar.telemetry.convert import Converter
from sidecar.telemetry.snapshot import take_snapshot
from sidecar.telemetry.stats import ExportStats

logger = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[int], int] | None:
    # glibc keeps the heap pages an export's protobuf messages used; malloc_trim hands them
    # back to the system (about 5 MB for 10,000 series, in well under a millisecond). Other C
    # libraries (musl) have no such function, and the export simply runs without it.
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    trim = getattr(ctypes.CDLL(path), "malloc_trim", None)
    return trim if callable(trim) else None


_malloc_trim = _load_malloc_trim()


class MetricsPush:
    """A component that exports ``families()`` to ``<endpoint>/v1/metrics`` every interval."""

    def __init__(
        self,
        config: TelemetryConfig,
        families: Callable[[], Iterable[Metric]],
        stats: ExportStats,
    ) -> None:
        self._config = config
        self._families = families
        self._stats = stats
        self._transport = sdk.build_transport(config)
        self._exporter = sdk.build_metric_exporter(config, self._transport)
        self._converter = Converter(
            sdk.build_resource(config), sdk.SCOPE_NAME, config.metrics.temporality == "delta"
        )
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def exporting(self) -> bool:
        """Whether an export is running right now."""
        return self._thread_lock.locked()

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
            try:
                data = self.collect()
            except Exception:
                # A broken family source must not end the export loop; the scrape that reads
                # the same source reports it too.
                logger.exception("reading the metric families for OTLP export failed")
                self._stats.record("metrics", False, time.perf_counter() - started)
                return False
            result = self._exporter.export(data, timeout_millis=self._config.timeout * 1000)
            succeeded = result is MetricExportResult.SUCCESS
            elapsed = time.perf_counter() - started
            del data
            if _malloc_trim is not None:
                _malloc_trim(0)
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
                self._transport.last_outcome,
                format_duration(self._config.metrics.interval),
            )
        self._failing = not succeeded

    def collect(self) -> MetricsData:
        """Read the families once and return them in the SDK's data model, ready to export."""
        return self._converter.convert(take_snapshot(self._families()))
