"""The outbox contract, run against both backends: SQLite in a file and Redis (shared server).

Redis tests use a unique key prefix and remove their keys with SCAN afterwards, since other
tests use the same server at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.alerts.outbox.base import Outbox, OutboxFull, OutboxUnavailable, dedup_key
from sidecar.alerts.outbox.redis import RedisOutbox
from sidecar.alerts.outbox.sqlite import SqliteOutbox
from sidecar.alerts.payload import Notification
from sidecar.notify.base import Attempt
from sidecar.notify.log import LogDestination, LogNotifier
from tests.alerts_support import (
    RecordingNotifier,
    alerts_config,
    build_sidecar,
    open_outbox,
    payload,
    poll,
    running_client,
)


def _notification(group: str, status: str = "firing") -> Notification:
    return Notification.model_validate(payload(group, status=status))


@pytest.fixture(params=["sqlite", "redis"])
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    async with open_outbox(request.param, tmp_path, ["a", "b"], "outbox") as backend:
        yield backend


async def test_enqueue_claim_complete(outbox: Outbox) -> None:
    notification = _notification("one")

    stored = await outbox.enqueue(notification, ["a", "b"], dedup_key("r", notification))
    again = await outbox.enqueue(notification, ["a", "b"], dedup_key("r", notification))
    claims = await outbox.claim("a", 10)
    for claim in claims:
        await outbox.complete(claim.delivery_id)
    stats = await outbox.stats()

    assert (stored, again) == (True, False)
    assert len(claims) == 1
    assert Notification.model_validate_json(claims[0].body) == notification
    assert stats.depth == 1  # the delivery to b is still waiting
    assert await outbox.claim("a", 10) == []


async def test_a_later_notification_of_a_group_waits_for_the_earlier(outbox: Outbox) -> None:
    firing, resolved = _notification("g"), _notification("g", "resolved")
    await outbox.enqueue(firing, ["a"], "k1")
    await outbox.enqueue(resolved, ["a"], "k2")

    first = await outbox.claim("a", 10)
    blocked = await outbox.claim("a", 10)
    await outbox.retry(first[0].delivery_id, 0.2, "try later")
    still_blocked = await outbox.claim("a", 10)
    again = await poll(lambda: outbox.claim("a", 10), what="retried delivery due")
    await outbox.complete(again[0].delivery_id)
    second = await poll(lambda: outbox.claim("a", 10), what="the resolved one")

    assert [Notification.model_validate_json(c.body).status for c in first] == ["firing"]
    assert blocked == []
    assert still_blocked == []
    assert again[0].attempts == 1
    assert Notification.model_validate_json(second[0].body).status == "resolved"


async def test_an_expired_lease_is_claimed_again(outbox: Outbox) -> None:
    await outbox.enqueue(_notification("lease"), ["a"], "k")

    claimed = await outbox.claim("a", 1)
    reclaimed = await poll(lambda: outbox.claim("a", 1), within=5, what="lease expiry")

    assert reclaimed[0].body == claimed[0].body


async def test_dead_letters_are_listed_and_requeued(outbox: Outbox) -> None:
    await outbox.enqueue(_notification("dead"), ["a"], "k")
    claim = (await outbox.claim("a", 1))[0]

    await outbox.bury(claim.delivery_id, "permanent failure: 404")
    dead = await outbox.list("dead")
    stats = await outbox.stats()
    await poll(lambda: time.time() > dead[0].accepted_at + 0.05, what="time to pass")
    requeued_at = time.time()
    requeued = await outbox.requeue(dead[0].delivery_id)
    unknown = await outbox.requeue("12345")
    claimed = await outbox.claim("a", 1)

    assert [d.last_error for d in dead] == ["permanent failure: 404"]
    assert (stats.dead, stats.depth) == (1, 0)
    assert (requeued, unknown) == (True, False)
    assert claimed[0].attempts == 0
    # The age limit counts from the requeue, or an old letter would die again at once.
    assert claimed[0].accepted_at >= requeued_at - 0.001


async def test_list_tells_leased_from_pending(outbox: Outbox) -> None:
    await outbox.enqueue(_notification("first"), ["a"], "k1")
    await outbox.enqueue(_notification("second"), ["a"], "k2")
    claimed = await outbox.claim("a", 1)

    leased = await outbox.list("leased")
    pending = await outbox.list("pending")
    every = await outbox.list()

    assert [record.delivery_id for record in leased] == [claimed[0].delivery_id]
    assert [record.state for record in leased] == ["leased"]
    assert len(pending) == 1
    assert pending[0].state == "pending"
    assert pending[0].delivery_id != claimed[0].delivery_id
    assert sorted(record.state for record in every) == ["leased", "pending"]


async def test_a_delivery_waiting_for_its_retry_counts_in_the_oldest_age(
    outbox: Outbox,
) -> None:
    await outbox.enqueue(_notification("slow"), ["a"], "k")
    claim = (await outbox.claim("a", 1))[0]
    await outbox.retry(claim.delivery_id, 60, "destination down")
    await poll(lambda: time.time() > claim.accepted_at + 0.2, what="time to pass")

    stats = await outbox.stats()

    assert stats.depth == 1
    assert stats.oldest_age >= 0.2


async def test_the_bound_refuses_and_stores_nothing(outbox: Outbox) -> None:
    for index in range(5):
        await outbox.enqueue(_notification(f"n{index}"), ["a"], f"k{index}")

    with pytest.raises(OutboxFull):
        await outbox.enqueue(_notification("over"), ["a"], "over")
    stats = await outbox.stats()
    # The refused key is not remembered, so Alertmanager's retry is accepted later.
    claim = (await outbox.claim("a", 1))[0]
    await outbox.complete(claim.delivery_id)
    accepted = await outbox.enqueue(_notification("over"), ["a"], "over")

    assert stats.depth == 5
    assert stats.oldest_age >= 0
    assert accepted


async def test_notifier_state_survives_and_expires(outbox: Outbox) -> None:
    await outbox.state.set("discord:message:abc", '{"id": "1"}')
    await outbox.state.set("short", "x", ttl=0.2)

    kept = await outbox.state.get("discord:message:abc")
    missing = await outbox.state.get("never-set")
    expired = await poll(
        lambda: _is_none(outbox.state.get("short")), within=5, what="state key expired"
    )

    assert kept == '{"id": "1"}'
    assert missing is None
    assert expired


async def _is_none(value: object) -> bool:
    return await value is None  # type: ignore[misc]


async def test_sqlite_state_and_deliveries_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "restart.sqlite3"
    first = SqliteOutbox(path, max_depth=10, dedup_window=60, lease=600, retention=60)
    await first.start()
    await first.enqueue(_notification("kept"), ["a"], "k")
    await first.claim("a", 1)  # claimed, then the process "dies" without finishing
    await first.state.set("key", "value")
    await first.stop()

    second = SqliteOutbox(path, max_depth=10, dedup_window=60, lease=600, retention=60)
    await second.start()
    claims = await second.claim("a", 1)
    value = await second.state.get("key")
    duplicate = await second.enqueue(_notification("kept"), ["a"], "k")
    await second.stop()

    assert len(claims) == 1
    assert value == "value"
    assert duplicate is False


async def test_sqlite_group_commit_shares_transactions(tmp_path: Path) -> None:
    outbox = SqliteOutbox(
        tmp_path / "group.sqlite3", max_depth=10_000, dedup_window=60, lease=60, retention=60
    )
    await outbox.start()
    before = outbox.commits

    results = await asyncio.gather(
        *(outbox.enqueue(_notification(f"c{i}"), ["a"], f"k{i}") for i in range(200))
    )
    commits = outbox.commits - before
    stats = await outbox.stats()
    await outbox.stop()

    assert all(results)
    assert stats.depth == 200
    assert commits < 100, commits


async def test_sqlite_prune_removes_delivered_entries(tmp_path: Path) -> None:
    outbox = SqliteOutbox(
        tmp_path / "prune.sqlite3", max_depth=10, dedup_window=60, lease=60, retention=0
    )
    await outbox.start()
    await outbox.enqueue(_notification("p"), ["a"], "k")
    claim = (await outbox.claim("a", 1))[0]
    await outbox.complete(claim.delivery_id)

    pruned = await outbox.prune()
    remaining = await outbox.list()
    await outbox.stop()

    assert pruned == 1
    assert remaining == []


async def test_sqlite_unwritable_path_is_a_startup_error(tmp_path: Path) -> None:
    from sidecar.errors import StartupError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    outbox = SqliteOutbox(
        blocker / "outbox.sqlite3", max_depth=1, dedup_window=1, lease=1, retention=1
    )

    with pytest.raises(StartupError, match=r"alerts\.outbox\.sqlite\.path"):
        await outbox.start()


async def test_redis_unreachable_is_unavailable() -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    outbox = RedisOutbox(
        client, prefix="none", destinations=["a"], max_depth=1, dedup_window=1, lease=1
    )

    with pytest.raises(OutboxUnavailable, match="Redis outbox: ConnectionError"):
        await outbox.check_storage()
    with pytest.raises(OutboxUnavailable):
        await outbox.enqueue(_notification("x"), ["a"], "k")
    await outbox.stop()


async def test_log_destination_writes_one_line_per_alert(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = LogNotifier(LogDestination(name="log"))
    document = payload("logged", alerts=2)
    document["alerts"][1]["annotations"]["summary"] = "second <b>one</b>"

    with caplog.at_level(logging.INFO, logger="sidecar.notify.log"):
        await notifier.send(Notification.model_validate(document), Attempt("d1", "log"))

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("alert firing Alertlogged destination=log receiver=default")
    assert "instance=10.0.0.1:9100" in lines[1]
    assert "summary='second <b>one</b>'" in lines[1]


async def test_default_sidecar_logs_alerts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    document = alerts_config(tmp_path)
    document["alerts"].pop("destinations")
    document["alerts"].pop("receivers")
    sidecar = build_sidecar(document, {})

    with caplog.at_level(logging.INFO, logger="sidecar.notify.log"):
        async with running_client(sidecar) as client:
            response = await client.post("/alerts", json=payload("visible"))
            await poll(lambda: caplog.records, what="log line")

    assert response.json()["destinations"] == ["log"]
    assert "alert firing Alertvisible destination=log" in caplog.records[0].getMessage()


async def test_shutdown_lets_deliveries_in_flight_finish(tmp_path: Path) -> None:
    notifier = RecordingNotifier(delay=0.3)
    sidecar = build_sidecar(alerts_config(tmp_path), {"test": notifier})
    assert sidecar.alerts is not None

    async with running_client(sidecar) as client:
        await client.post("/alerts", json=payload("slow"))
        await poll(lambda: notifier.attempts, what="attempt started")

    assert len(notifier.records) == 1
    assert notifier.closed


async def test_shutdown_releases_deliveries_that_run_too_long(tmp_path: Path) -> None:
    notifier = RecordingNotifier(delay=30)
    document = alerts_config(tmp_path, dispatcher={"stop_timeout": "100ms"})
    sidecar = build_sidecar(document, {"test": notifier})

    async with running_client(sidecar) as client:
        await client.post("/alerts", json=payload("stuck"))
        await poll(lambda: notifier.attempts, what="attempt started")
    reopened = SqliteOutbox(
        tmp_path / "outbox.sqlite3",
        max_depth=10,
        dedup_window=1,
        lease=60,
        retention=60,
        recover=False,
    )
    await reopened.start()
    records = await reopened.list("pending")
    await reopened.stop()

    assert notifier.records == []
    assert [(r.state, r.attempts) for r in records] == [("pending", 0)]


async def test_too_many_attempts_make_a_dead_letter(tmp_path: Path) -> None:
    notifier = RecordingNotifier(failure_rate=1.0)
    document = alerts_config(tmp_path, dispatcher={"max_attempts": 3})
    sidecar = build_sidecar(document, {"test": notifier})
    assert sidecar.alerts is not None

    async with running_client(sidecar) as client:
        await client.post("/alerts", json=payload("hopeless"))
        dead = await poll(lambda: sidecar.alerts.outbox.list("dead"), what="dead letter")

    assert len(notifier.attempts) == 3
    assert dead[0].last_error.startswith("3 attempts failed; last: test destination failed")


async def test_concurrent_enqueues_each_get_their_own_answer(outbox: Outbox) -> None:
    notifications = [_notification(f"together{i}") for i in range(6)]

    results = await asyncio.gather(
        *(outbox.enqueue(n, ["a"], dedup_key("r", n)) for n in notifications),
        outbox.enqueue(notifications[0], ["a"], dedup_key("r", notifications[0])),
        return_exceptions=True,
    )

    # Sent together, answered one by one: five fit (max_depth 5), the sixth does not, and the
    # repeat of the first is a duplicate.
    assert results[:5] == [True] * 5
    assert isinstance(results[5], OutboxFull)
    assert results[6] is False
    assert (await outbox.stats()).depth == 5


async def test_redis_outbox_loads_its_scripts_again_after_redis_forgets_them(
    tmp_path: Path,
) -> None:
    async with open_outbox("redis", tmp_path, ["a"], "flush") as outbox:
        await outbox.enqueue(_notification("one"), ["a"], "flush-1")
        await outbox.redis.script_flush()

        stored = await outbox.enqueue(_notification("two"), ["a"], "flush-2")
        claims = await outbox.claim("a", 10)
        for claim in claims:
            await outbox.redis.script_flush()
            await outbox.complete(claim.delivery_id)
        stats = await outbox.stats()

    assert stored is True
    assert len(claims) == 2
    assert stats.depth == 0


async def test_redis_outbox_fails_waiting_callers_when_its_own_code_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_outbox("redis", tmp_path, ["a"], "broken") as outbox:
        assert isinstance(outbox, RedisOutbox)

        async def broken(calls: list[Any]) -> list[Any]:
            raise ValueError("an answer of the wrong length")

        monkeypatch.setattr(outbox, "_evaluate", broken)
        results = await asyncio.wait_for(
            asyncio.gather(
                outbox.enqueue(_notification("x1"), ["a"], "broken-1"),
                outbox.enqueue(_notification("x2"), ["a"], "broken-2"),
                return_exceptions=True,
            ),
            timeout=10,
        )
        monkeypatch.undo()
        stored = await outbox.enqueue(_notification("x1"), ["a"], "broken-1")

    assert [type(result) for result in results] == [OutboxUnavailable, OutboxUnavailable]
    assert "ValueError: an answer of the wrong length" in str(results[0])
    assert stored is True  # nothing was written by the failed call


async def test_a_redis_claim_that_fails_part_way_keeps_nothing_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_outbox("redis", tmp_path, ["a"], "partway") as outbox:
        assert isinstance(outbox, RedisOutbox)
        for index in range(3):
            await outbox.enqueue(_notification(f"p{index}"), ["a"], f"partway-{index}")
        lindex = outbox.redis.lindex
        calls = 0

        async def failing_second(name: str, index: int) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RedisConnectionError("connection lost")
            return await lindex(name, index)

        monkeypatch.setattr(outbox.redis, "lindex", failing_second)
        with pytest.raises(OutboxUnavailable, match="connection lost"):
            await outbox.claim("a", 10)
        kept = dict(outbox._claimed)

    assert calls == 2
    assert kept == {}
