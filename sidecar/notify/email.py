"""Delivery by email through an SMTP smarthost (aiosmtplib).

Each notification becomes one ``multipart/alternative`` message with a text/plain and an
HTML part, both from Jinja2 templates; the HTML is autoescaped and self-contained (inline
styles, no remote images). Messages of one alert group form a thread: the ``Message-ID`` is
derived from the group and the notification's content (so a retried delivery keeps its id),
and ``In-Reply-To``/``References`` point at the group's first message, remembered in the
notifier state.

TLS is required by default (STARTTLS); ``implicit`` speaks TLS from the first byte (port
465); ``none`` sends in clear text and is refused with a password unless the smarthost is on
loopback. SMTP answers are classified for the dispatcher: 4xx replies and connection
problems are retryable, 5xx replies (including a rejected login) permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, getaddresses, parseaddr
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from prometheus_client import CollectorRegistry
from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from sidecar.alerts.payload import Alert, Notification
from sidecar.fields import Duration, Secret, is_loopback_host
from sidecar.notify.base import Attempt, Delivered, DeliveryError, DestinationConfig, NotifierState
from sidecar.notify.metrics import notifier_metrics
from sidecar.notify.render import group_url, silence_url
from sidecar.notify.templates import Flavour, TemplateSection, TemplateText, default_template
from sidecar.notify.text import clip, single_line

logger = logging.getLogger(__name__)

SUBJECT_LIMIT = 250
THREAD_RECORD_TTL = 30 * 86400.0
DEFAULT_MAX_ALERTS = 50
DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-[]:")

DEFAULT_SUBJECT = default_template("email_subject.j2")
DEFAULT_TEXT = default_template("email_text.j2")
DEFAULT_HTML = default_template("email_html.j2")


def _check_address(value: str) -> str:
    if any(char in value for char in "\r\n\x00"):
        raise ValueError("must not contain line breaks")
    name, address = parseaddr(value)
    if not address or len(getaddresses([value])) != 1:
        raise ValueError(f"is not one email address: {value!r}")
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in address):
        raise ValueError(f"is not an email address such as alerts@example.org: {value!r}")
    try:
        Address(display_name=name, addr_spec=address)
    except (ValueError, IndexError) as error:
        raise ValueError(f"is not a valid email address: {value!r} ({error})") from None
    return value


EmailAddress = Annotated[str, Field(max_length=320), AfterValidator(_check_address)]


class EmailTemplates(TemplateSection):
    """Jinja2 templates replacing the default email; each also accepts ``<name>_file``.

    Context: ``notification``, ``now``, ``alerts`` (the alerts to list, at most
    ``max_alerts``), ``hidden`` (how many are not listed), ``subject``, and the functions
    ``silence_url(alert)`` and ``group_url()``. The HTML template is autoescaped.
    """

    flavours: ClassVar[dict[str, tuple[Flavour, Literal["alert", "notification"]]]] = {
        "subject": ("text", "notification"),
        "text": ("text", "notification"),
        "html": ("html", "notification"),
    }

    subject: TemplateText | None = None
    """Subject line (line breaks removed, cut at 250 characters)."""

    text: TemplateText | None = None
    """The text/plain part."""

    html: TemplateText | None = None
    """The text/html part (autoescaped)."""

    @classmethod
    def extra_context(cls, notification: Notification) -> dict[str, Any]:
        return template_context(notification, subject="sample subject")


class EmailDestination(DestinationConfig):
    """Recipients reached through an SMTP smarthost."""

    kind: Literal["email"]
    """Selects this destination type."""

    smarthost: Annotated[str, Field(min_length=1, max_length=253)]
    """Host name or address of the SMTP server."""

    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """SMTP port (default: 587 for `starttls`, 465 for `implicit`, 25 for `none`)."""

    tls: Literal["starttls", "implicit", "none"] = "starttls"
    """`starttls` upgrades the connection and fails if the server cannot; `implicit` speaks
    TLS from the start (port 465); `none` sends in clear text."""

    ca_file: Path | None = None
    """CA certificates (PEM) to verify the server with, instead of the system's (relative to
    the configuration file)."""

    username: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Login name for SMTP AUTH; needs `password`."""

    password: Secret | None = None
    """Password for SMTP AUTH; prefer `password_file` or `password_env`."""

    helo: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """Name sent in EHLO/HELO (default: this machine's name)."""

    sender: EmailAddress
    """The From address, such as `Alerts <alerts@example.org>`."""

    to: Annotated[list[EmailAddress], Field(min_length=1, max_length=100)]
    """Recipient addresses."""

    timeout: Duration = 10.0
    """Time limit of each SMTP step (connect, each command)."""

    max_alerts: Annotated[int, Field(ge=1, le=1000)] = DEFAULT_MAX_ALERTS
    """Alerts listed one by one; the rest of a larger group is counted with a link to the
    group in Alertmanager."""

    templates: EmailTemplates = EmailTemplates()
    """Template overrides for the subject, text and HTML parts."""

    @field_validator("helo", "smarthost")
    @classmethod
    def _check_hostname(cls, value: str | None) -> str | None:
        if value is not None and not set(value) <= _HOSTNAME_CHARS:
            raise ValueError("must be a host name or address")
        return value

    @field_validator("ca_file")
    @classmethod
    def _check_ca_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base_dir = (info.context or {}).get("base_dir")
        if value is not None and base_dir is not None and not value.is_absolute():
            # Like secret and template files: relative to the configuration file.
            value = Path(base_dir) / value
        if value is not None:
            try:
                ssl.create_default_context(cafile=str(value))
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"cannot load CA certificates from {value}: {error}") from None
        return value

    @model_validator(mode="after")
    def _check_authentication(self) -> EmailDestination:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        if (
            self.password is not None
            and self.tls == "none"
            and not is_loopback_host(self.smarthost)
        ):
            raise ValueError(
                "refusing to send a password in clear text: use tls starttls or implicit"
            )
        if self.ca_file is not None and self.tls == "none":
            raise ValueError("ca_file is only used with tls starttls or implicit")
        return self

    @property
    def effective_port(self) -> int:
        """The port to connect to."""
        return self.port or DEFAULT_PORTS[self.tls]


def template_context(
    notification: Notification, subject: str, max_alerts: int = DEFAULT_MAX_ALERTS
) -> dict[str, Any]:
    """What the email templates see besides ``notification`` and ``now``: ``alerts`` (the
    first ``max_alerts``), ``hidden`` (how many more there are, including those Alertmanager
    left out), ``subject``, ``silence_url(alert)`` and ``group_url()``."""
    silence: Callable[[Alert], str] = lambda alert: silence_url(  # noqa: E731
        notification.external_url, alert.labels
    )
    shown = notification.alerts[:max_alerts]
    return {
        "subject": subject,
        "alerts": shown,
        "hidden": len(notification.alerts) - len(shown) + notification.truncated_alerts,
        "silence_url": silence,
        "group_url": lambda: group_url(notification),
    }


def group_id(notification: Notification) -> str:
    """A stable identifier of the alert group at this receiver."""
    key = f"{notification.receiver}\x00{notification.group_key}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def message_id(notification: Notification, domain: str) -> str:
    """Deterministic per group and notification content: a retry keeps the same id."""
    content = hashlib.sha256(notification.to_json().encode()).hexdigest()[:16]
    return f"<{group_id(notification)}.{content}@{domain}>"


def render_email(
    notification: Notification,
    config: EmailDestination,
    *,
    now: datetime,
    thread_root: str | None = None,
) -> EmailMessage:
    """The complete message; ``thread_root`` is the group's first Message-ID, if known."""
    templates = config.templates
    context = template_context(notification, subject="", max_alerts=config.max_alerts)
    raw_subject = (templates.subject or DEFAULT_SUBJECT).render(
        "text", notification=notification, now=now, **context
    )
    # Header safety: a line break in a header would start a new header (header injection).
    subject = clip(single_line(raw_subject.replace("\x00", "")), SUBJECT_LIMIT)
    context["subject"] = subject
    text = (templates.text or DEFAULT_TEXT).render(
        "text", notification=notification, now=now, **context
    )
    html = (templates.html or DEFAULT_HTML).render(
        "html", notification=notification, now=now, **context
    )

    domain = parseaddr(config.sender)[1].rpartition("@")[2]
    message = EmailMessage(policy=SMTP_POLICY)
    message["Subject"] = subject
    message["From"] = config.sender
    message["To"] = ", ".join(config.to)
    message["Date"] = format_datetime(now.astimezone(UTC))
    own_id = message_id(notification, domain)
    message["Message-ID"] = own_id
    if thread_root and thread_root != own_id:
        message["In-Reply-To"] = thread_root
        message["References"] = thread_root
    # RFC 3834: machine-generated, so auto-responders do not answer it.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Alert-Status"] = notification.status
    message.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    message.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    return message


class EmailNotifier:
    """Sends each notification as one email over a fresh SMTP connection."""

    kind = "email"

    def __init__(
        self, config: EmailDestination, *, state: NotifierState, registry: CollectorRegistry
    ) -> None:
        self.config = config
        self.name = config.name
        self.send_resolved = config.send_resolved
        self._state = state
        self._requests = notifier_metrics(registry).requests
        self._tls_context = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None
        )

    async def send(self, notification: Notification, attempt: Attempt) -> Delivered:
        """Compose and send; raise ``DeliveryError`` classified by the SMTP answer."""
        thread_key = f"email:{self.name}:thread:{group_id(notification)}"
        thread_root = await self._state.get(thread_key)
        message = render_email(
            notification, self.config, now=datetime.now(UTC), thread_root=thread_root
        )

        code = await self._deliver(message)

        if thread_root is None:
            await self._state.set(thread_key, str(message["Message-ID"]), ttl=THREAD_RECORD_TTL)
        logger.info(
            "delivered %s notification of %d alerts to email destination %s (%d recipients)",
            notification.status,
            len(notification.alerts),
            self.name,
            len(self.config.to),
        )
        return Delivered(status=code, message_ids=[str(message["Message-ID"])])

    async def close(self) -> None:
        """Nothing to release: every delivery opens and closes its own connection."""

    async def _deliver(self, message: EmailMessage) -> int:
        # aiosmtplib is imported with the first email, not by every sidecar that starts.
        import aiosmtplib

        config = self.config
        password = config.password.reveal() if config.password else None
        try:
            client = aiosmtplib.SMTP(
                hostname=config.smarthost,
                port=config.effective_port,
                username=config.username,
                password=password,
                local_hostname=config.helo,
                timeout=config.timeout,
                use_tls=config.tls == "implicit",
                start_tls=config.tls == "starttls",
                tls_context=self._tls_context if config.tls != "none" else None,
            )
            try:
                await client.connect()
                refused, _reply = await client.send_message(message)
                with contextlib.suppress(aiosmtplib.SMTPException):
                    await client.quit()
            finally:
                await _release(client)
        except aiosmtplib.SMTPRecipientsRefused as error:
            codes = [refusal.code for refusal in error.recipients]
            self._count(str(max(codes, default=0)) if codes else "error")
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in error.recipients)
            raise DeliveryError(
                f"SMTP server refused every recipient: {detail}",
                retryable=any(400 <= code < 500 for code in codes),
                status=max(codes, default=None),
            ) from error
        except aiosmtplib.SMTPAuthenticationError as error:
            self._count(str(error.code))
            raise DeliveryError(
                f"SMTP login as {config.username} failed ({error.code} {error.message}); "
                "check username and password",
                retryable=400 <= error.code < 500,
                status=error.code,
            ) from error
        except aiosmtplib.SMTPResponseException as error:
            self._count(str(error.code))
            kind = "temporarily" if 400 <= error.code < 500 else "permanently"
            raise DeliveryError(
                f"SMTP server {kind} refused the message ({error.code} {error.message})",
                retryable=not 500 <= error.code < 600,
                status=error.code,
            ) from error
        except aiosmtplib.SMTPNotSupported as error:
            self._count("error")
            raise DeliveryError(
                f"SMTP server {config.smarthost}:{config.effective_port} does not support what "
                f"tls: {config.tls} needs ({error}); check tls and port",
                retryable=False,
            ) from error
        except (aiosmtplib.SMTPException, OSError) as error:
            self._count("error")
            if type(error) is aiosmtplib.SMTPException:
                # The bare base class is how aiosmtplib reports a session the server cannot
                # hold as configured (no AUTH offered): retrying changes nothing.
                raise DeliveryError(
                    f"SMTP server {config.smarthost}:{config.effective_port} cannot serve this "
                    f"session as configured (tls: {config.tls}): {error}",
                    retryable=False,
                ) from error
            cause = error.__cause__ or error.__context__
            certificate = isinstance(cause, ssl.SSLCertVerificationError) or isinstance(
                error, ssl.SSLCertVerificationError
            )
            if certificate:
                raise DeliveryError(
                    f"cannot verify the TLS certificate of {config.smarthost}: {cause or error}; "
                    "set ca_file to the CA that signed it",
                    retryable=False,
                ) from error
            raise DeliveryError(
                f"cannot talk to SMTP server {config.smarthost}:{config.effective_port} "
                f"({type(error).__name__}): {error}",
                retryable=True,
            ) from error

        # aiosmtplib returns the final reply's text only; reaching here means 250 to DATA.
        self._count("250")
        if refused:
            logger.warning(
                "email destination %s: some recipients were refused: %s",
                self.name,
                "; ".join(
                    f"{address}: {answer.code} {answer.message}"
                    for address, answer in refused.items()
                ),
            )
        return 250

    def _count(self, code: str) -> None:
        self._requests.labels(self.name, self.kind, code).inc()


async def _release(client: Any) -> None:
    """Close an SMTP connection now, whatever state an error left it in.

    ``close()`` on a TLS transport starts a shutdown that finishes on later loop iterations,
    and a connection abandoned after a refused command would otherwise wait for the garbage
    collector. Aborting drops it at once; one pass of the loop runs the callback that closes
    the socket.
    """
    transport = client.transport
    if transport is not None:
        transport.abort()
    client.close()
    await asyncio.sleep(0)
