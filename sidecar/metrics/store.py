"""The application-metric store: families and series written by StatsD and OTLP, read by scrapes.

Contracts:

- A sample that does not fit is rejected with a reason and never reaches the exposition: the
  same name with another type (``type_conflict``), another label-name set (``label_conflict``),
  or a name that another family's samples already use, such as ``x_count`` next to a histogram
  ``x`` (``name_conflict``). A gauge named like a sample of another type (``_count``, ``_sum``,
  ``_bucket``, ``_total``) is rejected (``reserved_suffix``). ``/metrics`` therefore always
  parses, and promtool finds nothing wrong with the names the store lets through except those
  that break its style lints (camelCase, non-base units), which mappings can rename.
- New series beyond the per-family or total cap are dropped (``family_limit``,
  ``total_limit``); existing series keep working.
- A series that got no sample for its TTL is removed; an emptied family is forgotten, so its
  name may come back with another type.
- Writers resolve a series with :meth:`Store.series` and mutate it only while holding
  ``store.lock``; rendering takes the same lock, so a scrape never sees half an update.

Rendering is the hot path of a scrape: each series keeps the text of its sample names and labels
(``name_bucket{a="b",le="0.5"} ``), built once, so a scrape only formats values.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"
SUMMARY = "summary"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Names the sidecar's own metrics use; an application may not write into them.
RESERVED_PREFIX = "sidecar_"
# OpenMetrics gives these suffixes to the samples of counters, histograms and summaries; a
# family of another type named with one is ambiguous, and promtool flags it.
_NON_COUNTER_SUFFIXES = ("_total", "_created")
_GAUGE_SUFFIXES = ("_count", "_sum", "_bucket")
_SPECIAL_VALUES = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}


def format_value(value: float) -> str:
    """Write a sample value as both exposition formats accept it."""
    text = repr(value)
    return _SPECIAL_VALUES.get(text, text)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if openmetrics else text


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape_label(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Series:
    """One label set of a family. Mutate only while holding the store's lock."""

    __slots__ = (
        "alive",
        "bounds",
        "buckets",
        "count",
        "expires_after",
        "family",
        "label_names",
        "label_values",
        "prefixes",
        "quantiles",
        "sum",
        "updated",
        "value",
    )

    def __init__(
        self,
        family: Family,
        label_names: tuple[str, ...],
        label_values: tuple[str, ...],
        expires_after: float,
    ) -> None:
        self.family = family
        self.label_names = label_names
        self.label_values = label_values
        self.expires_after = expires_after
        self.updated = time.monotonic()
        self.alive = True
        self.value = 0.0
        self.sum = 0.0
        self.count = 0.0
        self.bounds: tuple[float, ...] = ()
        self.buckets: list[float] = []  # per bucket (not cumulative), +Inf last
        self.quantiles: tuple[tuple[float, float], ...] = ()
        self.prefixes: list[str] = []
        self._build_prefixes()

    def _build_prefixes(self) -> None:
        family = self.family
        names, values = self.label_names, self.label_values
        if family.kind == COUNTER:
            self.prefixes = [f"{family.name}_total{_label_text(names, values)} "]
        elif family.kind == GAUGE:
            self.prefixes = [f"{family.name}{_label_text(names, values)} "]
        elif family.kind == HISTOGRAM:
            les = [*(format_value(float(b)) for b in self.bounds), "+Inf"]
            bucket = family.name + "_bucket"
            self.prefixes = [_label_text(names, values, f'le="{le}"') for le in les]
            self.prefixes = [f"{bucket}{text} " for text in self.prefixes]
            self.prefixes += [
                f"{family.name}_count{_label_text(names, values)} ",
                f"{family.name}_sum{_label_text(names, values)} ",
            ]
        else:
            quantile_texts = [
                _label_text(names, values, f'quantile="{format_value(q)}"')
                for q, _ in self.quantiles
            ]
            self.prefixes = [f"{family.name}{text} " for text in quantile_texts]
            self.prefixes += [
                f"{family.name}_count{_label_text(names, values)} ",
                f"{family.name}_sum{_label_text(names, values)} ",
            ]

    def set_bounds(self, bounds: tuple[float, ...]) -> None:
        """Give a histogram series new bucket bounds, clearing its state."""
        self.bounds = bounds
        self.buckets = [0.0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0.0
        self._build_prefixes()

    def observe(self, value: float, weight: float = 1.0) -> None:
        """Add one observation (``weight`` times, for sampled timers) to a histogram series."""
        self.buckets[bisect.bisect_left(self.bounds, value)] += weight
        self.sum += value * weight
        self.count += weight

    def set_summary(
        self, quantiles: tuple[tuple[float, float], ...], total: float, count: float
    ) -> None:
        """Replace a summary series' quantiles, sum and count."""
        if tuple(q for q, _ in quantiles) != tuple(q for q, _ in self.quantiles):
            self.quantiles = quantiles
            self._build_prefixes()
        self.quantiles = quantiles
        self.sum = total
        self.count = count

    def render(self, out: list[str]) -> None:
        prefixes = self.prefixes
        kind = self.family.kind
        if kind in (COUNTER, GAUGE):
            out.append(prefixes[0] + format_value(self.value) + "\n")
            return
        if kind == HISTOGRAM:
            cumulative = 0.0
            for prefix, count in zip(prefixes, self.buckets, strict=False):
                cumulative += count
                out.append(prefix + format_value(cumulative) + "\n")
        else:
            for prefix, (_, value) in zip(prefixes, self.quantiles, strict=False):
                out.append(prefix + format_value(value) + "\n")
        out.append(prefixes[-2] + format_value(self.count) + "\n")
        out.append(prefixes[-1] + format_value(self.sum) + "\n")


@dataclass(eq=False)
class Family:
    """A metric family: one name, one type, one label-name set."""

    name: str
    kind: str
    help: str
    label_names: tuple[str, ...]
    claims: tuple[str, ...]
    flexible: bool = False  # series may differ in label names (target_info)
    series: dict[tuple[Any, ...], Series] = field(default_factory=dict)
    headers: tuple[str, str] = ("", "")  # (text 0.0.4, OpenMetrics)

    def __post_init__(self) -> None:
        name_004 = self.name + "_total" if self.kind == COUNTER else self.name
        self.headers = (
            f"# HELP {name_004} {_escape_help(self.help, False)}\n# TYPE {name_004} {self.kind}\n",
            f"# HELP {self.name} {_escape_help(self.help, True)}\n# TYPE {self.name} {self.kind}\n",
        )


def _claims(name: str, kind: str) -> tuple[str, ...]:
    """Every sample or family name a family of this kind shows, in either format."""
    if kind == COUNTER:
        return (name, name + "_total", name + "_created")
    if kind == HISTOGRAM:
        return (name, name + "_bucket", name + "_count", name + "_sum", name + "_created")
    if kind == SUMMARY:
        return (name, name + "_count", name + "_sum", name + "_created")
    return (name,)


def _check_labels(kind: str, labels: Mapping[str, str]) -> str:
    for label in labels:
        if not _LABEL.fullmatch(label) or label.startswith("__"):
            return "invalid_label"
        if (kind == HISTOGRAM and label == "le") or (kind == SUMMARY and label == "quantile"):
            return "invalid_label"
    return ""


def family_name(name: str, kind: str) -> str:
    """The family name of a sample name: a counter's ``_total`` belongs to its samples."""
    if kind == COUNTER and name.endswith("_total"):
        return name[: -len("_total")]
    return name


@dataclass
class StoreStats:
    """Counters the store keeps about itself, read by :class:`StoreCollector`."""

    dropped: dict[str, int] = field(default_factory=lambda: {"family_limit": 0, "total_limit": 0})
    expired: int = 0


class Store:
    """Application metric families and series, shared by every ingest source."""

    def __init__(
        self,
        *,
        ttl: float = 600.0,
        max_series: int = 100_000,
        max_series_per_family: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_series = max_series
        self.max_series_per_family = max_series_per_family
        self.clock = clock
        self.lock = threading.Lock()
        self.stats = StoreStats()
        self._families: dict[str, Family] = {}
        self._claimed: dict[str, Family] = {}
        self._series_count = 0
        self._last_sweep = clock()

    @property
    def series_count(self) -> int:
        """Series currently held."""
        return self._series_count

    def series(
        self,
        kind: str,
        name: str,
        labels: Mapping[str, str],
        *,
        help: str = "",
        ttl: float | None = None,
        bounds: Sequence[float] | None = None,
        flexible: bool = False,
    ) -> Series | str:
        """Return the series for ``name`` and ``labels``, creating it, or a rejection reason.

        Call with ``self.lock`` held. ``name`` is the family name (a counter's ``_total`` is
        stripped). ``bounds`` are a new histogram series' bucket bounds. A ``flexible`` family
        lets its series have different label names, as ``target_info`` needs.
        """
        family = self._families.get(name)
        if family is None:
            reason = self._check_new_family(kind, name, labels)
            if reason:
                return reason
            label_names = tuple(sorted(labels))
        else:
            if family.kind != kind:
                return "type_conflict"
            if family.flexible:
                label_names = tuple(sorted(labels))
                reason = _check_labels(kind, labels)
                if reason:
                    return reason
            else:
                label_names = family.label_names
                if len(labels) != len(label_names) or any(n not in labels for n in label_names):
                    return "label_conflict"
        values = tuple(labels[n] for n in label_names)
        if family is not None:
            flexible = family.flexible  # the family's first writer decided
        key: tuple[Any, ...] = (label_names, values) if flexible else values
        if family is not None:
            existing = family.series.get(key)
            if existing is not None:
                return existing
            if len(family.series) >= self.max_series_per_family:
                self.stats.dropped["family_limit"] += 1
                return "family_limit"
        if self._series_count >= self.max_series:
            self.stats.dropped["total_limit"] += 1
            return "total_limit"
        if family is None:
            text = help or f"Application metric {name}."
            family = Family(name, kind, text, label_names, _claims(name, kind), flexible)
            self._families[name] = family
            for claim in family.claims:
                self._claimed[claim] = family
        series = Series(family, label_names, values, self.ttl if ttl is None else ttl)
        if kind == HISTOGRAM:
            series.set_bounds(tuple(bounds or ()))
        family.series[key] = series
        self._series_count += 1
        return series

    def _check_new_family(self, kind: str, name: str, labels: Mapping[str, str]) -> str:
        if not _NAME.fullmatch(name):
            return "invalid_name"
        if name.startswith(RESERVED_PREFIX):
            return "reserved_name"
        if kind != COUNTER and name.endswith(_NON_COUNTER_SUFFIXES):
            return "reserved_suffix"
        if kind == GAUGE and name.endswith(_GAUGE_SUFFIXES):
            return "reserved_suffix"
        reason = _check_labels(kind, labels)
        if reason:
            return reason
        if any(claim in self._claimed for claim in _claims(name, kind)):
            return "name_conflict"
        return ""

    def sweep(self, now: float | None = None) -> int:
        """Remove series past their TTL; return how many. Call with ``self.lock`` held."""
        now = self.clock() if now is None else now
        self._last_sweep = now
        removed = 0
        for family_key in list(self._families):
            family = self._families[family_key]
            stale = [
                key
                for key, series in family.series.items()
                if series.expires_after and now - series.updated > series.expires_after
            ]
            for key in stale:
                family.series.pop(key).alive = False
            removed += len(stale)
            if not family.series:
                del self._families[family_key]
                for claim in family.claims:
                    self._claimed.pop(claim, None)
        self._series_count -= removed
        self.stats.expired += removed
        return removed

    def _maybe_sweep(self) -> None:
        # A sweep walks every series; once a second is plenty for TTLs of minutes.
        now = self.clock()
        if now - self._last_sweep >= 1.0:
            self.sweep(now)

    def render(self, openmetrics: bool = False) -> bytes:
        """The exposition text of every family (without ``# EOF``)."""
        out: list[str] = []
        header = 1 if openmetrics else 0
        with self.lock:
            self._maybe_sweep()
            for family in self._families.values():
                out.append(family.headers[header])
                for series in family.series.values():
                    series.render(out)
        return "".join(out).encode()

    def families(self) -> Iterable[Metric]:
        """The same data as :meth:`render`, as prometheus_client metric families."""
        result: list[Metric] = []
        with self.lock:
            self._maybe_sweep()
            for family in self._families.values():
                result.append(_to_metric(family))
        return result


def _to_metric(family: Family) -> Metric:
    name = family.name
    metric = Metric(name, family.help, family.kind)
    for series in family.series.values():
        labels = dict(zip(series.label_names, series.label_values, strict=True))
        if family.kind == COUNTER:
            metric.add_sample(name + "_total", labels, series.value)
        elif family.kind == GAUGE:
            metric.add_sample(name, labels, series.value)
        elif family.kind == HISTOGRAM:
            cumulative = 0.0
            for bound, count in zip((*series.bounds, math.inf), series.buckets, strict=True):
                cumulative += count
                le = format_value(float(bound))
                metric.add_sample(name + "_bucket", {**labels, "le": le}, cumulative)
            metric.add_sample(name + "_count", labels, series.count)
            metric.add_sample(name + "_sum", labels, series.sum)
        else:
            for quantile, number in series.quantiles:
                metric.add_sample(name, {**labels, "quantile": format_value(quantile)}, number)
            metric.add_sample(name + "_count", labels, series.count)
            metric.add_sample(name + "_sum", labels, series.sum)
    return metric


class StoreCollector(Collector):
    """The store's own metrics: series held, the cap, drops and expiries."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        store = self._store
        with store.lock:
            dropped = dict(store.stats.dropped)
            expired = store.stats.expired
            count = store.series_count
        yield GaugeMetricFamily(
            "sidecar_app_series", "Application series currently in the store.", value=count
        )
        yield GaugeMetricFamily(
            "sidecar_app_series_limit",
            "Most application series the store holds.",
            value=store.max_series,
        )
        family = CounterMetricFamily(
            "sidecar_app_series_dropped",
            "New application series dropped because a cardinality limit was reached.",
            labels=["reason"],
        )
        for reason, value in dropped.items():
            family.add_metric([reason], value)
        yield family
        yield CounterMetricFamily(
            "sidecar_app_series_expired",
            "Application series removed after their TTL without samples.",
            value=expired,
        )


class IngestStats:
    """Accepted and rejected samples per source, for ``sidecar_ingest_*``.

    Sources either call :meth:`add` (thread-safe) or keep their own counts and register a
    reader, which the hot StatsD path does to avoid a lock per datagram.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._samples: dict[str, int] = {"statsd": 0, "otlp": 0}
        self._rejected: dict[tuple[str, str], int] = {}
        self._readers: list[tuple[str, Callable[[], tuple[int, Mapping[str, int]]]]] = []

    def add(self, source: str, accepted: int, rejected: Mapping[str, int] | None = None) -> None:
        """Count ``accepted`` samples and rejections by reason for ``source``."""
        with self.lock:
            self._samples[source] = self._samples.get(source, 0) + accepted
            for reason, count in (rejected or {}).items():
                key = (source, reason)
                self._rejected[key] = self._rejected.get(key, 0) + count

    def add_reader(self, source: str, read: Callable[[], tuple[int, Mapping[str, int]]]) -> None:
        """Count what ``read()`` returns (accepted, rejected by reason) for ``source``."""
        self._readers.append((source, read))

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """(accepted per source, rejected per source and reason) right now."""
        with self.lock:
            samples = dict(self._samples)
            rejected = dict(self._rejected)
        for source, read in self._readers:
            accepted, reasons = read()
            samples[source] = samples.get(source, 0) + accepted
            for reason, count in reasons.items():
                rejected[(source, reason)] = rejected.get((source, reason), 0) + count
        return samples, rejected


class IngestCollector(Collector):
    """``sidecar_ingest_samples_total`` and ``sidecar_ingest_rejected_samples_total``."""

    def __init__(self, stats: IngestStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        samples, rejected = self._stats.snapshot()
        accepted = CounterMetricFamily(
            "sidecar_ingest_samples",
            "Application samples written to the store, by source.",
            labels=["source"],
        )
        for source, count in sorted(samples.items()):
            accepted.add_metric([source], count)
        yield accepted
        family = CounterMetricFamily(
            "sidecar_ingest_rejected_samples",
            "Application samples rejected at ingest, by source and reason.",
            labels=["source", "reason"],
        )
        for (source, reason), count in sorted(rejected.items()):
            family.add_metric([source, reason], count)
        yield family
