"""``notify_test``: the sample firing and resolved notifications through real notifiers."""

from __future__ import annotations

import email
import email.policy
import io
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from sidecar.notify.discord import DiscordDestination, DiscordNotifier
from sidecar.notify.email import EmailDestination, EmailNotifier
from sidecar.notify.testsend import notify_test
from tests.fake_discord import FakeDiscord
from tests.notify_support import MemoryState
from tests.smtp_server import SmtpServer, start_server


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = start_server("plain")
    yield server
    server.stop()


def discord(url: str, registry: CollectorRegistry, **options: object) -> DiscordNotifier:
    config = DiscordDestination.model_validate(
        {"name": "chat", "kind": "discord", "webhook_url": url, **options}
    )
    return DiscordNotifier(config, state=MemoryState(), registry=registry)


def mail(port: int, registry: CollectorRegistry) -> EmailNotifier:
    config = EmailDestination.model_validate(
        {
            "name": "mail",
            "kind": "email",
            "smarthost": "127.0.0.1",
            "port": port,
            "tls": "none",
            "sender": "alerts@example.org",
            "to": ["ops@example.org"],
        }
    )
    return EmailNotifier(config, state=MemoryState(), registry=registry)


async def test_every_destination_gets_firing_then_resolved_and_the_exit_code_is_zero(
    fake_discord: FakeDiscord, smtp: SmtpServer, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    notifiers = [discord(url, registry, on_resolve="edit"), mail(smtp.port, registry)]
    out = io.StringIO()

    code = await notify_test(notifiers, receiver="team-a", out=out)
    for notifier in notifiers:
        await notifier.close()

    assert code == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("chat (discord) firing: delivered (status 200, message ids: 11")
    assert lines[1].startswith("chat (discord) resolved: delivered")
    assert lines[2].startswith("mail (email) firing: delivered (status 250, message ids: <")
    assert lines[-1] == "receiver team-a: 2 destinations, all delivered"
    [message] = fake_discord.messages_for(url)
    assert [e["title"] for e in message["embeds"]] == ["[RESOLVED] SidecarTestNotification"] * 2
    subjects = [
        email.message_from_bytes(m.content, policy=email.policy.default)["Subject"]
        for m in smtp.mailbox.messages
    ]
    assert subjects == ["[FIRING:2] SidecarTestNotification", "[RESOLVED] SidecarTestNotification"]


async def test_a_failing_destination_prints_the_precise_error_and_exits_one(
    fake_discord: FakeDiscord, registry: CollectorRegistry
) -> None:
    url = fake_discord.add_webhook()
    broken = discord(url[:-40] + "z" * 40, registry, send_resolved=False)
    out = io.StringIO()

    code = await notify_test([broken], receiver="team-b", out=out)
    await broken.close()

    assert code == 1
    output = out.getvalue()
    assert (
        "chat (discord) firing: FAILED (permanent, status 401): Discord rejected the webhook token"
        in output
    )
    assert "Invalid Webhook Token" in output
    assert "z" * 40 not in output
    assert output.splitlines()[-1] == "receiver team-b: 1 destinations, 1 failed"


async def test_a_receiver_without_destinations_fails() -> None:
    out = io.StringIO()

    code = await notify_test([], receiver="empty", out=out)

    assert code == 1
    assert out.getvalue() == "receiver empty has no destinations to test\n"
