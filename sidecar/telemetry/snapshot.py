"""One consistent reading of every metric family, sorted into what OTLP distinguishes.

prometheus_client families are read once per export; counters, gauges and histograms are then
all taken from that one reading, so an export shows the values of a single instant, as one
scrape of ``/metrics`` would. This module imports no OpenTelemetry code.

Mapping (the Prometheus-to-OTLP mapping the OpenTelemetry Collector applies in reverse):

- counter: a monotonic sum named after the family, without the ``_total`` suffix;
- gauge: a gauge;
- histogram: a histogram with the ``le`` bounds as explicit bounds (``+Inf`` implied);
- summary: ``<name>_count`` and ``<name>_sum`` as monotonic sums, quantiles as a gauge with a
  ``quantile`` attribute (the SDK data model has no summary point);
- info, stateset, gaugehistogram, unknown: every sample as a gauge named after the sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import Metric

COUNTER = "counter"
GAUGE = "gauge"


@dataclass
class NumberSeries:
    """The samples of one sum or gauge: ``(value, attributes)`` per series."""

    kind: str
    name: str
    description: str
    unit: str
    points: list[tuple[float, dict[str, str]]] = field(default_factory=list)


@dataclass
class HistogramSeries:
    """One histogram series: non-cumulative bucket counts over ``bounds``, plus count and sum."""

    attributes: dict[str, str]
    bounds: list[float]
    counts: list[int]
    count: int
    sum: float


@dataclass
class HistogramFamily:
    name: str
    description: str
    unit: str
    series: list[HistogramSeries] = field(default_factory=list)


@dataclass
class Snapshot:
    """Every family of one reading, keyed as OTLP needs them."""

    numbers: dict[tuple[str, str], NumberSeries] = field(default_factory=dict)
    histograms: list[HistogramFamily] = field(default_factory=list)


# Prometheus base units, as name suffixes, and their UCUM codes that OTLP units use.
_UNITS = {"seconds": "s", "bytes": "By", "ratio": "1"}


def unit_of(family: Metric) -> str:
    """The UCUM unit of a family: its declared unit, else its name's base-unit suffix."""
    if family.unit:
        return _UNITS.get(family.unit, family.unit)
    suffix = family.name.rsplit("_", 1)[-1]
    return _UNITS.get(suffix, "")


def take_snapshot(families: Iterable[Metric]) -> Snapshot:
    """Read ``families`` once and sort their samples into sums, gauges and histograms."""
    snapshot = Snapshot()
    for family in families:
        if family.type == "counter":
            _add_counter(snapshot, family)
        elif family.type == "gauge":
            _number(snapshot, GAUGE, family.name, family).points.extend(
                (sample.value, sample.labels) for sample in family.samples
            )
        elif family.type == "histogram":
            snapshot.histograms.append(_histogram(family))
        elif family.type == "summary":
            _add_summary(snapshot, family)
        else:
            for sample in family.samples:
                _number(snapshot, GAUGE, sample.name, family).points.append(
                    (sample.value, sample.labels)
                )
    return snapshot


def _number(snapshot: Snapshot, kind: str, name: str, family: Metric) -> NumberSeries:
    key = (kind, name)
    series = snapshot.numbers.get(key)
    if series is None:
        series = NumberSeries(kind, name, family.documentation, unit_of(family))
        snapshot.numbers[key] = series
    return series


def _add_counter(snapshot: Snapshot, family: Metric) -> None:
    series = _number(snapshot, COUNTER, family.name, family)
    for sample in family.samples:
        # `_created` carries a timestamp, not a count; the sidecar turns it off anyway.
        if sample.name.endswith("_total"):
            series.points.append((sample.value, sample.labels))


def _add_summary(snapshot: Snapshot, family: Metric) -> None:
    for sample in family.samples:
        if sample.name == family.name + "_count" or sample.name == family.name + "_sum":
            _number(snapshot, COUNTER, sample.name, family).points.append(
                (sample.value, sample.labels)
            )
        elif sample.name == family.name:
            _number(snapshot, GAUGE, family.name, family).points.append(
                (sample.value, sample.labels)
            )


def _histogram(family: Metric) -> HistogramFamily:
    histogram = HistogramFamily(family.name, family.documentation, unit_of(family))
    # Samples of one series are adjacent in prometheus_client's output, but grouping by the
    # label set does not rely on it.
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    totals: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    attributes: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    for sample in family.samples:
        labels = {key: value for key, value in sample.labels.items() if key != "le"}
        key = tuple(labels.items())
        attributes.setdefault(key, labels)
        if sample.name.endswith("_bucket"):
            buckets.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            totals.setdefault(key, {})["count"] = sample.value
        elif sample.name.endswith("_sum"):
            totals.setdefault(key, {})["sum"] = sample.value

    for key, labels in attributes.items():
        cumulative = sorted(buckets.get(key, []))
        count = totals.get(key, {}).get("count")
        if not cumulative or not math.isinf(cumulative[-1][0]):
            # OTLP needs one more count than bounds: the +Inf bucket holds every observation.
            total = count if count is not None else (cumulative[-1][1] if cumulative else 0.0)
            cumulative.append((math.inf, total))
        bounds = [bound for bound, _ in cumulative if not math.isinf(bound)]
        counts = []
        previous = 0.0
        for _, value in cumulative:
            counts.append(round(value - previous))
            previous = value
        if count is None:
            count = previous
        histogram.series.append(
            HistogramSeries(
                labels, bounds, counts, round(count), totals.get(key, {}).get("sum", 0.0)
            )
        )
    return histogram
