"""OTLP/HTTP metrics receiver: ``POST /v1/metrics`` into the application-metric store.

Bodies are protobuf (``application/x-protobuf``) or JSON (``application/json``), optionally
gzip-encoded, decoded with the official ``opentelemetry-proto`` messages. Answers follow the
OTLP/HTTP specification: 200 with ``partial_success`` counting rejected data points, 400 for an
undecodable body, 413 above ``otlp.max_body_size`` (before and after decompression), 415 for an
unsupported content type or encoding, 503 with ``Retry-After`` over ``otlp.max_in_flight``.
Error bodies are ``google.rpc.Status`` messages in the request's format.

Conversion follows OpenTelemetry's Prometheus compatibility rules:

- monotonic Sum -> counter (``_total``), delta points accumulated into the cumulative value;
  non-monotonic Sum -> gauge (delta points added); Gauge -> gauge;
- Histogram -> histogram, cumulative points replace the state and delta points are added
  (bucket bounds must not change under delta);
- Summary -> summary; ExponentialHistogram -> classic buckets at the exponential bucket
  boundaries when cumulative (``otlp.exponential_histograms: convert``), rejected when delta;
- names: invalid characters become ``_``, the unit becomes a suffix (``s`` -> ``_seconds``,
  ``By`` -> ``_bytes``, ``1`` on a gauge -> ``_ratio``, ``x/s`` -> ``_x_per_second``);
- attributes become labels with sanitised names (values of keys that collide are joined by
  ``;``); ``service.namespace``/``service.name`` become ``job`` and ``service.instance.id``
  becomes ``instance`` on every series; the other resource attributes are in ``target_info``.

Instrumentation scope name and version are not added as labels.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import logging
import math
import re
import zlib
from collections.abc import Iterable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.metrics.ingest_config import OtlpConfig
from sidecar.metrics.store import COUNTER, GAUGE, HISTOGRAM, SUMMARY, IngestStats, Series, Store

if TYPE_CHECKING:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric as OtlpMetric

logger = logging.getLogger(__name__)


@functools.cache
def _protobuf() -> SimpleNamespace:
    """The protobuf messages, imported with the first export: they cost about 4 MB resident,
    which a sidecar whose application never sends OTLP should not pay."""
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2

    return SimpleNamespace(
        json_format=json_format,
        DecodeError=DecodeError,
        Request=metrics_service_pb2.ExportMetricsServiceRequest,
        Response=metrics_service_pb2.ExportMetricsServiceResponse,
        AnyValue=common_pb2.AnyValue,
        KeyValue=common_pb2.KeyValue,
    )


PROTOBUF = "application/x-protobuf"
JSON = "application/json"
DELTA = 1
CUMULATIVE = 2
_NO_RECORDED_VALUE = 1
# Bodies above this are decoded on a worker thread so StatsD keeps flowing on the loop.
_THREAD_THRESHOLD = 64 * 1024
_MAX_EXPONENTIAL_BUCKETS = 320
# google.rpc.Code values used in error bodies.
_INVALID_ARGUMENT = 3
_RESOURCE_EXHAUSTED = 8
_UNAVAILABLE = 14

_UNITS = {
    "d": "days",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "TiBy": "tebibytes",
    "KBy": "kilobytes",
    "MBy": "megabytes",
    "GBy": "gigabytes",
    "TBy": "terabytes",
    "m": "meters",
    "V": "volts",
    "A": "amperes",
    "J": "joules",
    "W": "watts",
    "g": "grams",
    "Cel": "celsius",
    "Hz": "hertz",
    "%": "percent",
}
_PER_UNITS = {
    "s": "second",
    "m": "minute",
    "h": "hour",
    "d": "day",
    "w": "week",
    "mo": "month",
    "y": "year",
}
_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]+")
_ANNOTATION = re.compile(r"\{[^}]*\}")


def _sanitize_name(text: str) -> str:
    text = _INVALID_NAME.sub("_", text)
    text = re.sub(r"__+", "_", text)
    if not text or text[0].isdigit():
        text = "_" + text
    return text


def label_name(key: str) -> str:
    """A Prometheus label name for an attribute key, per the compatibility rules."""
    name = _INVALID_LABEL.sub("_", key)
    if not name:
        return "key_"
    if name[0].isdigit():
        return "key_" + name
    if name.startswith("__"):
        # Names starting with two underscores are Prometheus' own.
        return "key_" + name.lstrip("_")
    return name


def _unit_words(unit: str, kind: str) -> list[str]:
    unit = _ANNOTATION.sub("", unit).strip()
    if not unit:
        return []
    if unit == "1":
        return ["ratio"] if kind == GAUGE else []
    main, _, per = unit.partition("/")
    words = []
    if main:
        words.append(_UNITS.get(main, main))
    if per:
        words += ["per", _PER_UNITS.get(per, per)]
    return [_sanitize_name(word).strip("_") for word in words if _sanitize_name(word).strip("_")]


def metric_name(name: str, unit: str, kind: str) -> str:
    """The Prometheus family name of an OTLP metric (a counter's ``_total`` is added later)."""
    base = _sanitize_name(name)
    if kind == COUNTER and base.endswith("_total"):
        base = base[: -len("_total")]
    suffix = "_".join(_unit_words(unit, kind))
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base


def _attribute_text(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return repr(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if kind is None:
        return ""
    as_dict = _protobuf().json_format.MessageToDict(value)
    return json.dumps(as_dict[_json_key(kind)], separators=(",", ":"))


def _json_key(kind: str) -> str:
    head, *rest = kind.split("_")
    return head + "".join(part.title() for part in rest)


def attribute_labels(attributes: Iterable[KeyValue]) -> dict[str, str]:
    """Labels of OTLP attributes; values of keys that sanitise to one name are joined by ``;``."""
    collected: dict[str, list[tuple[str, str]]] = {}
    for attribute in attributes:
        collected.setdefault(label_name(attribute.key), []).append(
            (attribute.key, _attribute_text(attribute.value))
        )
    return {
        name: ";".join(value for _, value in sorted(pairs)) for name, pairs in collected.items()
    }


def _resource_labels(attributes: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(labels for every series, labels of ``target_info``) from resource attributes."""
    promoted: dict[str, str] = {}
    name = attributes.get("service.name")
    if name is not None:
        namespace = attributes.get("service.namespace")
        promoted["job"] = f"{namespace}/{name}" if namespace else name
    if "service.instance.id" in attributes:
        promoted["instance"] = attributes["service.instance.id"]
    info = dict(promoted)
    proto = _protobuf()
    rest = [
        proto.KeyValue(key=key, value=proto.AnyValue(string_value=value))
        for key, value in attributes.items()
        if key not in ("service.name", "service.namespace", "service.instance.id")
    ]
    info.update({k: v for k, v in attribute_labels(rest).items() if k not in promoted})
    return promoted, info


def exponential_buckets(point: Any) -> tuple[tuple[float, ...], list[float]] | str:
    """Classic (bounds, per-bucket counts with +Inf last) of an exponential histogram point."""
    if len(point.positive.bucket_counts) + len(point.negative.bucket_counts) > (
        _MAX_EXPONENTIAL_BUCKETS
    ):
        return "too_many_buckets"
    base_exponent = 2.0 ** (-point.scale)
    bounds: list[float] = []
    counts: list[float] = []
    try:
        negative = list(enumerate(point.negative.bucket_counts, start=point.negative.offset))
        # Bucket i of the negative range holds [-base**(i+1), -base**i): largest magnitude first.
        for index, count in reversed(negative):
            bounds.append(-(2.0 ** (index * base_exponent)))
            counts.append(float(count))
        bounds.append(point.zero_threshold)
        counts.append(float(point.zero_count))
        for index, count in enumerate(point.positive.bucket_counts, start=point.positive.offset):
            bounds.append(2.0 ** ((index + 1) * base_exponent))
            counts.append(float(count))
    except OverflowError:
        return "invalid_histogram"
    if any(b >= c for b, c in itertools.pairwise(bounds)) or any(math.isinf(b) for b in bounds):
        return "invalid_histogram"
    counts.append(0.0)
    return tuple(bounds), counts


class _Outcome:
    """Accepted points and rejections by reason for one request."""

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.examples: list[str] = []

    def reject(self, reason: str, metric: str, count: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + count
        if len(self.examples) < 5:
            self.examples.append(f"{metric}: {reason}")

    @property
    def rejected_points(self) -> int:
        return sum(self.rejected.values())


class OtlpReceiver:
    """Decodes OTLP metric exports and writes them to the store."""

    def __init__(self, config: OtlpConfig, store: Store, stats: IngestStats) -> None:
        self._config = config
        self._store = store
        self._stats = stats
        self._in_flight = 0
        self.responses: dict[str, int] = {}
        self.app = Starlette(routes=[Route("/v1/metrics", self.endpoint, methods=["POST"])])

    async def endpoint(self, request: Request) -> Response:
        """``POST /v1/metrics``."""
        if self._in_flight >= self._config.max_in_flight:
            return self._error(503, _UNAVAILABLE, "too many exports at once", False, retry=1)
        self._in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self._in_flight -= 1

    async def _handle(self, request: Request) -> Response:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in (PROTOBUF, JSON):
            return self._error(
                415,
                _INVALID_ARGUMENT,
                f"unsupported content type {media!r}; send {PROTOBUF} or {JSON}",
                False,
            )
        use_json = media == JSON
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity", ""):
            return self._error(
                415, _INVALID_ARGUMENT, f"unsupported content encoding {encoding!r}", use_json
            )

        limit = int(self._config.max_body_size)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return self._too_large(limit, use_json)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return self._too_large(limit, use_json)
                chunks.append(chunk)
        except ClientDisconnect:
            return self._error(400, _INVALID_ARGUMENT, "client disconnected", use_json)
        body = b"".join(chunks)
        if encoding == "gzip":
            inflated = _gunzip(body, limit)
            if inflated is None:
                return self._error(400, _INVALID_ARGUMENT, "body is not valid gzip", use_json)
            if len(inflated) > limit:
                return self._too_large(limit, use_json)
            body = inflated

        proto = _protobuf()
        message = proto.Request()
        try:
            if use_json:
                proto.json_format.Parse(body, message, ignore_unknown_fields=True)
            else:
                message.ParseFromString(body)
        except (
            proto.DecodeError,
            proto.json_format.ParseError,
            UnicodeDecodeError,
            ValueError,
        ) as error:
            return self._error(
                400, _INVALID_ARGUMENT, f"cannot decode the export request: {error}", use_json
            )

        if len(body) > _THREAD_THRESHOLD:
            outcome = await asyncio.to_thread(self.apply, message)
        else:
            outcome = self.apply(message)
        response = proto.Response()
        if outcome.rejected_points:
            response.partial_success.rejected_data_points = outcome.rejected_points
            response.partial_success.error_message = "rejected: " + "; ".join(outcome.examples)
        return self._respond(200, response, use_json)

    def apply(self, message: ExportMetricsServiceRequest) -> _Outcome:
        """Write every data point of an export to the store; return what was accepted."""
        outcome = _Outcome()
        for resource_metrics in message.resource_metrics:
            resource = attribute_labels(resource_metrics.resource.attributes)
            raw = {a.key: _attribute_text(a.value) for a in resource_metrics.resource.attributes}
            promoted, info = _resource_labels(raw)
            if resource:
                self._apply_info(info, outcome)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self._apply_metric(metric, promoted, outcome)
        self._stats.add("otlp", outcome.accepted, outcome.rejected)
        return outcome

    def _apply_info(self, labels: dict[str, str], outcome: _Outcome) -> None:
        with self._store.lock:
            series = self._store.series(
                GAUGE,
                "target_info",
                labels,
                help="Target metadata: resource attributes of OTLP senders.",
                flexible=True,
            )
            if isinstance(series, str):
                # Not a data point of the export, so not part of partial_success; counted.
                self._stats.add("otlp", 0, {"target_info_" + series: 1})
                return
            series.value = 1.0
            series.updated = self._store.clock()

    def _apply_metric(
        self, metric: OtlpMetric, promoted: dict[str, str], outcome: _Outcome
    ) -> None:
        data = metric.WhichOneof("data")
        if data is None:
            return
        if data == "sum":
            kind = COUNTER if metric.sum.is_monotonic else GAUGE
            points: Any = metric.sum.data_points
            temporality: int = metric.sum.aggregation_temporality
        elif data == "gauge":
            kind, points, temporality = GAUGE, metric.gauge.data_points, CUMULATIVE
        elif data == "histogram":
            kind, points = HISTOGRAM, metric.histogram.data_points
            temporality = metric.histogram.aggregation_temporality
        elif data == "exponential_histogram":
            kind, points = HISTOGRAM, metric.exponential_histogram.data_points
            temporality = metric.exponential_histogram.aggregation_temporality
        else:
            kind, points, temporality = SUMMARY, metric.summary.data_points, CUMULATIVE
        name = metric_name(metric.name, metric.unit, kind)
        if temporality not in (DELTA, CUMULATIVE):
            outcome.reject("invalid_temporality", name, len(points))
            return
        if data == "exponential_histogram" and (
            temporality == DELTA or self._config.exponential_histograms == "reject"
        ):
            refusal = "delta_exponential_histogram" if temporality == DELTA else "unsupported_type"
            outcome.reject(refusal, name, len(points))
            return
        help_text = metric.description or f"OTLP metric {metric.name}."
        store = self._store
        with store.lock:
            now = store.clock()
            for point in points:
                if point.flags & _NO_RECORDED_VALUE:
                    continue  # a stale marker: nothing to record
                labels = attribute_labels(point.attributes)
                labels.update(promoted)
                counts: list[float] = []
                if data == "exponential_histogram":
                    converted = exponential_buckets(point)
                    if isinstance(converted, str):
                        outcome.reject(converted, name)
                        continue
                    bounds: tuple[float, ...] = converted[0]
                    counts = converted[1]
                else:
                    bounds = tuple(point.explicit_bounds) if kind == HISTOGRAM else ()
                    if kind == HISTOGRAM and not _valid_histogram(bounds, point):
                        outcome.reject("invalid_histogram", name)
                        continue
                series = store.series(kind, name, labels, help=help_text, bounds=bounds)
                if isinstance(series, str):
                    outcome.reject(series, name)
                    continue
                reason: str | None
                if data == "exponential_histogram":
                    reason = _set_histogram(series, bounds, counts, point)
                elif kind == HISTOGRAM:
                    reason = _apply_histogram(series, bounds, point, temporality)
                elif kind == SUMMARY:
                    reason = _apply_summary(series, point)
                else:
                    reason = _apply_number(series, kind, point, temporality)
                if reason:
                    outcome.reject(reason, name)
                    continue
                series.updated = now
                outcome.accepted += 1

    def _too_large(self, limit: int, use_json: bool) -> Response:
        return self._error(
            413,
            _RESOURCE_EXHAUSTED,
            f"body larger than {limit} bytes; send smaller batches",
            use_json,
        )

    def _respond(self, status: int, message: Any, use_json: bool) -> Response:
        self.responses[str(status)] = self.responses.get(str(status), 0) + 1
        if use_json:
            body = _protobuf().json_format.MessageToJson(message)
            return Response(body, status, media_type=JSON)
        return Response(message.SerializeToString(), status, media_type=PROTOBUF)

    def _error(
        self, status: int, code: int, text: str, use_json: bool, retry: int | None = None
    ) -> Response:
        self.responses[str(status)] = self.responses.get(str(status), 0) + 1
        headers = {"Retry-After": str(retry)} if retry is not None else None
        if use_json:
            body = json.dumps({"code": code, "message": text})
            return Response(body, status, headers=headers, media_type=JSON)
        return Response(_status_message(code, text), status, headers=headers, media_type=PROTOBUF)


def _status_message(code: int, text: str) -> bytes:
    """A ``google.rpc.Status`` (code = field 1 varint, message = field 2 string) in protobuf."""
    encoded = text.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(encoded)) + encoded


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _gunzip(body: bytes, limit: int) -> bytes | None:
    """Inflate at most ``limit + 1`` bytes, so a gzip bomb costs no more than the limit."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error:
        return None
    if len(inflated) <= limit and not inflater.eof:
        return None  # truncated stream
    return inflated


def _number(point: Any) -> float | None:
    which = point.WhichOneof("value")
    if which == "as_double":
        return float(point.as_double)
    if which == "as_int":
        return float(point.as_int)
    return None


def _apply_number(series: Series, kind: str, point: Any, temporality: int) -> str | None:
    value = _number(point)
    if value is None:
        return "missing_value"
    if kind == COUNTER and (value < 0 or math.isnan(value)):
        return "invalid_value"
    if temporality == DELTA:
        series.value += value
    else:
        series.value = value
    return None


def _apply_histogram(
    series: Series, bounds: tuple[float, ...], point: Any, temporality: int
) -> str | None:
    counts = point.bucket_counts
    if temporality == CUMULATIVE:
        return _set_histogram(series, bounds, [float(c) for c in counts], point)
    if series.bounds != bounds:
        if series.count:
            return "bucket_mismatch"
        series.set_bounds(bounds)
    for index, count in enumerate(counts):
        series.buckets[index] += count
    series.count += point.count
    series.sum += point.sum if point.HasField("sum") else 0.0
    return None


def _valid_histogram(bounds: tuple[float, ...], point: Any) -> bool:
    if len(point.bucket_counts) != len(bounds) + 1:
        return False
    if any(math.isnan(b) or math.isinf(b) for b in bounds):
        return False
    return all(b < c for b, c in itertools.pairwise(bounds))


def _set_histogram(
    series: Series, bounds: tuple[float, ...], counts: list[float], point: Any
) -> str | None:
    if series.bounds != bounds:
        series.set_bounds(bounds)
    series.buckets = counts
    series.count = float(point.count)
    series.sum = point.sum if point.HasField("sum") else 0.0
    return None


def _apply_summary(series: Series, point: Any) -> str | None:
    quantiles = tuple(sorted((q.quantile, q.value) for q in point.quantile_values))
    if any(not 0.0 <= q <= 1.0 for q, _ in quantiles):
        return "invalid_summary"
    series.set_summary(quantiles, point.sum, float(point.count))
    return None


class OtlpCollector(Collector):
    """``sidecar_otlp_requests_total{code}``."""

    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "sidecar_otlp_requests",
            "OTLP/HTTP export requests answered, by HTTP status code.",
            labels=["code"],
        )
        for code, count in sorted(dict(self._receiver.responses).items()):
            family.add_metric([code], count)
        yield family
