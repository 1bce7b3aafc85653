"""Test notifiers and helpers for the alert pipeline tests.

``RecordingNotifier`` follows the public ``Notifier`` protocol: it records every delivery and
fails on demand (a scripted list of errors, or a random share of attempts).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sidecar.alerts.payload import Notification
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.notify.base import Attempt, Delivered, DeliveryError

SAMPLE = Path(__file__).parent / "data" / "alertmanager-webhook-v4.json"


def sample_payload(**changes: Any) -> dict[str, Any]:
    """The real Alertmanager sample, with top-level keys replaced."""
    payload = json.loads(SAMPLE.read_text())
    payload.update(changes)
    return payload


def payload(
    group: str = "g1", status: str = "firing", alerts: int = 1, receiver: str = "default"
) -> dict[str, Any]:
    """A realistic notification of ``alerts`` alerts in group ``group``."""
    items = []
    for index in range(alerts):
        items.append(
            {
                "status": status,
                "labels": {
                    "alertname": f"Alert{group}",
                    "instance": f"10.0.0.{index}:9100",
                    "job": "node",
                    "severity": "critical",
                },
                "annotations": {"summary": f"summary {index}", "description": "x" * 80},
                "startsAt": "2026-12-03T16:05:03.51Z",
                "endsAt": "0001-01-01T00:00:00Z"
                if status == "firing"
                else "2026-12-03T16:09:03.51Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=up",
                "fingerprint": f"{group}-{index:04d}",
            }
        )
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="Alert{group}"}}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {"alertname": f"Alert{group}"},
        "commonLabels": {"alertname": f"Alert{group}", "job": "node", "severity": "critical"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": items,
    }


@dataclass
class Record:
    delivery_id: str
    group_key: str
    status: str
    fingerprints: list[str]
    attempt: int
    at: float = field(default_factory=time.monotonic)


class RecordingNotifier:
    """Records deliveries; ``script`` is a list of errors raised by the next attempts."""

    kind = "test"

    def __init__(
        self,
        name: str = "test",
        *,
        send_resolved: bool = True,
        failure_rate: float = 0.0,
        journal: Path | None = None,
        delay: float = 0.0,
        tag: str = "",
    ) -> None:
        self.name = name
        self.send_resolved = send_resolved
        self.failure_rate = failure_rate
        self.journal = journal
        self.delay = delay
        self.tag = tag
        self.script: list[DeliveryError] = []
        self.records: list[Record] = []
        self.attempts: list[Attempt] = []
        self.closed = False

    async def send(self, notification: Notification, attempt: Attempt) -> Delivered:
        self.attempts.append(attempt)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.script:
            raise self.script.pop(0)
        if self.failure_rate and random.random() < self.failure_rate:
            raise DeliveryError("test destination failed on purpose", retryable=True, status=503)
        record = Record(
            attempt.delivery_id,
            notification.group_key,
            notification.status,
            [alert.fingerprint for alert in notification.alerts],
            attempt.number,
        )
        if self.journal is not None:
            # One line per delivery, flushed before the notifier reports success, so a crash
            # after it shows as a duplicate and never as a loss.
            line = json.dumps(
                {
                    "group": record.group_key,
                    "status": record.status,
                    "id": record.delivery_id,
                    "destination": self.name,
                    "by": self.tag,
                }
            )
            with self.journal.open("a") as stream:
                stream.write(line + "\n")
                stream.flush()
                os.fsync(stream.fileno())
        self.records.append(record)
        return Delivered(status=200)

    async def close(self) -> None:
        self.closed = True


def alerts_config(tmp_path: Path, **alerts: Any) -> dict[str, Any]:
    """A configuration document with the outbox in ``tmp_path`` and a ``test`` destination."""
    section: dict[str, Any] = {
        "outbox": {"sqlite": {"path": str(tmp_path / "outbox.sqlite3")}},
        "destinations": [{"name": "test", "kind": "log"}],
        "receivers": [{"name": "default", "destinations": ["test"]}],
        "dispatcher": {"poll_interval": "50ms", "backoff_initial": "20ms", "backoff_max": "100ms"},
    }
    for key, value in alerts.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            section[key] = {**section[key], **value}
        else:
            section[key] = value
    return {
        "metrics": {"host": {"enabled": False}},
        # The default StatsD and OTLP ports are fixed; other tests on the machine bind them too.
        "ingest": {"statsd": {"enabled": False}, "otlp": {"enabled": False}},
        "alerts": section,
    }


def build_sidecar(document: dict[str, Any], notifiers: dict[str, RecordingNotifier]) -> Sidecar:
    """A sidecar whose named destinations are replaced by the given test notifiers."""
    sidecar = Sidecar(parse_config(document))
    assert sidecar.alerts is not None
    for name, notifier in notifiers.items():
        sidecar.alerts.notifiers[name] = notifier
    return sidecar


@asynccontextmanager
async def running_client(sidecar: Sidecar) -> AsyncIterator[httpx.AsyncClient]:
    """The sidecar started, and a client talking to its app in process."""
    async with sidecar.running():
        transport = httpx.ASGITransport(app=sidecar.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            yield client


async def poll(condition: Any, within: float = 10.0, what: str = "") -> Any:
    """Await ``condition()`` becoming truthy, polling; fail after ``timeout``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what or condition}")


SHARED_REDIS = "redis://127.0.0.1:6379/0"
"""The machine's Redis; tests sharing it use a unique prefix and delete their keys by SCAN."""


@asynccontextmanager
async def open_outbox(
    backend: str, tmp_path: Path, destinations: list[str], purpose: str
) -> AsyncIterator[Any]:
    """A started outbox of either backend with small bounds, removed again afterwards."""
    from redis.asyncio import Redis

    from sidecar.alerts.outbox.redis import RedisOutbox
    from sidecar.alerts.outbox.sqlite import SqliteOutbox

    outbox: SqliteOutbox | RedisOutbox
    if backend == "sqlite":
        outbox = SqliteOutbox(
            tmp_path / "outbox.sqlite3", max_depth=5, dedup_window=60, lease=0.5, retention=0
        )
    else:
        outbox = RedisOutbox(
            Redis.from_url(SHARED_REDIS, decode_responses=True),
            prefix=f"test-{purpose}-{os.urandom(4).hex()}",
            destinations=destinations,
            max_depth=5,
            dedup_window=60,
            lease=0.5,
            park_delay=0.05,
        )
    await outbox.start()
    try:
        yield outbox
    finally:
        if isinstance(outbox, RedisOutbox):
            cleaner = Redis.from_url(SHARED_REDIS, decode_responses=True)
            async for key in cleaner.scan_iter(match=f"{outbox.prefix}:*", count=500):
                await cleaner.delete(key)
            await cleaner.aclose()
        await outbox.stop()


@asynccontextmanager
async def serve_on_loopback(
    tmp_path: Path, token: str
) -> AsyncIterator[tuple[Sidecar, RecordingNotifier, str]]:
    """A sidecar serving on a real loopback port and requiring ``token``; yields its base URL."""
    from sidecar.server import serve
    from tests.harness import free_port

    port = free_port()
    document = alerts_config(tmp_path, receiver={"auth": {"bearer_tokens": [token]}})
    document["server"] = {"listen": f"127.0.0.1:{port}"}
    notifier = RecordingNotifier()
    sidecar = build_sidecar(document, {"test": notifier})
    task = asyncio.create_task(serve(sidecar))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:

        async def answers() -> bool:
            try:
                return (await client.get(base + "/metrics")).status_code == 200
            except httpx.TransportError:
                return False

        await poll(answers, what="sidecar listening")
    try:
        yield sidecar, notifier, base
    finally:
        sidecar.lifecycle.stopping.set()
        await asyncio.wait_for(task, timeout=20)
