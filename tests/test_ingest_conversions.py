"""OTLP conversions and store limits driven through the receiver and listener directly."""

from __future__ import annotations

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.metrics.v1 import metrics_pb2

from sidecar.metrics.ingest_config import OtlpConfig
from sidecar.metrics.otlp import DELTA, OtlpReceiver
from sidecar.metrics.store import IngestStats, Store
from tests.ingest_helpers import ingest_sidecar, poll, samples, scrape, value


def _receiver(**config: object) -> tuple[OtlpReceiver, Store]:
    store = Store()
    return OtlpReceiver(OtlpConfig.model_validate(config), store, IngestStats()), store


def _export(metric: metrics_pb2.Metric) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    request.resource_metrics.add().scope_metrics.add().metrics.append(metric)
    return request


def _delta_histogram(bounds: list[float], counts: list[int]) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name="work.duration", unit="s")
    metric.histogram.aggregation_temporality = DELTA
    metric.histogram.data_points.add(
        count=sum(counts), sum=float(sum(counts)), explicit_bounds=bounds, bucket_counts=counts
    )
    return metric


def test_delta_histograms_accumulate_and_refuse_changed_bounds() -> None:
    receiver, store = _receiver()

    first = receiver.apply(_export(_delta_histogram([1, 2], [1, 0, 2])))
    second = receiver.apply(_export(_delta_histogram([1, 2], [0, 4, 1])))
    changed = receiver.apply(_export(_delta_histogram([1, 5], [1, 1, 1])))

    assert (first.accepted, second.accepted, changed.accepted) == (1, 1, 0)
    assert changed.rejected == {"bucket_mismatch": 1}
    parsed = samples(store.render().decode())
    assert parsed[("work_duration_seconds_bucket", (("le", "1.0"),))] == 1
    assert parsed[("work_duration_seconds_bucket", (("le", "2.0"),))] == 5
    assert parsed[("work_duration_seconds_bucket", (("le", "+Inf"),))] == 8
    assert parsed[("work_duration_seconds_count", ())] == 8


def test_exponential_histograms_can_be_refused_by_configuration() -> None:
    receiver, store = _receiver(exponential_histograms="reject")
    metric = metrics_pb2.Metric(name="sizes")
    metric.exponential_histogram.aggregation_temporality = 2
    metric.exponential_histogram.data_points.add(count=1, zero_count=1)

    outcome = receiver.apply(_export(metric))

    assert outcome.rejected == {"unsupported_type": 1}
    assert store.render() == b""


def test_unspecified_temporality_and_missing_values_are_rejected() -> None:
    receiver, store = _receiver()
    unspecified = metrics_pb2.Metric(name="things")
    unspecified.sum.data_points.add(as_int=1)
    empty = metrics_pb2.Metric(name="level")
    empty.gauge.data_points.add()
    stale = metrics_pb2.Metric(name="stale")
    stale.gauge.data_points.add(as_double=1, flags=1)

    outcomes = [receiver.apply(_export(m)) for m in (unspecified, empty, stale)]

    assert outcomes[0].rejected == {"invalid_temporality": 1}
    assert outcomes[1].rejected == {"missing_value": 1}
    assert (outcomes[2].accepted, outcomes[2].rejected) == (0, {})
    assert "stale" not in store.render().decode()


async def test_series_caps_drop_new_series_and_show_in_metrics() -> None:
    sidecar = ingest_sidecar({"store": {"max_series": 3, "max_series_per_family": 2}})
    async with sidecar.running():
        statsd = sidecar.ingest.statsd
        assert statsd is not None
        statsd.ingest.handle_datagram(
            b"a:1|c|#k:1\na:1|c|#k:2\na:1|c|#k:3\nb:1|g\nc:1|g\na:1|c|#k:1"
        )

        text = (await scrape(sidecar)).text

    assert value(text, "a_total", k="1") == 2
    assert value(text, "a_total", k="3") is None
    assert value(text, "c") is None
    assert value(text, "sidecar_app_series") == 3
    assert value(text, "sidecar_app_series_limit") == 3
    assert value(text, "sidecar_app_series_dropped_total", reason="family_limit") == 1
    assert value(text, "sidecar_app_series_dropped_total", reason="total_limit") == 1
    assert value(text, "sidecar_ingest_rejected_samples_total", source="statsd",
                 reason="total_limit") == 1  # fmt: skip


async def test_mapping_ttl_overrides_the_store_ttl() -> None:
    sidecar = ingest_sidecar(
        {
            "store": {"ttl": "1m"},
            "statsd": {"mappings": [{"match": "keep.*", "name": "kept_$1", "ttl": "0s"}]},
        }
    )
    async with sidecar.running():
        statsd = sidecar.ingest.statsd
        assert statsd is not None
        statsd.ingest.handle_datagram(b"keep.me:1|g\nplain:1|g")

        async def both() -> str | None:
            text = (await scrape(sidecar)).text
            return text if value(text, "kept_me") == 1 and value(text, "plain") == 1 else None

        await poll(both)
        store = sidecar.ingest.store
        ttls = {
            family.name: series.expires_after
            for family in store._families.values()
            for series in family.series.values()
        }

    assert ttls == {"kept_me": 0.0, "plain": 60.0}
