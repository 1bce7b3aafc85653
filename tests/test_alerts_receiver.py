"""The webhook endpoint in process: answers, authentication, storage, order and dead letters."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sidecar.notify.base import DeliveryError
from tests.alerts_support import (
    RecordingNotifier,
    alerts_config,
    build_sidecar,
    payload,
    poll,
    running_client,
    sample_payload,
)
from tests.harness import require_tool

JSON = {"content-type": "application/json"}


async def test_sample_notification_is_stored_then_delivered(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": notifier})

    async with running_client(sidecar) as client:
        response = await client.post("/alerts", json=sample_payload())
        await poll(lambda: notifier.records, what="delivery")

    assert response.status_code == 200
    assert response.json() == {"status": "accepted", "destinations": ["test"]}
    assert notifier.records[0].fingerprints == ["2a2abd29000bbe9f"]
    assert notifier.records[0].status == "firing"


async def test_duplicate_from_ha_peer_is_acknowledged_and_delivered_once(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": notifier})

    async with running_client(sidecar) as client:
        first = await client.post("/alerts", json=payload("dup"))
        second = await client.post("/alerts", json=payload("dup"))
        resolved = await client.post("/alerts", json=payload("dup", status="resolved"))
        await poll(lambda: len(notifier.records) == 2, what="two deliveries")
        metrics = generate_latest(sidecar.registry).decode()

    assert [first.json()["status"], second.json()["status"]] == ["accepted", "duplicate"]
    assert resolved.json()["status"] == "accepted"
    assert [record.status for record in notifier.records] == ["firing", "resolved"]
    assert 'sidecar_alerts_deduplicated_total{receiver="default"} 1.0' in metrics
    assert 'sidecar_alerts_received_total{outcome="duplicate",receiver="default"} 1.0' in metrics


async def test_resolved_never_overtakes_the_firing_notification_it_follows(
    tmp_path: Path,
) -> None:
    notifier = RecordingNotifier()
    notifier.script = [DeliveryError("busy", retryable=True, retry_after=0.3)]
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": notifier})

    async with running_client(sidecar) as client:
        await client.post("/alerts", json=payload("order"))
        await poll(lambda: notifier.attempts, what="first attempt")
        await client.post("/alerts", json=payload("order", status="resolved"))
        await client.post("/alerts", json=payload("other"))
        await poll(lambda: len(notifier.records) == 3, what="three deliveries")

    order = [(r.group_key.split('"')[1], r.status) for r in notifier.records]
    assert order.index(("Alertorder", "firing")) < order.index(("Alertorder", "resolved"))
    # The other group was not held up behind the retrying one.
    assert order[0] == ("Alertother", "firing")
    assert notifier.records[order.index(("Alertorder", "firing"))].attempt == 2


async def test_retry_after_of_the_notifier_is_honoured(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    notifier.script = [DeliveryError("rate limited", retryable=True, retry_after=30, status=429)]
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": notifier})
    assert sidecar.alerts is not None

    async with running_client(sidecar) as client:
        await client.post("/alerts", json=payload("later"))
        await poll(lambda: notifier.attempts, what="first attempt")
        records = await poll(
            lambda: _pending(sidecar), what="delivery pending again after the failure"
        )

    assert records[0].last_error == "rate limited"
    assert records[0].not_before - records[0].accepted_at >= 29
    assert notifier.records == []


async def _pending(sidecar: object) -> list[object]:
    records = await sidecar.alerts.outbox.list("pending")  # type: ignore[attr-defined]
    return [record for record in records if record.attempts == 1]


async def test_permanent_failure_is_a_dead_letter_that_can_be_retried(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    notifier.script = [DeliveryError("webhook gone (404)", retryable=False, status=404)]
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": notifier})
    assert sidecar.alerts is not None
    outbox = sidecar.alerts.outbox

    async with running_client(sidecar):
        transport_client = running_client  # the app is driven through the outbox below
        del transport_client
        await sidecar.alerts.receiver.outbox.enqueue(_notification("dead"), ["test"], "dead-key")
        sidecar.alerts.dispatcher.wake(["test"])
        dead = await poll(lambda: outbox.list("dead"), what="dead letter")
        await sidecar.alerts.dispatcher.refresh_stats()
        gauges = generate_latest(sidecar.registry).decode()
        assert await outbox.requeue(dead[0].delivery_id)
        sidecar.alerts.dispatcher.wake(["test"])
        await poll(lambda: notifier.records, what="delivery after requeue")

    assert dead[0].last_error == "permanent failure: webhook gone (404)"
    assert "sidecar_alerts_dead_letters 1.0" in gauges
    assert 'sidecar_alerts_deliveries_total{destination="test",result="dead"} 1.0' in gauges
    assert await _reopen_dead(tmp_path) == []


async def _reopen_dead(tmp_path: Path) -> list[object]:
    from sidecar.alerts.outbox.sqlite import SqliteOutbox

    outbox = SqliteOutbox(
        tmp_path / "outbox.sqlite3", max_depth=10, dedup_window=1, lease=1, retention=1
    )
    await outbox.start()
    try:
        return list(await outbox.list("dead"))
    finally:
        await outbox.stop()


def _notification(group: str):  # type: ignore[no-untyped-def]
    from sidecar.alerts.payload import Notification

    return Notification.model_validate(payload(group))


async def test_full_outbox_answers_503_with_retry_after(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    notifier.script = [DeliveryError("down", retryable=True, retry_after=60)]
    document = alerts_config(tmp_path, outbox={"max_depth": 1})
    sidecar = build_sidecar(document, {"test": notifier})

    async with running_client(sidecar) as client:
        first = await client.post("/alerts", json=payload("a"))
        second = await client.post("/alerts", json=payload("b"))
        again = await client.post("/alerts", json=payload("b"))

    assert first.status_code == 200
    assert second.status_code == 503
    assert second.headers["retry-after"] == "5"
    assert "max_depth" in second.json()["error"]
    # Not recorded for dedup: Alertmanager's retry must be accepted once there is room.
    assert again.status_code == 503


async def test_stopped_storage_answers_503(tmp_path: Path) -> None:
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": RecordingNotifier()})
    assert sidecar.alerts is not None

    async with running_client(sidecar) as client:
        await sidecar.alerts.outbox.stop()
        response = await client.post("/alerts", json=payload("x"))
        with pytest.raises(Exception, match="not running"):
            await sidecar.alerts.check_storage()

    assert response.status_code == 503
    assert "not running" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{", JSON, 400, "malformed JSON: Expecting property name"),
        (b"", JSON, 400, "empty body"),
        (b'{"version": "4"', JSON, 400, "malformed JSON"),
        (b"\xff\xfe{}", JSON, 400, "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, JSON, 400, "nested too deeply"),
        (b'[{"labels": {"alertname": "x"}}]', JSON, 400, "Prometheus"),
        (b'"text"', JSON, 400, "must be a JSON object"),
        (json.dumps({**payload(), "version": "3"}).encode(), JSON, 400, "version 4"),
        (
            json.dumps({k: v for k, v in payload().items() if k != "groupKey"}).encode(),
            JSON,
            400,
            "groupKey: Field required",
        ),
        (
            json.dumps({**payload(), "alerts": [{"status": "burning", "labels": {}}]}).encode(),
            JSON,
            400,
            "alerts[0].status",
        ),
        (
            json.dumps({**payload(), "commonLabels": {"a": "x" * 70_000}}).encode(),
            JSON,
            400,
            "commonLabels.a",
        ),
        (b'{"version": "4", "x": "\\ud800"}', JSON, 400, "groupKey"),
        (json.dumps(payload()).encode(), {"content-type": "text/plain"}, 415, "application/json"),
        (json.dumps(payload()).encode(), {}, 415, "application/json"),
    ],
)
async def test_bad_requests_get_a_precise_4xx(
    tmp_path: Path, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    notifier = RecordingNotifier()
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": notifier})

    async with running_client(sidecar) as client:
        response = await client.post("/alerts", content=body, headers=headers)
        after = await client.post("/alerts", json=payload("after"))
        await poll(lambda: notifier.records, what="later notification delivered")

    assert response.status_code == status
    assert message in response.json()["error"]
    assert after.status_code == 200


async def test_unpaired_surrogate_escape_is_refused(tmp_path: Path) -> None:
    document = payload()
    document["commonLabels"] = {"x": "\ud800", "\udfff": "y"}
    body = json.dumps(document).encode()
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": RecordingNotifier()})

    async with running_client(sidecar) as client:
        response = await client.post("/alerts", content=body, headers=JSON)

    assert response.status_code == 400
    assert "commonLabels.x: Input should be a valid string" in response.json()["error"]


async def test_body_above_the_limit_is_413(tmp_path: Path) -> None:
    document = alerts_config(tmp_path, receiver={"max_body_size": "64KiB"})
    sidecar = build_sidecar(document, {"test": RecordingNotifier()})
    big = json.dumps(payload(alerts=400)).encode()

    async with running_client(sidecar) as client:
        declared = await client.post("/alerts", content=big, headers=JSON)

        async def chunks():  # type: ignore[no-untyped-def]
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        streamed = await client.post("/alerts", content=chunks(), headers=JSON)

    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert "65536 bytes" in streamed.json()["error"]


async def test_ten_thousand_alerts_within_the_limit_are_accepted(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    document = alerts_config(tmp_path, receiver={"max_body_size": "16MiB"})
    sidecar = build_sidecar(document, {"test": notifier})

    async with running_client(sidecar) as client:
        response = await client.post("/alerts", json=payload("many", alerts=10_000))
        await poll(lambda: notifier.records, what="delivery")

    assert response.status_code == 200
    assert len(notifier.records[0].fingerprints) == 10_000


async def test_unknown_receiver_in_path_is_404_and_known_one_skips_routing(
    tmp_path: Path,
) -> None:
    pager, chat = RecordingNotifier("pager"), RecordingNotifier("chat")
    document = alerts_config(
        tmp_path,
        destinations=[{"name": "pager", "kind": "log"}, {"name": "chat", "kind": "log"}],
        receivers=[
            {"name": "default", "destinations": ["chat"]},
            {"name": "oncall", "destinations": ["pager"]},
        ],
    )
    sidecar = build_sidecar(document, {"pager": pager, "chat": chat})

    async with running_client(sidecar) as client:
        missing = await client.post("/alerts/nobody", json=payload())
        direct = await client.post("/alerts/oncall", json=payload("direct"))
        await poll(lambda: pager.records, what="pager delivery")

    assert missing.status_code == 404
    assert "nobody" in missing.json()["error"]
    assert direct.json()["destinations"] == ["pager"]
    assert chat.records == []


async def test_routes_choose_destinations_by_labels(tmp_path: Path) -> None:
    pager, chat = RecordingNotifier("pager"), RecordingNotifier("chat", send_resolved=False)
    document = alerts_config(
        tmp_path,
        destinations=[{"name": "pager", "kind": "log"}, {"name": "chat", "kind": "log"}],
        receivers=[
            {"name": "default", "destinations": ["chat"]},
            {"name": "oncall", "destinations": ["pager"]},
        ],
        routes=[
            {"matchers": ['severity=~"critical|page"'], "receivers": ["oncall"], "continue": True},
            {"matchers": ["job!=node"], "receivers": ["default"]},
        ],
    )
    sidecar = build_sidecar(document, {"pager": pager, "chat": chat})
    warning = payload("warn")
    warning["commonLabels"] = {"severity": "warning", "job": "node"}

    async with running_client(sidecar) as client:
        critical = await client.post("/alerts", json=payload("crit"))
        fallback = await client.post("/alerts", json=warning)
        resolved = await client.post("/alerts", json=payload("warn", status="resolved"))

    assert critical.json()["destinations"] == ["pager"]
    assert fallback.json()["destinations"] == ["chat"]
    # chat does not take resolved notifications; pager does.
    assert resolved.json()["destinations"] == ["pager"]


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong-token", 401),
        ("Bearer s3cret-token", 200),
        ("Bearer second-token", 200),
        ("Basic " + base64.b64encode(b"am:pa55word").decode(), 200),
        ("Basic " + base64.b64encode(b"am:nope").decode(), 401),
        ("Basic !!!notbase64", 401),
        ("Basic " + base64.b64encode(b"no-colon").decode(), 401),
        ("Digest abc", 401),
    ],
)
async def test_credentials_are_checked(tmp_path: Path, header: str | None, status: int) -> None:
    (tmp_path / "token").write_text("second-token\n")
    auth = {
        "bearer_tokens": ["s3cret-token", {"file": str(tmp_path / "token")}],
        "basic": [{"username": "am", "password": "pa55word"}],
    }
    sidecar = build_sidecar(alerts_config(tmp_path, receiver={"auth": auth}), {})
    headers = {"authorization": header} if header else {}

    async with running_client(sidecar) as client:
        response = await client.post("/alerts", json=payload(), headers=headers)

    assert response.status_code == status
    if status == 401:
        assert "Bearer" in response.headers["www-authenticate"]
        assert "s3cret" not in response.text
        assert "pa55" not in response.text


def test_metrics_pass_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    sidecar = build_sidecar(alerts_config(tmp_path), {})
    assert sidecar.alerts is not None
    metrics = sidecar.alerts.metrics
    metrics.received.labels("default", "accepted").inc()
    metrics.deduplicated.labels("default").inc()
    metrics.deliveries.labels("test", "success").inc()
    metrics.attempts.labels("test").inc()
    metrics.latency.labels("test").observe(0.2)

    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(sidecar.registry),
        capture_output=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == b""
    assert result.stderr == b""


async def test_receiver_names_are_not_told_before_authentication(tmp_path: Path) -> None:
    auth = {"bearer_tokens": ["s3cret-token"]}
    sidecar = build_sidecar(alerts_config(tmp_path, receiver={"auth": auth}), {})

    async with running_client(sidecar) as client:
        anonymous = await client.post("/alerts/nobody", json=payload())
        known = await client.post(
            "/alerts/nobody", json=payload(), headers={"authorization": "Bearer s3cret-token"}
        )

    assert anonymous.status_code == 401
    assert known.status_code == 404
