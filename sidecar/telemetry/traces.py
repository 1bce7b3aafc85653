"""Trace export: the SDK's batch processor in front of the OTLP/HTTP span exporter.

Finished spans wait in a bounded queue (``traces.max_queue_size``; the SDK drops spans beyond
it) and are sent by the processor's own thread, so ending a span on the event loop only
appends to that queue. Every export request is counted in ``sidecar_otel_exports_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from sidecar import __version__
from sidecar.telemetry import sdk
from sidecar.telemetry.config import TelemetryConfig
from sidecar.telemetry.stats import ExportStats
from sidecar.telemetry.tracing import SpanPipelineTracer
from sidecar.telemetry.transport import HttpxTransport

logger = logging.getLogger(__name__)

# How long the processor waits to fill a batch; spans of a delivery show up within this.
SCHEDULE_DELAY_MILLIS = 2000


class CountingSpanExporter(SpanExporter):
    """Delegates to another span exporter and counts each export's result and duration."""

    def __init__(
        self, exporter: SpanExporter, stats: ExportStats, url: str, transport: HttpxTransport
    ) -> None:
        self._exporter = exporter
        self._transport = transport
        self._stats = stats
        self._url = url
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        started = time.perf_counter()
        result = self._exporter.export(spans)
        succeeded = result is SpanExportResult.SUCCESS
        self._stats.record("traces", succeeded, time.perf_counter() - started)
        if not succeeded:
            logger.warning(
                "trace export to %s failed: %s; %d spans dropped",
                self._url,
                self._transport.last_outcome,
                len(spans),
            )
        elif self._failing:
            logger.info("trace export to %s works again", self._url)
        self._failing = not succeeded
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class TracePush:
    """A component owning the tracer provider; ``stop()`` flushes what is queued."""

    def __init__(self, config: TelemetryConfig, stats: ExportStats) -> None:
        self.url = sdk.signal_url(config, "traces")
        self._timeout = config.timeout
        transport = sdk.build_transport(config)
        exporter = CountingSpanExporter(
            sdk.build_span_exporter(config, transport), stats, self.url, transport
        )
        self.provider = TracerProvider(
            resource=sdk.build_resource(config),
            sampler=sdk.build_sampler(config),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=config.traces.max_queue_size,
                schedule_delay_millis=SCHEDULE_DELAY_MILLIS,
                max_export_batch_size=min(512, config.traces.max_queue_size),
                export_timeout_millis=config.timeout * 1000,
            )
        )
        self.tracer = SpanPipelineTracer(self.provider.get_tracer(sdk.SCOPE_NAME, __version__))

    async def start(self) -> None:
        logger.info("exporting alert-pipeline traces over OTLP/HTTP to %s", self.url)

    async def stop(self) -> None:
        # The flush runs on a worker thread: it may wait for the collector up to the timeout.
        await asyncio.to_thread(self.provider.shutdown)

    async def flush(self) -> bool:
        """Send every finished span now (tests use it instead of waiting for a batch)."""
        return await asyncio.to_thread(self.provider.force_flush, int(self._timeout * 1000))
