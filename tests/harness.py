"""Starting and stopping real servers for the tests: the sidecar itself, Prometheus, Redis.

Every server binds to a free loopback port and is polled for readiness, never waited for
with a fixed sleep. A Debian tool that is missing skips the test that needs it with the
reason, except under ``CI=true``, where a missing tool fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """The path of a Debian tool; skip without it on a developer machine, fail in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/test installs it from Debian)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(
    condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as error:
            last_error = error
        else:
            if result:
                return result
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or condition}: {last_error}"
    )


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; return the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def sidecar_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a sidecar subprocess that runs the code of this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SIDECAR_CONFIG", None)
    env.update(extra or {})
    return env


class SidecarProcess:
    """``python -m sidecar run`` in a subprocess, with its output kept in a file."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any] | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log_path = workdir / f"sidecar-{self.port}.log"
        config = dict(config or {})
        server = dict(config.get("server", {}))
        server.setdefault("listen", f"127.0.0.1:{self.port}")
        config["server"] = server
        self.config_path = workdir / f"sidecar-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.args = args or []
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_path: str = "/metrics") -> SidecarProcess:
        command = [sys.executable, "-m", "sidecar", "run", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.args],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=sidecar_env(self.env),
            )
        wait_until(lambda: self._answers(wait_path), timeout=20, what=f"sidecar on {self.url}")
        return self

    def _answers(self, path: str) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.process.returncode}:\n{self.log()}")
        return httpx.get(self.url + path, timeout=2).status_code < 500

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        return stop_process(self.process, timeout)


class PrometheusServer:
    """A real Prometheus whose scrape targets the tests set through file discovery."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_tool("prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets_dir = workdir / "targets"
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.rules_dir = workdir / "rules"
        self.rules_dir.mkdir(exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, alertmanager_url: str | None = None) -> None:
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(self.rules_dir / "*.yml")],
            "scrape_configs": [
                {
                    "job_name": "tests",
                    "file_sd_configs": [
                        {"files": [str(self.targets_dir / "*.json")], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        if alertmanager_url:
            host = alertmanager_url.removeprefix("http://")
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> PrometheusServer:
        self.write_config()
        with (self.workdir / "prometheus.log").open("ab") as log:
            self.process = self._launch(log)
        wait_until(
            lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200,
            timeout=30,
            what="Prometheus ready",
        )
        return self

    def _launch(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--web.external-url={self.url}",
                "--web.enable-lifecycle",
                "--rules.alert.resend-delay=1s",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def reload(self) -> None:
        httpx.post(self.url + "/-/reload", timeout=10).raise_for_status()

    def scrape(self, name: str, url: str, labels: dict[str, str] | None = None) -> None:
        """Add (or replace) a scrape target, labelled ``target_name=name``."""
        host = url.removeprefix("http://").rstrip("/")
        document = [{"targets": [host], "labels": {"target_name": name, **(labels or {})}}]
        path = self.targets_dir / f"{name}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document))
        temporary.rename(path)

    def target_health(self, name: str) -> str | None:
        response = httpx.get(self.url + "/api/v1/targets", timeout=5).json()
        for target in response["data"]["activeTargets"]:
            if target["labels"].get("target_name") == name:
                return str(target["health"])
        return None

    def query(self, expression: str) -> list[dict[str, Any]]:
        response = httpx.get(
            self.url + "/api/v1/query", params={"query": expression}, timeout=10
        ).json()
        assert response["status"] == "success", response
        return list(response["data"]["result"])

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class RedisServer:
    """A private redis-server on a free port, for tests that stop and restart Redis."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_tool("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=10, what=f"redis-server on {self.port}")
        return self

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
