#!/usr/bin/env python3
"""Scrape latency and memory of `sidecar run` on its defaults, against node_exporter.

Both exporters run on loopback, started by this script: the sidecar from this checkout and
Debian's ``prometheus-node-exporter --no-collector.systemd``. They are scraped alternately
(so that background load hits both alike), first as a plain client asks, then with the headers
Prometheus sends (OpenMetrics and gzip). The table gives the median and 99th percentile
latency, the series count, the ratio sidecar / node_exporter and the resident memory.

    python bench/scrape.py [--scrapes 400]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url}: not ready after 30 s")


def series_count(body: str) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith("#"))


def memory(pid: int) -> tuple[int, int, int, int]:
    """Processes, summed resident set, resident set of the first, summed proportional set.

    The sidecar's SQLite outbox runs in a writer process of its own, so a process and its
    children are counted together."""
    main = psutil.Process(pid)
    members = [main, *main.children(recursive=True)]
    rss = sum(member.memory_info().rss for member in members)
    pss = sum(member.memory_full_info().pss for member in members)
    return len(members), rss, main.memory_info().rss, pss


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scrapes", type=int, default=400, help="scrapes of each exporter per mode"
    )
    args = parser.parse_args()

    node_exporter = shutil.which("prometheus-node-exporter")
    if node_exporter is None:
        raise SystemExit("prometheus-node-exporter is not installed (apt-get install it)")

    workdir = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    sidecar_port, node_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SIDECAR_CONFIG", None)
    sidecar = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--listen",
            f"127.0.0.1:{sidecar_port}",
            "--log-level",
            "warning",
        ],
        cwd=workdir,
        env=env,
    )
    node = subprocess.Popen(
        [
            node_exporter,
            f"--web.listen-address=127.0.0.1:{node_port}",
            "--no-collector.systemd",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    targets = {
        "sidecar": (f"http://127.0.0.1:{sidecar_port}/metrics", sidecar),
        "node_exporter": (f"http://127.0.0.1:{node_port}/metrics", node),
    }
    try:
        for url, process in targets.values():
            wait_ready(url, process)
        time.sleep(2)  # let both settle before reading idle memory
        idle = {name: memory(process.pid) for name, (_, process) in targets.items()}
        rows = []
        for mode, headers in (("text", {}), ("prometheus (openmetrics+gzip)", PROMETHEUS_HEADERS)):
            timings: dict[str, list[float]] = {name: [] for name in targets}
            series: dict[str, int] = {}
            with httpx.Client(headers=headers, timeout=10) as client:
                for name, (url, _) in targets.items():  # warm up
                    for _ in range(20):
                        client.get(url)
                    series[name] = series_count(client.get(url).text)
                for _ in range(args.scrapes):
                    for name, (url, _) in targets.items():
                        started = time.perf_counter()
                        response = client.get(url)
                        response.read()
                        timings[name].append(time.perf_counter() - started)
                        response.raise_for_status()
            medians = {name: statistics.median(values) for name, values in timings.items()}
            rows.append((mode, timings, medians, series))
        loaded = {name: memory(process.pid) for name, (_, process) in targets.items()}
    finally:
        for _, process in targets.values():
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{args.scrapes} scrapes of each exporter per mode, alternating, on loopback\n")
    print(
        "| mode | exporter | series | median ms | p99 ms | median ratio sidecar / node_exporter |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for mode, timings, medians, series in rows:
        ratio = medians["sidecar"] / medians["node_exporter"]
        for name in targets:
            shown = f"**{ratio:.2f}**" if name == "sidecar" else ""
            print(
                f"| {mode} | {name} | {series[name]} | {medians[name] * 1000:.2f} | "
                f"{percentile(timings[name], 0.99) * 1000:.2f} | {shown} |"
            )
    print()
    print(
        "| exporter | processes | resident idle MB (main + others) | proportional idle MB"
        " | resident after the scrapes MB |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in targets:
        count, rss, main_rss, pss = idle[name]
        print(
            f"| {name} | {count} | {rss / 1e6:.1f} ({main_rss / 1e6:.1f} + "
            f"{(rss - main_rss) / 1e6:.1f}) | {pss / 1e6:.1f} | {loaded[name][1] / 1e6:.1f} |"
        )
    print(
        "\nresident: the sum of the processes' resident sets, which counts memory they share"
        " (the interpreter's code) once per process; proportional: each shared page divided"
        " among the processes sharing it, which is what the node's memory holds for them."
    )


if __name__ == "__main__":
    main()
