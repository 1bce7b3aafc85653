"""Discord messages built from a notification, within every documented limit by construction.

Layout: one embed per alert (colour by severity, green when resolved; title with status and
``alertname``; description from the ``summary`` and ``description`` annotations followed by
links to the source, runbook, dashboard and a prefilled Silence; one field per chosen label
or annotation; the time the alert started or ended). Embeds are packed in order into as many
messages as needed: at most 10 embeds and 6,000 characters per message. Beyond ``max_alerts``
the rest of the group is summarised in one embed that says how many alerts it covers and
links to the group in Alertmanager. Nothing is dropped without saying so.

Every limit below is Discord's documented one; lengths are counted as ``text.text_length``
does (UTF-16 units), never less than what Discord counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sidecar.alerts.payload import Alert, Notification
from sidecar.notify.templates import TemplateText, default_template, safe_url
from sidecar.notify.text import clip, escape_markdown, neutralise_mentions, single_line, text_length

if TYPE_CHECKING:
    from sidecar.notify.discord import DiscordDestination

CONTENT_LIMIT = 2000
EMBEDS_PER_MESSAGE = 10
MESSAGE_TOTAL = 6000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELDS_PER_EMBED = 25
FIELD_NAME_LIMIT = 256
FIELD_VALUE_LIMIT = 1024
FOOTER_LIMIT = 2048
MENTIONS_PER_KIND = 100
URL_LIMIT = 2048
# A link is left out of the description rather than let one URL eat the description.
LINK_LIMIT = 1024
# Room the description keeps for itself before fields get shortened to make space.
DESCRIPTION_RESERVE = 1500

RESOLVED_COLOUR = 0x2ECC71
SEVERITY_COLOURS = {
    "critical": 0xE74C3C,
    "error": 0xE74C3C,
    "page": 0xE74C3C,
    "high": 0xE67E22,
    "warning": 0xF1C40F,
    "info": 0x3498DB,
    "none": 0x95A5A6,
}
UNKNOWN_SEVERITY_COLOUR = 0xE67E22
DESCRIPTION_ANNOTATIONS = ("summary", "description")

DEFAULT_TITLE = default_template("discord_title.j2")
DEFAULT_DESCRIPTION = default_template("discord_description.j2")


@dataclass
class Message:
    """One Discord message: its JSON body and the alert fingerprint behind each embed."""

    content: str
    embeds: list[dict[str, Any]]
    fingerprints: list[str | None] = field(default_factory=list)
    mention_roles: list[str] = field(default_factory=list)
    mention_users: list[str] = field(default_factory=list)

    def body(self, username: str | None = None, avatar_url: str | None = None) -> dict[str, Any]:
        """The execute-webhook JSON: mentions allowed only for exactly the listed ids."""
        document: dict[str, Any] = {
            "content": self.content,
            "embeds": self.embeds,
            "allowed_mentions": allowed_mentions(self.mention_roles, self.mention_users),
        }
        if username:
            document["username"] = username
        if avatar_url:
            document["avatar_url"] = avatar_url
        return document


def allowed_mentions(roles: Sequence[str] = (), users: Sequence[str] = ()) -> dict[str, Any]:
    """``parse`` is always empty: nothing pings unless its id is listed here."""
    return {"parse": [], "roles": list(roles), "users": list(users)}


def embed_size(embed: Mapping[str, Any]) -> int:
    """The characters of an embed that count toward Discord's 6,000 per message."""
    size = text_length(embed.get("title", "")) + text_length(embed.get("description", ""))
    size += text_length(embed.get("footer", {}).get("text", ""))
    size += text_length(embed.get("author", {}).get("name", ""))
    for item in embed.get("fields", ()):
        size += text_length(item["name"]) + text_length(item["value"])
    return size


def render_messages(
    notification: Notification, config: DiscordDestination, *, now: datetime
) -> list[Message]:
    """All messages for one notification, in order; each within every Discord limit."""
    shown = notification.alerts[: config.max_alerts]
    hidden = notification.alerts[config.max_alerts :]
    embeds = [
        render_embed(alert, notification, config, now=now, position=(index + 1, len(shown)))
        for index, alert in enumerate(shown)
    ]
    fingerprints: list[str | None] = [alert.fingerprint or None for alert in shown]
    if hidden or notification.truncated_alerts:
        embeds.append(render_summary_embed(hidden, notification))
        fingerprints.append(None)

    messages = _pack(embeds, fingerprints)
    roles, users = mentions_for(notification, config)
    for number, message in enumerate(messages, start=1):
        part = f"Part {number} of {len(messages)}" if len(messages) > 1 else ""
        if number == 1 and (roles or users):
            message.content, message.mention_roles, message.mention_users = _ping(
                roles, users, part
            )
        else:
            message.content = part
    return messages


def _pack(embeds: list[dict[str, Any]], fingerprints: list[str | None]) -> list[Message]:
    messages: list[Message] = []
    current = Message("", [], [])
    total = 0
    for embed, fingerprint in zip(embeds, fingerprints, strict=True):
        size = embed_size(embed)
        if current.embeds and (
            len(current.embeds) == EMBEDS_PER_MESSAGE or total + size > MESSAGE_TOTAL
        ):
            messages.append(current)
            current, total = Message("", [], []), 0
        current.embeds.append(embed)
        current.fingerprints.append(fingerprint)
        total += size
    if current.embeds:
        messages.append(current)
    return messages


def _ping(roles: list[str], users: list[str], suffix: str) -> tuple[str, list[str], list[str]]:
    """Content with as many whole mentions as fit in 2,000 characters, and exactly those ids.

    Discord also takes at most 100 ids of each kind in ``allowed_mentions``.
    """
    room = CONTENT_LIMIT - (len(suffix) + 1 if suffix else 0)
    words: list[str] = []
    kept: dict[str, list[str]] = {"roles": [], "users": []}
    for kind, ids, form in (("roles", roles, "<@&{}>"), ("users", users, "<@{}>")):
        for snowflake in ids[:MENTIONS_PER_KIND]:
            word = form.format(snowflake)
            if sum(len(w) + 1 for w in words) + len(word) > room:
                break
            words.append(word)
            kept[kind].append(snowflake)
    content = " ".join([*words, suffix] if suffix else words)
    return content, kept["roles"], kept["users"]


def mentions_for(
    notification: Notification, config: DiscordDestination
) -> tuple[list[str], list[str]]:
    """Role and user ids to ping: those configured for the severities of firing alerts."""
    roles: list[str] = []
    users: list[str] = []
    severities = {alert.labels.get("severity", "") for alert in notification.firing}
    for severity, targets in config.mentions.items():
        if not severities or (severity != "*" and severity not in severities):
            continue
        roles += [role for role in targets.roles if role not in roles]
        users += [user for user in targets.users if user not in users]
    return roles, users


def render_embed(
    alert: Alert,
    notification: Notification,
    config: DiscordDestination,
    *,
    now: datetime,
    position: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """One alert as an embed within the per-embed limits and at most 6,000 characters."""
    context = {"alert": alert, "notification": notification, "now": now}
    templates = config.templates
    title = clip(single_line(_render(templates.title or DEFAULT_TITLE, context)), TITLE_LIMIT)
    body = _render(templates.description or DEFAULT_DESCRIPTION, context).strip()
    footer = clip(
        single_line(f"{notification.receiver} · alert {position[0]} of {position[1]}"),
        FOOTER_LIMIT,
    )
    fields = _fit_fields(
        _fields(alert, notification, config, context),
        MESSAGE_TOTAL
        - text_length(title)
        - text_length(footer)
        - min(text_length(body), DESCRIPTION_RESERVE),
    )
    room = min(
        DESCRIPTION_LIMIT,
        MESSAGE_TOTAL
        - text_length(title)
        - text_length(footer)
        - sum(text_length(item["name"]) + text_length(item["value"]) for item in fields),
    )
    description = _describe(body, links_line(alert, notification), room)

    embed: dict[str, Any] = {"color": colour(alert)}
    if title.strip():
        embed["title"] = title
    if description:
        embed["description"] = description
    source = safe_url(alert.generator_url)
    if source and len(source) <= URL_LIMIT:
        embed["url"] = str(source)
    if fields:
        embed["fields"] = fields
    embed["footer"] = {"text": footer}
    moment = alert.ends_at if alert.status == "resolved" and alert.ends_at else alert.starts_at
    if moment is not None:
        embed["timestamp"] = moment.isoformat()
    return embed


def _render(template: TemplateText, context: dict[str, Any]) -> str:
    return template.render("markdown", **context)


def _describe(body: str, links: str, room: int) -> str:
    if links and text_length(links) + 2 <= room // 2:
        return clip(body, room - text_length(links) - 2) + "\n\n" + links if body else links
    return clip(body, room)


def _fields(
    alert: Alert, notification: Notification, config: DiscordDestination, context: dict[str, Any]
) -> list[tuple[str, str]]:
    if config.templates.fields is not None:
        rendered = config.templates.fields.render("markdown", **context)
        pairs = []
        for line in rendered.splitlines():
            name, separator, value = line.partition(":")
            if separator and name.strip() and value.strip():
                pairs.append((name.strip(), value.strip()))
        return pairs
    names = config.labels
    if names is None:
        names = sorted(name for name in alert.labels if name != "alertname")
    pairs = [(name, alert.labels[name]) for name in names if name in alert.labels]
    pairs += [
        (name, alert.annotations[name]) for name in config.annotations if name in alert.annotations
    ]
    return [(escape_markdown(name), escape_markdown(value)) for name, value in pairs]


def _fit_fields(pairs: list[tuple[str, str]], budget: int) -> list[dict[str, Any]]:
    """At most 25 fields, each within its limits, all together within ``budget``."""
    if len(pairs) > FIELDS_PER_EMBED:
        rest = ", ".join(name for name, _ in pairs[FIELDS_PER_EMBED - 1 :])
        pairs = [
            *pairs[: FIELDS_PER_EMBED - 1],
            (f"{len(pairs) - FIELDS_PER_EMBED + 1} more", rest),
        ]
    # Discord refuses a field whose name or value is empty or blank.
    items = [
        (
            clip(single_line(name), FIELD_NAME_LIMIT) if name.strip() else "(blank)",
            clip(value, FIELD_VALUE_LIMIT) if value.strip() else "(empty)",
        )
        for name, value in pairs
    ]
    total = sum(text_length(name) + text_length(value) for name, value in items)
    if total > budget and items:
        names = sum(text_length(name) for name, _ in items)
        share = max((budget - names) // len(items), 16)
        items = [(name, clip(value, share)) for name, value in items]
    # Names alone may still not fit when there are many long ones: drop from the end.
    while items and sum(text_length(n) + text_length(v) for n, v in items) > budget:
        items.pop()
    return [{"name": name, "value": value, "inline": True} for name, value in items]


def colour(alert: Alert) -> int:
    """Green when resolved, otherwise by the ``severity`` label."""
    if alert.status == "resolved":
        return RESOLVED_COLOUR
    severity = alert.labels.get("severity", "").lower()
    return SEVERITY_COLOURS.get(severity, UNKNOWN_SEVERITY_COLOUR)


def links_line(alert: Alert, notification: Notification) -> str:
    """Markdown links: source, runbook, dashboard, and a Silence prefilled with the labels."""
    candidates = [
        ("Source", alert.generator_url),
        ("Runbook", alert.annotations.get("runbook_url", "")),
        ("Dashboard", alert.annotations.get("dashboard_url", "")),
        ("Silence", silence_url(notification.external_url, alert.labels)),
    ]
    links = []
    for label, target in candidates:
        url = safe_url(target)
        if url and len(url) <= LINK_LIMIT:
            links.append(f"[{label}]({url})")
    return " · ".join(links)


def matchers(labels: Mapping[str, str]) -> str:
    """Labels as an Alertmanager matcher list: ``{a="x",b="y"}`` with quotes escaped."""
    parts = []
    for name, value in sorted(labels.items()):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{name}="{escaped}"')
    return "{" + ",".join(parts) + "}"


def silence_url(external_url: str, labels: Mapping[str, str]) -> str:
    """The Alertmanager page that creates a silence for exactly these labels."""
    if not external_url:
        return ""
    base = f"{external_url.rstrip('/')}/#/silences/new?filter="
    url = base + quote(matchers(labels), safe="")
    if len(url) > LINK_LIMIT and "alertname" in labels:
        # A silence for the alert name alone is still useful when the labels are enormous.
        url = base + quote(matchers({"alertname": labels["alertname"]}), safe="")
    return url


def group_url(notification: Notification) -> str:
    """The Alertmanager page listing this group's alerts."""
    if not notification.external_url:
        return ""
    filter_text = quote(matchers(notification.group_labels), safe="")
    return f"{notification.external_url.rstrip('/')}/#/alerts?filter={filter_text}"


def render_summary_embed(hidden: Sequence[Alert], notification: Notification) -> dict[str, Any]:
    """One embed standing for the alerts not shown one by one; says how many and links."""
    left_out = notification.truncated_alerts
    count = len(hidden) + left_out
    firing = sum(1 for alert in hidden if alert.status == "firing")
    lines = [
        f"{count} more alert{'s' if count != 1 else ''} of this group "
        f"{'are' if count != 1 else 'is'} not shown one by one: "
        f"{firing} firing and {len(hidden) - firing} resolved listed here"
        + (f", {left_out} left out by Alertmanager (max_alerts)." if left_out else ".")
    ]
    url = safe_url(group_url(notification))
    link = f"[Open the group in Alertmanager]({url})" if url and len(url) <= LINK_LIMIT else ""
    names = sorted({alert.name for alert in hidden if alert.name})
    if names:
        lines.append("Alert names: " + ", ".join(escape_markdown(name) for name in names))
    body = "\n".join(lines)
    room = DESCRIPTION_LIMIT - (text_length(link) + 2 if link else 0)
    description = clip(body, room) + (f"\n\n{link}" if link else "")
    return {
        "title": clip(f"…and {count} more alert{'s' if count != 1 else ''}", TITLE_LIMIT),
        "description": neutralise_mentions(description),
        "color": RESOLVED_COLOUR
        if notification.status == "resolved" and not firing
        else UNKNOWN_SEVERITY_COLOUR,
        "footer": {"text": clip(single_line(f"{notification.receiver} · summary"), FOOTER_LIMIT)},
    }
