"""/metrics and the landing page, served in process; the exposition linted by promtool."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from sidecar.app import Sidecar
from sidecar.config import parse_config
from tests.harness import require_tool

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = parse_config(
        {
            "metrics": {"process": {"targets": [{"name": "app", "pid_file": "/nonexistent.pid"}]}},
            "ingest": {"statsd": {"listen": "127.0.0.1:0"}},
            "alerts": {"outbox": {"sqlite": {"path": str(tmp_path / "outbox.sqlite3")}}},
        }
    )
    sidecar = Sidecar(config)
    async with sidecar.running():
        transport = httpx.ASGITransport(app=sidecar.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            yield client


async def test_text_format_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE sidecar_host_cpu_seconds_total counter" in response.text
    assert 'sidecar_process_instances{target="app"} 0.0' in response.text
    assert "_created" not in response.text


async def test_openmetrics_when_prometheus_asks(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})

    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "# TYPE sidecar_host_cpu_seconds counter" in response.text


async def test_gzip_when_allowed(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    refused = await client.get("/metrics", headers={"Accept-Encoding": "gzip;q=0, identity"})

    assert response.headers["content-encoding"] == "gzip"
    assert b"sidecar_build_info" in response.content  # httpx decompressed it
    assert "content-encoding" not in refused.headers


async def test_build_info_and_scrape_duration(client: httpx.AsyncClient) -> None:
    await client.get("/metrics")

    text = (await client.get("/metrics")).text

    assert 'sidecar_build_info{python_implementation="CPython"' in text
    assert "sidecar_scrape_duration_seconds_count 1.0" in text


async def test_landing_page_lists_endpoints(client: httpx.AsyncClient) -> None:
    html_page = await client.get("/")
    plain = await client.get("/", headers={"Accept": "text/plain"})

    assert '<a href="/metrics">/metrics</a>' in html_page.text
    assert plain.text.startswith("/metrics\t")


@pytest.mark.parametrize(
    ("method", "path", "status"), [("POST", "/metrics", 405), ("GET", "/nope", 404)]
)
async def test_wrong_method_and_path(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    assert (await client.request(method, path)).status_code == status


async def test_promtool_finds_nothing(client: httpx.AsyncClient) -> None:
    promtool = require_tool("promtool")
    body = (await client.get("/metrics")).content

    result = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )

    assert (result.returncode, result.stdout + result.stderr) == (0, b"")


async def test_gzip_body_is_valid() -> None:
    sidecar = Sidecar(parse_config({}))
    transport = httpx.ASGITransport(app=sidecar.app)
    headers = {"Accept-Encoding": "gzip"}
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://s") as raw,
        raw.stream("GET", "/metrics", headers=headers) as response,
    ):
        compressed = b"".join([chunk async for chunk in response.aiter_raw()])

    assert gzip.decompress(compressed).startswith(b"# HELP")
