"""The ``telemetry`` section: OTLP push of metrics and traces, and its environment variables.

The standard OpenTelemetry variables are read here and nowhere else, from the environment
mapping that ``sidecar.config`` passes in the validation context. They fill the keys the file
leaves out, so the file wins wherever both set a value. Export stays off until an endpoint is
configured by either.

Variables understood (OpenTelemetry SDK environment specification):
``OTEL_SDK_DISABLED``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``
(only ``http/protobuf``), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``,
``OTEL_EXPORTER_OTLP_COMPRESSION``, ``OTEL_METRIC_EXPORT_INTERVAL``,
``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``, ``OTEL_METRICS_EXPORTER``,
``OTEL_TRACES_EXPORTER``, ``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``. Kubernetes attributes come from the
downward-API variables ``K8S_POD_NAME``, ``K8S_POD_UID``, ``K8S_NAMESPACE_NAME`` (or
``POD_NAMESPACE``) and ``K8S_NODE_NAME``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from sidecar.fields import Duration, Secret, Section

# RFC 9110 token characters: what an HTTP header name may contain.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
# OpenTelemetry attribute keys are free text, but a key with control characters or a huge one
# is a configuration mistake rather than an attribute anybody wants.
_ATTRIBUTE_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
MAX_ATTRIBUTE_VALUE = 4096

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
Sampler = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]

# Downward-API variable names, in order of preference, for each Kubernetes resource attribute
# of the OpenTelemetry semantic conventions.
KUBERNETES_VARIABLES: dict[str, tuple[str, ...]] = {
    "k8s.pod.name": ("K8S_POD_NAME",),
    "k8s.pod.uid": ("K8S_POD_UID",),
    "k8s.namespace.name": ("K8S_NAMESPACE_NAME", "POD_NAMESPACE"),
    "k8s.node.name": ("K8S_NODE_NAME",),
}


def _check_endpoint(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PydanticCustomError(
            "endpoint",
            "must be an http:// or https:// URL with a host, such as http://collector:4318 "
            "(got '{value}')",
            {"value": value},
        )
    try:
        parts.port  # noqa: B018 - reading it validates the port number
    except ValueError:
        raise PydanticCustomError(
            "endpoint", "has an invalid port (got '{value}')", {"value": value}
        ) from None
    if parts.query or parts.fragment or parts.username or parts.password:
        raise PydanticCustomError(
            "endpoint",
            "must not contain credentials, a query or a fragment; put credentials in headers",
        )
    return value.rstrip("/")


Endpoint = Annotated[str, AfterValidator(_check_endpoint)]


def _check_headers(value: dict[str, Secret]) -> dict[str, Secret]:
    for name, secret in value.items():
        if not _HEADER_NAME.match(name):
            raise PydanticCustomError(
                "header", "{name!r} is not a valid HTTP header name", {"name": name}
            )
        if any(char in secret.reveal() for char in "\r\n\0"):
            raise PydanticCustomError(
                "header", "the value of {name} contains a line break or NUL", {"name": name}
            )
    return value


def _check_attributes(value: dict[str, str]) -> dict[str, str]:
    for key, text in value.items():
        if not _ATTRIBUTE_KEY.match(key):
            raise PydanticCustomError(
                "attribute",
                "{key!r} is not a valid attribute key (printable ASCII, 1 to 255 characters)",
                {"key": key[:80]},
            )
        if len(text) > MAX_ATTRIBUTE_VALUE:
            raise PydanticCustomError(
                "attribute",
                "the value of {key} is longer than {limit} characters",
                {"key": key, "limit": MAX_ATTRIBUTE_VALUE},
            )
    return value


class MetricsExportConfig(Section):
    enabled: bool = True
    """Push every metric `/metrics` shows to `<endpoint>/v1/metrics` once an endpoint is set
    (`OTEL_METRICS_EXPORTER=none` turns it off)."""

    interval: Annotated[Duration, Field(ge=1.0, le=86400.0)] = 60.0
    """Time between two exports (`OTEL_METRIC_EXPORT_INTERVAL`, in milliseconds there)."""

    temporality: Literal["cumulative", "delta"] = "cumulative"
    """Counters and histograms as running totals (`cumulative`) or as the change since the
    previous export (`delta`; `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`)."""


class TracesExportConfig(Section):
    enabled: bool = False
    """Send spans of the alert pipeline to `<endpoint>/v1/traces` (`OTEL_TRACES_EXPORTER=otlp`
    turns it on)."""

    sampler: Sampler = "parentbased_always_on"
    """Which notifications get a trace (`OTEL_TRACES_SAMPLER`). The `parentbased_` samplers
    follow the decision of an incoming `traceparent`."""

    ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Share of traces kept by the `traceidratio` samplers (`OTEL_TRACES_SAMPLER_ARG`)."""

    max_queue_size: Annotated[int, Field(ge=1, le=100_000)] = 2048
    """Finished spans waiting for export; beyond this they are dropped, never blocking the
    pipeline."""


class TelemetryConfig(Section):
    """OpenTelemetry push. Keys left out are taken from the `OTEL_*` environment variables."""

    enabled: bool = True
    """Master switch (`OTEL_SDK_DISABLED=true` sets it to false)."""

    endpoint: Endpoint | None = None
    """Base URL of the OTLP/HTTP receiver, such as `http://otel-collector:4318`; `/v1/metrics`
    and `/v1/traces` are appended. Nothing is exported without it
    (`OTEL_EXPORTER_OTLP_ENDPOINT`)."""

    protocol: Literal["http/protobuf"] = "http/protobuf"
    """Wire protocol (`OTEL_EXPORTER_OTLP_PROTOCOL`); only OTLP/HTTP with protobuf is built
    in."""

    headers: Annotated[dict[str, Secret], AfterValidator(_check_headers)] = {}
    """HTTP headers sent with every export, such as an API key; each value may be given as
    `<value>`, `{file: path}` or `{env: NAME}` (`OTEL_EXPORTER_OTLP_HEADERS`)."""

    timeout: Annotated[Duration, Field(gt=0.0, le=300.0)] = 10.0
    """Time one export may take, retries of 429/502/503/504 answers included
    (`OTEL_EXPORTER_OTLP_TIMEOUT`, in milliseconds there)."""

    compression: Literal["none", "gzip"] = "none"
    """Request body compression (`OTEL_EXPORTER_OTLP_COMPRESSION`). `gzip` shrinks metric
    exports about 8 times for about 2.5 ms of CPU per 1,000 series."""

    service_name: Annotated[str, Field(min_length=1, max_length=255)] = "sidecar"
    """The `service.name` resource attribute (`OTEL_SERVICE_NAME`)."""

    resource: Annotated[dict[str, str], AfterValidator(_check_attributes)] = {}
    """More resource attributes, over those of `OTEL_RESOURCE_ATTRIBUTES` and the Kubernetes
    downward-API variables."""

    metrics: MetricsExportConfig = MetricsExportConfig()
    """Metric export."""

    traces: TracesExportConfig = TracesExportConfig()
    """Trace export of the alert pipeline."""

    @model_validator(mode="before")
    @classmethod
    def _fill_from_environment(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        environ: Mapping[str, str] | None = (info.context or {}).get("environ")
        if environ is None:
            return data
        return _merge_under(environment_settings(environ), data)

    @property
    def metrics_active(self) -> bool:
        """Whether metrics are pushed at all."""
        return self.enabled and self.endpoint is not None and self.metrics.enabled

    @property
    def traces_active(self) -> bool:
        """Whether spans are recorded and pushed."""
        return self.enabled and self.endpoint is not None and self.traces.enabled

    def resource_attributes(self) -> dict[str, str]:
        """The configured resource attributes, ``service.name`` included."""
        return {**self.resource, "service.name": self.service_name}


def environment_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``telemetry`` keys that the OpenTelemetry environment variables set.

    Raises ``PydanticCustomError`` naming the variable when one is malformed, so that
    ``check-config`` and ``run`` report it like a wrong key in the file.
    """
    settings: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    traces: dict[str, Any] = {}

    disabled = _get(environ, "OTEL_SDK_DISABLED")
    if disabled is not None:
        settings["enabled"] = not _boolean(disabled, "OTEL_SDK_DISABLED")
    if (endpoint := _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")) is not None:
        settings["endpoint"] = endpoint
    if (protocol := _get(environ, "OTEL_EXPORTER_OTLP_PROTOCOL")) is not None:
        settings["protocol"] = protocol
    if (headers := _get(environ, "OTEL_EXPORTER_OTLP_HEADERS")) is not None:
        settings["headers"] = {
            name: Secret(value, "env OTEL_EXPORTER_OTLP_HEADERS")
            for name, value in _pairs(headers, "OTEL_EXPORTER_OTLP_HEADERS").items()
        }
    if (timeout := _get(environ, "OTEL_EXPORTER_OTLP_TIMEOUT")) is not None:
        settings["timeout"] = _milliseconds(timeout, "OTEL_EXPORTER_OTLP_TIMEOUT")
    if (compression := _get(environ, "OTEL_EXPORTER_OTLP_COMPRESSION")) is not None:
        settings["compression"] = compression.lower()

    attributes = _kubernetes_attributes(environ)
    if (text := _get(environ, "OTEL_RESOURCE_ATTRIBUTES")) is not None:
        attributes.update(_pairs(text, "OTEL_RESOURCE_ATTRIBUTES"))
    service_name = attributes.pop("service.name", None)
    service_name = _get(environ, "OTEL_SERVICE_NAME") or service_name
    if service_name:
        settings["service_name"] = service_name
    if attributes:
        settings["resource"] = attributes

    if (interval := _get(environ, "OTEL_METRIC_EXPORT_INTERVAL")) is not None:
        metrics["interval"] = _milliseconds(interval, "OTEL_METRIC_EXPORT_INTERVAL")
    preference = _get(environ, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
    if preference is not None:
        metrics["temporality"] = preference.lower()
    if (exporter := _get(environ, "OTEL_METRICS_EXPORTER")) is not None:
        metrics["enabled"] = _exporter_enabled(exporter, "OTEL_METRICS_EXPORTER")

    if (exporter := _get(environ, "OTEL_TRACES_EXPORTER")) is not None:
        traces["enabled"] = _exporter_enabled(exporter, "OTEL_TRACES_EXPORTER")
    if (sampler := _get(environ, "OTEL_TRACES_SAMPLER")) is not None:
        traces["sampler"] = sampler.lower()
    if (argument := _get(environ, "OTEL_TRACES_SAMPLER_ARG")) is not None:
        traces["ratio"] = _number(argument, "OTEL_TRACES_SAMPLER_ARG")

    if metrics:
        settings["metrics"] = metrics
    if traces:
        settings["traces"] = traces
    return settings


def _merge_under(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over ``defaults``, nested sections merged key by key."""
    merged = dict(defaults)
    for key, value in data.items():
        below = merged.get(key)
        # Attribute and header maps are replaced as a whole by the file, except `resource`,
        # whose environment attributes (pod name) the file only adds to.
        if isinstance(value, dict) and isinstance(below, dict) and key != "headers":
            merged[key] = _merge_under(below, value)
        else:
            merged[key] = value
    return merged


def _get(environ: Mapping[str, str], name: str) -> str | None:
    # The specification treats an empty variable like an unset one.
    value = environ.get(name, "").strip()
    return value or None


def _fail(variable: str, message: str, value: str | None) -> PydanticCustomError:
    if value is None:
        return PydanticCustomError(
            "environment", "environment variable {variable} " + message, {"variable": variable}
        )
    return PydanticCustomError(
        "environment",
        "environment variable {variable} " + message + " (got '{value}')",
        {"variable": variable, "value": value[:100]},
    )


def _boolean(value: str, variable: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise _fail(variable, "must be true or false", value)
    return lowered == "true"


def _milliseconds(value: str, variable: str) -> str:
    if not value.isdigit():
        raise _fail(variable, "must be a whole number of milliseconds", value)
    return f"{int(value)}ms"


def _number(value: str, variable: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise _fail(variable, "must be a number", value) from None


def _exporter_enabled(value: str, variable: str) -> bool:
    names = {name.strip().lower() for name in value.split(",") if name.strip()}
    if names <= {"none"}:
        return False
    if names == {"otlp"}:
        return True
    raise _fail(variable, "must be otlp or none", value)


def _pairs(text: str, variable: str) -> dict[str, str]:
    """Parse ``key1=value1,key2=value2`` with percent-encoded values, as both
    ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_EXPORTER_OTLP_HEADERS`` are written."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            # Header values are credentials: the message never repeats the text.
            shown = None if variable == "OTEL_EXPORTER_OTLP_HEADERS" else text
            raise _fail(variable, "must be a list of key=value pairs separated by commas", shown)
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _kubernetes_attributes(environ: Mapping[str, str]) -> dict[str, str]:
    attributes = {}
    for attribute, variables in KUBERNETES_VARIABLES.items():
        for variable in variables:
            if (value := _get(environ, variable)) is not None:
                attributes[attribute] = value
                break
    return attributes
