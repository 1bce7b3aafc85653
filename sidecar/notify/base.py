"""The contract between the dispatcher and every notifier.

The dispatcher hands a notifier one ``Notification`` for one destination and one attempt. The
notifier returns a ``Delivered`` on success or raises ``DeliveryError`` saying whether the
failure is worth retrying, and after how long at the earliest. Notifiers never retry on their
own beyond waiting out a rate limit they were told about in the same attempt.

::

    SidecarError
    └── DeliveryError          retryable or permanent; carries retry_after and a reason
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Protocol

from pydantic import Field

from sidecar.alerts.payload import Notification
from sidecar.errors import SidecarError
from sidecar.fields import Section

DESTINATION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class DestinationConfig(Section):
    """Fields every destination has; each kind subclasses it with ``kind: Literal[...]``."""

    name: Annotated[str, Field(pattern=DESTINATION_NAME)]
    """Unique name of the destination, used in metrics (`destination` label) and logs."""

    send_resolved: bool = True
    """Deliver resolved notifications too, not only firing ones."""


class DeliveryError(SidecarError):
    """A delivery attempt failed.

    ``retryable`` tells the dispatcher whether another attempt may succeed (5xx, 429, network
    errors, SMTP 4xx) or not (400, 401, 403, 404, SMTP 5xx). ``retry_after`` is the earliest
    moment, in seconds from now, for the next attempt when the destination said so.
    ``status`` is the HTTP status or SMTP code, when there was one.
    """

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@dataclass(frozen=True)
class Attempt:
    """What the dispatcher tells a notifier about the delivery it is attempting."""

    delivery_id: str
    """Stable across attempts of the same delivery (use it for idempotency keys)."""

    destination: str
    """The destination's name, as configured."""

    number: int = 1
    """1 for the first attempt."""


@dataclass(frozen=True)
class Delivered:
    """A successful delivery: what the destination returned, for logs and later edits."""

    status: int | None = None
    """HTTP status or SMTP code."""

    message_ids: list[str] = field(default_factory=list)
    """Identifiers the destination assigned (Discord message ids, email Message-IDs)."""


class NotifierState(Protocol):
    """Small durable key-value memory a notifier may keep between deliveries.

    Provided by the outbox backend (SQLite or Redis), so it survives restarts and, with Redis,
    is shared by replicas. Values are JSON text; keys are namespaced by the notifier.
    """

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: float | None = None) -> None: ...


class Notifier(Protocol):
    """Delivers notifications to one configured destination."""

    name: str
    """The destination's name, unique in the configuration."""

    kind: str
    """``log``, ``discord``, ``email``..."""

    send_resolved: bool
    """Whether resolved notifications are delivered at all."""

    async def send(self, notification: Notification, attempt: Attempt) -> Delivered:
        """Deliver, or raise ``DeliveryError``."""
        ...

    async def close(self) -> None:
        """Release connections; called once at shutdown."""
        ...
