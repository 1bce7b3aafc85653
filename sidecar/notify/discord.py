"""Delivery to a Discord channel through a webhook.

Each notification becomes one or more messages (see ``render``), posted in order with
``?wait=true`` so that Discord returns each message and its id. Message ids are kept in the
notifier state: a retried delivery skips the messages already posted, and with
``on_resolve: edit`` a resolved alert's firing message is edited (PATCH) to show it resolved.

Answers are classified for the dispatcher: 2xx delivered; 429 waited out once within the
attempt, then retryable with Discord's ``retry_after``; 5xx and network errors retryable;
400 (Discord's error body is logged), 401, 403, 404 and other 4xx permanent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from pydantic import Field, field_validator

from sidecar import __version__
from sidecar.alerts.payload import Alert, Notification
from sidecar.fields import Duration, Secret, Section, is_loopback_host
from sidecar.logs import redact
from sidecar.notify.base import Attempt, Delivered, DeliveryError, DestinationConfig, NotifierState
from sidecar.notify.metrics import notifier_metrics
from sidecar.notify.ratelimit import Budget, LocalBudget, RedisBudget, budget_key
from sidecar.notify.render import (
    MESSAGE_TOTAL,
    Message,
    allowed_mentions,
    embed_size,
    render_embed,
    render_messages,
)
from sidecar.notify.templates import Flavour, TemplateSection, TemplateText

if TYPE_CHECKING:
    import httpx
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

Snowflake = Annotated[str, Field(pattern=r"^[0-9]{15,21}$")]
_WEBHOOK_PATH = re.compile(r"^/api(?:/v[0-9]+)?/webhooks/[0-9]{15,21}/[A-Za-z0-9_.\-]{20,100}$")
# Discord keeps webhook messages; the firing message of an alert is worth editing for a week.
MESSAGE_RECORD_TTL = 7 * 86400.0
# Long enough to outlive every retry of one delivery.
SENT_RECORD_TTL = 2 * 86400.0
ERROR_BODY_LIMIT = 1000
MAX_RETRY_AFTER = 3600.0


class MentionTargets(Section):
    """Who is pinged for one severity."""

    roles: Annotated[list[Snowflake], Field(max_length=100)] = Field(default_factory=list)
    """Role ids to ping (Discord allows at most 100 per message)."""

    users: Annotated[list[Snowflake], Field(max_length=100)] = Field(default_factory=list)
    """User ids to ping (Discord allows at most 100 per message)."""


class DiscordTemplates(TemplateSection):
    """Jinja2 templates replacing parts of the default embed; each also accepts ``<name>_file``.

    Context: ``alert``, ``notification``, ``now``. Values are escaped for Discord markdown;
    pass link targets through the ``url`` filter.
    """

    flavours: ClassVar[dict[str, tuple[Flavour, Literal["alert", "notification"]]]] = {
        "title": ("markdown", "alert"),
        "description": ("markdown", "alert"),
        "fields": ("markdown", "alert"),
    }

    title: TemplateText | None = None
    """Embed title (one line, cut at 256 characters)."""

    description: TemplateText | None = None
    """Embed description above the links (cut to fit 4,096 characters)."""

    fields: TemplateText | None = None
    """Embed fields: each output line ``name: value`` becomes one field (25 at most)."""


class DiscordDestination(DestinationConfig):
    """A Discord channel reached through a webhook."""

    kind: Literal["discord"]
    """Selects this destination type."""

    webhook_url: Secret
    """Webhook URL ``https://discord.com/api/webhooks/ID/TOKEN``; prefer `webhook_url_file` or
    `webhook_url_env`. The token is never logged."""

    username: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    """Name shown as the message author instead of the webhook's own."""

    avatar_url: str | None = None
    """Image shown as the author's avatar (http or https)."""

    thread_id: Snowflake | None = None
    """Post into this thread of the webhook's channel."""

    mentions: dict[str, MentionTargets] = Field(default_factory=dict)
    """Pings by `severity` label value of firing alerts (`"*"` for every severity). Only
    these ids can ever be pinged; alert text never pings anyone."""

    labels: list[str] | None = None
    """Labels shown as embed fields, in this order (default: all except `alertname`)."""

    annotations: list[str] = Field(default_factory=list)
    """Annotations shown as embed fields besides `summary` and `description`."""

    max_alerts: Annotated[int, Field(ge=1, le=1000)] = 50
    """Alerts shown one embed each; the rest of a larger group is summarised in one embed
    with its count and a link to the group in Alertmanager."""

    on_resolve: Literal["post", "edit", "edit_and_post"] = "post"
    """When an alert resolves: post a new message, edit its firing message to show it
    resolved, or both."""

    timeout: Duration = 10.0
    """Time limit of one HTTP request to Discord."""

    max_rate_limit_wait: Duration = 30.0
    """Longest wait for the rate limit within one attempt; beyond it the attempt fails as
    retryable and the dispatcher tries again later."""

    templates: DiscordTemplates = DiscordTemplates()
    """Template overrides for the embed title, description and fields."""

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: Secret) -> Secret:
        # Messages never include the value: it holds the webhook token.
        try:
            parts = urlsplit(value.reveal())
        except ValueError:
            raise ValueError("is not a URL") from None
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(
                "must be an https URL such as https://discord.com/api/webhooks/ID/TOKEN"
            )
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError("must use https (plain http is only accepted on loopback)")
        if not _WEBHOOK_PATH.match(parts.path):
            raise ValueError("must have the path /api/webhooks/ID/TOKEN")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query; set thread_id instead")
        return value

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str | None) -> str | None:
        # Discord refuses webhook usernames containing these words.
        if value is not None and any(word in value.lower() for word in ("discord", "clyde")):
            raise ValueError('must not contain "discord" or "clyde" (Discord refuses them)')
        return value

    @field_validator("avatar_url")
    @classmethod
    def _check_avatar_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http or https URL")
        return value


class DiscordNotifier:
    """Posts notifications to one Discord webhook; one HTTP client, requests in sequence.

    Requests to the webhook are serialised: Discord's bucket for a webhook is small (about
    five requests per two seconds), and sending one at a time lets each answer's headers
    decide when the next may go. With ``redis``, replicas share the bucket's budget.
    """

    kind = "discord"

    def __init__(
        self,
        config: DiscordDestination,
        *,
        state: NotifierState,
        registry: CollectorRegistry,
        redis: Redis | None = None,
        key_prefix: str = "sidecar:",
    ) -> None:
        self.config = config
        self.name = config.name
        self.send_resolved = config.send_resolved
        self._state = state
        self._url = config.webhook_url.reveal()
        # httpx is imported only when a Discord destination exists (about 3 MB resident).
        import httpx

        self._http_errors = httpx.HTTPError
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout),
            headers={"User-Agent": f"sidecar/{__version__}"},
            follow_redirects=False,
        )
        self._lock = asyncio.Lock()
        local = LocalBudget()
        self._budget: Budget = (
            RedisBudget(redis, budget_key(key_prefix, self._url), local) if redis else local
        )
        metrics = notifier_metrics(registry)
        self._requests = metrics.requests
        self._rate_limited = metrics.rate_limited
        self._wait_seconds = metrics.rate_limit_wait.labels(config.name)
        self._created = metrics.messages.labels(config.name, "create")
        self._edited = metrics.messages.labels(config.name, "edit")

    async def send(self, notification: Notification, attempt: Attempt) -> Delivered:
        """Post (or edit) every message of ``notification``; raise ``DeliveryError``."""
        now = datetime.now(UTC)
        message_ids: list[str] = []
        if self.config.on_resolve != "post" and notification.resolved:
            edited = await self._edit_resolved(notification, now, message_ids)
            if self.config.on_resolve == "edit" and edited:
                remaining = [a for a in notification.alerts if a.fingerprint not in edited]
                if not remaining:
                    return Delivered(status=200, message_ids=message_ids)
                notification = notification.model_copy(update={"alerts": remaining})

        messages = render_messages(notification, self.config, now=now)
        for index, message in enumerate(messages):
            sent_key = f"discord:{self.name}:sent:{attempt.delivery_id}:{index}"
            already = await self._state.get(sent_key)
            if already is not None:
                if previous_id := json.loads(already):
                    message_ids.append(previous_id)
                continue
            answer = await self._request("POST", self._execute_url(), self._body(message))
            message_id = str(answer.get("id", ""))
            self._created.inc()
            await self._state.set(sent_key, json.dumps(message_id), ttl=SENT_RECORD_TTL)
            if message_id:
                message_ids.append(message_id)
                if self.config.on_resolve != "post":
                    await self._remember(notification, message, message_id)
        logger.info(
            "delivered %s notification of %d alerts to Discord destination %s in %d messages",
            notification.status,
            len(notification.alerts),
            self.name,
            len(messages),
        )
        return Delivered(status=200, message_ids=message_ids)

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    def _body(self, message: Message) -> dict[str, Any]:
        return message.body(self.config.username, self.config.avatar_url)

    def _execute_url(self) -> str:
        query = "?wait=true"
        if self.config.thread_id:
            query += f"&thread_id={self.config.thread_id}"
        return self._url + query

    def _message_url(self, message_id: str) -> str:
        query = f"?thread_id={self.config.thread_id}" if self.config.thread_id else ""
        return f"{self._url}/messages/{message_id}{query}"

    def _alert_key(self, notification: Notification, alert: Alert) -> str:
        group = hashlib.sha256(notification.group_key.encode()).hexdigest()[:16]
        return f"discord:{self.name}:alert:{group}:{alert.fingerprint}"

    async def _remember(
        self, notification: Notification, message: Message, message_id: str
    ) -> None:
        """Keep what an edit needs: which message shows each firing alert, and its embeds."""
        record = {"embeds": message.embeds, "fingerprints": message.fingerprints}
        await self._state.set(
            f"discord:{self.name}:message:{message_id}", json.dumps(record), ttl=MESSAGE_RECORD_TTL
        )
        by_fingerprint = {a.fingerprint: a for a in notification.alerts if a.fingerprint}
        for fingerprint in message.fingerprints:
            alert = by_fingerprint.get(fingerprint or "")
            if alert is not None and alert.status == "firing":
                await self._state.set(
                    self._alert_key(notification, alert), message_id, ttl=MESSAGE_RECORD_TTL
                )

    async def _edit_resolved(
        self, notification: Notification, now: datetime, message_ids: list[str]
    ) -> set[str]:
        """Edit the firing messages of resolved alerts; return the fingerprints edited."""
        by_message: dict[str, list[Alert]] = {}
        for alert in notification.resolved:
            if not alert.fingerprint:
                continue
            message_id = await self._state.get(self._alert_key(notification, alert))
            if message_id:
                by_message.setdefault(message_id, []).append(alert)

        edited: set[str] = set()
        for message_id, alerts in by_message.items():
            key = f"discord:{self.name}:message:{message_id}"
            stored = await self._state.get(key)
            if stored is None:
                continue
            record = json.loads(stored)
            embeds, fingerprints = record["embeds"], record["fingerprints"]
            for alert in alerts:
                index = fingerprints.index(alert.fingerprint)
                embeds[index] = render_embed(alert, notification, self.config, now=now)
            if sum(embed_size(embed) for embed in embeds) > MESSAGE_TOTAL:
                # The resolved embeds are longer than the firing ones were; post them anew.
                continue
            body = {"embeds": embeds, "allowed_mentions": allowed_mentions()}
            try:
                await self._request("PATCH", self._message_url(message_id), body)
            except DeliveryError as error:
                if error.status != 404:
                    raise
                # Someone deleted the firing message: the resolved alerts are posted anew.
                logger.info(
                    "Discord destination %s: message %s is gone, posting instead of editing",
                    self.name,
                    message_id,
                )
                continue
            self._edited.inc()
            await self._state.set(key, json.dumps(record), ttl=MESSAGE_RECORD_TTL)
            edited.update(alert.fingerprint for alert in alerts)
            message_ids.append(message_id)
        return edited

    async def _request(self, method: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            for try_number in (1, 2):
                await self._wait_for_budget()
                try:
                    response = await self._exchange(method, url, body)
                except DeliveryError:
                    # No answer, no headers: the next request must not wait for them.
                    await self._budget.answered()
                    raise
                await self._observe(response)
                if response.is_success:
                    return _json_object(response)
                if response.status_code != 429:
                    raise self._refusal(response)
                retry_after = self._note_rate_limit(response)
                await self._budget.block(retry_after)
                if try_number == 2 or retry_after > self.config.max_rate_limit_wait:
                    raise DeliveryError(
                        f"Discord rate limit: retry after {retry_after:.3f}s",
                        retryable=True,
                        retry_after=retry_after,
                        status=429,
                    )
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _exchange(self, method: str, url: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = await self._client.request(method, url, json=body)
        except self._http_errors as error:
            self._requests.labels(self.name, self.kind, "error").inc()
            reason = redact(str(error) or type(error).__name__, [self._url])
            raise DeliveryError(
                f"cannot reach Discord ({type(error).__name__}): {reason}", retryable=True
            ) from error
        self._requests.labels(self.name, self.kind, str(response.status_code)).inc()
        return response

    async def _wait_for_budget(self) -> None:
        waited = 0.0
        while (wait := await self._budget.take()) > 0:
            if waited + wait > self.config.max_rate_limit_wait:
                raise DeliveryError(
                    f"Discord rate limit: bucket empty for another {wait:.3f}s",
                    retryable=True,
                    retry_after=wait,
                )
            await asyncio.sleep(wait)
            waited += wait
            self._wait_seconds.inc(wait)

    async def _observe(self, response: httpx.Response) -> None:
        headers = response.headers
        try:
            limit = int(headers["X-RateLimit-Limit"])
            remaining = int(headers["X-RateLimit-Remaining"])
            reset_after = float(headers["X-RateLimit-Reset-After"])
        except (KeyError, ValueError):
            await self._budget.answered()
            return
        await self._budget.observe(limit, remaining, reset_after)

    def _note_rate_limit(self, response: httpx.Response) -> float:
        body = _json_object(response)
        try:
            retry_after = float(body.get("retry_after") or response.headers.get("Retry-After", 1))
        except (TypeError, ValueError):
            retry_after = 1.0
        if not math.isfinite(retry_after):
            retry_after = 1.0
        # A nonsensical answer must not park the destination for days.
        retry_after = min(max(retry_after, 0.0), MAX_RETRY_AFTER)
        if response.headers.get("X-RateLimit-Scope") == "shared":
            scope = "shared"
        elif body.get("global") or response.headers.get("X-RateLimit-Global") == "true":
            scope = "global"
        else:
            scope = "route"
        self._rate_limited.labels(self.name, scope).inc()
        logger.warning(
            "Discord destination %s rate limited (%s), retry after %.3fs",
            self.name,
            scope,
            retry_after,
        )
        return retry_after

    def _refusal(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        text = redact(response.text[:ERROR_BODY_LIMIT], [self._url])
        if status >= 500:
            return DeliveryError(
                f"Discord failed with {status}: {text}", retryable=True, status=status
            )
        reasons = {
            400: "Discord refused the message as invalid",
            401: "Discord rejected the webhook token; check webhook_url",
            403: "Discord forbids this webhook from posting; check its channel permissions",
            404: "the Discord webhook or message does not exist (deleted?); check webhook_url",
        }
        reason = reasons.get(status, f"Discord refused the request with {status}")
        # A 400 means we built something Discord refuses: its body names the field, so it is
        # logged as an error for the developers; other refusals are the operator's to fix
        # and reach them through the dispatcher's dead letters.
        level = logging.ERROR if status == 400 else logging.WARNING
        logger.log(level, "Discord destination %s: %s (%d): %s", self.name, reason, status, text)
        return DeliveryError(f"{reason} ({status}): {text}", retryable=False, status=status)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        document = response.json()
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
