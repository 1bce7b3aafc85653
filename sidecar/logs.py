"""Log handlers for the entry point: readable text on a terminal, JSON lines in production.

Library modules only call ``logging.getLogger(__name__)``; ``configure_logging`` is called once
by the command line. A redaction filter on the handler removes every configured secret and
anything shaped like a Discord webhook token or URL credentials, whoever logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

REDACTED = "<redacted>"
_WEBHOOK_TOKEN = re.compile(r"(/api/webhooks/\d+/)[A-Za-z0-9_.\-]+")
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.\-]*://)[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secret values, webhook tokens and URL credentials from ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _WEBHOOK_TOKEN.sub(rf"\g<1>{REDACTED}", text)
    return _URL_CREDENTIALS.sub(rf"\g<1>{REDACTED}@", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message and exception text with secrets removed."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so that a secret containing another is removed whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                document[key] = (
                    value if isinstance(value, int | float | bool | None) else str(value)
                )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        return json.dumps(document, ensure_ascii=False)


def configure_logging(
    level: str = "info",
    log_format: str = "text",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Send every log line to ``stream`` (standard error) through one redacting handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter(secrets))
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn configures its own loggers unless told not to; route them through ours. Its
    # start and stop lines repeat what the sidecar logs itself, so they show only at debug.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    logging.getLogger("uvicorn.error").setLevel(quiet)
    # httpx logs every request with its full URL, and a Discord webhook URL is a credential.
    # The filter would redact it; keeping those lines at WARNING avoids producing them at all.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
