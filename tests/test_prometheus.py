"""A real Prometheus scrapes a real sidecar; the stored series are checked against psutil."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import PrometheusServer, SidecarProcess, require_tool, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def application(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A stand-in application process with a pid file, as a pod's main container would have."""
    workdir = tmp_path_factory.mktemp("application")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    pid_file = workdir / "app.pid"
    pid_file.write_text(str(process.pid))
    yield process, pid_file
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def scraped(
    prometheus: PrometheusServer,
    application: tuple[subprocess.Popen[bytes], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarProcess]:
    _, pid_file = application
    config = {"metrics": {"process": {"targets": [{"name": "app", "pid_file": str(pid_file)}]}}}
    sidecar = SidecarProcess(tmp_path_factory.mktemp("sidecar"), config=config).start()
    prometheus.scrape("foundation", sidecar.url)
    wait_until(lambda: prometheus.target_health("foundation") == "up", timeout=30, what="target up")
    wait_until(
        lambda: prometheus.query('sidecar_process_instances{target_name="foundation"}'),
        timeout=30,
        what="first samples stored",
    )
    yield sidecar
    sidecar.stop()


def single(prometheus: PrometheusServer, expression: str) -> float:
    result = prometheus.query(expression)
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_memory_total_is_the_machines(
    prometheus: PrometheusServer, scraped: SidecarProcess
) -> None:
    value = single(prometheus, 'sidecar_host_memory_total_bytes{target_name="foundation"}')

    assert value == psutil.virtual_memory().total


def test_cpu_seconds_are_plausible(prometheus: PrometheusServer, scraped: SidecarProcess) -> None:
    stored = single(
        prometheus, 'sum(sidecar_host_cpu_seconds_total{target_name="foundation",mode="idle"})'
    )
    now = sum(times.idle for times in psutil.cpu_times(percpu=True))

    assert 0 < stored <= now + 1
    assert now - stored < 60


def test_every_cpu_is_present(prometheus: PrometheusServer, scraped: SidecarProcess) -> None:
    value = single(
        prometheus, 'count(sidecar_host_cpu_seconds_total{target_name="foundation",mode="user"})'
    )

    assert value == psutil.cpu_count()


def test_target_process_series(
    prometheus: PrometheusServer,
    scraped: SidecarProcess,
    application: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, _ = application
    expected_start = psutil.Process(process.pid).create_time()

    instances = single(
        prometheus, 'sidecar_process_instances{target_name="foundation",target="app"}'
    )
    start = single(
        prometheus, 'sidecar_process_start_time_seconds{target_name="foundation",target="app"}'
    )
    resident = single(
        prometheus, 'sidecar_process_resident_memory_bytes{target_name="foundation",target="app"}'
    )

    assert instances == 1
    assert start == pytest.approx(expected_start, abs=0.01)
    assert 1_000_000 < resident < 500_000_000


def test_sidecar_sees_its_own_process(
    prometheus: PrometheusServer, scraped: SidecarProcess
) -> None:
    assert scraped.process is not None
    start = single(
        prometheus, 'sidecar_process_start_time_seconds{target_name="foundation",target="self"}'
    )

    assert start == pytest.approx(psutil.Process(scraped.process.pid).create_time(), abs=0.01)


def test_no_collector_failed(prometheus: PrometheusServer, scraped: SidecarProcess) -> None:
    failed = prometheus.query('sidecar_scrape_collector_success{target_name="foundation"} == 0')

    assert failed == []


def test_prometheus_negotiated_openmetrics(
    prometheus: PrometheusServer, scraped: SidecarProcess
) -> None:
    # Prometheus stores counters of OpenMetrics scrapes under their _total name, as with text.
    assert prometheus.query('sidecar_collector_errors_total{target_name="foundation"}')
    response = httpx.get(
        scraped.url + "/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0"},
        timeout=5,
    )
    assert response.text.endswith("# EOF\n")


def test_live_exposition_is_lint_free(scraped: SidecarProcess) -> None:
    promtool = require_tool("promtool")
    body = httpx.get(scraped.url + "/metrics", timeout=5).content

    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )

    assert (result.returncode, result.stdout + result.stderr) == (0, b"")
