"""Health checks in a real ``sidecar`` process: SIGTERM drain, a real prober, ``sidecar check``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.cli import main
from tests.harness import (
    PrometheusServer,
    SidecarProcess,
    free_port,
    require_tool,
    sidecar_env,
    wait_until,
)
from tests.health_peers import HttpPeer

QUIET_METRICS = {"host": {"enabled": False}, "process": {"include_self": False}}


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    server = HttpPeer().start()
    yield server
    server.stop()


def web_check(url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "http", "name": "web", "url": url, "interval": "500ms", "timeout": "400ms"} | (
        extra
    )


def test_sigterm_fails_readiness_at_once_and_keeps_liveness_during_the_drain(
    tmp_path: Path, peer: HttpPeer
) -> None:
    sidecar = SidecarProcess(
        tmp_path,
        {
            "server": {"shutdown_delay": "3s"},
            "metrics": QUIET_METRICS,
            "health": {"checks": [web_check(peer.url)]},
        },
    ).start(wait_path="/livez")
    wait_until(lambda: httpx.get(sidecar.url + "/readyz").status_code == 200, what="ready")
    assert sidecar.process is not None

    sidecar.process.send_signal(signal.SIGTERM)
    draining = wait_until(
        lambda: (r := httpx.get(sidecar.url + "/readyz")).status_code == 503 and r,
        what="readiness failing",
    )
    live = httpx.get(sidecar.url + "/livez")
    running_while_draining = sidecar.process.poll() is None
    code = sidecar.process.wait(timeout=15)

    assert draining.text.startswith("[-]shutdown failed: the sidecar is shutting down\n")
    assert (live.status_code, live.text) == (200, "ok")
    assert running_while_draining
    assert code == 0
    assert "readiness failing; closing listeners in 3.0s" in sidecar.log()


def test_blackbox_exporter_follows_readiness(tmp_path: Path, peer: HttpPeer) -> None:
    blackbox = require_tool("prometheus-blackbox-exporter")
    sidecar = SidecarProcess(
        tmp_path,
        {"metrics": QUIET_METRICS, "health": {"checks": [web_check(peer.url)]}},
    ).start(wait_path="/livez")
    modules = {
        "modules": {
            "readyz": {
                "prober": "http",
                "timeout": "2s",
                "http": {
                    "valid_status_codes": [200],
                    "fail_if_body_not_matches_regexp": ["^ok$"],
                },
            }
        }
    }
    (tmp_path / "blackbox.yml").write_text(yaml.safe_dump(modules))
    port = free_port()
    exporter = subprocess.Popen(
        [
            blackbox,
            f"--config.file={tmp_path / 'blackbox.yml'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def probe() -> dict[str, float]:
        response = httpx.get(
            f"http://127.0.0.1:{port}/probe",
            params={"module": "readyz", "target": sidecar.url + "/readyz"},
            timeout=5,
        )
        samples = re.findall(r"^(probe_success|probe_http_status_code) (\S+)$", response.text, re.M)
        return {name: float(value) for name, value in samples}

    try:
        passing = wait_until(lambda: (p := probe()).get("probe_success") == 1 and p, what="up")
        peer.status = 500
        failing = wait_until(lambda: (p := probe()).get("probe_success") == 0 and p, what="down")
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
        sidecar.stop()

    assert passing["probe_http_status_code"] == 200
    assert failing["probe_http_status_code"] == 503


def run_check(tmp_path: Path, checks: list[dict[str, Any]], *args: str) -> tuple[int, str]:
    path = tmp_path / "checks.yaml"
    path.write_text(yaml.safe_dump({"health": {"checks": checks}}))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(path), *args],
        capture_output=True,
        text=True,
        env=sidecar_env(),
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def table(output: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line, maxsplit=4) for line in output.splitlines()]


def test_sidecar_check_prints_a_table_and_fails_on_a_critical_failure(
    tmp_path: Path, peer: HttpPeer
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    checks = [
        web_check(peer.url),
        {"kind": "tcp", "name": "db", "address": closed},
        {"kind": "tcp", "name": "cache", "address": closed, "critical": False},
    ]

    code, output = run_check(tmp_path, checks)

    rows = table(output)
    assert code == 1
    assert rows[0] == ["NAME", "KIND", "STATUS", "DURATION", "REASON"]
    assert [row[:3] for row in rows[1:]] == [
        ["event_loop", "builtin", "pass"],
        ["web", "http", "pass"],
        ["db", "tcp", "fail"],
        ["cache", "tcp", "warn"],
    ]
    assert all(re.fullmatch(r"\d+\.\dms", row[3]) for row in rows[1:])
    assert rows[3][4] == "connect failed: Connection refused"


def test_sidecar_check_only_runs_the_named_checks(tmp_path: Path, peer: HttpPeer) -> None:
    checks = [web_check(peer.url), {"kind": "tcp", "name": "db", "address": "127.0.0.1:1"}]

    code, output = run_check(tmp_path, checks, "--only", "web")
    unknown_code, unknown_output = run_check(tmp_path, checks, "--only", "nosuch")

    assert code == 0
    assert [row[0] for row in table(output)] == ["NAME", "web"]
    assert unknown_code == 2
    assert unknown_output == "no check named nosuch; configured: event_loop, web, db\n"


def test_sidecar_check_reports_an_invalid_configuration(tmp_path: Path) -> None:
    code, output = run_check(tmp_path, [{"kind": "tcp", "name": "db", "address": "nowhere"}])

    assert code == 2
    assert "health.checks[0].address: must be host:port" in output


def test_sidecar_check_in_process_prints_the_same_table(
    tmp_path: Path, peer: HttpPeer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checks.yaml"
    path.write_text(yaml.safe_dump({"health": {"checks": [web_check(peer.url)]}}))

    code = main(["check", "--config", str(path), "--only", "web", "--only", "event_loop"])

    rows = table(capsys.readouterr().out)
    assert code == 0
    assert [row[:3] for row in rows] == [
        ["NAME", "KIND", "STATUS"],
        ["event_loop", "builtin", "pass"],
        ["web", "http", "pass"],
    ]


def test_prometheus_sees_readiness_and_check_status(
    tmp_path: Path, peer: HttpPeer, prometheus: PrometheusServer
) -> None:
    sidecar = SidecarProcess(
        tmp_path, {"metrics": QUIET_METRICS, "health": {"checks": [web_check(peer.url)]}}
    ).start(wait_path="/livez")
    prometheus.scrape("health-probe-up", sidecar.url)
    selector = '{target_name="health-probe-up"}'

    def value(expression: str) -> str | None:
        result = prometheus.query(expression)
        return str(result[0]["value"][1]) if result else None

    try:
        wait_until(
            lambda: value(f'sidecar_health_probe_up{selector[:-1]},probe="readyz"}}') == "1",
            timeout=30,
            what="readyz up in Prometheus",
        )
        peer.status = 500
        wait_until(
            lambda: value(f'sidecar_health_probe_up{selector[:-1]},probe="readyz"}}') == "0",
            timeout=30,
            what="readyz down in Prometheus",
        )
        failing = value(f'sidecar_health_check_status{selector[:-1]},check="web",status="fail"}}')
        errors = value(
            f'sidecar_health_check_failures_total{selector[:-1]},check="web",reason="error"}}'
        )
    finally:
        sidecar.stop()

    assert failing == "1"
    assert errors is not None
    assert float(errors) >= 1
