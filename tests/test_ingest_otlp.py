"""OTLP/HTTP metrics: the OpenTelemetry SDK's exporter against a running sidecar, a real
Prometheus scraping the result, and hostile or malformed bodies."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    UpDownCounter,
    _Gauge,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from sidecar.config import parse_config
from sidecar.errors import ConfigError
from sidecar.metrics.otlp import label_name, metric_name
from sidecar.metrics.store import COUNTER, GAUGE, HISTOGRAM
from tests.harness import PrometheusServer, SidecarProcess, free_port, wait_until
from tests.ingest_helpers import OPENMETRICS, free_udp_port, promtool_findings, samples, value

PROTOBUF = {"content-type": "application/x-protobuf"}
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """One sidecar process (the real CLI, on uvloop) for every OTLP test of this module."""
    otlp_port = free_port()
    statsd_port = free_udp_port()
    process = SidecarProcess(
        tmp_path_factory.mktemp("otlp"),
        {
            "ingest": {
                "statsd": {"listen": f"127.0.0.1:{statsd_port}"},
                "otlp": {
                    "listen": f"127.0.0.1:{otlp_port}",
                    "max_body_size": MAX_BODY,
                    "max_in_flight": 1,
                },
            }
        },
    ).start()
    process.otlp_url = f"http://127.0.0.1:{otlp_port}"  # type: ignore[attr-defined]
    process.statsd_port = statsd_port  # type: ignore[attr-defined]
    yield process
    process.stop()


def _otlp(sidecar: SidecarProcess) -> str:
    return str(sidecar.otlp_url)  # type: ignore[attr-defined]


def _metrics(sidecar: SidecarProcess, accept: str = "") -> str:
    response = httpx.get(sidecar.url + "/metrics", headers={"accept": accept}, timeout=10)
    assert response.status_code == 200
    return response.text


def _provider(sidecar: SidecarProcess, instance: str, delta: bool) -> MeterProvider:
    temporality = AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
    exporter = OTLPMetricExporter(
        endpoint=_otlp(sidecar) + "/v1/metrics",
        preferred_temporality={
            kind: temporality for kind in (Counter, UpDownCounter, Histogram, _Gauge)
        },
    )
    # The interval is long on purpose: the test exports with force_flush, never on a timer.
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    resource = Resource.create(
        {"service.name": "shop", "service.instance.id": instance, "deployment": "test"}
    )
    return MeterProvider(metric_readers=[reader], resource=resource)


@pytest.mark.parametrize("delta", [False, True], ids=["cumulative", "delta"])
def test_sdk_export_is_scraped_value_by_value(sidecar: SidecarProcess, delta: bool) -> None:
    instance = "delta" if delta else "cumulative"
    provider = _provider(sidecar, instance, delta)
    meter = provider.get_meter("tests")
    counter = meter.create_counter("orders.processed", unit="{order}", description="Orders.")
    updown = meter.create_up_down_counter("queue.items")
    gauge = meter.create_gauge("cpu.temperature", unit="Cel")
    histogram = meter.create_histogram("request.duration", unit="s")
    meter.create_observable_gauge(
        "pool.usage", callbacks=[lambda _: [_observation(0.25)]], unit="1"
    )

    counter.add(5, {"route": "/a"})
    counter.add(3, {"route": "/a"})
    counter.add(1, {"route": "/b"})
    updown.add(10)
    updown.add(-4)
    gauge.set(21.5)
    for seconds in (0.004, 3.0, 7.0, 7.5):
        histogram.record(seconds)
    assert provider.force_flush(10_000)
    counter.add(2, {"route": "/a"})
    updown.add(-1)
    gauge.set(22.0)
    histogram.record(30.0)
    assert provider.force_flush(10_000)
    provider.shutdown()

    labels = {"job": "shop", "instance": instance}
    text = _metrics(sidecar)
    assert value(text, "orders_processed_total", route="/a", **labels) == 10
    assert value(text, "orders_processed_total", route="/b", **labels) == 1
    assert value(text, "queue_items", **labels) == 5
    assert value(text, "cpu_temperature_celsius", **labels) == 22.0
    assert value(text, "pool_usage_ratio", **labels) == 0.25
    assert value(text, "request_duration_seconds_count", **labels) == 5
    assert value(text, "request_duration_seconds_sum", **labels) == pytest.approx(47.504)
    expected_buckets = {"0.0": 0, "5.0": 2, "10.0": 4, "25.0": 4, "50.0": 5, "+Inf": 5}
    for le, count in expected_buckets.items():
        assert value(text, "request_duration_seconds_bucket", le=le, **labels) == count, le
    info = {
        labels_of: number
        for (name, labels_of), number in samples(text).items()
        if name == "target_info" and dict(labels_of).get("instance") == instance
    }
    ((info_labels, info_value),) = [(dict(k), v) for k, v in info.items()]
    assert info_value == 1
    assert info_labels["deployment"] == "test"
    assert info_labels["job"] == "shop"
    assert info_labels["telemetry_sdk_language"] == "python"
    assert "service_name" not in info_labels
    assert "# HELP orders_processed_total Orders.\n" in text
    assert "# TYPE request_duration_seconds histogram\n" in text


def _observation(number: float) -> Any:
    from opentelemetry.metrics import Observation

    return Observation(number)


def test_the_running_process_receives_statsd_on_uvloop_and_logs_its_buffer(
    sidecar: SidecarProcess,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"process.hits:3|c|#via:udp", ("127.0.0.1", sidecar.statsd_port))  # type: ignore[attr-defined]

    wait_until(
        lambda: value(_metrics(sidecar), "process_hits_total", via="udp") == 3,
        what="the datagram in /metrics",
    )
    granted = value(_metrics(sidecar), "sidecar_statsd_receive_buffer_bytes")
    assert granted is not None
    assert granted >= 4 * 1024 * 1024
    assert f"kernel granted {int(granted)}" in sidecar.log()


def test_prometheus_scrapes_the_received_metrics(
    sidecar: SidecarProcess, prometheus: PrometheusServer
) -> None:
    provider = _provider(sidecar, "prom", delta=True)
    counter = provider.get_meter("tests").create_counter("prom.checked")
    counter.add(7, {"kind": "x"})
    assert provider.force_flush(10_000)
    provider.shutdown()

    prometheus.scrape("otlp-ingest", sidecar.url)

    def scraped() -> list[dict[str, Any]]:
        return prometheus.query('prom_checked_total{target_name="otlp-ingest"}')

    result = wait_until(scraped, timeout=30, what="Prometheus scraping the sidecar")
    assert prometheus.target_health("otlp-ingest") == "up"
    (series,) = result
    assert float(series["value"][1]) == 7
    # Prometheus keeps its own job and instance and moves the sender's aside.
    assert series["metric"]["exported_job"] == "shop"
    assert series["metric"]["exported_instance"] == "prom"
    assert series["metric"]["kind"] == "x"


def _request(*metrics: metrics_pb2.Metric, service: str = "raw") -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value=service))
    )
    resource_metrics.scope_metrics.add().metrics.extend(metrics)
    return request


def _gauge(name: str, number: float, **attributes: str) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name)
    point = metric.gauge.data_points.add(as_double=number)
    for key, text in attributes.items():
        point.attributes.append(KeyValue(key=key, value=AnyValue(string_value=text)))
    return metric


def _post(sidecar: SidecarProcess, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(_otlp(sidecar) + "/v1/metrics", content=body, headers=headers, timeout=10)


def _status_message(response: httpx.Response) -> str:
    """The ``message`` of a protobuf ``google.rpc.Status`` body (field 2)."""
    body = response.content
    assert body[0] == 0x08  # field 1, the code
    position = 2
    assert body[position] == 0x12  # field 2, the message
    length = body[position + 1]
    return body[position + 2 : position + 2 + length].decode()


def test_partial_success_counts_rejected_points_and_keeps_the_good_ones(
    sidecar: SidecarProcess,
) -> None:
    conflict = metrics_pb2.Metric(name="partial.kind")
    conflict.sum.is_monotonic = True
    conflict.sum.aggregation_temporality = 2
    conflict.sum.data_points.add(as_int=1)
    bad_histogram = metrics_pb2.Metric(name="partial.hist")
    bad_histogram.histogram.aggregation_temporality = 2
    bad_histogram.histogram.data_points.add(count=1, explicit_bounds=[1, 2], bucket_counts=[1])
    delta_exponential = metrics_pb2.Metric(name="partial.exp")
    delta_exponential.exponential_histogram.aggregation_temporality = 1
    delta_exponential.exponential_histogram.data_points.add(count=1, zero_count=1)
    negative_counter = metrics_pb2.Metric(name="partial.negative")
    negative_counter.sum.is_monotonic = True
    negative_counter.sum.aggregation_temporality = 1
    negative_counter.sum.data_points.add(as_double=-1)
    request = _request(
        _gauge("partial.kind", 1), _gauge("partial.good", 4), conflict, bad_histogram,
        delta_exponential, negative_counter,
    )  # fmt: skip

    response = _post(sidecar, request.SerializeToString(), PROTOBUF)

    assert response.status_code == 200
    answer = ExportMetricsServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_data_points == 4
    assert "partial_kind: type_conflict" in answer.partial_success.error_message
    text = _metrics(sidecar)
    assert value(text, "partial_good", job="raw") == 4
    assert value(text, "partial_kind", job="raw") == 1
    for reason in ("type_conflict", "invalid_histogram", "delta_exponential_histogram"):
        assert value(text, "sidecar_ingest_rejected_samples_total", source="otlp", reason=reason), (
            reason
        )


def test_json_bodies_and_gzip_are_accepted(sidecar: SidecarProcess) -> None:
    request = _request(_gauge("json.level", 2.5, zone="eu"))
    body = json_format.MessageToJson(request).encode()

    plain = _post(sidecar, body, {"content-type": "application/json"})
    zipped = _post(
        sidecar,
        gzip.compress(_request(_gauge("gzip.level", 3)).SerializeToString()),
        {**PROTOBUF, "content-encoding": "gzip"},
    )

    assert plain.status_code == 200
    assert plain.headers["content-type"] == "application/json"
    assert json.loads(plain.content) == {}
    assert zipped.status_code == 200
    text = _metrics(sidecar)
    assert value(text, "json_level", job="raw", zone="eu") == 2.5
    assert value(text, "gzip_level", job="raw") == 3


def test_summary_and_cumulative_exponential_histogram_are_converted(
    sidecar: SidecarProcess,
) -> None:
    summary = metrics_pb2.Metric(name="rpc.size", unit="By")
    point = summary.summary.data_points.add(count=4, sum=100)
    point.quantile_values.add(quantile=0.5, value=20)
    point.quantile_values.add(quantile=0.99, value=40)
    exponential = metrics_pb2.Metric(name="rpc.latency", unit="s")
    exponential.exponential_histogram.aggregation_temporality = 2
    data = exponential.exponential_histogram.data_points.add(
        count=6, sum=9.5, scale=0, zero_count=1
    )
    data.positive.offset = 0  # buckets (1, 2], (2, 4]
    data.positive.bucket_counts.extend([2, 2])
    data.negative.offset = 1  # bucket [-4, -2)
    data.negative.bucket_counts.extend([1])

    response = _post(sidecar, _request(summary, exponential).SerializeToString(), PROTOBUF)

    assert response.status_code == 200
    assert not ExportMetricsServiceResponse.FromString(
        response.content
    ).partial_success.ListFields()
    text = _metrics(sidecar)
    assert value(text, "rpc_size_bytes", job="raw", quantile="0.99") == 40
    assert value(text, "rpc_size_bytes_count", job="raw") == 4
    buckets = {"-2.0": 1, "0.0": 2, "2.0": 4, "4.0": 6, "+Inf": 6}
    for le, count in buckets.items():
        assert value(text, "rpc_latency_seconds_bucket", job="raw", le=le) == count, le
    assert value(text, "rpc_latency_seconds_sum", job="raw") == 9.5


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"\xff\xff\xff", PROTOBUF, 400, "cannot decode the export request"),
        (b"{not json", {"content-type": "application/json"}, 400, "cannot decode"),
        (b"x", {"content-type": "text/plain"}, 415, "unsupported content type 'text/plain'"),
        (b"x", {}, 415, "unsupported content type ''"),
        (b"x", {**PROTOBUF, "content-encoding": "br"}, 415, "unsupported content encoding"),
        (b"not gzip", {**PROTOBUF, "content-encoding": "gzip"}, 400, "not valid gzip"),
        (gzip.compress(b"abc")[:-6], {**PROTOBUF, "content-encoding": "gzip"}, 400, "gzip"),
        (b"\0" * (MAX_BODY + 1), PROTOBUF, 413, f"larger than {MAX_BODY} bytes"),
        (gzip.compress(b"\0" * (MAX_BODY * 8)), {**PROTOBUF, "content-encoding": "gzip"}, 413,
         "larger than"),
    ],
    ids=["protobuf", "json", "text", "none", "brotli", "gzip", "truncated-gzip", "large", "bomb"],
)  # fmt: skip
def test_bad_bodies_get_precise_errors_and_the_receiver_keeps_working(
    sidecar: SidecarProcess, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    response = _post(sidecar, body, headers)

    assert response.status_code == status
    if response.headers["content-type"] == "application/json":
        assert message in response.json()["message"]
    else:
        assert message in _status_message(response)
    after = _post(sidecar, _request(_gauge("after.error", 1)).SerializeToString(), PROTOBUF)
    assert after.status_code == 200
    assert f'sidecar_otlp_requests_total{{code="{status}"}}' in _metrics(sidecar)


def test_unknown_path_and_method_are_refused(sidecar: SidecarProcess) -> None:
    assert httpx.get(_otlp(sidecar) + "/v1/metrics", timeout=10).status_code == 405
    assert httpx.post(_otlp(sidecar) + "/v1/traces", timeout=10).status_code == 404


def test_over_capacity_answers_503_with_retry_after(sidecar: SidecarProcess) -> None:
    # max_in_flight is 1: a request whose body is still arriving holds the only slot.
    host, port = _otlp(sidecar).removeprefix("http://").split(":")
    body = _request(_gauge("slow.body", 1)).SerializeToString()
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:3]
        )

        def refused() -> httpx.Response | None:
            response = _post(sidecar, body, PROTOBUF)
            return response if response.status_code == 503 else None

        response = wait_until(refused, timeout=10, what="a 503 while the slot is taken")
        slow.sendall(body[3:])
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")

    assert response.headers["retry-after"] == "1"
    assert "too many exports" in _status_message(response)
    assert value(_metrics(sidecar), "slow_body", job="raw") == 1


def test_whole_exposition_is_clean_under_promtool_after_otlp_ingest(
    sidecar: SidecarProcess,
) -> None:
    conflict = metrics_pb2.Metric(name="lint.x_count")
    conflict.sum.is_monotonic = True
    conflict.sum.aggregation_temporality = 2
    conflict.sum.data_points.add(as_int=1)
    histogram = metrics_pb2.Metric(name="lint.x")
    histogram.histogram.aggregation_temporality = 2
    histogram.histogram.data_points.add(count=1, sum=1, explicit_bounds=[1], bucket_counts=[1, 0])
    _post(sidecar, _request(histogram, conflict).SerializeToString(), PROTOBUF)

    response = httpx.get(sidecar.url + "/metrics", timeout=10)
    openmetrics = httpx.get(sidecar.url + "/metrics", headers={"accept": OPENMETRICS}, timeout=10)

    assert promtool_findings(response.content) == ""
    assert openmetrics.text.endswith("# EOF\n")
    assert value(response.text, "lint_x_count", job="raw") == 1
    assert samples(response.text)


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        ("http.server.duration", "s", HISTOGRAM, "http_server_duration_seconds"),
        ("http.server.duration", "ms", HISTOGRAM, "http_server_duration_milliseconds"),
        ("memory", "By", GAUGE, "memory_bytes"),
        ("requests", "{request}", COUNTER, "requests"),
        ("requests_total", "1", COUNTER, "requests"),
        ("utilization", "1", GAUGE, "utilization_ratio"),
        ("throughput", "By/s", GAUGE, "throughput_bytes_per_second"),
        ("latency_seconds", "s", GAUGE, "latency_seconds"),
        ("2xx..count", "", GAUGE, "_2xx_count"),
        ("héllo", "", GAUGE, "h_llo"),
    ],
)
def test_names_follow_the_prometheus_compatibility_rules(
    name: str, unit: str, kind: str, expected: str
) -> None:
    assert metric_name(name, unit, kind) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [("http.method", "http_method"), ("2fa", "key_2fa"), ("__x", "key_x"), ("", "key_")],
)
def test_attribute_keys_become_valid_label_names(key: str, expected: str) -> None:
    assert label_name(key) == expected


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"listen": "4318"}, "ingest.otlp.listen"),
        ({"max_body_size": "lots"}, "ingest.otlp.max_body_size"),
        ({"max_in_flight": 0}, "ingest.otlp.max_in_flight"),
        ({"exponential_histograms": "maybe"}, "ingest.otlp.exponential_histograms"),
        ({"extra": True}, "ingest.otlp.extra"),
    ],
)
def test_invalid_otlp_config_names_the_field(section: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"ingest": {"otlp": section}})

    assert path in [problem.path for problem in raised.value.problems]


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"ttl": "-5s"}, "ingest.store.ttl"),
        ({"max_series": 0}, "ingest.store.max_series"),
        ({"max_series_per_family": "many"}, "ingest.store.max_series_per_family"),
    ],
)
def test_invalid_store_config_names_the_field(section: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"ingest": {"store": section}})

    assert path in [problem.path for problem in raised.value.problems]


def test_docs_mention_every_ingest_config_key() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "ingest.md").read_text()
    from sidecar.metrics.ingest_config import OtlpConfig, StatsdConfig, StatsdMapping, StoreConfig

    for model in (StoreConfig, StatsdConfig, StatsdMapping, OtlpConfig):
        for key in model.model_fields:
            assert f"`{key}`" in docs, key


def _post_in_process(body: bytes) -> httpx.Response:
    from sidecar.metrics.ingest_config import OtlpConfig
    from sidecar.metrics.otlp import OtlpReceiver
    from sidecar.metrics.store import IngestStats, Store

    receiver = OtlpReceiver(OtlpConfig(max_body_size=64 * 1024), Store(), IngestStats())

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=receiver.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://otlp") as client:
            return await client.post("/v1/metrics", content=body, headers=PROTOBUF)

    return asyncio.run(post())


def _valid_body() -> bytes:
    histogram = metrics_pb2.Metric(name="fuzz.hist", unit="s")
    histogram.histogram.aggregation_temporality = 1
    histogram.histogram.data_points.add(
        count=3, sum=1.5, explicit_bounds=[0.1, 1], bucket_counts=[1, 1, 1]
    )
    exponential = metrics_pb2.Metric(name="fuzz.exp")
    exponential.exponential_histogram.aggregation_temporality = 2
    point = exponential.exponential_histogram.data_points.add(count=2, scale=3, zero_count=1)
    point.positive.offset = -2
    point.positive.bucket_counts.extend([1])
    summary = metrics_pb2.Metric(name="fuzz.summary")
    summary.summary.data_points.add(count=1, sum=1).quantile_values.add(quantile=0.5, value=1)
    return _request(
        _gauge("fuzz.gauge", 1, k="v"), histogram, exponential, summary
    ).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_and_random_bodies_never_cause_a_server_error(data: st.DataObject) -> None:
    body = bytearray(_valid_body())
    for _ in range(data.draw(st.integers(0, 6))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        body = bytearray(data.draw(st.binary(max_size=300)))

    response = _post_in_process(bytes(body))

    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        ExportMetricsServiceResponse.FromString(response.content)
