"""Traces of the alert pipeline through the real receiver, outbox and dispatcher.

The sidecar serves on a loopback port and exports spans over OTLP/HTTP to the real receiver of
``tests/otel_receiver.py``; a test notifier fails twice and then delivers. The trace context
travels in the outbox, so both backends are checked for keeping it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.alerts.outbox.base import Outbox, dedup_key
from sidecar.alerts.outbox.sqlite import SqliteOutbox
from sidecar.alerts.payload import Notification
from sidecar.app import Sidecar
from sidecar.notify.base import DeliveryError
from sidecar.server import serve
from sidecar.telemetry.tracing import NOOP_TRACER
from tests.alerts_support import (
    RecordingNotifier,
    alerts_config,
    build_sidecar,
    open_outbox,
    payload,
    poll,
)
from tests.harness import free_port
from tests.otel_receiver import OtlpReceiver, attributes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CARRIER = f"00-{TRACE_ID}-{PARENT_ID}-01\nvendor=opaque"


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


async def _serve(sidecar: Sidecar, port: int) -> asyncio.Task[None]:
    task = asyncio.create_task(serve(sidecar))
    async with httpx.AsyncClient() as client:

        async def answers() -> bool:
            try:
                return (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
            except httpx.TransportError:
                return False

        await poll(answers, what="sidecar listening")
    return task


async def test_a_delivery_failing_twice_is_one_trace_under_alertmanagers_parent(
    otlp: OtlpReceiver, tmp_path: Path
) -> None:
    port = free_port()
    document = alerts_config(tmp_path)
    document["server"] = {"listen": f"127.0.0.1:{port}"}
    document["telemetry"] = {
        "endpoint": otlp.url,
        "metrics": {"enabled": False},
        "traces": {"enabled": True},
    }
    notifier = RecordingNotifier()
    notifier.script = [
        DeliveryError("destination answered 503", retryable=True, status=503),
        DeliveryError("destination answered 503", retryable=True, status=503),
    ]
    sidecar = build_sidecar(document, {"test": notifier})
    assert sidecar.telemetry.traces is not None
    body = payload("traced", alerts=3)

    task = await _serve(sidecar, port)
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"http://127.0.0.1:{port}/alerts",
                json=body,
                headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            )
        assert answer.status_code == 200, answer.text
        await poll(lambda: notifier.records, what="the third attempt delivered")
        assert await sidecar.telemetry.traces.flush()
    finally:
        sidecar.lifecycle.stopping.set()
        await asyncio.wait_for(task, timeout=20)

    received = sorted(otlp.spans(), key=lambda span: span.start_time_unix_nano)
    by_id = {span.span_id: span for span in received}
    shape = [
        (
            span.name,
            by_id[span.parent_span_id].name if span.parent_span_id in by_id else None,
            span.kind,
            attributes(span.attributes),
            span.status.code,
        )
        for span in received
    ]
    server, internal, client_kind = 2, 1, 3  # OTLP's SpanKind numbers
    ok, error = 0, 2  # unset and error status codes
    delivery = {
        "sidecar.destination": "test",
        "sidecar.destination.kind": "test",
    }
    retry = {
        **delivery,
        "sidecar.delivery.outcome": "retry",
        "http.response.status_code": 503,
        "error.type": "DeliveryError",
    }
    assert shape == [
        (
            "alerts.receive",
            None,
            server,
            {
                "sidecar.receiver": "default",
                "sidecar.group_key": body["groupKey"],
                "sidecar.alerts": 3,
                "sidecar.status": "firing",
                "sidecar.outcome": "accepted",
                "http.response.status_code": 200,
            },
            ok,
        ),
        ("alerts.route", "alerts.receive", internal, {"sidecar.destinations": ["test"]}, ok),
        ("alerts.store", "alerts.receive", internal, {"sidecar.outbox.backend": "sqlite"}, ok),
        (
            "alerts.deliver",
            "alerts.receive",
            client_kind,
            {**retry, "sidecar.delivery.attempt": 1},
            error,
        ),
        (
            "alerts.deliver",
            "alerts.receive",
            client_kind,
            {**retry, "sidecar.delivery.attempt": 2},
            error,
        ),
        (
            "alerts.deliver",
            "alerts.receive",
            client_kind,
            {
                **delivery,
                "sidecar.delivery.attempt": 3,
                "sidecar.delivery.outcome": "success",
                "http.response.status_code": 200,
            },
            ok,
        ),
    ]
    # Alertmanager's traceparent is the parent of the whole trace.
    assert {span.trace_id.hex() for span in received} == {TRACE_ID}
    assert received[0].parent_span_id.hex() == PARENT_ID
    assert [attempt.number for attempt in notifier.attempts] == [1, 2, 3]


async def test_a_rejected_webhook_is_traced_with_its_answer(
    otlp: OtlpReceiver, tmp_path: Path
) -> None:
    document = alerts_config(tmp_path)
    document["telemetry"] = {
        "endpoint": otlp.url,
        "metrics": {"enabled": False},
        "traces": {"enabled": True},
    }
    sidecar = build_sidecar(document, {"test": RecordingNotifier()})
    assert sidecar.telemetry.traces is not None
    async with sidecar.running():
        transport = httpx.ASGITransport(app=sidecar.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
            answer = await client.post(
                "/alerts", content=b'{"version": "3"}', headers={"content-type": "application/json"}
            )
        assert await sidecar.telemetry.traces.flush()

    assert answer.status_code == 400
    (span,) = otlp.spans()
    assert span.name == "alerts.receive"
    assert attributes(span.attributes) == {
        "sidecar.receiver": "-",
        "sidecar.outcome": "rejected",
        "http.response.status_code": 400,
    }


def test_without_an_endpoint_the_pipeline_gets_the_noop_tracer(tmp_path: Path) -> None:
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": RecordingNotifier()})
    assert sidecar.alerts is not None
    assert sidecar.alerts.receiver.tracer is NOOP_TRACER
    assert sidecar.alerts.dispatcher.tracer is NOOP_TRACER


@pytest.fixture(params=["sqlite", "redis"])
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    async with open_outbox(request.param, tmp_path, ["a"], "tracing") as backend:
        yield backend


async def _claim_one(outbox: Outbox) -> Any:
    claims = await poll(lambda: outbox.claim("a", 1), what="a due delivery")
    (claim,) = claims
    return claim


async def test_the_trace_context_survives_claims_retries_and_requeues(outbox: Outbox) -> None:
    notification = Notification.model_validate(payload("ctx"))
    stored = await outbox.enqueue(
        notification, ["a"], dedup_key("r", notification), trace_context=CARRIER
    )
    assert stored

    first = await _claim_one(outbox)
    await outbox.retry(first.delivery_id, 0.0, "503")
    second = await _claim_one(outbox)
    await outbox.bury(second.delivery_id, "gave up")
    assert await outbox.requeue(second.delivery_id)
    third = await _claim_one(outbox)

    assert [claim.trace_context for claim in (first, second, third)] == [CARRIER] * 3
    assert third.delivery_id == first.delivery_id


async def test_an_untraced_notification_has_an_empty_context(outbox: Outbox) -> None:
    notification = Notification.model_validate(payload("plain"))
    await outbox.enqueue(notification, ["a"], dedup_key("r", notification))
    claim = await _claim_one(outbox)
    assert claim.trace_context == ""


async def test_an_outbox_file_of_the_previous_schema_is_upgraded_in_place(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE notifications (id INTEGER PRIMARY KEY, body TEXT NOT NULL,
            accepted_at REAL NOT NULL);
        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            notification_id INTEGER NOT NULL REFERENCES notifications(id),
            destination TEXT NOT NULL, group_id TEXT NOT NULL, group_key TEXT NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            accepted_at REAL NOT NULL, not_before REAL NOT NULL,
            lease_until REAL NOT NULL DEFAULT 0, finished_at REAL,
            last_error TEXT NOT NULL DEFAULT '');
        """
    )
    body = Notification.model_validate(payload("old")).to_json()
    old.execute("INSERT INTO notifications (id, body, accepted_at) VALUES (1, ?, 1.0)", (body,))
    old.execute(
        "INSERT INTO deliveries (notification_id, destination, group_id, group_key, state,"
        " accepted_at, not_before) VALUES (1, 'a', 'g', 'old', 'pending', 1.0, 1.0)"
    )
    old.commit()
    old.close()

    outbox = SqliteOutbox(path, max_depth=5, dedup_window=60, lease=5, retention=0)
    await outbox.start()
    try:
        (kept,) = await outbox.claim("a", 5)
        notification = Notification.model_validate(payload("new"))
        await outbox.enqueue(
            notification, ["a"], dedup_key("r", notification), trace_context=CARRIER
        )
        (new,) = await outbox.claim("a", 5)
    finally:
        await outbox.stop()

    assert (kept.body, kept.trace_context) == (body, "")
    assert new.trace_context == CARRIER
