"""A minimal real OTLP/HTTP receiver for the tests, built on ``opentelemetry-proto``.

It serves ``POST /v1/metrics`` and ``POST /v1/traces`` on a free loopback port (uvicorn in a
thread), decodes the protobuf bodies (gzip or plain) exactly as a collector would, and keeps
them for assertions. ``fail_next(n, status)`` makes it answer the next ``n`` requests with an
error, to test retries and recovery.
"""

from __future__ import annotations

import gzip
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.harness import free_port, wait_until

MAX_BODY = 32 * 1024 * 1024


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP key-value pairs as a dict."""
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass
class Received:
    """What arrived, in order."""

    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


class OtlpReceiver:
    """Start with ``start()``; ``url`` is the base endpoint to configure in the sidecar."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.received = Received()
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._failures: list[tuple[int, dict[str, str]]] = []
        app = Starlette(
            routes=[
                Route("/v1/metrics", self._metrics, methods=["POST"]),
                Route("/v1/traces", self._traces, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="otlp-receiver", daemon=True)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        wait_until(lambda: self._server.started, timeout=10, what="OTLP receiver")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def fail_next(self, count: int, status: int = 503, retry_after: str | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (and ``Retry-After``)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._failures.extend([(status, headers)] * count)

    def recover(self) -> None:
        """Answer every request normally again."""
        with self._lock:
            self._failures.clear()

    async def _body(self, request: Request) -> bytes | Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return Response(status_code=413)
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return body

    def _failure(self) -> Response | None:
        with self._lock:
            if not self._failures:
                return None
            status, headers = self._failures.pop(0)
            self.received.statuses.append(status)
        return Response(b"unavailable", status_code=status, headers=headers)

    async def _metrics(self, request: Request) -> Response:
        if (failure := self._failure()) is not None:
            return failure
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        message = ExportMetricsServiceRequest()
        try:
            message.ParseFromString(body)
        except DecodeError:
            return Response(b"bad protobuf", status_code=400)
        with self._lock:
            self.received.metrics.append(message)
            self.received.statuses.append(200)
            self.headers.append(dict(request.headers))
        return Response(
            ExportMetricsServiceResponse().SerializeToString(),
            media_type="application/x-protobuf",
        )

    async def _traces(self, request: Request) -> Response:
        if (failure := self._failure()) is not None:
            return failure
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        message = ExportTraceServiceRequest()
        try:
            message.ParseFromString(body)
        except DecodeError:
            return Response(b"bad protobuf", status_code=400)
        with self._lock:
            self.received.traces.append(message)
            self.received.statuses.append(200)
        return Response(
            ExportTraceServiceResponse().SerializeToString(),
            media_type="application/x-protobuf",
        )

    def wait_for_metrics(
        self, count: int = 1, timeout: float = 15.0
    ) -> ExportMetricsServiceRequest:
        """The ``count``-th metrics request, once it has arrived."""
        wait_until(
            lambda: len(self.received.metrics) >= count, timeout=timeout, what="metrics export"
        )
        return self.received.metrics[count - 1]

    def spans(self) -> list[Any]:
        """Every span received so far."""
        return [
            span
            for request in self.received.traces
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


def resource_of(request: ExportMetricsServiceRequest) -> dict[str, Any]:
    """The resource attributes of a single-resource export."""
    (resource_metrics,) = request.resource_metrics
    return attributes(resource_metrics.resource.attributes)


def series_of(request: ExportMetricsServiceRequest) -> dict[tuple[str, frozenset[Any]], Any]:
    """Every data point as Prometheus would name it: ``{(sample name, labels): value}``.

    Sums become ``<name>_total``, histograms ``_bucket`` (cumulative, ``le`` added as a float),
    ``_count`` and ``_sum``, so the result compares directly with a parsed ``/metrics`` page.
    """
    series: dict[tuple[str, frozenset[Any]], Any] = {}
    for metric in _metrics(request):
        kind = metric.WhichOneof("data")
        if kind == "sum":
            # A summary's `_count` and `_sum` travel as sums under their own sample names.
            summary_part = metric.name.endswith(("_count", "_sum"))
            name = metric.name if summary_part else metric.name + "_total"
            for point in metric.sum.data_points:
                series[(name, _labels(point.attributes))] = _number(point)
        elif kind == "gauge":
            for point in metric.gauge.data_points:
                series[(metric.name, _labels(point.attributes))] = _number(point)
        elif kind == "histogram":
            for point in metric.histogram.data_points:
                labels = attributes(point.attributes)
                running = 0
                bounds = [*point.explicit_bounds, math.inf]
                for bound, count in zip(bounds, point.bucket_counts, strict=True):
                    running += count
                    le = {**labels, "le": bound}
                    series[(metric.name + "_bucket", frozenset(le.items()))] = running
                series[(metric.name + "_count", frozenset(labels.items()))] = point.count
                series[(metric.name + "_sum", frozenset(labels.items()))] = point.sum
    return series


def _metrics(request: ExportMetricsServiceRequest) -> Iterator[Any]:
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            yield from scope_metrics.metrics


def metric_named(request: ExportMetricsServiceRequest, name: str) -> Any:
    """The one metric called ``name`` in an export."""
    (metric,) = [metric for metric in _metrics(request) if metric.name == name]
    return metric


def _labels(pairs: Any) -> frozenset[Any]:
    return frozenset(attributes(pairs).items())


def _number(point: Any) -> float:
    return float(point.as_int if point.WhichOneof("value") == "as_int" else point.as_double)
