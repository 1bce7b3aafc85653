"""End to end with a real Alertmanager (and a real Prometheus rule) posting to the sidecar.

The sidecar runs in process under uvicorn on a loopback port with bearer authentication; a
recording notifier stands in for its destination so that the test sees each delivery.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar.app import Sidecar
from tests.alerts_support import (
    RecordingNotifier,
    poll,
    serve_on_loopback,
)
from tests.harness import PrometheusServer, free_port, require_tool, stop_process, wait_until

TOKEN = "e2e-bearer-token-0123456789"

pytestmark = pytest.mark.integration


class AlertmanagerServer:
    """A real Alertmanager whose only receiver is a webhook to ``webhook_url``."""

    def __init__(self, workdir: Path, webhook_url: str) -> None:
        self.binary = require_tool("prometheus-alertmanager")
        self.amtool = require_tool("amtool")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "route": {
                "receiver": "sidecar",
                "group_by": ["alertname"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {
                    "name": "sidecar",
                    "webhook_configs": [
                        {
                            "url": webhook_url,
                            "send_resolved": True,
                            "http_config": {
                                "authorization": {"type": "Bearer", "credentials": TOKEN}
                            },
                        }
                    ],
                }
            ],
        }
        self.config_path = workdir / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AlertmanagerServer:
        with (self.workdir / "alertmanager.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.path={self.workdir / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                    f"--web.external-url={self.url}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200,
            timeout=30,
            what="Alertmanager ready",
        )
        return self

    def add_alert(self, name: str, *, resolved: bool = False, **labels: str) -> None:
        command = [
            self.amtool,
            f"--alertmanager.url={self.url}",
            "alert",
            "add",
            name,
            *(f"{key}={value}" for key, value in labels.items()),
            f"--annotation=summary={name} from amtool",
        ]
        if resolved:
            past = datetime.now(UTC) - timedelta(seconds=5)
            command.append(f"--end={past.strftime('%Y-%m-%dT%H:%M:%SZ')}")
        subprocess.run(command, check=True, capture_output=True, timeout=20)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Sidecar, RecordingNotifier, str]]:
    """A sidecar serving on a real loopback port, requiring the bearer token."""
    async with serve_on_loopback(tmp_path, TOKEN) as (sidecar, notifier, base):
        yield sidecar, notifier, base + "/alerts"


@pytest.fixture
def alertmanager_factory(tmp_path: Path) -> Iterator[list[AlertmanagerServer]]:
    started: list[AlertmanagerServer] = []
    yield started
    for server in started:
        server.stop()


async def test_alertmanager_firing_then_resolved_with_bearer_auth(
    served: tuple[Sidecar, RecordingNotifier, str],
    alertmanager_factory: list[AlertmanagerServer],
    tmp_path: Path,
) -> None:
    _, notifier, webhook = served
    alertmanager = await asyncio.to_thread(AlertmanagerServer(tmp_path, webhook).start)
    alertmanager_factory.append(alertmanager)

    await asyncio.to_thread(alertmanager.add_alert, "DiskFull", severity="critical", host="db1")
    await poll(lambda: notifier.records, within=30, what="firing delivery")
    await asyncio.to_thread(
        alertmanager.add_alert, "DiskFull", resolved=True, severity="critical", host="db1"
    )
    await poll(lambda: len(notifier.records) >= 2, within=30, what="resolved delivery")

    firing, resolved = notifier.records[0], notifier.records[1]
    assert firing.status == "firing"
    assert resolved.status == "resolved"
    assert firing.group_key == resolved.group_key
    assert firing.group_key.endswith('{alertname="DiskFull"}')
    async with httpx.AsyncClient() as client:
        unauthenticated = await client.post(webhook, json={"version": "4"})
    assert unauthenticated.status_code == 401


async def test_prometheus_rule_reaches_the_destination_through_alertmanager(
    served: tuple[Sidecar, RecordingNotifier, str],
    alertmanager_factory: list[AlertmanagerServer],
    prometheus: PrometheusServer,
    tmp_path: Path,
) -> None:
    _, notifier, webhook = served
    alertmanager = await asyncio.to_thread(AlertmanagerServer(tmp_path, webhook).start)
    alertmanager_factory.append(alertmanager)
    rule_file = prometheus.rules_dir / "alerts-e2e.yml"
    rule_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "alerts-e2e",
                        "rules": [
                            {
                                "alert": "SidecarAlertsEndToEnd",
                                "expr": "vector(1) > 0",
                                "labels": {"severity": "page"},
                                "annotations": {"summary": "raised by a real rule"},
                            }
                        ],
                    }
                ]
            }
        )
    )
    prometheus.write_config(alertmanager.url)
    try:
        await asyncio.to_thread(prometheus.reload)

        await poll(
            lambda: any("SidecarAlertsEndToEnd" in r.group_key for r in notifier.records),
            within=60,
            what="the rule's alert delivered",
        )
    finally:
        rule_file.unlink()
        prometheus.write_config()
        await asyncio.to_thread(prometheus.reload)

    record = next(r for r in notifier.records if "SidecarAlertsEndToEnd" in r.group_key)
    assert record.status == "firing"
