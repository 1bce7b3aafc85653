"""OpenTelemetry push: OTLP export of every metric ``/metrics`` shows, and pipeline traces.

Importing this package is cheap: the OpenTelemetry SDK is imported only when export is
configured, so an idle sidecar without an endpoint carries none of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from sidecar.errors import StartupError
from sidecar.telemetry.config import TelemetryConfig
from sidecar.telemetry.stats import ExportStats
from sidecar.telemetry.tracing import NOOP_TRACER, PipelineTracer

if TYPE_CHECKING:
    from sidecar.telemetry.metrics import MetricsPush
    from sidecar.telemetry.traces import TracePush


@dataclass
class Telemetry:
    """What the composition root needs: the tracer to hand to the alert pipeline, and the
    components to start and stop."""

    tracer: PipelineTracer = NOOP_TRACER
    metrics: MetricsPush | None = None
    traces: TracePush | None = None
    components: list[Any] = field(default_factory=list)


def build_telemetry(
    config: TelemetryConfig,
    families: Callable[[], Iterable[Metric]],
    registry: CollectorRegistry,
) -> Telemetry:
    """Build metric and trace export as configured; import the SDK only for what is on."""
    telemetry = Telemetry()
    stats = ExportStats(registry)
    try:
        if config.metrics_active:
            from sidecar.telemetry.metrics import MetricsPush

            telemetry.metrics = MetricsPush(config, families, stats)
            telemetry.components.append(telemetry.metrics)
        if config.traces_active:
            # Separately: the tracing SDK adds about 5 MB that metrics alone do not need.
            from sidecar.telemetry.traces import TracePush

            telemetry.traces = TracePush(config, stats)
            telemetry.tracer = telemetry.traces.tracer
            telemetry.components.append(telemetry.traces)
    except ImportError as error:
        raise StartupError(
            f"telemetry.endpoint is set but the OpenTelemetry packages are missing ({error}); "
            "install them with: pip install 'sidecar[otel]'"
        ) from error
    return telemetry
