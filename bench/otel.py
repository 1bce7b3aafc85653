#!/usr/bin/env python3
"""CPU and memory cost of OTLP metric export of 10,000 series every 10 s, against a scrape.

The sidecar's registry is filled with about 10,000 series (counters, gauges and histograms,
made with prometheus_client as the application store will provide them). Each export reads
every family, converts it and posts it over OTLP/HTTP (gzip) to a real receiver running in a
separate process (tests/otel_receiver.py), so the receiver's work is not counted. The peer is
what the same data costs when Prometheus pulls it instead: one ``/metrics`` render (the text
format, as ``Exposition.render`` does it) per interval.

CPU is the process time (every thread) per export, divided by the interval: the share of one
core that exporting every ``--interval`` seconds takes. Memory is the resident set added by
turning export on (importing the SDK, the exporter and the instruments) after the exports ran.

    python bench/otel.py [--series 10000] [--exports 30] [--interval 10]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402

from sidecar.app import Sidecar  # noqa: E402
from sidecar.config import parse_config  # noqa: E402

RECEIVER = """
import sys, time
from tests.otel_receiver import OtlpReceiver
receiver = OtlpReceiver().start()
print(receiver.url, flush=True)
sys.stdin.read()
receiver.stop()
"""
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def fill(sidecar: Sidecar, series: int) -> None:
    """About ``series`` series: 50% counters, 40% gauges, 10% histogram samples."""
    registry = sidecar.registry
    counters = series // 2
    gauges = series * 4 // 10
    histogram_series = series // 10 // (len(BUCKETS) + 3)  # buckets, +Inf, count, sum
    for family in range(50):
        counter = Counter(f"app_ops_{family}", "Operations.", ["route", "code"], registry=registry)
        for index in range(counters // 50):
            counter.labels(f"/r{index // 5}", str(200 + index % 5)).inc(index)
    for family in range(40):
        gauge = Gauge(f"app_level_{family}", "Levels.", ["shard"], registry=registry)
        for index in range(gauges // 40):
            gauge.labels(str(index)).set(index * 1.5)
    latency = Histogram(
        "app_latency_seconds", "Latency.", ["route"], buckets=BUCKETS, registry=registry
    )
    for index in range(histogram_series):
        child = latency.labels(f"/r{index}")
        for value in (0.003, 0.02, 0.2, 2.0):
            child.observe(value)


def count_series(sidecar: Sidecar) -> int:
    body, _ = sidecar.exposition.render()
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def rss() -> int:
    gc.collect()
    # The export returns freed heap pages to the system after each run (glibc malloc_trim);
    # do the same before every reading so that the baseline is measured the same way.
    from sidecar.telemetry.metrics import _malloc_trim

    if _malloc_trim is not None:
        _malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def cpu_per_call(function: object, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.process_time()
        function()  # type: ignore[operator]
        samples.append(time.process_time() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--exports", type=int, default=30, help="exports measured per mode")
    parser.add_argument("--interval", type=float, default=10.0, help="export interval, seconds")
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        url = receiver.stdout.readline().strip()
        httpx.post(url + "/v1/metrics", content=b"", timeout=5)  # the receiver is up

        sidecar = Sidecar(parse_config({}, environ={}))
        fill(sidecar, args.series)
        series = count_series(sidecar)
        scrape = cpu_per_call(lambda: sidecar.exposition.render(), args.exports)
        baseline = rss()

        from sidecar.telemetry.metrics import MetricsPush
        from sidecar.telemetry.stats import ExportStats

        rows = []
        stats = ExportStats(CollectorRegistry())  # the sidecar's own are already registered
        for temporality in ("cumulative", "delta"):
            config = parse_config(
                {"telemetry": {"endpoint": url, "metrics": {"temporality": temporality}}},
                environ={},
            ).telemetry
            push = MetricsPush(config, sidecar.exposition.families, stats)
            assert push.export_sync(), "the first export failed"
            export = cpu_per_call(push.export_sync, args.exports)
            rows.append((f"OTLP export ({temporality})", export))
            added = rss() - baseline
            if temporality == "cumulative":
                cumulative_added = added
            push._shutdown()
        delta_added = added
    finally:
        if receiver.stdin is not None:
            receiver.stdin.close()
        receiver.wait(timeout=10)

    scrape_median = statistics.median(scrape)
    print(f"{series} series, one export every {args.interval:g} s, {args.exports} exports each")
    print()
    header = (
        f"{'what':<28} {'CPU/export ms':>14} {'p90 ms':>8} {'core share':>11} "
        f"{'vs scrape':>10} {'added RSS MB':>13}"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{'/metrics render (peer)':<28} {scrape_median * 1000:>14.1f} "
        f"{sorted(scrape)[int(0.9 * len(scrape))] * 1000:>8.1f} "
        f"{scrape_median / args.interval:>10.2%} {1.0:>9.2f}x {0.0:>13.1f}"
    )
    for (name, samples), added in zip(rows, (cumulative_added, delta_added), strict=True):
        median = statistics.median(samples)
        print(
            f"{name:<28} {median * 1000:>14.1f} "
            f"{sorted(samples)[int(0.9 * len(samples))] * 1000:>8.1f} "
            f"{median / args.interval:>10.2%} {median / scrape_median:>9.2f}x "
            f"{added / 2**20:>13.1f}"
        )
    print()
    print("goal: under 2% of one core and under 10 MB added resident memory")


if __name__ == "__main__":
    main()
