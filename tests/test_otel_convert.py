"""From prometheus_client families to the SDK's metric data model, family type by family type."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, Histogram, Sum
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Enum, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from sidecar.telemetry.convert import Converter
from sidecar.telemetry.snapshot import take_snapshot


def convert(families: Iterable[Metric], converter: Converter | None = None) -> dict[str, Any]:
    converter = converter or Converter(Resource({}), "sidecar", delta=False)
    data = converter.convert(take_snapshot(families))
    (resource_metrics,) = data.resource_metrics
    (scope_metrics,) = resource_metrics.scope_metrics
    return {metric.name: metric for metric in scope_metrics.metrics}


def points(metric: Any) -> dict[tuple[tuple[str, str], ...], Any]:
    return {tuple(sorted(point.attributes.items())): point for point in metric.data.data_points}


def counter(value: float, name: str = "jobs", labels: dict[str, str] | None = None) -> Metric:
    family = CounterMetricFamily(name, "Jobs.", labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def test_a_counter_becomes_a_monotonic_cumulative_sum_without_total() -> None:
    metrics = convert([counter(5, labels={"queue": "a"})])

    metric = metrics["jobs"]
    assert isinstance(metric.data, Sum)
    assert metric.data.is_monotonic
    assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    (point,) = metric.data.data_points
    assert point.attributes == {"queue": "a"}
    assert point.value == 5
    assert 0 < point.start_time_unix_nano <= point.time_unix_nano


def test_a_gauge_keeps_negative_and_special_values() -> None:
    family = GaugeMetricFamily("temperature_celsius", "Temperature.", labels=["room"])
    family.add_metric(["cellar"], -3.5)
    family.add_metric(["attic"], float("inf"))

    metric = convert([family])["temperature_celsius"]

    assert isinstance(metric.data, Gauge)
    values = {key: point.value for key, point in points(metric).items()}
    assert values == {(("room", "cellar"),): -3.5, (("room", "attic"),): float("inf")}


def test_a_histogram_gets_per_bucket_counts_and_bounds() -> None:
    family = HistogramMetricFamily("wait_seconds", "Wait.", labels=["pool"])
    family.add_metric(["x"], buckets=[("0.1", 2), ("1", 5), ("+Inf", 6)], sum_value=4.5)

    metric = convert([family])["wait_seconds"]

    assert isinstance(metric.data, Histogram)
    assert metric.unit == "s"
    (point,) = metric.data.data_points
    assert list(point.explicit_bounds) == [0.1, 1.0]
    assert list(point.bucket_counts) == [2, 3, 1]
    assert (point.count, point.sum) == (6, 4.5)
    assert point.min is None


def test_a_histogram_without_an_inf_bucket_gets_one_from_its_count() -> None:
    family = Metric("partial", "Partial.", "histogram")
    family.add_sample("partial_bucket", {"le": "1"}, 2)
    family.add_sample("partial_count", {}, 7)
    family.add_sample("partial_sum", {}, 10)

    (point,) = convert([family])["partial"].data.data_points

    assert list(point.explicit_bounds) == [1.0]
    assert list(point.bucket_counts) == [2, 5]
    assert point.count == 7


def test_a_summary_becomes_count_and_sum_sums_and_a_quantile_gauge() -> None:
    family = SummaryMetricFamily("rpc_seconds", "RPC.", count_value=4, sum_value=2.0)
    family.add_sample("rpc_seconds", {"quantile": "0.5"}, 0.4)

    metrics = convert([family])

    assert isinstance(metrics["rpc_seconds_count"].data, Sum)
    assert metrics["rpc_seconds_count"].data.data_points[0].value == 4
    assert metrics["rpc_seconds_sum"].data.data_points[0].value == 2.0
    (quantile,) = metrics["rpc_seconds"].data.data_points
    assert (quantile.attributes, quantile.value) == ({"quantile": "0.5"}, 0.4)


def test_info_and_stateset_samples_become_gauges() -> None:
    registry = CollectorRegistry()
    Info("build", "Build.", registry=registry).info({"commit": "abc"})
    Enum("mode", "Mode.", states=["on", "off"], registry=registry).state("off")

    metrics = convert(registry.collect())

    assert points(metrics["build_info"])[(("commit", "abc"),)].value == 1
    modes = {key: point.value for key, point in points(metrics["mode"]).items()}
    assert modes == {(("mode", "on"),): 0, (("mode", "off"),): 1}


def test_names_otel_instruments_would_refuse_are_kept() -> None:
    # Recording-rule style names are valid Prometheus; OTLP itself does not restrict names.
    metrics = convert([counter(1, name="job:requests:rate5m")])

    assert "job:requests:rate5m" in metrics


def test_an_empty_registry_converts_to_an_empty_scope() -> None:
    assert convert([]) == {}


def test_delta_counters_report_the_change_and_survive_a_reset() -> None:
    converter = Converter(Resource({}), "sidecar", delta=True)
    first = convert([counter(10)], converter)["jobs"].data.data_points[0]

    second = convert([counter(15)], converter)["jobs"]
    third = convert([counter(4)], converter)["jobs"].data.data_points[0]

    assert first.value == 10
    assert second.data.aggregation_temporality is AggregationTemporality.DELTA
    assert second.data.data_points[0].value == 5
    assert second.data.data_points[0].start_time_unix_nano == first.time_unix_nano
    assert third.value == 4  # below the previous total: a restart, reported whole


def test_delta_state_forgets_series_that_disappeared() -> None:
    converter = Converter(Resource({}), "sidecar", delta=True)
    convert([counter(10, labels={"q": "a"})], converter)
    convert([counter(1, labels={"q": "b"})], converter)

    back = convert([counter(12, labels={"q": "a"})], converter)["jobs"].data.data_points[0]

    # Series a was missing in between, so its old total is gone: 12 is reported whole.
    assert back.value == 12


def test_delta_histograms_subtract_bucket_by_bucket() -> None:
    converter = Converter(Resource({}), "sidecar", delta=True)

    def histogram(counts: list[tuple[str, float]], total: float) -> Metric:
        family = HistogramMetricFamily("wait_seconds", "Wait.")
        family.add_metric([], buckets=counts, sum_value=total)
        return family

    convert([histogram([("1", 1), ("+Inf", 2)], 3.0)], converter)
    (point,) = convert([histogram([("1", 4), ("+Inf", 6)], 9.0)], converter)[
        "wait_seconds"
    ].data.data_points

    assert list(point.bucket_counts) == [3, 1]
    assert (point.count, point.sum) == (4, 6.0)
