"""Log output: JSON lines or text, and no secret ever reaches either."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from sidecar.logs import REDACTED, configure_logging, redact

WEBHOOK = "https://discord.com/api/webhooks/123456789/AbC-def_GHI.jkl"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_webhook_tokens_and_url_credentials_are_removed() -> None:
    text = f"posting to {WEBHOOK} and redis://user:hunter2@redis:6379/0"

    cleaned = redact(text)

    assert "AbC-def_GHI.jkl" not in cleaned and "hunter2" not in cleaned
    assert f"/api/webhooks/123456789/{REDACTED}" in cleaned
    assert f"redis://{REDACTED}@redis:6379/0" in cleaned


def test_configured_secrets_are_removed_from_messages_arguments_and_tracebacks(
    restore_logging: None,
) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", secrets=["s3cr3t-token", "ab"], stream=stream)
    logger = logging.getLogger("sidecar.test")

    logger.info("token is %s", "s3cr3t-token")
    try:
        raise ValueError("failed with s3cr3t-token")
    except ValueError:
        logger.exception("delivery to %s failed", WEBHOOK)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == f"token is {REDACTED}"
    assert "s3cr3t-token" not in stream.getvalue()
    assert "AbC-def_GHI" not in stream.getvalue()
    assert "ValueError: failed with <redacted>" in lines[1]["exception"]
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "sidecar.test"


def test_short_values_are_not_treated_as_secrets(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "text", secrets=["ab"], stream=stream)

    logging.getLogger("sidecar.test").info("about abc")

    assert "about abc" in stream.getvalue()


def test_extra_fields_appear_in_json(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)

    logging.getLogger("sidecar.test").info("delivered", extra={"destination": "ops", "attempt": 2})

    line = json.loads(stream.getvalue())
    assert (line["destination"], line["attempt"]) == ("ops", 2)


def test_level_filters_lines(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("warning", "text", stream=stream)

    logging.getLogger("sidecar.test").info("hidden")
    logging.getLogger("sidecar.test").warning("shown")

    assert "hidden" not in stream.getvalue()
    assert "WARNING sidecar.test: shown" in stream.getvalue()
