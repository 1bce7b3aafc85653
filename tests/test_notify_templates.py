"""Template helpers, flavours and the sandbox; and the local rate-limit budget."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from jinja2 import TemplateError

from sidecar.notify.ratelimit import LocalBudget, budget_key
from sidecar.notify.templates import TemplateText, format_duration, format_labels, safe_url
from tests.notify_support import NOW, alert, notification


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0s"),
        (42.9, "42s"),
        (65, "1m 5s"),
        (3900, "1h 5m"),
        (90061, "1d 1h"),
        (timedelta(hours=2), "2h"),
        (None, ""),
        (-5, "0s"),
    ],
)
def test_duration_is_written_for_people(value: float | timedelta | None, text: str) -> None:
    assert format_duration(value) == text


def test_labels_are_sorted_and_can_exclude_names() -> None:
    assert (
        format_labels({"b": "2", "a": "1", "alertname": "X"}, exclude=["alertname"]) == "a=1, b=2"
    )


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://grafana.example/d/x?a=1&b=2", "https://grafana.example/d/x?a=1&b=2"),
        ("http://h/a b(c)", "http://h/a%20b%28c%29"),
        ("javascript:alert(1)", ""),
        ("data:text/html,<script>", ""),
        ("//evil.example/x", ""),
        ("https://", ""),
        ("http://[::1", ""),
        ("", ""),
    ],
)
def test_url_keeps_only_http_links_and_encodes_what_would_break_markup(url: str, kept: str) -> None:
    assert safe_url(url) == kept


def test_markdown_flavour_escapes_values_but_not_the_template_text() -> None:
    template = TemplateText(
        "**{{ alert.annotations.summary }}** [Runbook]({{ alert.annotations.runbook_url|url }})"
    )
    payload = notification([alert(annotations={"summary": "*x* @everyone"})])

    text = template.render("markdown", alert=payload.alerts[0], notification=payload, now=NOW)

    assert text == (
        "**\\*x\\* @\u200beveryone** [Runbook](https://runbooks.example.org/api/high-error-rate)"
    )


def test_html_flavour_autoescapes_and_text_flavour_does_not() -> None:
    template = TemplateText("{{ notification.receiver }}")
    payload = notification([alert()], receiver="<b>&")

    assert template.render("html", notification=payload, now=NOW) == "&lt;b&gt;&amp;"
    assert template.render("text", notification=payload, now=NOW) == "<b>&"


def test_since_and_time_use_the_given_now() -> None:
    template = TemplateText("{{ since(alert.starts_at) }} / {{ alert.starts_at|time }}")
    payload = notification([alert()])

    assert (
        template.render("text", alert=payload.alerts[0], now=NOW) == "12m / 2026-12-03 16:18:00 UTC"
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ notification.__class__.__init__.__globals__ }}",
        "{{ notification.alerts.clear() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ],
)
def test_the_sandbox_refuses_internals_and_mutation(source: str) -> None:
    payload = notification([alert()])

    with pytest.raises(TemplateError):
        TemplateText(source).render("text", notification=payload, now=NOW)


async def test_local_budget_discovers_then_spends_the_bucket() -> None:
    budget = LocalBudget()

    first = await budget.take()
    waiting_for_headers = await budget.take()
    await budget.observe(limit=3, remaining=2, reset_after=5.0)
    spent = [await budget.take(), await budget.take()]
    empty = await budget.take()

    assert first == 0
    assert 0 < waiting_for_headers <= 0.05
    assert spent == [0, 0]
    assert 4.9 < empty <= 5.0


async def test_local_budget_starts_a_new_window_once_the_reset_has_passed() -> None:
    budget = LocalBudget()
    await budget.take()
    await budget.observe(limit=2, remaining=1, reset_after=0.2)
    assert await budget.take() == 0
    wait = await budget.take()

    await asyncio.sleep(wait)
    taken = [await budget.take(), await budget.take()]
    after = await budget.take()

    # The new window has the known size: two requests, then a wait for its reset.
    assert 0 < wait <= 0.2
    assert taken == [0, 0]
    assert 0.15 < after <= 0.2


async def test_a_429_blocks_the_budget_for_retry_after() -> None:
    budget = LocalBudget()
    await budget.take()
    await budget.observe(limit=5, remaining=4, reset_after=2.0)

    await budget.block(7.5)

    assert 7.4 < await budget.take() <= 7.5


def test_the_redis_key_of_a_budget_never_holds_the_token() -> None:
    url = "https://discord.com/api/webhooks/123456789012345678/secret-token-value"

    key = budget_key("sidecar:", url)

    assert key.startswith("sidecar:discord:ratelimit:")
    assert "secret" not in key
    assert key == budget_key("sidecar:", url + "?wait=true")


async def test_an_answer_without_headers_ends_the_discovery_wait() -> None:
    budget = LocalBudget()
    await budget.take()
    assert await budget.take() > 0

    await budget.answered()

    assert await budget.take() == 0
