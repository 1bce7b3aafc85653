"""Every destination type the configuration accepts, and the factory that builds its notifier.

The list under ``alerts.destinations`` is a union discriminated by ``kind``; its tags start with
``tag:`` so that configuration errors name ``alerts.destinations[1].url`` and not the tag.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from prometheus_client import CollectorRegistry
from pydantic import Discriminator, Tag

from sidecar.notify.base import DestinationConfig, Notifier, NotifierState
from sidecar.notify.discord import DiscordDestination, DiscordNotifier
from sidecar.notify.email import EmailDestination, EmailNotifier
from sidecar.notify.log import LogDestination, LogNotifier

if TYPE_CHECKING:
    from redis.asyncio import Redis


def _destination_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"tag:{kind}"


# Each kind is one line here; a new destination type adds its config class to this union and
# one branch to build_notifier.
Destination = Annotated[
    Annotated[LogDestination, Tag("tag:log")]
    | Annotated[DiscordDestination, Tag("tag:discord")]
    | Annotated[EmailDestination, Tag("tag:email")],
    Discriminator(
        _destination_tag,
        custom_error_type="destination_kind",
        custom_error_message="kind must name a destination type: log, discord or email",
    ),
]


def build_notifier(
    config: DestinationConfig,
    *,
    state: NotifierState,
    registry: CollectorRegistry,
    redis: Redis | None = None,
    key_prefix: str = "sidecar:",
) -> Notifier:
    """Build the notifier of one configured destination.

    ``state`` is the outbox's durable key-value store, ``registry`` receives the notifier's
    metrics and ``redis`` is the shared client when the outbox uses Redis (for limits shared
    by replicas), under ``key_prefix``.
    """
    if isinstance(config, LogDestination):
        return LogNotifier(config)
    if isinstance(config, DiscordDestination):
        return DiscordNotifier(
            config, state=state, registry=registry, redis=redis, key_prefix=key_prefix
        )
    if isinstance(config, EmailDestination):
        return EmailNotifier(config, state=state, registry=registry)
    raise TypeError(f"no notifier for destination kind {type(config).__name__}")
