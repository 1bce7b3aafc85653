"""The email notifier against real SMTP servers (aiosmtpd) with AUTH, STARTTLS and TLS."""

from __future__ import annotations

import email
import email.policy
import gc
import logging
import warnings
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.notify.base import Attempt, DeliveryError
from sidecar.notify.email import EmailDestination, EmailNotifier
from tests.harness import free_port
from tests.notify_support import MemoryState, alert, notification
from tests.smtp_server import (
    PASSWORD,
    USERNAME,
    Certificates,
    SmtpServer,
    make_certificates,
    start_server,
)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def starttls_server(certificates: Certificates) -> Iterator[SmtpServer]:
    server = start_server("starttls", certificates, with_auth=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def implicit_server(certificates: Certificates) -> Iterator[SmtpServer]:
    server = start_server("implicit", certificates, with_auth=True)
    yield server
    server.stop()


@pytest.fixture
def plain_server() -> Iterator[SmtpServer]:
    server = start_server("plain")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _collect_abandoned_transports() -> Iterator[None]:
    """Collect, at the end of each test, transports asyncio abandoned during a TLS failure.

    When a TLS handshake fails, asyncio's ``start_tls`` drops the plain transport beneath it
    without closing it; the garbage collector closes the socket later, with a
    ResourceWarning that pytest (warnings as errors) would pin on whichever test happens to
    run at that moment. Collecting here keeps each test's outcome its own.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(autouse=True)
def _empty_mailboxes(request: pytest.FixtureRequest) -> None:
    for name in ("starttls_server", "implicit_server"):
        if name in request.fixturenames:
            server: SmtpServer = request.getfixturevalue(name)
            server.mailbox.messages.clear()
            server.mailbox.rcpt_reply = server.mailbox.data_reply = None


def notifier_for(
    port: int,
    registry: CollectorRegistry,
    *,
    state: MemoryState | None = None,
    **options: Any,
) -> EmailNotifier:
    config = EmailDestination.model_validate(
        {
            "name": "ops-mail",
            "kind": "email",
            "smarthost": "127.0.0.1",
            "port": port,
            "sender": "Sidecar Alerts <alerts@example.org>",
            "to": ["ops@example.org", "Oncall <oncall@example.org>"],
            "timeout": "5s",
            **options,
        }
    )
    return EmailNotifier(config, state=state or MemoryState(), registry=registry)


def authenticated(certificates: Certificates, **options: Any) -> dict[str, Any]:
    return {"username": USERNAME, "password": PASSWORD, "ca_file": str(certificates.ca), **options}


def attempt(delivery_id: str = "d-1") -> Attempt:
    return Attempt(delivery_id=delivery_id, destination="ops-mail")


def parsed(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def test_starttls_with_auth_delivers_a_text_and_html_message(
    starttls_server: SmtpServer, certificates: Certificates, registry: CollectorRegistry
) -> None:
    notifier = notifier_for(starttls_server.port, registry, **authenticated(certificates))

    delivered = await notifier.send(notification([alert(index=0), alert(index=1)]), attempt())

    [received] = starttls_server.mailbox.messages
    assert received.tls
    assert received.authenticated
    assert received.mail_from == "alerts@example.org"
    assert received.recipients == ["ops@example.org", "oncall@example.org"]
    message = parsed(received.content)
    assert message["Subject"] == "[FIRING:2] HighErrorRate"
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]
    assert delivered.message_ids == [message["Message-ID"]]
    assert delivered.status == 250
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Error rate above 5% on api-1" in text
    assert (
        registry.get_sample_value(
            "sidecar_notifier_requests_total",
            {"destination": "ops-mail", "kind": "email", "code": "250"},
        )
        == 1
    )


async def test_implicit_tls_with_auth_delivers(
    implicit_server: SmtpServer, certificates: Certificates, registry: CollectorRegistry
) -> None:
    notifier = notifier_for(
        implicit_server.port, registry, tls="implicit", **authenticated(certificates)
    )

    await notifier.send(notification([alert()]), attempt())

    [received] = implicit_server.mailbox.messages
    assert received.tls
    assert received.authenticated


async def test_clear_text_delivery_without_auth(
    plain_server: SmtpServer, registry: CollectorRegistry
) -> None:
    notifier = notifier_for(plain_server.port, registry, tls="none")

    await notifier.send(notification([alert()]), attempt())

    [received] = plain_server.mailbox.messages
    assert not received.tls


async def test_starttls_required_but_not_offered_is_permanent(
    plain_server: SmtpServer, registry: CollectorRegistry
) -> None:
    notifier = notifier_for(plain_server.port, registry)

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    assert not failure.value.retryable
    assert "tls: starttls" in failure.value.reason
    assert plain_server.mailbox.messages == []


async def test_an_untrusted_certificate_is_permanent_and_names_ca_file(
    starttls_server: SmtpServer, registry: CollectorRegistry
) -> None:
    notifier = notifier_for(starttls_server.port, registry, username=USERNAME, password=PASSWORD)

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    assert not failure.value.retryable
    assert "cannot verify the TLS certificate" in failure.value.reason
    assert "ca_file" in failure.value.reason


async def test_bad_credentials_are_permanent_and_the_password_is_never_shown(
    starttls_server: SmtpServer,
    certificates: Certificates,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "wrong-password-value"
    notifier = notifier_for(
        starttls_server.port, registry, **authenticated(certificates, password=wrong)
    )

    with caplog.at_level(logging.DEBUG), pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    assert not failure.value.retryable
    assert failure.value.status == 535
    assert "check username and password" in failure.value.reason
    assert wrong not in failure.value.reason
    assert wrong not in caplog.text
    assert starttls_server.mailbox.messages == []


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [
        ("451 4.3.0 Mail server temporarily unavailable", True),
        ("554 5.6.0 Message rejected", False),
    ],
)
async def test_data_replies_are_classified_by_code(
    starttls_server: SmtpServer,
    certificates: Certificates,
    registry: CollectorRegistry,
    reply: str,
    retryable: bool,
) -> None:
    starttls_server.mailbox.data_reply = reply
    notifier = notifier_for(starttls_server.port, registry, **authenticated(certificates))

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    code = int(reply[:3])
    assert failure.value.retryable is retryable
    assert failure.value.status == code
    assert reply[4:] in failure.value.reason
    assert (
        registry.get_sample_value(
            "sidecar_notifier_requests_total",
            {"destination": "ops-mail", "kind": "email", "code": str(code)},
        )
        == 1
    )


@pytest.mark.parametrize(
    ("reply", "retryable"), [("450 4.2.1 Mailbox busy", True), ("550 5.1.1 No such user", False)]
)
async def test_refused_recipients_are_classified_by_code(
    starttls_server: SmtpServer,
    certificates: Certificates,
    registry: CollectorRegistry,
    reply: str,
    retryable: bool,
) -> None:
    starttls_server.mailbox.rcpt_reply = reply
    notifier = notifier_for(starttls_server.port, registry, **authenticated(certificates))

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    assert failure.value.retryable is retryable
    assert "ops@example.org" in failure.value.reason


async def test_a_refused_connection_is_retryable(registry: CollectorRegistry) -> None:
    notifier = notifier_for(free_port(), registry, tls="none")

    with pytest.raises(DeliveryError) as failure:
        await notifier.send(notification([alert()]), attempt())

    assert failure.value.retryable
    assert "cannot talk to SMTP server 127.0.0.1" in failure.value.reason
    assert (
        registry.get_sample_value(
            "sidecar_notifier_requests_total",
            {"destination": "ops-mail", "kind": "email", "code": "error"},
        )
        == 1
    )


async def test_messages_of_a_group_form_one_thread_and_a_retry_keeps_its_id(
    starttls_server: SmtpServer, certificates: Certificates, registry: CollectorRegistry
) -> None:
    state = MemoryState()
    notifier = notifier_for(
        starttls_server.port, registry, state=state, **authenticated(certificates)
    )
    firing = notification([alert()])
    resolved = notification([alert(status="resolved")])

    first = await notifier.send(firing, attempt("firing"))
    again = await notifier.send(firing, attempt("firing"))
    second = await notifier.send(resolved, attempt("resolved"))

    messages = [parsed(m.content) for m in starttls_server.mailbox.messages]
    assert first.message_ids == again.message_ids
    assert messages[0]["In-Reply-To"] is None
    assert messages[2]["Message-ID"] == second.message_ids[0] != first.message_ids[0]
    assert messages[2]["In-Reply-To"] == first.message_ids[0]
    assert messages[2]["References"] == first.message_ids[0]
    assert messages[2]["Subject"] == "[RESOLVED] HighErrorRate"


async def test_hostile_alert_text_cannot_inject_headers_or_markup(
    plain_server: SmtpServer, registry: CollectorRegistry
) -> None:
    hostile = (
        'Evil\r\nBcc: victim@example.net\r\n\r\n<script>alert(1)</script><a href="javascript:x">'
    )
    payload = notification(
        [
            alert(
                name=hostile, annotations={"summary": hostile, "runbook_url": "javascript:alert(1)"}
            )
        ]
    )
    notifier = notifier_for(plain_server.port, registry, tls="none")

    await notifier.send(payload, attempt())

    [received] = plain_server.mailbox.messages
    message = parsed(received.content)
    assert message["Bcc"] is None
    assert received.recipients == ["ops@example.org", "oncall@example.org"]
    assert "\n" not in message["Subject"]
    assert message["Subject"].startswith("[FIRING:1] Evil Bcc: victim@example.net")
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "javascript:" not in html.replace("javascript:x", "")
    assert 'href="javascript' not in html


async def test_a_relative_ca_file_is_read_next_to_the_configuration(
    starttls_server: SmtpServer, certificates: Certificates, registry: CollectorRegistry
) -> None:
    config = EmailDestination.model_validate(
        {
            "name": "ops-mail",
            "kind": "email",
            "smarthost": "127.0.0.1",
            "port": starttls_server.port,
            "sender": "alerts@example.org",
            "to": ["ops@example.org"],
            "username": USERNAME,
            "password": PASSWORD,
            "ca_file": certificates.ca.name,
        },
        context={"base_dir": certificates.ca.parent},
    )
    notifier = EmailNotifier(config, state=MemoryState(), registry=registry)

    await notifier.send(notification([alert()]), attempt())

    assert config.ca_file == certificates.ca
    assert len(starttls_server.mailbox.messages) == 1


def test_templates_from_files_are_used(tmp_path: Path) -> None:
    (tmp_path / "subject.j2").write_text(
        "{{ notification.alerts|length }} alerts for {{ notification.receiver }}"
    )

    config = EmailDestination.model_validate(
        {
            "name": "m",
            "kind": "email",
            "smarthost": "smtp.example.org",
            "sender": "a@example.org",
            "to": ["b@example.org"],
            "templates": {"subject_file": "subject.j2"},
        },
        context={"base_dir": tmp_path},
    )

    from sidecar.notify.email import render_email
    from tests.notify_support import NOW

    message = render_email(notification([alert(), alert(index=1)]), config, now=NOW)
    assert message["Subject"] == "2 alerts for ops"


async def test_non_latin_text_survives_the_trip_through_smtp(
    plain_server: SmtpServer, registry: CollectorRegistry
) -> None:
    payload = notification(
        [alert(name="ディスク容量不足", annotations={"summary": "Диск почти заполнен 💾"})]
    )
    notifier = notifier_for(plain_server.port, registry, tls="none")

    await notifier.send(payload, attempt())

    [received] = plain_server.mailbox.messages
    assert received.content.isascii()
    message = parsed(received.content)
    assert message["Subject"] == "[FIRING:1] ディスク容量不足"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Диск почти заполнен 💾" in text
