"""The Redis Streams outbox with two sidecar replicas against a private Redis.

Normal operation delivers each notification exactly once and shares deduplication; a replica
killed mid-delivery has its claimed work taken over after the lease; Redis stopped answers 503,
and the replicas recover once it is back; a Redis that stops answering is refused promptly.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from sidecar.alerts.config import AlertsConfig
from sidecar.alerts.outbox.base import OutboxUnavailable
from sidecar.alerts.payload import Notification
from sidecar.alerts.pipeline import build_outbox
from tests.alerts_processes import JournalingSidecar, Sender, delivery_counts, journal_lines
from tests.alerts_support import alerts_config, payload
from tests.harness import RedisServer, wait_until

pytestmark = pytest.mark.integration


def _document(tmp_path: Path, redis: RedisServer, prefix: str) -> dict[str, Any]:
    return alerts_config(
        tmp_path,
        outbox={"backend": "redis", "lease": "2s", "redis": {"url": redis.url, "prefix": prefix}},
        dispatcher={"concurrency": 4},
    )


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[JournalingSidecar]]:
    prefix = f"test-alerts-{uuid.uuid4().hex[:8]}"
    document = _document(tmp_path, redis_server, prefix)
    journal = tmp_path / "journal.jsonl"
    started = [
        JournalingSidecar(tmp_path, document, journal, failure_rate=0.0).start() for _ in range(2)
    ]
    yield started
    for replica in started:
        if replica.process is not None and replica.process.poll() is None:
            replica.stop()


def test_two_replicas_deliver_once_and_share_deduplication(
    replicas: list[JournalingSidecar],
) -> None:
    journal = replicas[0].journal
    items = [(f"redis{g}", status) for g in range(100) for status in ("firing", "resolved")]
    sender = Sender([replica.url for replica in replicas], items)
    twin = payload("ha-peer")

    first = httpx.post(replicas[0].url + "/alerts", json=twin, timeout=5)
    second = httpx.post(replicas[1].url + "/alerts", json=twin, timeout=5)
    sender.start()
    sender.join(timeout=60)
    expected = {*sender.accepted, (twin["groupKey"], "firing")}
    wait_until(lambda: set(delivery_counts(journal)) >= expected, timeout=60, what="deliveries")

    assert [first.json()["status"], second.json()["status"]] == ["accepted", "duplicate"]
    counts = delivery_counts(journal)
    assert set(counts) == expected
    assert max(counts.values()) == 1, [key for key, count in counts.items() if count > 1]
    assert len({line["by"] for line in journal_lines(journal)}) == 2


def test_work_of_a_killed_replica_is_taken_over(tmp_path: Path, redis_server: RedisServer) -> None:
    prefix = f"test-alerts-{uuid.uuid4().hex[:8]}"
    document = _document(tmp_path, redis_server, prefix)
    journal = tmp_path / "takeover.jsonl"
    # The slow replica claims deliveries and sits on them until it is killed.
    slow = JournalingSidecar(tmp_path, document, journal, 0.0, delay=600).start()
    items = [(f"takeover{g}", "firing") for g in range(40)]
    sender = Sender([slow.url], items)
    stream = redis.Redis.from_url(redis_server.url, decode_responses=True)
    stream_key = f"{prefix}:stream:test"

    sender.start()
    sender.join(timeout=60)
    held = wait_until(
        lambda: stream.xpending(stream_key, "dispatchers")["pending"], what="claimed entries"
    )
    slow.kill()
    fast = JournalingSidecar(tmp_path, document, journal, 0.0).start()
    accepted = set(sender.accepted)
    wait_until(lambda: accepted <= set(delivery_counts(journal)), timeout=60, what="delivered")
    fast.stop()
    stream.close()

    deliverers = {line["by"] for line in journal_lines(journal)}
    assert held >= 1
    assert len(accepted) == 40
    assert set(delivery_counts(journal)) == accepted
    assert deliverers == {str(fast.process.pid)}  # type: ignore[union-attr]


def test_redis_stopped_answers_503_then_recovers(
    replicas: list[JournalingSidecar], redis_server: RedisServer
) -> None:
    journal = replicas[0].journal
    url = replicas[0].url + "/alerts"

    redis_server.stop()
    refused = httpx.post(url, json=payload("while-down"), timeout=10)
    redis_server.start()
    accepted = wait_until(
        lambda: httpx.post(url, json=payload("after-restart"), timeout=10).status_code == 200,
        timeout=30,
        what="accepted again",
    )
    wait_until(
        lambda: any("after-restart" in line["group"] for line in journal_lines(journal)),
        timeout=30,
        what="delivered after the restart",
    )

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert "Redis outbox" in refused.json()["error"]
    assert accepted


async def test_a_redis_that_stops_answering_is_refused_promptly(
    redis_server: RedisServer,
) -> None:
    config = AlertsConfig.model_validate(
        {"outbox": {"backend": "redis", "redis": {"url": redis_server.url, "timeout": "300ms"}}}
    )
    outbox, client = build_outbox(config)
    assert client is not None
    await outbox.start()
    notification = Notification.model_validate(payload("paused"))
    assert redis_server.process is not None

    os.kill(redis_server.process.pid, signal.SIGSTOP)
    waited: list[float] = []
    try:
        for operation in (
            lambda: outbox.enqueue(notification, ["log"], "paused-1"),
            lambda: outbox.claim("log", 10),
            outbox.stats,
        ):
            began = time.monotonic()
            with pytest.raises(OutboxUnavailable, match="Timeout"):
                await operation()
            waited.append(time.monotonic() - began)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    stored = await outbox.enqueue(notification, ["log"], "paused-2")
    await outbox.stop()

    # The client built from the URL does not retry a timed-out command: Alertmanager gets its
    # 503 (and retries) long before its own timeout, and neither the dispatcher nor a stopping
    # sidecar waits through retries with backoff.
    assert max(waited) < 1.5, waited
    assert stored is True
