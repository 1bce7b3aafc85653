"""Benchmark of the webhook receiver: accepted notifications per second and ack latency.

Runs ``wrk`` (Debian) with a Lua script posting a realistic 10-alert Alertmanager payload, a
distinct group per request so that deduplication never short-cuts the write, against:

  baseline  starlette on uvicorn (httptools, uvloop) reading the same POST, storing nothing;
  nothing   ``sidecar run`` with the outbox's enqueue answering "stored" without writing: what
            the sidecar's HTTP handling, validation and routing cost without any storage;
  sqlite    ``sidecar run`` with the default SQLite outbox (WAL, synchronous=FULL, group commit);
  redis     ``sidecar run`` with the Redis Streams outbox on a private redis-server
            (appendonly yes, appendfsync everysec).

The sidecar also runs its dispatcher during the run, as in production, with the default ``log``
destination (one INFO line per alert). It runs at ``log_level: warning`` (those lines are
dropped before formatting) and once at ``info`` with standard error going to a file, to show
what writing them costs. Prints accepted/s, p50/p99 latency, the ratios to the baseline and
to the sidecar storing nothing, CPU time of the server's processes (the sidecar's outbox
writer included) per request, and how many deliveries the dispatcher completed meanwhile.
Every server runs once per round, and the table gives the median of the rounds; the ratios
are taken within each round (the range over the rounds is shown too).

    /work/main/.venv/bin/python bench/alerts.py [--duration 10] [--connections 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.alerts_support import payload  # noqa: E402 - the repository root is added above

BASELINE_APP = """
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def receive(request):
    await request.body()
    return JSONResponse({"status": "accepted"})

app = Starlette(routes=[Route("/alerts", receive, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=PORT, http="httptools", loop="uvloop",
            log_level="warning", access_log=False)
"""

LUA = """
local template = [==[BODY]==]
-- The body is cut at its placeholders once; each request joins the pieces around a new group
-- name. (A gsub per request cost wrk more CPU than the baseline server spent answering.)
local pieces = {}
local start = 1
while true do
  local first, last = string.find(template, "BENCHGROUP", start, true)
  if not first then
    pieces[#pieces + 1] = string.sub(template, start)
    break
  end
  pieces[#pieces + 1] = string.sub(template, start, first - 1)
  start = last + 1
end
local headers = {["Content-Type"] = "application/json"}
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function request()
  counter = counter + 1
  local body = table.concat(pieces, "t" .. tid .. "n" .. counter)
  return wrk.format("POST", "/alerts", headers, body)
end
"""


# The same sidecar with the outbox's enqueue answering "stored" at once: authentication,
# validation, deduplication key, routing and the answer, and nothing written anywhere (so the
# dispatcher has nothing to deliver either). Only this benchmark does this.
STORING_NOTHING = """
import sys
from sidecar.alerts.outbox.sqlite import SqliteOutbox
from sidecar.cli import main

async def enqueue(self, *arguments, **options):
    return True

SqliteOutbox.enqueue = enqueue
sys.argv[0] = "sidecar"
raise SystemExit(main())
"""


BASELINE = "baseline (no storage)"
NOTHING = "sidecar storing nothing"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server for {url} exited with {process.returncode}")
        try:
            httpx.post(url, content=b"{}", headers={"content-type": "application/json"})
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not start")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and its children (the outbox writer) so far."""
    process = psutil.Process(pid)
    total = 0.0
    for member in (process, *process.children(recursive=True)):
        times = member.cpu_times()
        total += times.user + times.system
    return total


def delivered(url: str) -> float:
    """Successful deliveries so far, from the sidecar's own /metrics."""
    text = httpx.get(url.rsplit("/", 1)[0] + "/metrics", timeout=10).text
    match = re.search(r'sidecar_alerts_deliveries_total\{[^}]*result="success"[^}]*\} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def run_wrk(
    url: str, script: Path, duration: int, connections: int, pid: int, sidecar: bool = True
) -> dict[str, float]:
    delivered_before = delivered(url) if sidecar else 0.0
    before = cpu_seconds(pid)
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = cpu_seconds(pid) - before
    delivered_after = delivered(url) if sidecar else 0.0
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    seconds = float(re.search(r"requests in ([\d.]+)s", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    failed = int(errors.group(1)) if errors else 0
    return {
        "accepted": (requests - failed) / seconds,
        "failed": failed,
        "p50": _latency(output, "50%"),
        "p99": _latency(output, "99%"),
        "cpu_us": cpu / max(1, requests - failed) * 1e6,
        "cpu_share": cpu / seconds,
        "delivered": (delivered_after - delivered_before) / seconds,
    }


def _latency(output: str, quantile: str) -> float:
    match = re.search(rf"{quantile}\s+([\d.]+)(us|ms|s)", output)
    assert match is not None, output
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def start_sidecar(
    workdir: Path, alerts: dict[str, Any], log_level: str = "warning", store: bool = True
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "log_level": log_level},
        "metrics": {"host": {"enabled": False}},
        # Only the webhook is measured; the ingest listeners would take fixed ports.
        "ingest": {"statsd": {"enabled": False}, "otlp": {"enabled": False}},
        "alerts": {"outbox": {"max_depth": 10_000_000, **alerts}},
    }
    path = workdir / f"sidecar-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = ["-m", "sidecar"] if store else ["-c", STORING_NOTHING]
    process = subprocess.Popen(
        [sys.executable, *command, "run", "--config", str(path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"sidecar-{port}.log").open("ab"),
    )
    return process, f"http://127.0.0.1:{port}/alerts"


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def redis_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server with an append-only file flushed every second."""
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    return process, f"redis://127.0.0.1:{port}/0"


def measure_sidecar(
    workdir: Path,
    script: Path,
    args: argparse.Namespace,
    alerts: dict[str, Any],
    log_level: str = "warning",
    store: bool = True,
) -> dict[str, float]:
    sidecar, url = start_sidecar(workdir, alerts, log_level=log_level, store=store)
    try:
        wait_ready(url, sidecar)
        return run_wrk(url, script, args.duration, args.connections, sidecar.pid)
    finally:
        stop(sidecar)


def one_round(
    number: int, workdir: Path, script: Path, args: argparse.Namespace, redis_url: str
) -> dict[str, dict[str, float]]:
    """Every server once, one after the other."""
    results: dict[str, dict[str, float]] = {}
    port = free_port()
    baseline = subprocess.Popen([sys.executable, "-c", BASELINE_APP.replace("PORT", str(port))])
    url = f"http://127.0.0.1:{port}/alerts"
    try:
        wait_ready(url, baseline)
        results[BASELINE] = run_wrk(
            url, script, args.duration, args.connections, baseline.pid, sidecar=False
        )
    finally:
        stop(baseline)
    results[NOTHING] = measure_sidecar(workdir, script, args, {}, store=False)
    for level in ("warning", "info"):
        path = workdir / f"outbox-{number}-{level}.sqlite3"
        results[f"sidecar sqlite, log {level}"] = measure_sidecar(
            workdir, script, args, {"sqlite": {"path": str(path)}}, log_level=level
        )
    redis = {"backend": "redis", "redis": {"url": redis_url, "prefix": f"bench{number}"}}
    results["sidecar redis, log warning"] = measure_sidecar(workdir, script, args, redis)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="times every server is run")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        raise SystemExit("needs wrk and redis-server (apt-get install wrk redis-server)")

    body = json.dumps(payload("BENCHGROUP", alerts=10))
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as temporary:
        workdir = Path(temporary)
        script = workdir / "post.lua"
        script.write_text(LUA.replace("BODY", body))
        redis, redis_url = redis_server(workdir)
        try:
            for number in range(1, args.rounds + 1):
                print(f"round {number} of {args.rounds}", file=sys.stderr, flush=True)
                rounds.append(one_round(number, workdir, script, args, redis_url))
        finally:
            stop(redis)

    def ratios(name: str, to: str) -> list[float]:
        return [each[name]["accepted"] / each[to]["accepted"] for each in rounds]

    print(
        f"\nwrk -t1 -c{args.connections} -d{args.duration}s, {len(body)} byte body"
        f" (10 alerts), distinct group per request; median of {args.rounds} rounds\n"
    )
    print(
        f"{'server':<28} {'accepted/s':>11} {'non-2xx':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'ratio':>6} {'vs nothing':>11} {'vs nothing, rounds':>19} {'CPU us/req':>11}"
        f" {'CPU share':>10} {'delivered/s':>12}"
    )
    for name in rounds[0]:

        def median(key: str, name: str = name) -> float:
            return statistics.median(each[name][key] for each in rounds)

        each_round = ratios(name, NOTHING)
        spread = f"{min(each_round):.2f}-{max(each_round):.2f}"
        print(
            f"{name:<28} {median('accepted'):>11.0f} {median('failed'):>8.0f}"
            f" {median('p50'):>8.2f} {median('p99'):>8.2f}"
            f" {statistics.median(ratios(name, BASELINE)):>6.2f}"
            f" {statistics.median(each_round):>11.2f} {spread:>19}"
            f" {median('cpu_us'):>11.0f} {median('cpu_share'):>10.2f}"
            f" {'-' if name == BASELINE else format(median('delivered'), '.0f'):>12}"
        )
    # Ratios are taken within each round, between runs a minute apart at most, and their median
    # is shown: the machine's speed drifts by more than 10% over minutes. CPU share is the
    # server's CPU seconds (all its processes) per wall second; the two CPUs here slow each
    # other down when both are busy, so wrk, the sidecar and its writer compete.
    print(f"\nload average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
