"""Builds the OpenTelemetry SDK objects from the ``telemetry`` section.

Imported only when export is configured: it pulls in the SDK, protobuf and requests. Every
argument is passed explicitly, so the SDK's own reading of ``OTEL_*`` variables never decides
anything that the configuration (file over environment) already decided.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.version import __version__ as sdk_version

from sidecar import __version__
from sidecar.telemetry.config import TelemetryConfig
from sidecar.telemetry.transport import HttpxTransport

if TYPE_CHECKING:
    # The tracing SDK costs about 5 MB resident: imported only when traces are on.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

SCOPE_NAME = "sidecar"


def build_resource(config: TelemetryConfig) -> Resource:
    """The resource of every export: configured attributes plus the SDK's own description."""
    attributes: dict[str, str] = {
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": sdk_version,
        "service.version": __version__,
        "process.runtime.name": platform.python_implementation().lower(),
        "process.runtime.version": platform.python_version(),
    }
    attributes.update(config.resource_attributes())
    # Resource(...) rather than Resource.create(...): create() would read OTEL_RESOURCE_ATTRIBUTES
    # and run detectors named by the environment behind the configuration's back.
    return Resource(attributes)


def build_transport(config: TelemetryConfig) -> HttpxTransport:
    """The HTTP transport for one exporter of this configuration."""
    assert config.endpoint is not None
    headers = {name: value.reveal() for name, value in config.headers.items()}
    return HttpxTransport(tls=config.endpoint.startswith("https://"), headers=headers)


def signal_url(config: TelemetryConfig, signal: str) -> str:
    """``<endpoint>/v1/<signal>``, as the OTLP/HTTP specification builds it from a base URL."""
    assert config.endpoint is not None
    return f"{config.endpoint}/v1/{signal}"


def _common_arguments(config: TelemetryConfig, transport: HttpxTransport) -> dict[str, Any]:
    return {
        # The transport adds the configured headers itself (see HttpxTransport).
        "headers": {},
        "timeout": config.timeout,
        "compression": Compression.Gzip
        if config.compression == "gzip"
        else Compression.NoCompression,
        # One transport per exporter keeps the connection to the collector open between
        # exports; see sidecar.telemetry.transport for why not the default one.
        "_transport": transport,
    }


def build_metric_exporter(config: TelemetryConfig, transport: HttpxTransport) -> OTLPMetricExporter:
    """The OTLP/HTTP metric exporter; it retries 429/502/503/504 within ``config.timeout``."""
    url = signal_url(config, "metrics")
    return OTLPMetricExporter(endpoint=url, **_common_arguments(config, transport))


def build_span_exporter(config: TelemetryConfig, transport: HttpxTransport) -> OTLPSpanExporter:
    """The OTLP/HTTP span exporter, with the same retry rules as metrics."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = signal_url(config, "traces")
    return OTLPSpanExporter(endpoint=url, **_common_arguments(config, transport))


def build_sampler(config: TelemetryConfig) -> Sampler:
    """The sampler the ``traces.sampler`` and ``traces.ratio`` keys name."""
    from opentelemetry.sdk.trace import sampling

    name = config.traces.sampler
    root: Sampler
    if name.endswith("always_on"):
        root = sampling.ALWAYS_ON
    elif name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(config.traces.ratio)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root
