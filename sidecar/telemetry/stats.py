"""The sidecar's own metrics about OTLP export, on prometheus_client (no SDK import)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

SIGNALS = ("metrics", "traces")


class ExportStats:
    """``sidecar_otel_exports_total{signal,result}`` and
    ``sidecar_otel_export_duration_seconds{signal}``.

    Registered whether or not export is configured, with every label pair at zero, so that an
    alert on failures has a series to read from the first scrape.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._exports = Counter(
            "sidecar_otel_exports",
            "OTLP export requests by signal and result, retries within one export included.",
            ["signal", "result"],
            registry=registry,
        )
        self._duration = Histogram(
            "sidecar_otel_export_duration_seconds",
            "Seconds one OTLP export took, retries included.",
            ["signal"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        for signal in SIGNALS:
            self._duration.labels(signal)
            for result in ("success", "failure"):
                self._exports.labels(signal, result)

    def record(self, signal: str, succeeded: bool, seconds: float) -> None:
        """Count one finished export of ``signal`` and how long it took."""
        self._exports.labels(signal, "success" if succeeded else "failure").inc()
        self._duration.labels(signal).observe(seconds)
