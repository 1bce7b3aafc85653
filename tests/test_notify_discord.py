"""The Discord notifier against the fake Discord API over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry, generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sidecar.logs import RedactingFilter
from sidecar.notify.base import Attempt, DeliveryError
from sidecar.notify.discord import DiscordDestination, DiscordNotifier
from tests.fake_discord import FakeDiscord
from tests.harness import RedisServer, free_port, require_tool
from tests.notify_support import MemoryState, alert, notification

ROLE = "123456789012345678"
USER = "223456789012345678"

Factory = Callable[..., DiscordNotifier]


def destination(url: str, **options: Any) -> DiscordDestination:
    return DiscordDestination.model_validate(
        {"name": "ops-discord", "kind": "discord", "webhook_url": url, **options}
    )


@pytest.fixture
async def make_notifier(registry: CollectorRegistry) -> AsyncIterator[Factory]:
    created: list[DiscordNotifier] = []

    def make(
        url: str, *, state: MemoryState | None = None, redis: Any = None, **options: Any
    ) -> DiscordNotifier:
        notifier = DiscordNotifier(
            destination(url, **options),
            state=state or MemoryState(),
            registry=registry,
            redis=redis,
            key_prefix=f"test-{uuid.uuid4().hex}:",
        )
        created.append(notifier)
        return notifier

    yield make
    for notifier in created:
        await notifier.close()


def attempt(delivery_id: str = "d-1", number: int = 1) -> Attempt:
    return Attempt(delivery_id=delivery_id, destination="ops-discord", number=number)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_firing_notification_is_posted_with_wait_and_returns_discord_message_ids(
    fake_discord: FakeDiscord, make_notifier: Factory, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url, username="Alerts", mentions={"critical": {"roles": [ROLE]}})

    delivered = await notifier.send(notification([alert(index=0), alert(index=1)]), attempt())

    requests = fake_discord.requests_for(url)
    messages = fake_discord.messages_for(url)
    assert [r.status for r in requests] == [200]
    assert requests[0].query == {"wait": "true"}
    assert delivered.message_ids == [messages[0]["id"]]
    assert len(messages[0]["embeds"]) == 2
    assert messages[0]["pinged"] == {"everyone": False, "roles": [ROLE], "users": []}
    assert requests[0].body["allowed_mentions"] == {"parse": [], "roles": [ROLE], "users": []}
    assert requests[0].body["username"] == "Alerts"
    assert (
        sample(
            registry,
            "sidecar_notifier_requests_total",
            destination="ops-discord",
            kind="discord",
            code="200",
        )
        == 1
    )
    assert (
        sample(
            registry, "sidecar_discord_messages_total", destination="ops-discord", action="create"
        )
        == 1
    )


async def test_a_twenty_alert_group_is_split_into_messages_discord_accepts(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url)

    delivered = await notifier.send(notification([alert(index=i) for i in range(20)]), attempt())

    messages = fake_discord.messages_for(url)
    assert [r.status for r in fake_discord.requests_for(url)] == [200, 200]
    assert [len(m["embeds"]) for m in messages] == [10, 10]
    assert len(delivered.message_ids) == 2
    titles = [e["footer"]["text"] for m in messages for e in m["embeds"]]
    assert titles == [f"ops · alert {i} of 20" for i in range(1, 21)]


async def test_a_300_alert_group_shows_max_alerts_and_summarises_the_rest_in_order(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook(limit=50, window=1.0)
    notifier = make_notifier(url, max_alerts=50)

    await notifier.send(notification([alert(index=i) for i in range(300)], truncated=12), attempt())

    messages = fake_discord.messages_for(url)
    assert all(r.status == 200 for r in fake_discord.requests_for(url))
    assert [m["content"] for m in messages] == [f"Part {i} of 6" for i in range(1, 7)]
    embeds = [e for m in messages for e in m["embeds"]]
    assert len(embeds) == 51
    assert embeds[-1]["title"] == "…and 262 more alerts"
    assert (
        "250 firing and 0 resolved listed here, 12 left out by Alertmanager"
        in embeds[-1]["description"]
    )
    assert "http://alertmanager.example:9093/#/alerts?filter=" in embeds[-1]["description"]


async def test_hostile_alert_text_pings_nobody_and_only_configured_ids_are_pinged(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(
        url, mentions={"critical": {"users": [USER]}, "info": {"roles": [ROLE]}}
    )
    hostile = (
        "@everyone @here <@&999999999999999999> <@111111111111111111> **bold** <b>x</b>"
        "\r\nSubject: x"
    )
    payload = notification(
        [alert(labels={"team": hostile}, annotations={"summary": hostile, "description": hostile})]
    )

    await notifier.send(payload, attempt())

    message = fake_discord.messages_for(url)[0]
    assert message["pinged"] == {"everyone": False, "roles": [], "users": [USER]}
    assert message["content"] == f"<@{USER}>"
    description = message["embeds"][0]["description"]
    assert "@everyone" not in description
    assert "<@&999" not in description
    assert "\\*\\*bold\\*\\*" in description
    assert "\r" not in description


async def test_a_10000_character_annotation_is_cut_cleanly_and_accepted(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url)
    text = "日本語のテキスト😀 " * 1000

    await notifier.send(notification([alert(annotations={"description": text})] * 3), attempt())

    messages = fake_discord.messages_for(url)
    assert all(r.status == 200 for r in fake_discord.requests_for(url))
    description = messages[0]["embeds"][0]["description"]
    assert "…\n\n[Source](" in description
    assert (
        "\ud83d"
        not in description.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")[-1:]
    )
    assert sum(len(m["embeds"]) for m in messages) == 3


async def test_resolve_edits_the_firing_message_instead_of_posting(
    fake_discord: FakeDiscord, make_notifier: Factory, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    state = MemoryState()
    notifier = make_notifier(url, state=state, on_resolve="edit")
    await notifier.send(notification([alert(index=0), alert(index=1)]), attempt("d-firing"))

    delivered = await notifier.send(
        notification([alert(index=0, status="resolved")], status="firing"), attempt("d-resolved")
    )

    messages = fake_discord.messages_for(url)
    assert len(messages) == 1
    assert delivered.message_ids == [messages[0]["id"]]
    first, second = messages[0]["embeds"]
    assert first["title"] == "[RESOLVED] HighErrorRate"
    assert first["color"] == 0x2ECC71
    assert second["title"] == "[FIRING] HighErrorRate"
    assert messages[0]["edited_timestamp"] is not None
    patch = fake_discord.requests_for(url)[-1]
    assert patch.method == "PATCH"
    assert patch.body["allowed_mentions"]["parse"] == []
    assert (
        sample(registry, "sidecar_discord_messages_total", destination="ops-discord", action="edit")
        == 1
    )


async def test_edit_and_post_edits_and_posts_and_unknown_alerts_are_posted(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url, on_resolve="edit_and_post")
    await notifier.send(notification([alert(index=0)]), attempt("d-firing"))

    await notifier.send(
        notification([alert(index=0, status="resolved"), alert(index=7, status="resolved")]),
        attempt("d-resolved"),
    )

    messages = fake_discord.messages_for(url)
    assert [len(m["embeds"]) for m in messages] == [1, 2]
    assert messages[0]["embeds"][0]["title"] == "[RESOLVED] HighErrorRate"


async def test_a_deleted_firing_message_makes_the_resolve_a_new_post(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url, on_resolve="edit")
    firing = await notifier.send(notification([alert()]), attempt("d-firing"))
    fake_discord.delete_message(url, firing.message_ids[0])

    resolved = await notifier.send(notification([alert(status="resolved")]), attempt("d-resolved"))

    [message] = fake_discord.messages_for(url)
    assert [r.status for r in fake_discord.requests_for(url)] == [200, 404, 200]
    assert resolved.message_ids == [message["id"]]
    assert message["embeds"][0]["title"] == "[RESOLVED] HighErrorRate"


async def test_a_retried_delivery_does_not_post_messages_twice(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url)
    payload = notification([alert(index=i) for i in range(15)])
    fake_discord.inject(url, 502, {"message": "Bad Gateway"}, after=1)
    with pytest.raises(DeliveryError) as failure:
        await notifier.send(payload, attempt("d-2"))

    delivered = await notifier.send(payload, attempt("d-2", number=2))

    assert failure.value.retryable
    assert failure.value.status == 502
    assert [r.status for r in fake_discord.requests_for(url)] == [200, 502, 200]
    messages = fake_discord.messages_for(url)
    assert [len(m["embeds"]) for m in messages] == [10, 5]
    assert delivered.message_ids == [m["id"] for m in messages]


@pytest.mark.parametrize(
    ("status", "body", "fragment"),
    [
        (
            400,
            {"code": 50035, "errors": {"embeds": {"0": {}}}, "message": "Invalid Form Body"},
            "invalid",
        ),
        (403, {"message": "Missing Permissions", "code": 50013}, "forbids"),
        (404, {"message": "Unknown Webhook", "code": 10015}, "does not exist"),
        (413, {"message": "Request entity too large"}, "refused the request with 413"),
    ],
)
async def test_client_errors_are_permanent_and_say_what_discord_answered(
    fake_discord: FakeDiscord,
    make_notifier: Factory,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: dict[str, Any],
    fragment: str,
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url)
    fake_discord.inject(url, status, body)

    with (
        caplog.at_level(logging.WARNING, logger="sidecar"),
        pytest.raises(DeliveryError) as failure,
    ):
        await notifier.send(notification([alert()]), attempt())

    [record] = [r for r in caplog.records if r.name == "sidecar.notify.discord"]
    assert record.levelno == (logging.ERROR if status == 400 else logging.WARNING)
    assert body["message"] in record.getMessage()
    assert not failure.value.retryable
    assert failure.value.status == status
    assert fragment in failure.value.reason
    assert body["message"] in failure.value.reason


async def test_a_wrong_token_is_permanent_and_the_token_is_never_shown(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    wrong = url[: -len("x" * 40)] + "y" * 40
    notifier = make_notifier(wrong)
    # The handler the entry point installs, with its redacting filter, at the chattiest level.
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.addFilter(RedactingFilter([wrong]))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with pytest.raises(DeliveryError) as failure:
            await notifier.send(notification([alert()]), attempt())
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)

    assert failure.value.status == 401
    assert not failure.value.retryable
    assert "Invalid Webhook Token" in failure.value.reason
    assert "y" * 40 not in failure.value.reason
    assert "Discord rejected the webhook token" in output.getvalue()
    assert "y" * 40 not in output.getvalue()


async def test_server_errors_and_unreachable_discord_are_retryable(
    fake_discord: FakeDiscord, make_notifier: Factory, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    fake_discord.inject(url, 503, {"message": "upstream"})
    closed = f"http://127.0.0.1:{free_port()}/api/webhooks/123456789012345678/{'t' * 40}"

    with pytest.raises(DeliveryError) as server_error:
        await make_notifier(url).send(notification([alert()]), attempt())
    with pytest.raises(DeliveryError) as network_error:
        await make_notifier(closed).send(notification([alert()]), attempt())

    assert server_error.value.retryable
    assert server_error.value.status == 503
    assert network_error.value.retryable
    assert network_error.value.retry_after is None
    assert network_error.value.status is None
    assert "cannot reach Discord (ConnectError)" in network_error.value.reason
    assert "t" * 40 not in network_error.value.reason
    assert (
        sample(
            registry,
            "sidecar_notifier_requests_total",
            destination="ops-discord",
            kind="discord",
            code="error",
        )
        == 1
    )


async def test_a_429_is_waited_out_within_the_attempt_and_counted(
    fake_discord: FakeDiscord, make_notifier: Factory, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url)
    fake_discord.inject(
        url, 429, {"message": "You are being rate limited.", "retry_after": 0.2, "global": False}
    )

    delivered = await notifier.send(notification([alert()]), attempt())

    statuses = [r.status for r in fake_discord.requests_for(url)]
    assert statuses == [429, 200]
    gap = fake_discord.requests_for(url)[1].at - fake_discord.requests_for(url)[0].at
    assert gap >= 0.19
    assert len(delivered.message_ids) == 1
    assert (
        sample(
            registry, "sidecar_discord_rate_limited_total", destination="ops-discord", scope="route"
        )
        == 1
    )
    assert (
        sample(registry, "sidecar_discord_rate_limit_wait_seconds_total", destination="ops-discord")
        >= 0.19
    )


async def test_a_long_global_429_is_reported_as_retryable_with_retry_after(
    fake_discord: FakeDiscord, make_notifier: Factory, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url, max_rate_limit_wait="1s")
    fake_discord.inject(
        url, 429, {"message": "You are being rate limited.", "retry_after": 42.5, "global": True}
    )

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())
    with pytest.raises(DeliveryError) as blocked:
        await notifier.send(notification([alert()]), attempt("d-next"))

    assert failure.value.retryable
    assert failure.value.retry_after == 42.5
    assert failure.value.status == 429
    assert blocked.value.retryable
    assert 41 < (blocked.value.retry_after or 0) <= 42.5
    assert len(fake_discord.requests_for(url)) == 1
    assert (
        sample(
            registry,
            "sidecar_discord_rate_limited_total",
            destination="ops-discord",
            scope="global",
        )
        == 1
    )


async def test_messages_go_into_the_configured_thread_and_an_unknown_thread_is_permanent(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    thread = "333456789012345678"
    url = fake_discord.add_webhook(threads=(thread,))

    await make_notifier(url, thread_id=thread, on_resolve="edit").send(
        notification([alert()]), attempt()
    )
    with pytest.raises(DeliveryError) as failure:
        await make_notifier(url, thread_id="444456789012345678").send(
            notification([alert()]), attempt()
        )

    assert fake_discord.requests_for(url)[0].query == {"wait": "true", "thread_id": thread}
    assert fake_discord.messages_for(url)[0]["thread_id"] == thread
    assert failure.value.status == 400
    assert "Unknown Channel" in failure.value.reason


async def test_a_burst_of_200_notifications_is_delivered_with_at_most_one_429(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    # Discord's bucket is about 5 per 2 s; a faster bucket keeps the test short while the
    # notifier still only follows the headers it is given.
    url = fake_discord.add_webhook(limit=20, window=0.5)
    notifier = make_notifier(url)

    results = await asyncio.gather(
        *(notifier.send(notification([alert(index=i)]), attempt(f"burst-{i}")) for i in range(200))
    )

    statuses = [r.status for r in fake_discord.requests_for(url)]
    assert len(results) == 200
    assert all(len(r.message_ids) == 1 for r in results)
    assert len(fake_discord.messages_for(url)) == 200
    assert statuses.count(429) <= 1


async def test_replicas_share_one_budget_per_webhook_through_redis(
    fake_discord: FakeDiscord, redis_server: RedisServer
) -> None:
    url = fake_discord.add_webhook(limit=5, window=0.5)
    client = redis_asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    replicas = [
        DiscordNotifier(
            destination(url),
            state=MemoryState(),
            registry=CollectorRegistry(),
            redis=client,
            key_prefix="sidecar:",
        )
        for _ in range(2)
    ]
    try:
        results = await asyncio.gather(
            *(
                replicas[i % 2].send(notification([alert(index=i)]), attempt(f"shared-{i}"))
                for i in range(40)
            )
        )
        keys = [key async for key in client.scan_iter(match="sidecar:discord:ratelimit:*")]
        budget = await client.hgetall(keys[0])
    finally:
        for replica in replicas:
            await replica.close()
        await client.aclose()

    statuses = [r.status for r in fake_discord.requests_for(url)]
    assert len(results) == 40
    assert len(fake_discord.messages_for(url)) == 40
    # Two replicas sending at once, each alone within its own bucket view, would see many.
    assert statuses.count(429) <= 1
    assert len(keys) == 1
    assert budget[b"limit"] == b"5"
    assert url.rsplit("/", 1)[1].encode() not in keys[0]


async def test_an_unreachable_redis_falls_back_to_the_local_budget(
    fake_discord: FakeDiscord, make_notifier: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    url = fake_discord.add_webhook(limit=3, window=0.3)
    client = redis_asyncio.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    notifier = make_notifier(url, redis=client)

    with caplog.at_level(logging.WARNING):
        await asyncio.gather(
            *(notifier.send(notification([alert(index=i)]), attempt(f"f-{i}")) for i in range(8))
        )
    await client.aclose()

    assert len(fake_discord.messages_for(url)) == 8
    assert [r.status for r in fake_discord.requests_for(url)].count(429) <= 1
    assert "shared Discord rate-limit budget unavailable" in caplog.text


async def test_notifier_metrics_pass_promtool(
    fake_discord: FakeDiscord, make_notifier: Factory, registry: CollectorRegistry, tmp_path: Any
) -> None:
    promtool = require_tool("promtool")
    url = fake_discord.add_webhook()
    fake_discord.inject(url, 429, {"message": "slow down", "retry_after": 0.05, "global": False})
    await make_notifier(url).send(notification([alert()]), attempt())

    exposition = generate_latest(registry)
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        check=False,
    )

    assert b"sidecar_discord_rate_limited_total" in exposition
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b""
    assert result.stderr.strip() == b""


async def test_a_429_without_a_body_uses_the_retry_after_header(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url, max_rate_limit_wait="500ms")
    fake_discord.inject(url, 429, None, headers={"Retry-After": "3"})

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    assert failure.value.retryable
    assert failure.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"retry_after": "NaN"}, 1.0),
        ({"retry_after": 1e12}, 3600.0),
        ({"retry_after": "soon"}, 1.0),
    ],
)
async def test_a_nonsensical_retry_after_is_bounded(
    fake_discord: FakeDiscord, make_notifier: Factory, body: dict[str, Any], expected: float
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url, max_rate_limit_wait="0s")
    fake_discord.inject(url, 429, {"message": "rate limited", "global": False, **body})

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    assert failure.value.retry_after == expected


async def test_a_negative_retry_after_means_retry_at_once(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url, max_rate_limit_wait="0s")
    fake_discord.inject(url, 429, {"message": "rate limited", "global": False, "retry_after": -5})

    await notifier.send(notification([alert()]), attempt())

    assert [r.status for r in fake_discord.requests_for(url)] == [429, 200]


async def test_a_shared_scope_429_is_counted_as_shared(
    fake_discord: FakeDiscord, make_notifier: Factory, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    notifier = make_notifier(url)
    fake_discord.inject(
        url,
        429,
        {"message": "You are being rate limited.", "retry_after": 0.05, "global": False},
        headers={"X-RateLimit-Scope": "shared"},
    )

    await notifier.send(notification([alert()]), attempt())

    assert (
        sample(
            registry,
            "sidecar_discord_rate_limited_total",
            destination="ops-discord",
            scope="shared",
        )
        == 1
    )


async def test_a_notification_without_alerts_sends_nothing(
    fake_discord: FakeDiscord, make_notifier: Factory
) -> None:
    url = fake_discord.add_webhook()
    empty = notification([alert()]).model_copy(update={"alerts": []})

    delivered = await make_notifier(url).send(empty, attempt())

    assert delivered.message_ids == []
    assert fake_discord.requests_for(url) == []
