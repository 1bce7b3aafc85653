#!/usr/bin/env python3
"""``/readyz`` latency of `sidecar run` under steady load while one check hangs and one flaps.

The script starts, on loopback: a server that accepts connections and never answers (the
hanging dependency), an HTTP server whose status alternates between 200 and 500 on every
request (the flapping one), the sidecar from this checkout with both as readiness checks, and
Debian's ``prometheus-blackbox-exporter`` as the peer whose own health endpoint
(``/-/healthy``, Go) is measured the same way.

Load comes from a paced open-loop client in this process: requests are scheduled at a fixed
rate over keep-alive connections and each latency is measured from its scheduled send time,
so a stall in the server counts in full (no coordinated omission). ``wrk`` (which has no rate
option) then runs closed-loop with a few connections to show the saturated throughput and its
latency distribution. Finally a soak at the fixed rate compares resident memory before and
after.

    python bench/health.py [--rate 1000] [--seconds 10] [--soak 60 | --long-soak]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
GOAL_P99_MS = 5.0


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
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url}: not ready after 30 s")


@contextmanager
def hanging_server() -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join()
        listener.close()
        for connection in held:
            connection.close()


@contextmanager
def flapping_server() -> Iterator[str]:
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            count[0] += 1
            self.send_response(200 if count[0] % 2 else 500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def sidecar(workdir: Path, hanging: str, flapping: str) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "log_level": "warning"},
        "health": {
            "checks": [
                # Not critical, so that /readyz follows the flapping check between 200 and
                # 503 and both answers are measured; it still runs and times out every 2s.
                {
                    "kind": "http",
                    "name": "hanging",
                    "url": hanging,
                    "interval": "2s",
                    "critical": False,
                },
                {
                    "kind": "http",
                    "name": "flapping",
                    "url": flapping,
                    "interval": "200ms",
                    "timeout": "150ms",
                },
                {"kind": "disk", "name": "data", "path": str(workdir), "interval": "1s"},
            ]
        },
    }
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/livez", process)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def blackbox(workdir: Path) -> Iterator[str | None]:
    binary = shutil.which("prometheus-blackbox-exporter")
    if binary is None:
        yield None
        return
    port = free_port()
    config = workdir / "blackbox.yml"
    config.write_text(yaml.safe_dump({"modules": {"http_2xx": {"prober": "http"}}}))
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/-/healthy", process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


class Paced:
    """Open-loop load at a fixed rate over keep-alive connections."""

    def __init__(self, url: str, rate: float, seconds: float, connections: int = 16) -> None:
        match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
        assert match, url
        self.host, self.port, self.path = match.group(1), int(match.group(2)), match.group(3)
        self.rate = rate
        self.seconds = seconds
        self.connections = connections
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0

    async def run(self) -> None:
        queue: asyncio.Queue[float | None] = asyncio.Queue()
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.connections)]
        start = time.perf_counter() + 0.05
        total = int(self.rate * self.seconds)
        for index in range(total):
            due = start + index / self.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(due)
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)

    async def _worker(self, queue: asyncio.Queue[float | None]) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        request = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n").encode()
        while (due := await queue.get()) is not None:
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, AttributeError):
                self.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(self.host, self.port)
                continue
            self.latencies.append(time.perf_counter() - due)
            status = int(head[9:12])
            self.statuses[status] = self.statuses.get(status, 0) + 1
        writer.close()

    def merge(self, other: Paced) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


def paced(url: str, rate: float, seconds: float) -> Paced:
    load = Paced(url, rate, seconds)
    try:
        import uvloop

        uvloop.run(load.run())
    except ImportError:
        asyncio.run(load.run())
    return load


def wrk(url: str, seconds: int) -> dict[str, str]:
    binary = shutil.which("wrk")
    if binary is None:
        return {}
    done = subprocess.run(
        [binary, "-t1", "-c4", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    )
    found = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)$", done.stdout, re.M))
    found["rps"] = re.search(r"Requests/sec:\s+(\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    found["non2xx"] = non_2xx.group(1) if non_2xx else "0"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10, help="length of each load run")
    parser.add_argument("--soak", type=float, default=60, help="soak seconds at the rate")
    parser.add_argument("--long-soak", action="store_true", help="soak for 5 minutes")
    args = parser.parse_args()
    soak_seconds = 300 if args.long_soak else args.soak
    load_before = os.getloadavg()[0]

    with (
        tempfile.TemporaryDirectory() as directory,
        hanging_server() as hanging,
        flapping_server() as flapping,
        sidecar(Path(directory), hanging, flapping) as (url, process),
        blackbox(Path(directory)) as peer,
    ):
        time.sleep(1)  # let every check produce a first result before measuring
        verbose = httpx.get(url + "/readyz?verbose", timeout=5).text
        targets = [("sidecar /readyz", url + "/readyz"), ("sidecar /livez", url + "/livez")]
        if peer is not None:
            targets.append(("blackbox /-/healthy", peer + "/-/healthy"))
        rows = [(name, Paced(target, args.rate, 0)) for name, target in targets]
        cpu_before = process.cpu_times()
        # One-second slices in turn, so that load from other processes on the machine hits
        # every endpoint alike.
        for _ in range(max(1, int(args.seconds))):
            for (_, total), (_, target) in zip(rows, targets, strict=True):
                total.merge(paced(target, args.rate, 1.0))
        cpu = process.cpu_times()
        sidecar_cpu = cpu.user + cpu.system - cpu_before.user - cpu_before.system
        ready = rows[0][1]
        requests = sum(len(load.latencies) for _, load in rows[:2])

        wrk_ready = wrk(url + "/readyz", int(args.seconds))
        wrk_peer = wrk(peer + "/-/healthy", int(args.seconds)) if peer else {}

        rss_before = process.memory_info().rss
        samples = [rss_before]
        soak = Paced(url + "/readyz", args.rate, soak_seconds)
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(5):
                samples.append(process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            import uvloop

            uvloop.run(soak.run())
        except ImportError:
            asyncio.run(soak.run())
        sampler_stop.set()
        sampler.join()
        rss_after = process.memory_info().rss

    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before the run,"
        f" {os.getloadavg()[0]:.2f} after (other processes share these CPUs)\n"
    )
    print(f"checks before the load:\n{verbose}")
    print(
        f"paced load: {args.rate:.0f} req/s, 16 keep-alive connections, {args.seconds:.0f} slices"
        " of 1s per endpoint, taken in turn"
    )
    header = f"{'endpoint':<22}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    header += f"{'200':>8}{'503':>8}{'errors':>8}"
    print(header)
    for name, load in rows:
        print(
            f"{name:<22}{load.percentile(0.5):>9.2f}{load.percentile(0.9):>9.2f}"
            f"{load.percentile(0.99):>9.2f}{load.percentile(1.0):>9.2f}"
            f"{load.statuses.get(200, 0):>8}{load.statuses.get(503, 0):>8}{load.errors:>8}"
        )
    p99 = ready.percentile(0.99)
    verdict = "met" if p99 < GOAL_P99_MS else "MISSED"
    ratio = p99 / GOAL_P99_MS
    print(f"/readyz p99 {p99:.2f} ms vs goal {GOAL_P99_MS} ms: ratio {ratio:.2f} ({verdict})")
    print(
        f"sidecar CPU per request (user+system): {sidecar_cpu / requests * 1e6:.0f} us"
        " (includes the checks running meanwhile)"
    )
    if peer is not None:
        peer_p99 = rows[-1][1].percentile(0.99)
        print(f"/readyz p99 / blackbox /-/healthy p99: {p99 / peer_p99:.2f}")

    if wrk_ready:
        print("\nwrk -t1 -c4 (closed loop, saturated):")
        print(f"{'endpoint':<22}{'req/s':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'non-2xx':>9}")
        for name, result in (("sidecar /readyz", wrk_ready), ("blackbox /-/healthy", wrk_peer)):
            if result:
                print(
                    f"{name:<22}{result['rps']:>10}{result['50']:>10}{result['90']:>10}"
                    f"{result['99']:>10}{result['non2xx']:>9}"
                )

    mib = 1024 * 1024
    print(f"\nsoak: {soak_seconds:.0f}s at {args.rate:.0f} req/s on /readyz")
    print(
        f"{'rss before MiB':>15}{'rss after MiB':>15}{'growth MiB':>12}{'max MiB':>10}{'p99 ms':>9}"
    )
    print(
        f"{rss_before / mib:>15.1f}{rss_after / mib:>15.1f}{(rss_after - rss_before) / mib:>12.1f}"
        f"{max(samples) / mib:>10.1f}{soak.percentile(0.99):>9.2f}"
    )


if __name__ == "__main__":
    main()
