"""OTLP metric export against a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import subprocess
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.metrics.v1 import metrics_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.telemetry.stats import ExportStats
from tests.harness import SidecarProcess, free_port, require_tool, wait_until
from tests.otel_receiver import OtlpReceiver, metric_named, resource_of, series_of

CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
# These change because of the very scrape or export that reads them.
# Families that change between the export and the scrape on their own: the export's and the
# scrape's own measurements, and what background work updates (health checks on their
# intervals, the outbox gauges refreshed every few seconds).
SELF_REFERENTIAL = (
    "sidecar_otel_export",
    "sidecar_scrape_duration_seconds",
    "sidecar_health_",
    "sidecar_event_loop_lag_seconds",
    "sidecar_alerts_outbox_",
    "sidecar_alerts_dead_letters",
)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def quiet_config(endpoint: str, **telemetry: Any) -> dict[str, Any]:
    """Host and process metrics off, so that every value holds still between two reads."""
    return {
        "metrics": {"host": {"enabled": False}, "process": {"include_self": False}},
        "telemetry": {"endpoint": endpoint, **telemetry},
    }


def add_test_metrics(sidecar: Sidecar) -> dict[str, Any]:
    registry = sidecar.registry
    requests = Counter("app_requests", "Requests.", ["method", "code"], registry=registry)
    requests.labels("GET", "200").inc(41)
    requests.labels("POST", "500").inc(2.5)
    queue = Gauge("app_queue_depth", "Jobs waiting.", registry=registry)
    queue.set(-7.25)
    latency = Histogram(
        "app_latency_seconds",
        "Latency.",
        ["route"],
        buckets=(0.01, 0.1, 1.0),
        registry=registry,
    )
    for value in (0.005, 0.05, 0.05, 0.5, 3.0):
        latency.labels("/a").observe(value)
    latency.labels("/b").observe(0.2)
    sizes = Summary("app_payload_bytes", "Payload sizes.", registry=registry)
    sizes.observe(100)
    sizes.observe(300)

    def store_families() -> Iterable[Metric]:
        # What the application-metric store will provide beside its pre-rendered text.
        counter = CounterMetricFamily("app_statsd_hits", "Hits.", labels=["job"])
        counter.add_metric(["x"], 12)
        gauge = GaugeMetricFamily("app_statsd_temperature", "Temperature.", labels=["room"])
        gauge.add_metric(["kitchen"], 21.5)
        return [counter, gauge]

    def store_text(openmetrics: bool) -> bytes:
        return (
            b"# HELP app_statsd_hits_total Hits.\n# TYPE app_statsd_hits_total counter\n"
            b'app_statsd_hits_total{job="x"} 12.0\n'
            b"# HELP app_statsd_temperature Temperature.\n# TYPE app_statsd_temperature gauge\n"
            b'app_statsd_temperature{room="kitchen"} 21.5\n'
        )

    sidecar.exposition.add_text_source(store_text, store_families)
    return {"requests": requests, "latency": latency}


def scraped_series(page: str) -> dict[tuple[str, frozenset[Any]], float]:
    series = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            labels = dict(sample.labels)
            if "le" in labels:
                labels["le"] = float(labels["le"])
            series[(sample.name, frozenset(labels.items()))] = sample.value
    return series


def stable(series: dict[tuple[str, frozenset[Any]], Any]) -> dict[tuple[str, frozenset[Any]], Any]:
    return {key: value for key, value in series.items() if not key[0].startswith(SELF_REFERENTIAL)}


async def scrape(sidecar: Sidecar) -> str:
    transport = httpx.ASGITransport(app=sidecar.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


async def test_exported_values_equal_the_metrics_page(receiver: OtlpReceiver) -> None:
    sidecar = Sidecar(parse_config(quiet_config(receiver.url), environ={}))
    add_test_metrics(sidecar)

    async with sidecar.running():
        assert await sidecar.telemetry.metrics.export()
        page = await scrape(sidecar)

    exported = stable(series_of(receiver.received.metrics[-1]))
    scraped = stable(scraped_series(page))
    assert exported == scraped
    assert scraped[("app_requests_total", frozenset({("method", "GET"), ("code", "200")}))] == 41
    assert scraped[("app_latency_seconds_bucket", frozenset({("route", "/a"), ("le", 0.1)}))] == 3
    assert scraped[("app_statsd_temperature", frozenset({("room", "kitchen")}))] == 21.5
    assert ("app_payload_bytes_count", frozenset()) in exported
    assert (
        "sidecar_build_info",
        frozenset(next(k for k in scraped if k[0] == "sidecar_build_info")[1]),
    ) in exported


async def test_every_series_of_a_full_sidecar_is_exported(receiver: OtlpReceiver) -> None:
    # Host and process metrics move between two reads, so this compares series, not values.
    sidecar = Sidecar(parse_config({"telemetry": {"endpoint": receiver.url}}, environ={}))

    async with sidecar.running():
        assert await sidecar.telemetry.metrics.export()
        page = await scrape(sidecar)

    exported = set(stable(series_of(receiver.received.metrics[-1])))
    scraped = set(stable(scraped_series(page)))
    assert exported == scraped
    assert any(name == "sidecar_host_cpu_seconds_total" for name, _ in scraped)


async def test_metric_types_survive_the_export(receiver: OtlpReceiver) -> None:
    sidecar = Sidecar(parse_config(quiet_config(receiver.url), environ={}))
    add_test_metrics(sidecar)

    async with sidecar.running():
        assert await sidecar.telemetry.metrics.export()

    request = receiver.received.metrics[-1]
    counter = metric_named(request, "app_requests")
    assert counter.WhichOneof("data") == "sum"
    assert counter.sum.is_monotonic
    assert counter.sum.aggregation_temporality == CUMULATIVE
    assert counter.description == "Requests."
    assert metric_named(request, "app_queue_depth").WhichOneof("data") == "gauge"
    histogram = metric_named(request, "app_latency_seconds")
    assert histogram.WhichOneof("data") == "histogram"
    assert histogram.unit == "s"
    assert histogram.histogram.aggregation_temporality == CUMULATIVE
    point_a = next(
        p for p in histogram.histogram.data_points if p.attributes[0].value.string_value == "/a"
    )
    assert list(point_a.explicit_bounds) == [0.01, 0.1, 1.0]
    assert list(point_a.bucket_counts) == [1, 2, 1, 1]
    assert point_a.count == 5
    assert math.isclose(point_a.sum, 3.605)
    assert not point_a.HasField("min")  # Prometheus keeps no minimum; none is invented
    assert point_a.start_time_unix_nano < point_a.time_unix_nano


async def test_resource_attributes_arrive(receiver: OtlpReceiver) -> None:
    environ = {
        "K8S_POD_NAME": "web-0",
        "POD_NAMESPACE": "shop",
        "K8S_NODE_NAME": "node-a",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=staging",
        "OTEL_SERVICE_NAME": "web-sidecar",
    }
    config = quiet_config(receiver.url, resource={"team": "payments"})
    sidecar = Sidecar(parse_config(config, environ=environ))

    async with sidecar.running():
        assert await sidecar.telemetry.metrics.export()

    resource = resource_of(receiver.received.metrics[-1])
    assert {key: resource[key] for key in environ_keys()} == {
        "service.name": "web-sidecar",
        "k8s.pod.name": "web-0",
        "k8s.namespace.name": "shop",
        "k8s.node.name": "node-a",
        "deployment.environment.name": "staging",
        "team": "payments",
        "telemetry.sdk.language": "python",
    }
    assert resource["service.version"]


def environ_keys() -> list[str]:
    return [
        "service.name",
        "k8s.pod.name",
        "k8s.namespace.name",
        "k8s.node.name",
        "deployment.environment.name",
        "team",
        "telemetry.sdk.language",
    ]


async def test_delta_temporality_sends_the_change_since_the_last_export(
    receiver: OtlpReceiver,
) -> None:
    config = quiet_config(receiver.url, metrics={"temporality": "delta"})
    sidecar = Sidecar(parse_config(config, environ={}))
    metrics = add_test_metrics(sidecar)

    async with sidecar.running():
        assert await sidecar.telemetry.metrics.export()
        metrics["requests"].labels("GET", "200").inc(3)
        metrics["latency"].labels("/a").observe(0.05)
        assert await sidecar.telemetry.metrics.export()

    first, second = receiver.received.metrics[-2:]
    get_200 = frozenset({("method", "GET"), ("code", "200")})
    assert series_of(first)[("app_requests_total", get_200)] == 41
    assert series_of(second)[("app_requests_total", get_200)] == 3
    assert (
        series_of(second)[("app_requests_total", frozenset({("method", "POST"), ("code", "500")}))]
        == 0
    )
    histogram = metric_named(second, "app_latency_seconds").histogram
    assert histogram.aggregation_temporality == DELTA
    point_a = next(p for p in histogram.data_points if p.attributes[0].value.string_value == "/a")
    assert list(point_a.bucket_counts) == [0, 1, 0, 0]
    assert point_a.count == 1
    first_point = next(
        p
        for p in metric_named(first, "app_latency_seconds").histogram.data_points
        if p.attributes[0].value.string_value == "/a"
    )
    assert point_a.start_time_unix_nano == first_point.time_unix_nano


async def test_retryable_answers_are_retried_within_one_export(receiver: OtlpReceiver) -> None:
    sidecar = Sidecar(parse_config(quiet_config(receiver.url), environ={}))
    receiver.fail_next(2, status=503, retry_after="0")

    async with sidecar.running():
        succeeded = await sidecar.telemetry.metrics.export()
        page = await scrape(sidecar)

    assert succeeded
    assert receiver.received.statuses == [503, 503, 200]
    assert 'sidecar_otel_exports_total{result="success",signal="metrics"} 1.0' in page
    assert 'sidecar_otel_exports_total{result="failure",signal="metrics"} 0.0' in page


async def test_a_non_retryable_answer_fails_at_once(receiver: OtlpReceiver) -> None:
    sidecar = Sidecar(parse_config(quiet_config(receiver.url), environ={}))
    receiver.fail_next(1, status=400)

    async with sidecar.running():
        assert not await sidecar.telemetry.metrics.export()

    assert receiver.received.statuses == [400]


async def test_an_outage_drops_data_instead_of_queueing_it_and_export_resumes(
    receiver: OtlpReceiver,
) -> None:
    config = quiet_config(receiver.url, timeout="1s")
    sidecar = Sidecar(parse_config(config, environ={}))
    gauge = Gauge("app_wide", "Many series.", ["shard"], registry=sidecar.registry)
    for shard in range(3000):
        gauge.labels(str(shard)).set(shard)
    # Every request during the outage answers 503; Retry-After 0 keeps the test fast.
    receiver.fail_next(10_000, status=503, retry_after="0")
    push = sidecar.telemetry.metrics

    async with sidecar.running():
        assert not await push.export()
        tracemalloc.start()
        try:
            assert not await push.export()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(6):
                assert not await push.export()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        page_during_outage = await scrape(sidecar)

        receiver.recover()
        assert await push.export()
        page_after = await scrape(sidecar)

    # One snapshot of 3,000 series is about 1 MB; eight failed exports keep none of them.
    assert grown < 256 * 1024, grown
    assert 'sidecar_otel_exports_total{result="failure",signal="metrics"} 8.0' in page_during_outage
    assert 'sidecar_otel_exports_total{result="success",signal="metrics"} 1.0' in page_after
    exported = series_of(receiver.received.metrics[-1])
    assert exported[("app_wide", frozenset({("shard", "2999")}))] == 2999


async def test_the_loop_keeps_exporting_after_failures(
    receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = quiet_config(receiver.url, timeout="1s", metrics={"interval": "1s"})
    sidecar = Sidecar(parse_config(config, environ={}))
    receiver.fail_next(1, status=400)
    caplog.set_level(logging.INFO, logger="sidecar.telemetry")

    async with sidecar.running():
        await _poll(lambda: len(receiver.received.metrics) >= 1)

    assert receiver.received.statuses[:2] == [400, 200]
    assert f"metrics export to {receiver.url}/v1/metrics failed" in caplog.text
    assert f"metrics export to {receiver.url}/v1/metrics works again" in caplog.text


async def _poll(condition: Any) -> None:
    # The export loop runs on this event loop: poll from a thread so that it keeps running.
    await asyncio.to_thread(wait_until, condition)


def test_a_sidecar_process_exports_with_environment_configuration(
    receiver: OtlpReceiver, tmp_path: Path
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20tok-123456",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_SERVICE_NAME": "shop-sidecar",
        "K8S_POD_NAME": "shop-7d9f",
        "K8S_NAMESPACE_NAME": "shop",
        "K8S_NODE_NAME": "worker-3",
    }
    sidecar = SidecarProcess(tmp_path, env=env).start()
    try:
        request = receiver.wait_for_metrics()
        page = httpx.get(sidecar.url + "/metrics", timeout=5).text
    finally:
        sidecar.stop()

    resource = resource_of(request)
    assert resource["service.name"] == "shop-sidecar"
    assert resource["k8s.pod.name"] == "shop-7d9f"
    assert resource["k8s.namespace.name"] == "shop"
    assert resource["k8s.node.name"] == "worker-3"
    assert receiver.headers[0]["authorization"] == "Bearer tok-123456"
    assert receiver.headers[0]["content-encoding"] == "gzip"
    assert ("sidecar_host_load1", frozenset()) in series_of(request)
    assert "sidecar_otel_exports_total" in page
    assert "tok-123456" not in sidecar.log()


def test_an_unreachable_endpoint_is_reported_at_run_time(tmp_path: Path) -> None:
    closed_port = free_port()
    url = f"http://127.0.0.1:{closed_port}"
    config = {"telemetry": {"endpoint": url, "timeout": "1s", "metrics": {"interval": "1s"}}}
    sidecar = SidecarProcess(tmp_path, config=config).start()
    try:
        wait_until(
            lambda: f"metrics export to {url}/v1/metrics failed" in sidecar.log(),
            what="the export failure in the log",
        )
        page = httpx.get(sidecar.url + "/metrics", timeout=5).text
        assert sidecar.process is not None
        assert sidecar.process.poll() is None
    finally:
        sidecar.stop()

    log = sidecar.log()
    assert f"metrics export to {url}/v1/metrics failed after" in log
    assert "cannot connect ([Errno 111] Connection refused)" in log, log
    assert 'sidecar_otel_exports_total{result="failure",signal="metrics"}' in page
    failures = next(
        line
        for line in page.splitlines()
        if line.startswith('sidecar_otel_exports_total{result="failure",signal="metrics"}')
    )
    assert float(failures.split()[-1]) >= 1


async def test_a_failing_family_source_is_counted_and_the_loop_survives(
    receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = Sidecar(parse_config(quiet_config(receiver.url), environ={}))
    broken = True

    def families() -> Iterable[Metric]:
        if broken:
            raise RuntimeError("store is being rebuilt")
        return [GaugeMetricFamily("app_ok", "Fine again.", value=1)]

    sidecar.exposition.add_text_source(lambda openmetrics: b"", families)

    async with sidecar.running():
        assert not await sidecar.telemetry.metrics.export()
        broken = False
        assert await sidecar.telemetry.metrics.export()
        page = await scrape(sidecar)

    assert "reading the metric families for OTLP export failed" in caplog.text
    assert 'sidecar_otel_exports_total{result="failure",signal="metrics"} 1.0' in page
    assert ("app_ok", frozenset()) in series_of(receiver.received.metrics[-1])


def test_the_export_metrics_pass_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    registry = CollectorRegistry()
    stats = ExportStats(registry)
    stats.record("metrics", True, 0.02)
    stats.record("traces", False, 1.5)

    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(registry),
        capture_output=True,
        check=False,
    )

    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


async def test_only_the_configured_headers_are_sent(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file's header map replaces the environment's, though the SDK's exporter would read
    # the variable on its own.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-from-env=leaked")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-metrics-env=leaked")
    config = quiet_config(receiver.url, headers={"authorization": "Bearer from-file"})
    sidecar = Sidecar(parse_config(config))

    async with sidecar.running():
        assert await sidecar.telemetry.metrics.export()

    (headers,) = receiver.headers
    assert headers["authorization"] == "Bearer from-file"
    assert headers["content-type"] == "application/x-protobuf"
    assert "x-from-env" not in headers
    assert "x-metrics-env" not in headers


async def test_a_stalled_collector_times_out_without_blocking_the_event_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A socket that accepts connections (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        sidecar = Sidecar(parse_config(quiet_config(url, timeout="1s"), environ={}))

        async with sidecar.running():
            push = sidecar.telemetry.metrics
            export = asyncio.create_task(push.export())
            await asyncio.to_thread(wait_until, lambda: push.exporting)
            started = time.monotonic()
            page = await scrape(sidecar)
            scrape_seconds = time.monotonic() - started
            succeeded = await export

    assert not succeeded
    assert scrape_seconds < 0.5
    assert "sidecar_build_info" in page
    assert f"metrics export to {url}/v1/metrics failed" in caplog.text
    assert "no answer within the timeout (ReadTimeout)" in caplog.text
