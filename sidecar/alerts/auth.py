"""Checks the credentials Alertmanager's ``http_config`` sends: bearer tokens or basic auth.

Every accepted secret is compared in constant time, and all of them are compared whatever the
outcome, so the time taken says nothing about which token nearly matched.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from sidecar.alerts.config import AuthConfig


class Authenticator:
    """Answers whether an ``Authorization`` header carries accepted credentials."""

    def __init__(self, config: AuthConfig | None) -> None:
        self.required = config is not None
        self._tokens = [t.reveal().encode() for t in config.bearer_tokens] if config else []
        self._basic = (
            [(c.username.encode(), c.password.reveal().encode()) for c in config.basic]
            if config
            else []
        )

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401."""
        schemes = []
        if self._tokens:
            schemes.append('Bearer realm="sidecar"')
        if self._basic:
            schemes.append('Basic realm="sidecar", charset="UTF-8"')
        return ", ".join(schemes)

    def check(self, header: str | None) -> str | None:
        """None if accepted, else the reason for the 401 (never echoing what was sent)."""
        if not self.required:
            return None
        if not header:
            return "missing Authorization header"
        scheme, _, credentials = header.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and self._tokens:
            given = credentials.encode("utf-8", "surrogateescape")
            matched = False
            for token in self._tokens:
                matched |= hmac.compare_digest(given, token)
            return None if matched else "invalid bearer token"
        if scheme.lower() == "basic" and self._basic:
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                return "malformed basic credentials"
            username, separator, password = decoded.partition(b":")
            if not separator:
                return "malformed basic credentials"
            matched = False
            for known_user, known_password in self._basic:
                user_ok = hmac.compare_digest(username, known_user)
                password_ok = hmac.compare_digest(password, known_password)
                matched |= user_ok and password_ok
            return None if matched else "invalid user name or password"
        return f"unsupported authorization scheme; use {self.challenge.split(' ')[0]}"
