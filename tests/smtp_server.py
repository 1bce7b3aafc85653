"""Real SMTP servers (aiosmtpd) for the email notifier tests, with generated certificates.

``make_certificates`` writes a throwaway CA and a server certificate for 127.0.0.1 and
localhost with the ``openssl`` command. ``Mailbox`` is the server's handler: it records
every accepted message and can be told to answer RCPT or DATA with a chosen reply.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.harness import free_port, require_tool

USERNAME = "alerts"
PASSWORD = "correct horse battery staple"


@dataclass
class Certificates:
    ca: Path
    certificate: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, self.key)
        return context


def make_certificates(directory: Path) -> Certificates:
    """A CA and a server certificate signed by it, valid for a day."""
    openssl = require_tool("openssl")
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, request, certificate = (
        directory / "server.key",
        directory / "server.csr",
        directory / "server.pem",
    )
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_subject = ["-subj", "/CN=sidecar test CA"]
    signing = ["-CAcreateserial", "-out", certificate, "-days", "1", "-extfile", extensions]
    commands = [
        [openssl, "req", "-x509", *curve, "-keyout", ca_key, "-out", ca, "-days", "1", *ca_subject],
        [openssl, "req", *curve, "-keyout", key, "-out", request, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, *signing],
    ]
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return Certificates(ca, certificate, key)


@dataclass
class Received:
    mail_from: str
    recipients: list[str]
    content: bytes
    tls: bool
    authenticated: bool


@dataclass
class Mailbox:
    """aiosmtpd handler: records messages; ``rcpt_reply``/``data_reply`` inject answers."""

    messages: list[Received] = field(default_factory=list)
    rcpt_reply: str | None = None
    data_reply: str | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content or envelope.content,
                server.transport.get_extra_info("sslcontext") is not None,
                bool(session.authenticated),
            )
        )
        return "250 2.0.0 Message accepted"


def authenticate(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    good = isinstance(auth_data, LoginPassword) and (
        auth_data.login == USERNAME.encode() and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=good, handled=False)


@dataclass
class SmtpServer:
    mailbox: Mailbox
    controller: Controller
    port: int

    def stop(self) -> None:
        self.controller.stop()


def start_server(
    mode: str, certificates: Certificates | None = None, *, with_auth: bool = False
) -> SmtpServer:
    """``mode``: ``plain`` (no TLS offered), ``starttls`` (TLS required before AUTH/MAIL), or
    ``implicit`` (TLS from the first byte)."""
    mailbox = Mailbox()
    port = free_port()
    options: dict[str, Any] = {}
    if with_auth:
        options.update(authenticator=authenticate, auth_required=True, auth_require_tls=True)
    if mode == "starttls":
        assert certificates is not None
        options.update(tls_context=certificates.server_context(), require_starttls=True)
    elif mode == "implicit":
        assert certificates is not None
        # aiosmtpd only counts STARTTLS as TLS for AUTH, and warns when AUTH is required
        # without it; this connection is TLS from the first byte, so AUTH is offered, checked
        # and recorded, just not demanded.
        options.update(
            ssl_context=certificates.server_context(),
            server_hostname="localhost",
            auth_require_tls=False,
            auth_required=False,
        )
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **options)
    if mode == "implicit":
        # The readiness probe of the controller speaks TLS too; let it trust our CA.
        controller.ssl_context.load_verify_locations(certificates.ca)  # type: ignore[union-attr]
    controller.start()
    return SmtpServer(mailbox, controller, port)
