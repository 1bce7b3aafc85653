"""The command line run as a user runs it: a subprocess, real HTTP, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import REPO_ROOT, SidecarProcess, free_port, sidecar_env, wait_until


def sidecar(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=sidecar_env(env),
        cwd=REPO_ROOT,
    )


def test_check_config_accepts_the_example() -> None:
    result = sidecar("check-config", "examples/sidecar.yaml")

    assert (result.returncode, result.stdout) == (0, "examples/sidecar.yaml: valid\n")


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server:\n  listen: nowhere\n  shutdown_delay: -5s\n  colour: blue\n"
        "metrics:\n  process:\n    targets:\n      - name: app\n"
    )

    result = sidecar("check-config", str(bad))

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"invalid configuration {bad}:",
        "  server.listen: must be host:port, such as 127.0.0.1:9464 (got 'nowhere')",
        "  server.shutdown_delay: must not be negative (got -5s)",
        "  server.colour: unknown key",
        "  metrics.process.targets[0]: set exactly one of pid_file, process_name and cmdline",
    ]
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file(tmp_path: Path) -> None:
    result = sidecar("check-config", str(tmp_path / "missing.yaml"))

    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_run_with_invalid_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [1, 2]\n")

    result = sidecar("run", "--config", str(bad))

    assert result.returncode == 2
    assert "server: Input should be a valid dictionary" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_bad_listen_flag_exits_2() -> None:
    result = sidecar("run", "--listen", "no-port")

    assert result.returncode == 2
    assert "server.listen: must be host:port" in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        result = sidecar("run", "--listen", f"127.0.0.1:{port}")

    assert result.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_on_defaults_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = SidecarProcess(tmp_path).start()

    landing = httpx.get(process.url + "/", timeout=5)
    metrics = httpx.get(process.url + "/metrics", timeout=5)
    started = time.monotonic()
    code = process.stop()

    assert landing.status_code == 200 and "/metrics" in landing.text
    assert "sidecar_host_cpu_seconds_total" in metrics.text
    assert code == 0
    assert time.monotonic() - started < 5
    log = process.log()
    assert f"serving http on 127.0.0.1:{process.port}" in log
    assert "sidecar stopped" in log
    assert "Traceback" not in log


def test_sigint_stops_cleanly_too(tmp_path: Path) -> None:
    process = SidecarProcess(tmp_path).start()
    assert process.process is not None

    process.process.send_signal(signal.SIGINT)

    assert process.process.wait(timeout=10) == 0


def test_request_in_flight_finishes_during_shutdown(tmp_path: Path) -> None:
    process = SidecarProcess(
        tmp_path, config={"server": {"shutdown_delay": "1s", "log_format": "json"}}
    ).start()
    assert process.process is not None

    process.process.send_signal(signal.SIGTERM)
    during_delay = httpx.get(process.url + "/metrics", timeout=5)
    code = process.process.wait(timeout=10)

    assert during_delay.status_code == 200
    assert code == 0
    lines = [json.loads(line) for line in process.log().splitlines()]
    assert {"time", "level", "logger", "message"} <= lines[0].keys()
    assert any("received SIGTERM" in line["message"] for line in lines)


def test_config_from_environment(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        f"server:\n  listen: 127.0.0.1:{port}\n"
        "ingest:\n  statsd:\n    listen: 127.0.0.1:0\n"
        f"  otlp:\n    listen: 127.0.0.1:{free_port()}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=sidecar_env({"SIDECAR_CONFIG": str(path)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200,
            what="sidecar configured by SIDECAR_CONFIG",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


@pytest.mark.parametrize("argv", [[], ["bogus"], ["run", "--log-format", "xml"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert sidecar(*argv).returncode == 2


def test_version() -> None:
    result = sidecar("--version")

    assert result.returncode == 0 and result.stdout.startswith("sidecar ")
