"""Destination configuration: every field's validation, secrets and templates at load time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from sidecar.config import Problem, problems_of
from sidecar.notify.discord import DiscordDestination
from sidecar.notify.email import EmailDestination

TOKEN = "SuperSecretWebhookToken_0123456789abcdef"
WEBHOOK = f"https://discord.com/api/webhooks/123456789012345678/{TOKEN}"


def problems(model: type[BaseModel], data: dict[str, Any], **context: Any) -> list[Problem]:
    with pytest.raises(ValidationError) as failure:
        model.model_validate(data, context={"environ": {}, "base_dir": None, **context})
    return problems_of(failure.value)


def discord(**fields: Any) -> dict[str, Any]:
    return {"name": "chat", "kind": "discord", "webhook_url": WEBHOOK, **fields}


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "name": "mail",
        "kind": "email",
        "smarthost": "smtp.example.org",
        "sender": "Alerts <alerts@example.org>",
        "to": ["ops@example.org"],
        **fields,
    }


def test_webhook_url_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text(WEBHOOK + "\n")
    from_env = discord()
    del from_env["webhook_url"]
    from_file = dict(from_env)

    by_env = DiscordDestination.model_validate(
        {**from_env, "webhook_url_env": "HOOK"}, context={"environ": {"HOOK": WEBHOOK}}
    )
    by_file = DiscordDestination.model_validate(
        {**from_file, "webhook_url_file": "hook"}, context={"base_dir": tmp_path}
    )

    assert by_env.webhook_url.reveal() == WEBHOOK
    assert by_file.webhook_url.reveal() == WEBHOOK
    assert TOKEN not in repr(by_env)
    assert TOKEN not in by_env.model_dump_json()


def test_a_missing_webhook_environment_variable_names_the_field() -> None:
    data = discord()
    del data["webhook_url"]

    found = problems(DiscordDestination, {**data, "webhook_url_env": "NOPE"})

    assert found == [Problem("webhook_url", "environment variable NOPE is not set")]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"ftp://discord.com/api/webhooks/123456789012345678/{TOKEN}", "must be an https URL"),
        (f"http://discord.com/api/webhooks/123456789012345678/{TOKEN}", "must use https"),
        (f"https://discord.com/api/hooks/123456789012345678/{TOKEN}", "/api/webhooks/ID/TOKEN"),
        ("https://discord.com/api/webhooks/123/short", "/api/webhooks/ID/TOKEN"),
        (f"{WEBHOOK}?thread_id=1", "set thread_id instead"),
        ("", "must be an https URL"),
    ],
)
def test_a_malformed_webhook_url_is_refused_without_showing_it(url: str, message: str) -> None:
    found = problems(DiscordDestination, discord(webhook_url=url))

    assert [p.path for p in found] == ["webhook_url"]
    assert message in found[0].message
    assert TOKEN not in found[0].message


def test_plain_http_is_accepted_on_loopback_only() -> None:
    config = DiscordDestination.model_validate(
        discord(webhook_url=f"http://127.0.0.1:8080/api/webhooks/123456789012345678/{TOKEN}")
    )

    assert config.webhook_url.reveal().startswith("http://127.0.0.1")


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"mentions": {"critical": {"roles": ["@everyone"]}}}, "mentions.critical.roles[0]"),
        ({"mentions": {"critical": {"users": ["12"]}}}, "mentions.critical.users[0]"),
        (
            {"mentions": {"critical": {"roles": ["123456789012345678"] * 101}}},
            "mentions.critical.roles",
        ),
        ({"max_alerts": 0}, "max_alerts"),
        ({"thread_id": "thread"}, "thread_id"),
        ({"on_resolve": "delete"}, "on_resolve"),
        ({"username": "x" * 81}, "username"),
        ({"username": "My Discord Bot"}, "username"),
        ({"avatar_url": "javascript:alert(1)"}, "avatar_url"),
        ({"timeout": "soon"}, "timeout"),
        ({"colour": "red"}, "colour"),
        ({"name": "has space"}, "name"),
    ],
)
def test_invalid_discord_fields_are_reported_by_path(fields: dict[str, Any], path: str) -> None:
    found = problems(DiscordDestination, discord(**fields))

    assert [p.path for p in found] == [path]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ alert.labels.alertname", "does not render (line 1)"),
        ("{% for x in %}{% endfor %}", "does not render"),
        ("{{ alert.labels.alertname|nosuchfilter }}", "No filter named 'nosuchfilter'"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "does not render"),
        ("{{ notification.alerts.append(1) }}", "does not render"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ],
)
def test_a_broken_or_unsafe_template_fails_at_load_with_its_field(
    template: str, message: str
) -> None:
    found = problems(DiscordDestination, discord(templates={"title": template}))

    assert [p.path for p in found] == ["templates.title"]
    assert message in found[0].message


def test_a_missing_template_file_is_reported(tmp_path: Path) -> None:
    found = problems(
        EmailDestination, mail(templates={"html_file": "missing.html.j2"}), base_dir=tmp_path
    )

    assert [p.path for p in found] == ["templates.html"]
    assert "cannot read template file" in found[0].message
    assert "missing.html.j2" in found[0].message


def test_a_template_given_inline_and_as_a_file_is_refused() -> None:
    found = problems(EmailDestination, mail(templates={"text": "x", "text_file": "x.j2"}))

    assert [p.message for p in found] == ["set only one of text and text_file"]


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        ({"to": ["not-an-address"]}, "to[0]", "is not an email address"),
        ({"to": ["ops@example.org\r\nBcc: x@example.net"]}, "to[0]", "line breaks"),
        ({"to": ["a@example.org, b@example.org"]}, "to[0]", "is not one email address"),
        ({"to": []}, "to", "at least 1 item"),
        ({"sender": "alerts"}, "sender", "is not an email address"),
        ({"tls": "ssl"}, "tls", "'starttls', 'implicit' or 'none'"),
        ({"port": 70000}, "port", "less than or equal to 65535"),
        ({"helo": "bad name\r\n"}, "helo", "must be a host name"),
        ({"smarthost": "smtp.example.org\nRCPT"}, "smarthost", "must be a host name"),
        ({"username": "u"}, "", "set both username and password"),
        ({"password": "p"}, "", "set both username and password"),
        ({"username": "u", "password": "p", "tls": "none"}, "", "clear text"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file", "cannot load CA certificates"),
    ],
)
def test_invalid_email_fields_are_reported_by_path(
    fields: dict[str, Any], path: str, message: str
) -> None:
    found = problems(EmailDestination, mail(**fields))

    assert [p.path for p in found] == [path]
    assert message in found[0].message


def test_email_password_from_the_environment_and_default_ports() -> None:
    config = EmailDestination.model_validate(
        mail(username="alerts", password_env="SMTP_PASSWORD", tls="implicit"),
        context={"environ": {"SMTP_PASSWORD": "hunter22"}},
    )

    assert config.password is not None
    assert config.password.reveal() == "hunter22"
    assert config.effective_port == 465
    assert EmailDestination.model_validate(mail()).effective_port == 587
    assert "hunter22" not in repr(config)
