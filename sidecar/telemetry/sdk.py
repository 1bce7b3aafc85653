"""Builds the OpenTelemetry SDK objects from the ``telemetry`` section.

Imported only when export is configured: it pulls in the SDK, protobuf and requests. Every
argument is passed explicitly, so the SDK's own reading of ``OTEL_*`` variables never decides
anything that the configuration (file over environment) already decided.
"""

from __future__ import annotations

import platform
import re
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.version import __version__ as sdk_version

from sidecar import __version__
from sidecar.telemetry.config import TelemetryConfig

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


def signal_url(config: TelemetryConfig, signal: str) -> str:
    """``<endpoint>/v1/<signal>``, as the OTLP/HTTP specification builds it from a base URL."""
    assert config.endpoint is not None
    return f"{config.endpoint}/v1/{signal}"


_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")


class ExportSession(requests.Session):
    """The HTTP session of one exporter; remembers how its last request went.

    The SDK's exporter returns only success or failure; this keeps the cause (a status line or
    the connection error) so that the sidecar's log says why an export failed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_outcome = "no request was sent"

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.Timeout:
            self.last_outcome = "the request timed out"
            raise
        except requests.ConnectionError as error:
            found = _ERRNO.search(str(error))
            self.last_outcome = (
                f"cannot connect ({found.group(0) if found else type(error).__name__})"
            )
            raise
        except requests.RequestException as error:
            self.last_outcome = f"request failed ({type(error).__name__})"
            raise
        self.last_outcome = f"answered {response.status_code} {response.reason}"
        return response


def _common_arguments(config: TelemetryConfig, session: ExportSession) -> dict[str, Any]:
    return {
        "headers": {name: value.reveal() for name, value in config.headers.items()},
        "timeout": config.timeout,
        "compression": Compression.Gzip
        if config.compression == "gzip"
        else Compression.NoCompression,
        # One session per exporter keeps the connection to the collector open between exports.
        "session": session,
    }


def build_metric_exporter(config: TelemetryConfig, session: ExportSession) -> OTLPMetricExporter:
    """The OTLP/HTTP metric exporter; it retries 429/502/503/504 within ``config.timeout``."""
    url = signal_url(config, "metrics")
    return OTLPMetricExporter(endpoint=url, **_common_arguments(config, session))


def build_span_exporter(config: TelemetryConfig, session: ExportSession) -> OTLPSpanExporter:
    """The OTLP/HTTP span exporter, with the same retry rules as metrics."""
    url = signal_url(config, "traces")
    return OTLPSpanExporter(endpoint=url, **_common_arguments(config, session))


def build_sampler(config: TelemetryConfig) -> Sampler:
    """The sampler the ``traces.sampler`` and ``traces.ratio`` keys name."""
    name = config.traces.sampler
    root: Sampler
    if name.endswith("always_on"):
        root = sampling.ALWAYS_ON
    elif name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(config.traces.ratio)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root
