"""Helpers shared by the application-metric ingest tests."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.config import parse_config
from tests.harness import require_tool

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ingest_sidecar(ingest: dict[str, Any] | None = None, *, host: bool = False) -> Sidecar:
    """A sidecar whose StatsD listener takes a free port; host metrics only when asked."""
    section: dict[str, Any] = {"statsd": {"listen": "127.0.0.1:0"}}
    for key, value in (ingest or {}).items():
        section[key] = {**section.get(key, {}), **value}
    metrics = {} if host else {"host": {"enabled": False}, "process": {"include_self": False}}
    return Sidecar(parse_config({"ingest": section, "metrics": metrics}))


async def scrape(sidecar: Sidecar, accept: str = "") -> httpx.Response:
    """GET /metrics in process."""
    transport = httpx.ASGITransport(app=sidecar.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
        return await client.get("/metrics", headers={"accept": accept} if accept else {})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text 0.0.4 exposition, keyed by name and sorted labels."""
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def value(text: str, name: str, **labels: str) -> float | None:
    """One sample's value, or None when it is absent."""
    return samples(text).get((name, tuple(sorted(labels.items()))))


async def poll(condition: Callable[[], Awaitable[Any]], limit: float = 10.0, what: str = "") -> Any:
    """Await ``condition`` until it returns something truthy; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        result = await condition()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def promtool_findings(exposition: bytes) -> str:
    """Run ``promtool check metrics``; return its output when it finds anything."""
    binary = require_tool("promtool")
    result = subprocess.run(
        [binary, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    if result.returncode == 0:
        return ""
    return (result.stdout + result.stderr).decode() or f"exit {result.returncode}"
