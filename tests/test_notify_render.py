"""Discord text helpers and embed rendering: every documented limit holds by construction."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.notify.discord import DiscordDestination
from sidecar.notify.render import embed_size, mentions_for, render_messages, silence_url
from sidecar.notify.text import ELLIPSIS, clip, escape_markdown, neutralise_mentions, text_length
from tests.fake_discord import validate_message
from tests.notify_support import NOW, alert, notification

WEBHOOK = "https://discord.com/api/webhooks/123456789012345678/abcdefghijklmnopqrstuvwxyz"


def config(**fields: Any) -> DiscordDestination:
    return DiscordDestination.model_validate(
        {"name": "chat", "kind": "discord", "webhook_url": WEBHOOK, **fields}
    )


def test_clip_leaves_short_text_alone_and_cuts_long_text_with_an_ellipsis() -> None:
    assert clip("short", 10) == "short"
    assert clip("abcdefghij", 5) == "abcd" + ELLIPSIS
    assert clip("anything", 0) == ""


def test_clip_counts_astral_characters_twice_and_never_splits_them() -> None:
    text = "😀" * 10

    cut = clip(text, 6)

    assert cut == "😀😀" + ELLIPSIS
    assert text_length(cut) == 5


def test_clip_never_leaves_an_escape_backslash_before_the_ellipsis() -> None:
    escaped = escape_markdown("a*b*c*d*e*f")

    cut = clip(escaped, 5)

    assert cut == "a\\*b" + ELLIPSIS


def test_clip_closes_a_code_block_it_cuts_through() -> None:
    cut = clip("before\n```\n" + "x" * 100 + "\n```", 40)

    assert cut.endswith(ELLIPSIS + "\n```")
    assert cut.count("```") == 2
    assert text_length(cut) <= 40


@settings(max_examples=200, deadline=None)
@given(st.text(), st.integers(min_value=0, max_value=300))
def test_clip_always_fits_and_stays_valid_text(text: str, limit: int) -> None:
    cut = clip(text, limit)

    assert text_length(cut) <= limit
    cut.encode("utf-16")  # a split surrogate pair would not encode
    if cut != text and limit > 0:
        assert ELLIPSIS in cut


def test_escape_markdown_shows_text_literally_and_disarms_mentions() -> None:
    escaped = escape_markdown("**bold** _it_ ~~s~~ `c` ||sp|| > q # h [l](u)\r\n@everyone <@&1>")

    assert escaped == (
        "\\*\\*bold\\*\\* \\_it\\_ \\~\\~s\\~\\~ \\`c\\` \\|\\|sp\\|\\| \\> q \\# h \\[l\\](u)\n"
        "@\u200beveryone \\<\u200b@&1\\>"
    )


def test_neutralise_mentions_covers_every_mention_form() -> None:
    text = "@everyone @HERE <@1> <@!2> <@&3> <#4> </cmd:5>"

    assert neutralise_mentions(text) == (
        "@\u200beveryone @\u200bHERE <\u200b@1> <\u200b@!2> <\u200b@&3> <\u200b#4> <\u200b/cmd:5>"
    )


def test_mentions_come_only_from_firing_alerts_of_configured_severities() -> None:
    chat = config(
        mentions={
            "critical": {"roles": ["123456789012345678"]},
            "*": {"users": ["223456789012345678"]},
            "info": {"roles": ["323456789012345678"]},
        }
    )

    firing = mentions_for(notification([alert(), alert(index=1)]), chat)
    resolved = mentions_for(notification([alert(status="resolved")]), chat)

    assert firing == (["123456789012345678"], ["223456789012345678"])
    assert resolved == ([], [])


def test_silence_url_prefills_the_labels_and_falls_back_to_the_alert_name() -> None:
    url = silence_url("http://am:9093/", {"alertname": "A", "path": 'x"y'})
    huge = silence_url("http://am:9093", {"alertname": "A", "blob": "x" * 5000})

    assert (
        url
        == "http://am:9093/#/silences/new?filter=%7Balertname%3D%22A%22%2Cpath%3D%22x%5C%22y%22%7D"
    )
    assert huge == "http://am:9093/#/silences/new?filter=%7Balertname%3D%22A%22%7D"


def test_alertmanagers_truncated_alerts_get_a_summary_even_below_max_alerts() -> None:
    messages = render_messages(notification([alert()], truncated=4), config(), now=NOW)

    titles = [embed["title"] for embed in messages[0].embeds]
    assert titles == ["[FIRING] HighErrorRate", "…and 4 more alerts"]


def test_more_than_25_labels_end_with_a_field_naming_the_rest() -> None:
    labels = {f"label_{i:02}": "v" for i in range(40)}

    [message] = render_messages(notification([alert(labels=labels)]), config(), now=NOW)

    fields = message.embeds[0]["fields"]
    assert len(fields) == 25
    assert fields[-1]["name"] == "19 more"
    # instance, job and label_00 to label_21 fill 24 fields; 19 labels remain.
    assert fields[-1]["value"].startswith("label\\_22, label\\_23")
    assert fields[-1]["value"].endswith("label\\_39, severity")


def test_a_fields_template_turns_lines_into_fields() -> None:
    chat = config(templates={"fields": "Service: {{ alert.labels.job }}\nbroken line\nTeam: *x*"})

    [message] = render_messages(notification([alert()]), chat, now=NOW)

    assert message.embeds[0]["fields"] == [
        {"name": "Service", "value": "api", "inline": True},
        {"name": "Team", "value": "*x*", "inline": True},
    ]


def long_text(repeat: int) -> st.SearchStrategy[str]:
    """Text up to ``20 * repeat`` characters: a drawn piece repeated, cheap to generate."""
    return st.builds(
        lambda piece, times: piece * times, st.text(max_size=20), st.integers(0, repeat)
    )


label_text = long_text(150)
alerts_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "labels": st.dictionaries(st.text(min_size=1, max_size=300), label_text, max_size=40),
            "summary": long_text(250),
            "description": long_text(600),
            "status": st.sampled_from(["firing", "resolved"]),
        }
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    alerts_strategy, st.integers(min_value=1, max_value=30), st.integers(min_value=0, max_value=50)
)
def test_every_rendered_message_is_accepted_by_discords_limits(
    drawn: list[dict[str, Any]], max_alerts: int, truncated: int
) -> None:
    payload = notification(
        [
            alert(
                index=i,
                status=a["status"],
                labels=a["labels"],
                annotations={"summary": a["summary"], "description": a["description"]},
            )
            for i, a in enumerate(drawn)
        ],
        truncated=truncated,
    )
    chat = config(max_alerts=max_alerts, mentions={"*": {"users": ["223456789012345678"]}})

    messages = render_messages(payload, chat, now=NOW)

    for message in messages:
        assert validate_message(message.body(), require_content=True) is None
        assert sum(embed_size(e) for e in message.embeds) <= 6000
    shown = [f for m in messages for f in m.fingerprints if f is not None]
    expected = [a.fingerprint for a in payload.alerts[:max_alerts]]
    assert shown == expected
    has_summary = len(payload.alerts) > max_alerts or truncated > 0
    assert (messages[-1].fingerprints[-1] is None) is has_summary


def test_many_mentions_are_kept_whole_within_the_content_limit() -> None:
    roles = [f"1{i:017d}" for i in range(100)]
    users = [f"2{i:017d}" for i in range(100)]
    chat = config(mentions={"*": {"roles": roles, "users": users}}, max_alerts=10)

    messages = render_messages(notification([alert(index=i) for i in range(15)]), chat, now=NOW)

    first = messages[0]
    assert len(first.content) <= 2000
    assert first.content.endswith(" Part 1 of 2")
    mentioned = first.content.removesuffix(" Part 1 of 2").split(" ")
    assert mentioned == [f"<@&{r}>" for r in first.mention_roles] + [
        f"<@{u}>" for u in first.mention_users
    ]
    assert first.mention_roles == roles[: len(first.mention_roles)]
    assert 80 < len(first.mention_roles) + len(first.mention_users) < 200
    assert messages[1].mention_roles == []
    assert validate_message(first.body(), require_content=True) is None


def test_an_enormous_summary_is_cut_inside_its_bold_markers() -> None:
    payload = notification([alert(annotations={"summary": "s" * 9000, "description": "d" * 9000})])

    [message] = render_messages(payload, config(), now=NOW)

    description = message.embeds[0]["description"]
    assert description.startswith("**" + "s" * 999 + "…**\n")
    assert text_length(description) <= 4096
