"""Golden files: the exact Discord messages and emails rendered for realistic notifications.

A change in rendering shows up as a diff of ``tests/golden``. After a deliberate change,
regenerate with ``SIDECAR_UPDATE_GOLDEN=1 pytest tests/test_notify_golden.py`` and review
the diff before committing it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest

from sidecar.alerts.payload import Notification
from sidecar.notify.discord import DiscordDestination
from sidecar.notify.email import EmailDestination, render_email
from sidecar.notify.render import render_messages
from tests.fake_discord import validate_message
from tests.notify_support import NOW, alert, notification

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("SIDECAR_UPDATE_GOLDEN") == "1"

HOSTILE = (
    "<script>alert('x')</script> <b>bold</b> &amp; **markdown** __under__ `code` ```fence"
    " ||spoiler|| [link](https://evil.example) @everyone @here <@&123456789012345678>"
    " <@223456789012345678> <#323456789012345678>\r\nInjected-Header: yes\r\n\r\nbody"
)


def sample() -> Notification:
    return Notification.model_validate_json((GOLDEN / "alertmanager-webhook-v4.json").read_text())


def group(size: int) -> Callable[[], Notification]:
    def build() -> Notification:
        severities = ["critical", "warning", "info"]
        alerts = [
            alert(
                index=i,
                status="resolved" if i % 7 == 6 else "firing",
                labels={"severity": severities[i % 3]},
            )
            for i in range(size)
        ]
        return notification(alerts)

    return build


def non_latin() -> Notification:
    return notification(
        [
            alert(
                name="ディスク容量不足",
                labels={"城市": "東京", "сервер": "база-данных-1", "منطقة": "الشرق"},
                annotations={
                    "summary": "Диск почти заполнен на сервере база-данных-1 💾",
                    "description": "残り容量は 3% です。ログを削除してください。"
                    " مساحة القرص منخفضة 🔥🔥",
                },
            )
        ]
    )


def long_annotation() -> Notification:
    text = "".join(
        f"line {i:04d}: connection reset by peer while reading response headers\n"
        for i in range(150)
    )
    assert len(text) >= 10_000
    return notification([alert(annotations={"description": text[:10_000]}), alert(index=1)])


def hostile() -> Notification:
    return notification(
        [
            alert(
                name="Hostile\r\nBcc: attacker@example.net",
                labels={"team": HOSTILE, "<@&1>": "@everyone"},
                annotations={
                    "summary": HOSTILE,
                    "description": HOSTILE,
                    "runbook_url": "javascript:alert(1)",
                    "dashboard_url": "https://grafana.example/d/x?var=a b)(",
                },
            )
        ]
    )


def resolved() -> Notification:
    return notification([alert(status="resolved"), alert(index=1, status="resolved")])


CASES: dict[str, Callable[[], Notification]] = {
    "alertmanager-sample": sample,
    "group-20": group(20),
    "group-300": group(300),
    "non-latin": non_latin,
    "annotation-10000": long_annotation,
    "hostile": hostile,
    "resolved": resolved,
}

DISCORD = DiscordDestination.model_validate(
    {
        "name": "chat",
        "kind": "discord",
        "webhook_url": "https://discord.com/api/webhooks/123456789012345678/abcdefghijklmnopqrstuvwxyz",
        "username": "Alerts",
        "mentions": {"critical": {"roles": ["423456789012345678"]}},
        "annotations": ["runbook_url"],
    }
)
EMAIL = EmailDestination.model_validate(
    {
        "name": "mail",
        "kind": "email",
        "smarthost": "smtp.example.org",
        "sender": "Sidecar Alerts <alerts@example.org>",
        "to": ["ops@example.org"],
    }
)


def compare(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: run with SIDECAR_UPDATE_GOLDEN=1 and review it")
    assert actual == path.read_text(encoding="utf-8"), f"rendering differs from {path}"


def email_text(message: EmailMessage) -> str:
    """Headers and both decoded parts; the MIME boundary is random, so it is left out."""
    lines = [f"{name}: {value}" for name, value in message.items() if name != "Content-Type"]
    lines.append(f"Content-Type: {message.get_content_type()}")
    for part in message.iter_parts():
        assert isinstance(part, EmailMessage)
        lines += ["", f"--- {part.get_content_type()} ---", part.get_content()]
    return "\n".join(lines)


@pytest.mark.parametrize("case", sorted(CASES))
def test_discord_rendering_matches_its_golden_file(case: str) -> None:
    messages = render_messages(CASES[case](), DISCORD, now=NOW)

    bodies = [message.body(DISCORD.username) for message in messages]

    for body in bodies:
        assert validate_message(body, require_content=True) is None
    compare(
        GOLDEN / "discord" / f"{case}.json", json.dumps(bodies, indent=1, ensure_ascii=False) + "\n"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_email_rendering_matches_its_golden_file(case: str) -> None:
    message = render_email(CASES[case](), EMAIL, now=NOW, thread_root="<root@example.org>")

    compare(GOLDEN / "email" / f"{case}.txt", email_text(message))


def test_hostile_text_is_disarmed_in_every_golden_output() -> None:
    bodies = [m.body() for m in render_messages(hostile(), DISCORD, now=NOW)]
    message = render_email(hostile(), EMAIL, now=NOW)

    discord_text = json.dumps(bodies, ensure_ascii=False)
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "@everyone" not in discord_text
    assert "<@&123456789012345678>" not in discord_text
    # The runbook_url annotation is shown as a field, as text; it must never become a link.
    assert "](javascript" not in discord_text
    assert all(b["allowed_mentions"]["parse"] == [] for b in bodies)
    assert "<script>" not in html
    assert "javascript:" not in html
    assert message["Bcc"] is None
    assert message["Injected-Header"] is None
