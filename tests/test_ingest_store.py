"""The application-metric store: conflicts, limits, expiry, rendering and concurrency."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.registry import Collector

from sidecar.metrics.store import COUNTER, GAUGE, HISTOGRAM, SUMMARY, Series, Store
from tests.ingest_helpers import promtool_findings, samples


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _series(store: Store, kind: str, name: str, **labels: str) -> Series:
    with store.lock:
        result = store.series(kind, name, labels, bounds=(0.1, 1.0))
    assert isinstance(result, Series), result
    return result


def _reason(store: Store, kind: str, name: str, **labels: str) -> str:
    with store.lock:
        result = store.series(kind, name, labels, bounds=(0.1, 1.0))
    assert isinstance(result, str), f"expected a rejection, got a series of {name}"
    return result


def _filled_store() -> Store:
    store = Store()
    _series(store, COUNTER, "requests", code="200").value = 5
    _series(store, COUNTER, "requests", code="500").value = 1
    _series(store, GAUGE, "temperature", room='a "quoted"\\ \nroom').value = -3.5
    gauge = _series(store, GAUGE, "special")
    gauge.value = math.inf
    histogram = _series(store, HISTOGRAM, "latency_seconds", path="/")
    for observed in (0.05, 0.5, 5.0):
        histogram.observe(observed)
    with store.lock:
        summary = store.series(SUMMARY, "size_bytes", {"kind": "x"})
    assert isinstance(summary, Series)
    summary.set_summary(((0.5, 10.0), (0.99, 20.0)), 100.0, 7.0)
    return store


class _StoreFamilies(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self):  # type: ignore[no-untyped-def]
        return self.store.families()


def test_render_matches_prometheus_client_rendering_of_the_same_families() -> None:
    store = _filled_store()
    registry = CollectorRegistry()
    registry.register(_StoreFamilies(store))

    text = store.render(openmetrics=False)
    openmetrics = store.render(openmetrics=True)

    assert samples(text.decode()) == samples(generate_latest(registry).decode())
    ours = {f.name: f for f in parse_openmetrics(openmetrics.decode() + "# EOF\n")}
    theirs = {f.name: f for f in parse_openmetrics(generate_openmetrics(registry).decode())}
    assert ours.keys() == theirs.keys()
    for name, family in ours.items():
        assert family.type == theirs[name].type
        assert family.documentation == theirs[name].documentation
        assert {(s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples} == {
            (s.name, tuple(sorted(s.labels.items())), s.value) for s in theirs[name].samples
        }


def test_render_shows_each_type_with_exact_values() -> None:
    text = _filled_store().render().decode()

    parsed = samples(text)
    assert parsed[("requests_total", (("code", "200"),))] == 5
    assert parsed[("temperature", (("room", 'a "quoted"\\ \nroom'),))] == -3.5
    assert parsed[("special", ())] == math.inf
    assert parsed[("latency_seconds_bucket", (("le", "0.1"), ("path", "/")))] == 1
    assert parsed[("latency_seconds_bucket", (("le", "1.0"), ("path", "/")))] == 2
    assert parsed[("latency_seconds_bucket", (("le", "+Inf"), ("path", "/")))] == 3
    assert parsed[("latency_seconds_count", (("path", "/"),))] == 3
    assert parsed[("latency_seconds_sum", (("path", "/"),))] == pytest.approx(5.55)
    assert parsed[("size_bytes", (("kind", "x"), ("quantile", "0.99")))] == 20
    assert "# TYPE requests_total counter\n" in text


def test_whole_store_exposition_is_clean_under_promtool() -> None:
    store = _filled_store()

    assert promtool_findings(store.render()) == ""


def test_type_conflict_is_rejected_and_the_first_family_kept() -> None:
    store = Store()
    _series(store, GAUGE, "jobs").value = 3

    assert _reason(store, COUNTER, "jobs") == "type_conflict"
    assert samples(store.render().decode()) == {("jobs", ()): 3}


def test_label_name_conflict_is_rejected() -> None:
    store = Store()
    _series(store, COUNTER, "hits", route="/a")

    assert _reason(store, COUNTER, "hits", route="/a", method="GET") == "label_conflict"
    assert _reason(store, COUNTER, "hits") == "label_conflict"
    assert _reason(store, COUNTER, "hits", method="GET") == "label_conflict"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((HISTOGRAM, "x"), (COUNTER, "x_count")),
        ((HISTOGRAM, "x"), (COUNTER, "x_sum")),
        ((HISTOGRAM, "x"), (COUNTER, "x_bucket")),
        ((COUNTER, "x_count"), (HISTOGRAM, "x")),
        ((COUNTER, "x_sum"), (SUMMARY, "x")),
        ((SUMMARY, "x"), (COUNTER, "x_count")),
        ((COUNTER, "x"), (COUNTER, "x_created")),
    ],
)
def test_names_that_collide_with_another_familys_samples_are_rejected(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    store = Store()
    _series(store, *first)

    assert _reason(store, *second) == "name_conflict"
    assert promtool_findings(store.render()) == ""


@pytest.mark.parametrize(
    ("kind", "name", "labels", "reason"),
    [
        (GAUGE, "1abc", {}, "invalid_name"),
        (GAUGE, "", {}, "invalid_name"),
        (GAUGE, "a-b", {}, "invalid_name"),
        (GAUGE, "sidecar_build_info", {}, "reserved_name"),
        (GAUGE, "x_count", {}, "reserved_suffix"),
        (GAUGE, "x_sum", {}, "reserved_suffix"),
        (GAUGE, "x_bucket", {}, "reserved_suffix"),
        (GAUGE, "x_total", {}, "reserved_suffix"),
        (HISTOGRAM, "x_total", {}, "reserved_suffix"),
        (SUMMARY, "x_created", {}, "reserved_suffix"),
        (GAUGE, "ok", {"__name__": "x"}, "invalid_label"),
        (GAUGE, "ok", {"a-b": "x"}, "invalid_label"),
        (HISTOGRAM, "ok", {"le": "x"}, "invalid_label"),
        (SUMMARY, "ok", {"quantile": "x"}, "invalid_label"),
    ],
)
def test_invalid_names_and_labels_are_rejected(
    kind: str, name: str, labels: dict[str, str], reason: str
) -> None:
    store = Store()

    assert _reason(store, kind, name, **labels) == reason
    assert store.render() == b""


def test_family_limit_drops_new_series_and_keeps_existing_ones() -> None:
    store = Store(max_series_per_family=2)
    first = _series(store, COUNTER, "c", k="1")
    _series(store, COUNTER, "c", k="2")

    assert _reason(store, COUNTER, "c", k="3") == "family_limit"
    assert _series(store, COUNTER, "c", k="1") is first
    _series(store, COUNTER, "other", k="3")
    assert store.stats.dropped == {"family_limit": 1, "total_limit": 0}


def test_total_limit_drops_new_series_across_families() -> None:
    store = Store(max_series=2)
    _series(store, GAUGE, "a")
    _series(store, GAUGE, "b")

    assert _reason(store, GAUGE, "c") == "total_limit"
    assert store.series_count == 2
    assert store.stats.dropped["total_limit"] == 1


def test_series_expire_after_their_ttl_and_the_name_is_freed() -> None:
    clock = _Clock()
    store = Store(ttl=60, clock=clock)
    old = _series(store, GAUGE, "g", k="old")
    old.updated = clock.now
    with store.lock:
        kept = store.series(GAUGE, "g", {"k": "forever"}, ttl=0)
    assert isinstance(kept, Series)

    clock.now += 61
    store.render()

    assert not old.alive
    assert kept.alive
    assert store.stats.expired == 1
    clock.now += 1000
    with store.lock:
        kept.family.series.clear()
        store.sweep()
    assert _series(store, COUNTER, "g", k="x")  # an emptied family's name may change type


def test_an_updated_series_does_not_expire() -> None:
    clock = _Clock()
    store = Store(ttl=60, clock=clock)
    series = _series(store, GAUGE, "g")
    series.updated = clock.now

    clock.now += 50
    series.updated = clock.now
    clock.now += 50
    store.render()

    assert series.alive
    assert store.series_count == 1


def test_concurrent_writes_and_scrapes_always_render_consistent_histograms() -> None:
    store = Store()
    series = _series(store, HISTOGRAM, "h")
    stop = threading.Event()
    problems: list[str] = []

    def write() -> None:
        while not stop.is_set():
            with store.lock:
                for _ in range(50):
                    series.observe(0.5)

    def check() -> None:
        for _ in range(200):
            parsed = samples(store.render().decode())
            count = parsed[("h_count", ())]
            if parsed[("h_bucket", (("le", "+Inf"),))] != count or count % 50:
                problems.append(f"inconsistent scrape: {parsed}")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        check()
    finally:
        stop.set()
        writer.join()

    assert problems == []


def test_a_flexible_family_takes_series_with_different_label_names() -> None:
    store = Store()
    with store.lock:
        first = store.series(GAUGE, "target_info", {"job": "a"}, flexible=True)
        second = store.series(GAUGE, "target_info", {"job": "b", "region": "x"}, flexible=True)
        again = store.series(GAUGE, "target_info", {"job": "a"}, flexible=True)
        bad = store.series(GAUGE, "target_info", {"__bad": "x"}, flexible=True)
    assert isinstance(first, Series)
    assert isinstance(second, Series)
    first.value = second.value = 1

    assert again is first
    assert bad == "invalid_label"
    assert samples(store.render().decode()) == {
        ("target_info", (("job", "a"),)): 1,
        ("target_info", (("job", "b"), ("region", "x"))): 1,
    }
    assert promtool_findings(store.render()) == ""


def test_a_fixed_family_stays_fixed_when_a_later_writer_asks_for_flexible_labels() -> None:
    store = Store()
    first = _series(store, GAUGE, "target_info", job="a")

    with store.lock:
        again = store.series(GAUGE, "target_info", {"job": "a"}, flexible=True)
        other = store.series(GAUGE, "target_info", {"job": "a", "x": "y"}, flexible=True)

    assert again is first
    assert other == "label_conflict"
    assert store.series_count == 1
